//! `kinesin bench produce`: load through the native gRPC API. Closed loop
//! (each worker sends its next batch when the previous one is answered) or,
//! with `--rate`, open loop: batches are due on a fixed schedule and latency
//! is measured from when a batch was due, so a slow server cannot hide its
//! queueing (no coordinated omission).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use kinesin_proto::v1::node_client::NodeClient;
use kinesin_proto::v1::{self as pb};
use tonic::transport::Endpoint;

#[derive(Args, Debug)]
pub struct ProduceArgs {
    /// gRPC addresses of the nodes to send to (round robin per worker).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7451")]
    endpoints: Vec<String>,
    #[arg(long, default_value = "bench")]
    stream: String,
    /// Create the stream with this many shards if it does not exist.
    #[arg(long, default_value_t = 4)]
    shards: u32,
    #[arg(long, default_value_t = 1024)]
    record_size: usize,
    /// Records per PutRecords call.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Target records per second (open loop); 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    let channels = args
        .endpoints
        .iter()
        .map(|e| {
            Ok(Endpoint::from_shared(format!("http://{e}"))?
                .tcp_nodelay(true)
                .connect_lazy())
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut admin = NodeClient::new(channels[0].clone());
    let created = admin
        .create_stream(pb::CreateStreamRequest {
            stream: args.stream.clone(),
            shard_count: args.shards,
            replication_factor: 0,
            max_record_bytes: 0,
        })
        .await;
    if let Err(s) = created {
        if s.code() != tonic::Code::AlreadyExists {
            anyhow::bail!("cannot create stream: {}", s.message());
        }
    }
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let records = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_secs);
    // Per-worker interval between batches in open-loop mode.
    let interval = (args.rate > 0).then(|| {
        Duration::from_secs_f64(args.batch as f64 * args.concurrency as f64 / args.rate as f64)
    });
    let payload = vec![b'x'; args.record_size];
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let mut client = NodeClient::new(channels[w % channels.len()].clone())
            .max_decoding_message_size(kinesin_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(kinesin_proto::MAX_MESSAGE_BYTES);
        let (histogram, records, errors) = (histogram.clone(), records.clone(), errors.clone());
        let (stream, payload, batch) = (args.stream.clone(), payload.clone(), args.batch);
        workers.push(tokio::spawn(async move {
            let mut seq = 0u64;
            let mut due =
                Instant::now() + interval.map_or(Duration::ZERO, |i| i.mul_f64(w as f64 / 32.0));
            while Instant::now() < deadline {
                if interval.is_some() {
                    tokio::time::sleep_until(due.into()).await;
                } else {
                    due = Instant::now();
                }
                let req = pb::PutRecordsRequest {
                    stream: stream.clone(),
                    records: (0..batch)
                        .map(|_| {
                            seq += 1;
                            pb::Record {
                                partition_key: format!("w{w}-{seq}"),
                                data: payload.clone().into(),
                                explicit_hash_key: String::new(),
                            }
                        })
                        .collect(),
                };
                match client.put_records(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        records.fetch_add(
                            (r.results.len() - r.failed_count as usize) as u64,
                            Ordering::Relaxed,
                        );
                        errors.fetch_add(u64::from(r.failed_count), Ordering::Relaxed);
                        let micros = due.elapsed().as_micros().max(1) as u64;
                        histogram
                            .lock()
                            .expect("histogram lock")
                            .saturating_record(micros);
                    }
                    Err(_) => {
                        errors.fetch_add(batch as u64, Ordering::Relaxed);
                    }
                }
                if let Some(i) = interval {
                    due += i;
                }
            }
        }));
    }
    let progress = {
        let records = records.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = records.load(Ordering::Relaxed);
                eprint!("\r{:>8} records/s   ", now - last);
                last = now;
            }
        })
    };
    for w in workers {
        w.await?;
    }
    progress.abort();
    eprintln!();
    let elapsed = started.elapsed().as_secs_f64();
    let h = histogram.lock().expect("histogram lock");
    let n = records.load(Ordering::Relaxed);
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let result = serde_json::json!({
        "records": n,
        "errors": errors.load(Ordering::Relaxed),
        "seconds": elapsed,
        "records_per_sec": n as f64 / elapsed,
        "mib_per_sec": n as f64 * args.record_size as f64 / elapsed / 1048576.0,
        "batch_latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0},
        "record_size": args.record_size, "batch": args.batch, "concurrency": args.concurrency, "target_rate": args.rate,
    });
    if args.json {
        println!("{result}");
    } else {
        println!(
            "{n} records in {elapsed:.1}s: {:.0} records/s, {:.1} MiB/s, {} errors; batch latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            result["records_per_sec"].as_f64().unwrap_or(0.0),
            result["mib_per_sec"].as_f64().unwrap_or(0.0),
            result["errors"],
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1000.0
        );
    }
    Ok(())
}
