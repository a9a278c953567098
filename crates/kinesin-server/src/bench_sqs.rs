//! `kinesin bench sqs`: SQS load over the AWS JSON API (awsJson1_0), so
//! that any SQS-compatible endpoint (moto, ElasticMQ, AWS) is measured with
//! the same client. Four phases on one queue: sends (SendMessageBatch,
//! closed loop), receive + delete (ReceiveMessage of 10 and
//! DeleteMessageBatch until the queue is drained), send → receive
//! latency (one sender at a fixed rate, the clients long-polling), and
//! sends with receives at once (half the clients each, closed loop: the
//! rate at which messages pass through the queue).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::bench::{AwsClient, AwsCredentials};
use crate::output::outln;

#[derive(Args, Debug)]
pub struct SqsArgs {
    /// AWS API addresses (round robin per client).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7450", value_parser = crate::profile::parse_address)]
    endpoints: Vec<String>,
    #[command(flatten)]
    credentials: AwsCredentials,
    #[arg(long, default_value = "bench")]
    queue: String,
    /// Partitions of the queue, if the run creates it.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    #[arg(long, default_value_t = 1024)]
    message_size: usize,
    /// Messages per SendMessageBatch (1 to 10).
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Length of the send phase and of the latency phase.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Messages per second of the latency phase's sender.
    #[arg(long, default_value_t = 100)]
    latency_rate: u64,
    /// Messages per second the senders of the phase that sends and
    /// receives at once send in all (0: as fast as they can). A rate the
    /// receivers keep up with is one the queue sustains.
    #[arg(long, default_value_t = 0)]
    mixed_rate: u64,
    #[arg(long)]
    json: bool,
}

fn histogram() -> Arc<Mutex<Histogram<u64>>> {
    Arc::new(Mutex::new(
        Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
    ))
}

fn ms(h: &Arc<Mutex<Histogram<u64>>>, q: f64) -> f64 {
    h.lock().expect("histogram lock").value_at_quantile(q) as f64 / 1000.0
}

fn record(h: &Arc<Mutex<Histogram<u64>>>, d: Duration) {
    h.lock()
        .expect("histogram lock")
        .saturating_record(d.as_micros().max(1) as u64);
}

async fn receive(client: &mut AwsClient, url: &str, wait: u32) -> anyhow::Result<Vec<Value>> {
    let out = client
        .call(
            "ReceiveMessage",
            &json!({ "QueueUrl": url, "MaxNumberOfMessages": 10, "WaitTimeSeconds": wait }),
        )
        .await?;
    Ok(out["Messages"].as_array().cloned().unwrap_or_default())
}

/// What a phase's clients count: messages done, failures, and the time
/// each send batch, or each receive + delete of a non-empty receive, took.
#[derive(Clone)]
struct Counts {
    done: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    latency: Arc<Mutex<Histogram<u64>>>,
}

