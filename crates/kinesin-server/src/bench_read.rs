//! `kinesin bench consume` and `kinesin bench e2e`, over the AWS JSON API (so
//! that peers are measured with the same client).
//!
//! - consume: N consumers each read every shard of an existing stream from
//!   TRIM_HORIZON to the tip; records/s and MiB/s per consumer and in total.
//! - e2e: a producer puts records at a fixed rate, each carrying the time it
//!   was due; N consumers follow every shard from LATEST and record, for each
//!   record, the time from due to seen (put → visible to a reader, including
//!   the polling interval). With `--shards 1 --consumers 4` this is the
//!   fan-out read workload.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::bench::{AwsClient, AwsCredentials};
use crate::output::outln;

#[derive(Args, Debug, Clone)]
pub struct ReadArgs {
    /// AWS API addresses (consumer k uses endpoint k mod n).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7450", value_parser = crate::profile::parse_address)]
    endpoints: Vec<String>,
    #[command(flatten)]
    credentials: AwsCredentials,
    #[arg(long, default_value = "bench")]
    stream: String,
    /// Shards of the stream, when e2e creates it.
    #[arg(long, default_value_t = 1)]
    shards: u32,
    /// Concurrent consumers, each reading every shard.
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// e2e: records per second put (PutRecords batches of 10).
    #[arg(long, default_value_t = 200)]
    rate: u64,
    #[arg(long, default_value_t = 1024)]
    record_size: usize,
    /// GetRecords Limit.
    #[arg(long, default_value_t = 10_000)]
    limit: u64,
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    #[arg(long)]
    json: bool,
}

