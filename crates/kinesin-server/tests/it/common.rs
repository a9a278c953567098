//! Helpers shared by the process tests: a `kinesin server` child process,
//! a native-API client, and waiting for a condition.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kinesin_proto::v1::node_client::NodeClient;
use kinesin_proto::v1::{self as pb};
use tonic::transport::Channel;

/// A port for a node process to bind later, reserved while the returned lock
/// file is open (a `Proc` holds its own). Two things could otherwise take it
/// between this pick and the node's bind, or while a killed node is down:
/// - an outgoing connection: a port-0 pick comes from the kernel's ephemeral
///   range, which every client socket on the host draws from, so the pick is
///   made below that range (and above the fixed ports of bench/, 17450–18701);
/// - another process test (Rust or tests/compat) making the same pick: each
///   port has a lock file in the temp directory, locked (`flock`), and a
///   port whose file another process holds is skipped. The directory is
///   the user's own, so a directory another user made cannot stop the pick.
fn reserve_port() -> (u16, std::fs::File) {
    use rand::Rng;
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    let dir = std::env::temp_dir().join(format!("kinesin-test-ports-{uid}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    // A host whose ephemeral range leaves no room below it gets the kernel's
    // pick (port 0), locked all the same.
    let below = if ephemeral_low > 22_000 {
        20_000..ephemeral_low
    } else {
        0..1
    };
    for _ in 0..1000 {
        let Ok(probe) =
            std::net::TcpListener::bind(("127.0.0.1", rand::rng().random_range(below.clone())))
        else {
            continue;
        };
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
            .unwrap();
        match lock.try_lock() {
            Ok(()) => return (port, lock),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => panic!("cannot lock a port's file: {e}"),
        }
    }
    panic!("no free port in {below:?} in 1000 picks");
}

pub struct Proc {
    pub id: u64,
    pub grpc: String,
    args: Vec<String>,
    child: Option<Child>,
    _ports: Vec<std::fs::File>,
}

impl Proc {
    pub fn new(id: u64, dir: &Path, seed: Option<&str>) -> Proc {
        let ports: Vec<(u16, std::fs::File)> = (0..3).map(|_| reserve_port()).collect();
        let grpc = format!("127.0.0.1:{}", ports[0].0);
        let mut args = vec![
            "server".to_string(),
            "--node-id".into(),
            id.to_string(),
            "--data-dir".into(),
            dir.join(format!("node-{id}")).display().to_string(),
            "--listen-grpc".into(),
            grpc.clone(),
            "--listen-api".into(),
            format!("127.0.0.1:{}", ports[1].0),
            "--listen-admin".into(),
            format!("127.0.0.1:{}", ports[2].0),
            "--replication-factor".into(),
            "3".into(),
            "--insecure-internal".into(),
        ];
        if let Some(seed) = seed {
            args.push("--seeds".into());
            args.push(seed.to_string());
        }
        Proc {
            id,
            grpc,
            args,
            child: None,
            _ports: ports.into_iter().map(|(_, lock)| lock).collect(),
        }
    }

    pub fn spawn(&mut self, dir: &Path) {
        let log = std::fs::File::create(dir.join(format!("node-{}.log", self.id))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kinesin"))
            .args(&self.args)
            .env("KINESIN_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Panics with the end of the node's log if its process has ended (a
    /// port taken by a process outside the tests, say),
    /// so that a wait for the cluster says why it never came.
    pub fn assert_running(&mut self, dir: &Path) {
        let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        else {
            return;
        };
        let log =
            std::fs::read_to_string(dir.join(format!("node-{}.log", self.id))).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        panic!("node {} exited ({status}); its log ends:\n{tail}", self.id);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub async fn client(addr: &str) -> Option<NodeClient<Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1));
    let channel = endpoint.connect().await.ok()?;
    Some(NodeClient::new(channel))
}

pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every record of one shard: sequence number → data.
pub async fn read_all(
    c: &mut NodeClient<Channel>,
    stream: &str,
    shard: &str,
) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut from = pb::IteratorType::TrimHorizon;
    let mut seq = String::new();
    loop {
        let resp = c
            .get_records(pb::GetRecordsRequest {
                stream: stream.into(),
                shard_id: shard.into(),
                from: from as i32,
                sequence_number: seq.clone(),
                timestamp_ms: 0,
                limit: 10_000,
            })
            .await
            .unwrap()
            .into_inner();
        if resp.records.is_empty() {
            return out;
        }
        for r in resp.records {
            out.insert(r.sequence_number, r.data.to_vec());
        }
        from = pb::IteratorType::AtSequenceNumber;
        seq = resp.next_sequence_number;
    }
}
