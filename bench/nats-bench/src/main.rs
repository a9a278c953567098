//! The NATS JetStream side of `bench/compare`: publishes to a replicated
//! JetStream stream with the same knobs as `kinesin bench produce` (record
//! size, batch, concurrency, open-loop rate) and prints the same JSON
//! report, so the comparison table can read both.
//!
//! A batch is `batch` asynchronous publishes whose acks are awaited together
//! (the counterpart of one PutRecords call); with `--rate`, batches start at
//! due times and latency is measured from the due time, so a server that
//! falls behind is charged for the wait (no coordinated omission).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::time::Instant;

#[derive(Parser)]
#[command(
    name = "kinesin-nats-bench",
    about = "Publish load against NATS JetStream"
)]
struct Args {
    /// NATS servers (comma-separated); worker i connects to server i mod n.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:4222")]
    servers: Vec<String>,
    /// The JetStream stream (created if missing) with subjects `<stream>.>`.
    #[arg(long, default_value = "bench")]
    stream: String,
    /// Stream replicas (R3 = the counterpart of a 3-node Kinesin).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    #[arg(long, default_value_t = 1024)]
    record_size: usize,
    /// Publishes per batch (acks awaited together).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Concurrent publishers.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Total batches per second (open loop); unset = as fast as acks come.
    #[arg(long)]
    rate: Option<f64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Totals {
    records: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

async fn worker(
    id: usize,
    args: Arc<Args>,
    start: Instant,
    totals: Arc<Totals>,
) -> anyhow::Result<Histogram<u64>> {
    let server = &args.servers[id % args.servers.len()];
    let client = async_nats::connect(server.as_str())
        .await
        .with_context(|| format!("cannot connect to {server}"))?;
    let js = jetstream::context::ContextBuilder::new()
        .max_ack_inflight(args.batch.max(1) * 2)
        .build(client);
    let subject = format!("{}.{id}", args.stream);
    let payload = Bytes::from(vec![b'x'; args.record_size]);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(args.concurrency as f64 / r));
    let end = start + Duration::from_secs(args.duration_secs);
    let mut n = 0u32;
    loop {
        let began = match interval {
            Some(every) => {
                let due = start + every * n;
                tokio::time::sleep_until(due).await;
                due
            }
            None => Instant::now(),
        };
        if began >= end {
            break;
        }
        n += 1;
        let mut acks = Vec::with_capacity(args.batch);
        let mut failed = 0;
        for _ in 0..args.batch {
            match js.publish(subject.clone(), payload.clone()).await {
                Ok(ack) => acks.push(ack),
                Err(_) => failed += 1,
            }
        }
        for ack in acks {
            if ack.await.is_err() {
                failed += 1;
            }
        }
        let ok = (args.batch - failed) as u64;
        totals.records.fetch_add(ok, Ordering::Relaxed);
        totals
            .bytes
            .fetch_add(ok * args.record_size as u64, Ordering::Relaxed);
        totals.errors.fetch_add(failed as u64, Ordering::Relaxed);
        if failed == 0 {
            latency.saturating_record(began.elapsed().as_micros() as u64);
        }
    }
    Ok(latency)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let client = async_nats::connect(args.servers[0].as_str()).await?;
    let js = jetstream::new(client);
    js.get_or_create_stream(stream::Config {
        name: args.stream.clone(),
        subjects: vec![format!("{}.>", args.stream)],
        num_replicas: args.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("cannot create the JetStream stream")?;

    let totals = Arc::new(Totals::default());
    let start = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|i| tokio::spawn(worker(i, args.clone(), start, totals.clone())))
        .collect();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    for w in workers {
        latency.add(w.await??)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let records = totals.records.load(Ordering::Relaxed);
    let bytes = totals.bytes.load(Ordering::Relaxed);
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let report = serde_json::json!({
        "target": "nats-jetstream",
        "records": records,
        "elapsed_secs": elapsed,
        "records_per_sec": records as f64 / elapsed,
        "mib_per_sec": bytes as f64 / elapsed / 1_048_576.0,
        "errors": totals.errors.load(Ordering::Relaxed),
        "batch_latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999),
            "max": latency.max() as f64 / 1000.0},
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{records} records in {elapsed:.1}s: {:.0} records/s, {:.1} MiB/s, {} errors; batch latency p50 {:.2} ms, p99 {:.2} ms",
            report["records_per_sec"].as_f64().unwrap_or(0.0),
            report["mib_per_sec"].as_f64().unwrap_or(0.0),
            report["errors"],
            ms(0.5),
            ms(0.99)
        );
    }
    Ok(())
}
