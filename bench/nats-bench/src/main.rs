//! The NATS JetStream side of `bench/compare`, with the same knobs and JSON
//! reports as `kinesin bench produce` and `kinesin bench e2e`, so the
//! comparison table can read both.
//!
//! - produce: a batch is `batch` asynchronous publishes whose acks are
//!   awaited together (the counterpart of one PutRecords call); with
//!   `--rate`, batches start at due times and latency is measured from the
//!   due time, so a server that falls behind is charged for the wait (no
//!   coordinated omission).
//! - e2e: one producer publishes `--rate` messages per second in batches of
//!   10 (acks awaited together, as PutRecords of 10), each carrying the time
//!   it was due, spread over `--subjects` subjects; `--consumers` ordered
//!   pull consumers each read the whole stream from new messages on and
//!   record due → seen. With one subject and four consumers this is the
//!   fan-out workload.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::StreamExt;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    Produce,
    E2e,
}

#[derive(Parser)]
#[command(
    name = "kinesin-nats-bench",
    about = "Publish load and end-to-end latency against NATS JetStream"
)]
struct Args {
    #[arg(long, value_enum, default_value = "produce")]
    workload: Workload,
    /// NATS servers (comma-separated); produce worker i and e2e reader i
    /// connect to server i mod n, the e2e producer to the first.
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
    /// produce: total batches per second (open loop; unset = as fast as
    /// acks come). e2e: messages per second (default 200).
    #[arg(long)]
    rate: Option<f64>,
    /// e2e: readers, each reading every message.
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// e2e: subjects the messages are spread over (the counterpart of shards).
    #[arg(long, default_value_t = 1)]
    subjects: usize,
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
                // Workers are spread over the interval, not due together.
                let due = start + every * n + every.mul_f64(id as f64 / args.concurrency as f64);
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
    match args.workload {
        Workload::Produce => produce(args).await,
        Workload::E2e => e2e(args, js).await,
    }
}

async fn produce(args: Arc<Args>) -> anyhow::Result<()> {
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
    let ms = |q: f64| quantile_ms(&latency, q);
    let report = serde_json::json!({
        "target": "nats-jetstream",
        "records": records,
        "elapsed_secs": elapsed,
        "records_per_sec": records as f64 / elapsed,
        "mib_per_sec": bytes as f64 / elapsed / 1_048_576.0,
        "errors": totals.errors.load(Ordering::Relaxed),
        "batch_latency_ms": percentiles_ms(&latency),
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

/// A histogram of microseconds, in milliseconds at quantile `q`.
fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// The report's latency block, the same keys as `kinesin bench`'s.
fn percentiles_ms(h: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({"p50": quantile_ms(h, 0.5), "p90": quantile_ms(h, 0.9),
        "p99": quantile_ms(h, 0.99), "p999": quantile_ms(h, 0.999), "max": h.max() as f64 / 1000.0})
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One reader: an ordered pull consumer from new messages on, recording
/// due → seen for each message until `stop`. Signals `ready` once its
/// consumer exists, so no message is published before every reader listens.
async fn read(
    server: String,
    name: String,
    histogram: Arc<Mutex<Histogram<u64>>>,
    ready: tokio::sync::mpsc::Sender<()>,
    seen: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let client = async_nats::connect(server.as_str())
        .await
        .with_context(|| format!("cannot connect to {server}"))?;
    let stream = jetstream::new(client).get_stream(&name).await?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .context("cannot create a consumer")?;
    let mut messages = consumer.messages().await?;
    ready.send(()).await?;
    loop {
        let message = tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            m = messages.next() => match m {
                Some(m) => m?,
                None => return Ok(()),
            },
        };
        let head = &message.payload[..message.payload.len().min(24)];
        if let Some(due) = std::str::from_utf8(head)
            .ok()
            .and_then(|t| t.split_whitespace().next())
            .and_then(|t| t.parse::<u64>().ok())
        {
            histogram
                .lock()
                .expect("histogram lock")
                .saturating_record(now_micros().saturating_sub(due).max(1));
        }
        seen.fetch_add(1, Ordering::Relaxed);
    }
}

async fn e2e(args: Arc<Args>, js: jetstream::Context) -> anyhow::Result<()> {
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        600_000_000,
        3,
    )?));
    let (stop_tx, stop) = watch::channel(false);
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel(args.consumers.max(1));
    let mut readers = Vec::new();
    let mut seen = Vec::new();
    for k in 0..args.consumers {
        let count = Arc::new(AtomicU64::new(0));
        seen.push(count.clone());
        readers.push(tokio::spawn(read(
            args.servers[k % args.servers.len()].clone(),
            args.stream.clone(),
            histogram.clone(),
            ready_tx.clone(),
            count,
            stop.clone(),
        )));
    }
    for _ in 0..args.consumers {
        tokio::time::timeout(Duration::from_secs(30), ready.recv())
            .await
            .context("the consumers were not created within 30 s")?;
    }
    let batch = 10u64;
    let rate = args.rate.unwrap_or(200.0).max(1.0);
    let interval = Duration::from_secs_f64(batch as f64 / rate);
    let subjects = args.subjects.max(1) as u64;
    let (mut put, mut failed, mut sent) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    let mut due = started;
    while started.elapsed() < Duration::from_secs(args.duration_secs) {
        tokio::time::sleep_until(due).await;
        let wall_due = now_micros().saturating_sub(due.elapsed().as_micros() as u64);
        let mut acks = Vec::new();
        for i in 0..batch {
            let mut data = format!("{wall_due} ").into_bytes();
            data.resize(args.record_size.max(data.len()), b'x');
            let subject = format!("{}.{}", args.stream, (sent + i) % subjects);
            match js.publish(subject, data.into()).await {
                Ok(ack) => acks.push(ack),
                Err(_) => failed += 1,
            }
        }
        for ack in acks {
            match ack.await {
                Ok(_) => put += 1,
                Err(_) => failed += 1,
            }
        }
        sent += batch;
        due += interval;
    }
    // Wait (bounded) until every reader has seen every acknowledged message.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && seen.iter().any(|s| s.load(Ordering::Relaxed) < put) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(true)?;
    for r in readers {
        r.await??;
    }
    let h = histogram.lock().expect("histogram lock");
    let ms = |q: f64| quantile_ms(&h, q);
    let seen: Vec<u64> = seen.iter().map(|s| s.load(Ordering::Relaxed)).collect();
    let report = serde_json::json!({
        "target": "nats-jetstream", "workload": "e2e", "put": put, "put_failed": failed,
        "rate": rate, "subjects": subjects, "consumers": args.consumers,
        "seen_per_consumer": seen, "record_size": args.record_size,
        "latency_ms": percentiles_ms(&h),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{put} put ({failed} failed), seen per consumer {seen:?}; put -> seen p50 {:.2} ms, p99 {:.2} ms",
            ms(0.5),
            ms(0.99)
        );
    }
    Ok(())
}