impl ReadArgs {
    fn client(&self, k: usize) -> AwsClient {
        self.credentials
            .client(&self.endpoints[k % self.endpoints.len()])
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

async fn shard_ids(client: &mut AwsClient, stream: &str) -> anyhow::Result<Vec<String>> {
    let r = client
        .call("ListShards", &json!({"StreamName": stream}))
        .await?;
    Ok(r["Shards"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["ShardId"].as_str().map(str::to_string))
        .collect())
}

async fn iterator(
    client: &mut AwsClient,
    stream: &str,
    shard: &str,
    kind: &str,
) -> anyhow::Result<String> {
    let r = client
        .call(
            "GetShardIterator",
            &json!({"StreamName": stream, "ShardId": shard, "ShardIteratorType": kind}),
        )
        .await?;
    r["ShardIterator"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("no iterator for {shard}"))
}

#[derive(Default)]
struct Totals {
    records: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// Reads every shard round-robin until `stop`, or (when `to_tip`) until
/// every shard is caught up. Calls `seen` for each record's data.
async fn follow(
    mut client: AwsClient,
    args: ReadArgs,
    from: &'static str,
    to_tip: bool,
    stop: Arc<AtomicBool>,
    totals: Arc<Totals>,
    seen: impl Fn(&[u8]),
) -> anyhow::Result<()> {
    let shards = shard_ids(&mut client, &args.stream).await?;
    let mut iterators = Vec::new();
    for s in &shards {
        iterators.push(Some(iterator(&mut client, &args.stream, s, from).await?));
    }
    let engine = base64::engine::general_purpose::STANDARD;
    while !stop.load(Ordering::Relaxed) {
        let mut got = 0;
        let mut caught_up = true;
        for it in iterators.iter_mut() {
            let Some(current) = it.clone() else { continue };
            match client
                .call(
                    "GetRecords",
                    &json!({"ShardIterator": current, "Limit": args.limit}),
                )
                .await
            {
                Ok(r) => {
                    for rec in r["Records"].as_array().into_iter().flatten() {
                        let data = engine
                            .decode(rec["Data"].as_str().unwrap_or_default())
                            .unwrap_or_default();
                        totals.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                        seen(&data);
                        got += 1;
                    }
                    if r["MillisBehindLatest"].as_u64().unwrap_or(0) > 0 {
                        caught_up = false;
                    }
                    *it = r["NextShardIterator"].as_str().map(str::to_string);
                }
                Err(_) => {
                    totals.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        totals.records.fetch_add(got, Ordering::Relaxed);
        if got == 0 {
            if to_tip && caught_up {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

fn report(args: &ReadArgs, result: Value) -> anyhow::Result<()> {
    if args.json {
        outln!("{result}");
    } else {
        outln!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        );
    }
    Ok(())
}

pub async fn consume(args: ReadArgs) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut consumers = Vec::new();
    let mut all_totals = Vec::new();
    for k in 0..args.consumers {
        let totals = Arc::new(Totals::default());
        all_totals.push(totals.clone());
        let (client, a, stop) = (args.client(k), args.clone(), stop.clone());
        consumers.push(tokio::spawn(async move {
            let t0 = Instant::now();
            follow(client, a, "TRIM_HORIZON", true, stop, totals, |_| {}).await?;
            Ok::<_, anyhow::Error>(t0.elapsed().as_secs_f64())
        }));
    }
    let limit = tokio::spawn({
        let stop = stop.clone();
        let secs = args.duration_secs;
        async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            stop.store(true, Ordering::Relaxed);
        }
    });
    let mut per_consumer = Vec::new();
    for (c, totals) in consumers.into_iter().zip(&all_totals) {
        let secs = c.await??;
        let n = totals.records.load(Ordering::Relaxed);
        per_consumer.push(json!({
            "records": n, "seconds": secs, "records_per_sec": n as f64 / secs,
            "mib_per_sec": totals.bytes.load(Ordering::Relaxed) as f64 / secs / 1048576.0,
            "errors": totals.errors.load(Ordering::Relaxed),
        }));
    }
    limit.abort();
    let elapsed = started.elapsed().as_secs_f64();
    let records: u64 = all_totals
        .iter()
        .map(|t| t.records.load(Ordering::Relaxed))
        .sum();
    let bytes: u64 = all_totals
        .iter()
        .map(|t| t.bytes.load(Ordering::Relaxed))
        .sum();
    report(
        &args,
        json!({"workload": "consume", "consumers": per_consumer, "records": records, "seconds": elapsed,
            "records_per_sec": records as f64 / elapsed, "mib_per_sec": bytes as f64 / elapsed / 1048576.0}),
    )
}

pub async fn e2e(args: ReadArgs) -> anyhow::Result<()> {
    let mut admin = args.client(0);
    if let Err(e) = admin
        .call(
            "CreateStream",
            &json!({"StreamName": args.stream, "ShardCount": args.shards}),
        )
        .await
    {
        anyhow::ensure!(e.to_string().contains("ResourceInUseException"), e);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = admin
            .call("DescribeStreamSummary", &json!({"StreamName": args.stream}))
            .await?;
        if d["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE" {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "stream did not become ACTIVE");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        600_000_000,
        3,
    )?));
    let stop = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for k in 0..args.consumers {
        let totals = Arc::new(Totals::default());
        let (client, a, stop, h) = (
            args.client(k),
            args.clone(),
            stop.clone(),
            histogram.clone(),
        );
        consumers.push(tokio::spawn(async move {
            follow(
                client,
                a,
                "LATEST",
                false,
                stop,
                totals.clone(),
                move |data| {
                    let text = String::from_utf8_lossy(&data[..data.len().min(24)]).into_owned();
                    if let Some(due) = text
                        .split_whitespace()
                        .next()
                        .and_then(|t| t.parse::<u64>().ok())
                    {
                        h.lock()
                            .expect("histogram lock")
                            .saturating_record(now_micros().saturating_sub(due).max(1));
                    }
                },
            )
            .await?;
            Ok::<_, anyhow::Error>(totals)
        }));
    }
    // Consumers hold LATEST iterators before the first put.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut producer = args.client(0);
    let batch = 10u64;
    let interval = Duration::from_secs_f64(batch as f64 / args.rate.max(1) as f64);
    let (mut put, mut failed) = (0u64, 0u64);
    let started = Instant::now();
    let mut due = Instant::now();
    while started.elapsed() < Duration::from_secs(args.duration_secs) {
        tokio::time::sleep_until(due.into()).await;
        let wall_due = now_micros().saturating_sub(due.elapsed().as_micros() as u64);
        let records: Vec<Value> = (0..batch)
            .map(|i| {
                let mut data = format!("{wall_due} ").into_bytes();
                data.resize(args.record_size.max(data.len()), b'x');
                json!({"PartitionKey": format!("k{}", put + i),
                    "Data": base64::engine::general_purpose::STANDARD.encode(&data)})
            })
            .collect();
        match producer
            .call(
                "PutRecords",
                &json!({"StreamName": args.stream, "Records": records}),
            )
            .await
        {
            Ok(r) => {
                let f = r["FailedRecordCount"].as_u64().unwrap_or(0);
                failed += f;
                put += batch - f;
            }
            Err(_) => failed += batch,
        }
        due += interval;
    }
    // Let the consumers see the last records.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for c in consumers {
        seen.push(c.await??.records.load(Ordering::Relaxed));
    }
    let h = histogram.lock().expect("histogram lock");
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    report(
        &args,
        json!({"workload": "e2e", "put": put, "put_failed": failed, "rate": args.rate, "shards": args.shards,
            "consumers": args.consumers, "seen_per_consumer": seen, "record_size": args.record_size,
            "latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0}}),
    )
}
