//! Latency and jitter between nodes. This kernel has no netem, so each node's
//! gRPC port gets a TCP proxy on the host's bridge address, the node
//! advertises the proxy, and every byte between nodes passes through one.
//! While a delay is set, each chunk is held until `base + random(0..=jitter)`
//! after it arrived, never before the chunk ahead of it (TCP keeps order).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The delay every proxy applies now (0/0 = none).
#[derive(Default)]
pub struct Delay {
    base_ms: AtomicU64,
    jitter_ms: AtomicU64,
}

impl Delay {
    pub fn set(&self, base_ms: u64, jitter_ms: u64) {
        self.base_ms.store(base_ms, Ordering::Relaxed);
        self.jitter_ms.store(jitter_ms, Ordering::Relaxed);
    }

    fn draw(&self) -> Duration {
        let base = self.base_ms.load(Ordering::Relaxed);
        let jitter = self.jitter_ms.load(Ordering::Relaxed);
        let extra = if jitter == 0 {
            0
        } else {
            rand::rng().random_range(0..=jitter)
        };
        Duration::from_millis(base + extra)
    }
}

/// The proxies of one run; dropping it stops them and their connections.
pub struct Proxies {
    pub delay: Arc<Delay>,
    tasks: Vec<JoinHandle<()>>,
}

impl Proxies {
    pub fn new() -> Proxies {
        Proxies {
            delay: Arc::new(Delay::default()),
            tasks: Vec::new(),
        }
    }

    /// Listens on `listen` and forwards every connection to `target`.
    pub async fn add(&mut self, listen: SocketAddr, target: SocketAddr) -> anyhow::Result<()> {
        let listener = TcpListener::bind(listen).await?;
        let delay = self.delay.clone();
        self.tasks.push(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                connections.spawn(forward(inbound, target, delay.clone()));
            }
        }));
        Ok(())
    }
}

impl Drop for Proxies {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn forward(inbound: TcpStream, target: SocketAddr, delay: Arc<Delay>) {
    let Ok(Ok(outbound)) =
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target)).await
    else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    // When either direction ends, the whole connection ends.
    tokio::select! {
        _ = pump(in_read, out_write, delay.clone()) => {}
        _ = pump(out_read, in_write, delay) => {}
    }
}

/// Copies one direction, holding each chunk for the delay drawn for it.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<Delay>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut last_due = Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    last_due = last_due.max(Instant::now() + delay.draw());
                    if tx.send((last_due, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