impl Counts {
    fn new(errors: &Arc<AtomicU64>) -> Counts {
        Counts {
            done: Arc::new(AtomicU64::new(0)),
            errors: errors.clone(),
            latency: histogram(),
        }
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

/// Sends batches of `batch` copies of `body` until `until`: closed loop,
/// or with `pace` (first batch's time, time between batches) on that
/// schedule, at once when behind it.
async fn send_until(
    mut client: AwsClient,
    url: String,
    body: String,
    batch: usize,
    until: Instant,
    pace: Option<(Instant, Duration)>,
    counts: Counts,
) {
    let mut due = pace.map(|(first, _)| first);
    while Instant::now() < until {
        if let (Some(at), Some((_, every))) = (due.as_mut(), pace) {
            tokio::time::sleep_until((*at).into()).await;
            *at += every;
            if Instant::now() >= until {
                break;
            }
        }
        let entries: Vec<Value> = (0..batch)
            .map(|i| json!({ "Id": i.to_string(), "MessageBody": body }))
            .collect();
        let t = Instant::now();
        match client
            .call(
                "SendMessageBatch",
                &json!({ "QueueUrl": url, "Entries": entries }),
            )
            .await
        {
            Ok(out) => {
                let ok = out["Successful"].as_array().map_or(0, Vec::len) as u64;
                counts.done.fetch_add(ok, Ordering::Relaxed);
                counts
                    .errors
                    .fetch_add(batch as u64 - ok, Ordering::Relaxed);
                record(&counts.latency, t.elapsed());
            }
            Err(_) => {
                counts.errors.fetch_add(batch as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Receives and deletes until `end`, counting the messages deleted before
/// it; one that `drain`s also stops once two receives in a row find
/// nothing.
async fn consume(mut client: AwsClient, url: String, end: Instant, drain: bool, counts: Counts) {
    let mut empty = 0;
    while empty < 2 && Instant::now() < end {
        let t = Instant::now();
        match receive(&mut client, &url, 1).await {
            Ok(m) if m.is_empty() => empty += u32::from(drain),
            Ok(m) => {
                empty = 0;
                if delete(&mut client, &url, &m).await.is_err() {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                } else if Instant::now() < end {
                    counts.done.fetch_add(m.len() as u64, Ordering::Relaxed);
                    record(&counts.latency, t.elapsed());
                }
            }
            Err(_) => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn delete(client: &mut AwsClient, url: &str, messages: &[Value]) -> anyhow::Result<()> {
    let entries: Vec<Value> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| json!({ "Id": i.to_string(), "ReceiptHandle": m["ReceiptHandle"] }))
        .collect();
    client
        .call(
            "DeleteMessageBatch",
            &json!({ "QueueUrl": url, "Entries": entries }),
        )
        .await?;
    Ok(())
}

pub async fn sqs(args: SqsArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=10).contains(&args.batch), "--batch is 1 to 10");
    let client_for = |i: usize| {
        args.credentials
            .client(&args.endpoints[i % args.endpoints.len()])
            .sqs()
    };
    let mut first = client_for(0);
    let url = first
        .call(
            "CreateQueue",
            &json!({
                "QueueName": args.queue,
                "tags": { kinesin_queue::PARTITIONS_TAG: args.partitions.to_string() },
            }),
        )
        .await?["QueueUrl"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("CreateQueue answered without a URL"))?
        .to_string();
    first
        .call("PurgeQueue", &json!({ "QueueUrl": url }))
        .await
        .ok();

    // Sends.
    let errors = Arc::new(AtomicU64::new(0));
    let body = "x".repeat(args.message_size);
    let sends = Counts::new(&errors);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_secs);
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        tasks.push(tokio::spawn(send_until(
            client_for(c),
            url.clone(),
            body.clone(),
            args.batch,
            deadline,
            None,
            sends.clone(),
        )));
    }
    for t in tasks.drain(..) {
        t.await?;
    }
    let send_secs = started.elapsed().as_secs_f64();
    let sent_n = sends.done();

    // Receive + delete until drained.
    let receives = Counts::new(&errors);
    let started = Instant::now();
    let give_up = started + Duration::from_secs(args.duration_secs * 6 + 30);
    for c in 0..args.clients {
        tasks.push(tokio::spawn(consume(
            client_for(c),
            url.clone(),
            give_up,
            true,
            receives.clone(),
        )));
    }
    for t in tasks.drain(..) {
        t.await?;
    }
    // The last empty polls (two per client of up to 1 s) are not work.
    let receive_secs = (started.elapsed().as_secs_f64() - 2.0).max(0.001);
    let received_n = receives.done();

    // Latency: long polls waiting, one sender at a fixed rate; each body
    // is the send time in µs since `origin`.
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let latency = histogram();
    for c in 0..args.clients {
        let mut client = client_for(c);
        let (stop, latency, url) = (stop.clone(), latency.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(messages) = receive(&mut client, &url, 2).await else {
                    continue;
                };
                let now = origin.elapsed();
                for m in &messages {
                    if let Some(us) = m["Body"].as_str().and_then(|b| b.parse::<u64>().ok()) {
                        record(&latency, now.saturating_sub(Duration::from_micros(us)));
                    }
                }
                if !messages.is_empty() {
                    let _ = delete(&mut client, &url, &messages).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut sender = client_for(args.clients);
    let every = Duration::from_secs_f64(1.0 / args.latency_rate.max(1) as f64);
    let end = Instant::now() + Duration::from_secs(args.duration_secs);
    let mut due = Instant::now();
    while Instant::now() < end {
        tokio::time::sleep_until(due.into()).await;
        let body = origin.elapsed().as_micros().to_string();
        let _ = sender
            .call(
                "SendMessage",
                &json!({ "QueueUrl": url, "MessageBody": body }),
            )
            .await;
        due += every;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks.drain(..) {
        t.await?;
    }

    // Sends and receives at once: half the clients each, for as long as
    // the send phase. The receivers count what they delete in that time.
    let half = (args.clients / 2).max(1);
    let (mixed_sends, mixed_receives) = (Counts::new(&errors), Counts::new(&errors));
    let started = Instant::now();
    let until = started + Duration::from_secs(args.duration_secs);
    // Each sender's share of the rate, their batches staggered.
    let every = (args.mixed_rate > 0)
        .then(|| Duration::from_secs_f64((args.batch * half) as f64 / args.mixed_rate as f64));
    for c in 0..half {
        let pace = every.map(|every| (started + every * c as u32 / half as u32, every));
        tasks.push(tokio::spawn(consume(
            client_for(c),
            url.clone(),
            until,
            false,
            mixed_receives.clone(),
        )));
        tasks.push(tokio::spawn(send_until(
            client_for(half + c),
            url.clone(),
            body.clone(),
            args.batch,
            until,
            pace,
            mixed_sends.clone(),
        )));
    }
    for t in tasks.drain(..) {
        t.await?;
    }
    let mixed_secs = args.duration_secs as f64;

    let result = json!({
        "message_size": args.message_size,
        "batch": args.batch,
        "clients": args.clients,
        "sent": sent_n,
        "send_messages_per_sec": sent_n as f64 / send_secs,
        "send_batch_p50_ms": ms(&sends.latency, 0.5),
        "send_batch_p99_ms": ms(&sends.latency, 0.99),
        "received_and_deleted": received_n,
        "receive_delete_messages_per_sec": received_n as f64 / receive_secs,
        "receive_delete_loop_p50_ms": ms(&receives.latency, 0.5),
        "receive_delete_loop_p99_ms": ms(&receives.latency, 0.99),
        "errors": errors.load(Ordering::Relaxed),
        "send_to_receive_p50_ms": ms(&latency, 0.5),
        "send_to_receive_p99_ms": ms(&latency, 0.99),
        "latency_samples": latency.lock().expect("histogram lock").len(),
        "mixed_rate": args.mixed_rate,
        "mixed_send_messages_per_sec": mixed_sends.done() as f64 / mixed_secs,
        "mixed_receive_delete_messages_per_sec": mixed_receives.done() as f64 / mixed_secs,
    });
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        outln!(
            "send: {:.0} msg/s (batch p50 {:.2} ms, p99 {:.2} ms); receive+delete: {:.0} msg/s (loop p50 {:.2} ms, p99 {:.2} ms); send→receive p50 {:.2} ms, p99 {:.2} ms; at once: send {:.0} msg/s, receive+delete {:.0} msg/s; errors {}",
            result["send_messages_per_sec"].as_f64().unwrap_or(0.0),
            result["send_batch_p50_ms"].as_f64().unwrap_or(0.0),
            result["send_batch_p99_ms"].as_f64().unwrap_or(0.0),
            result["receive_delete_messages_per_sec"].as_f64().unwrap_or(0.0),
            result["receive_delete_loop_p50_ms"].as_f64().unwrap_or(0.0),
            result["receive_delete_loop_p99_ms"].as_f64().unwrap_or(0.0),
            result["send_to_receive_p50_ms"].as_f64().unwrap_or(0.0),
            result["send_to_receive_p99_ms"].as_f64().unwrap_or(0.0),
            result["mixed_send_messages_per_sec"].as_f64().unwrap_or(0.0),
            result["mixed_receive_delete_messages_per_sec"].as_f64().unwrap_or(0.0),
            result["errors"],
        );
    }
    Ok(())
}
