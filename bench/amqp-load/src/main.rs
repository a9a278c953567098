//! `amqp-load URI[,URI…] [CLIENTS] [SECONDS] [RATE]`: the four phases of
//! `kinesin bench sqs`, against a RabbitMQ quorum queue, printing one JSON
//! object.
//!
//! - send: CLIENTS publishers (round robin over the URIs), each publishing
//!   batches of 10 persistent 1 KiB messages with publisher confirms and
//!   waiting for the batch's confirms, closed loop for SECONDS;
//! - receive + ack: CLIENTS consumers (prefetch 10, manual acks, one
//!   `multiple` ack per 10 deliveries) until every sent message is acked;
//! - latency: CLIENTS consumers waiting while one publisher sends 100
//!   confirmed messages a second for SECONDS, each carrying its send time;
//! - at once: half the CLIENTS publish as in the send phase (as fast as
//!   they can, or RATE messages a second in all) while the other half
//!   consume as above, for SECONDS (the rate at which messages pass
//!   through the queue).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

const QUEUE: &str = "bench";
const SIZE: usize = 1024;
const BATCH: usize = 10;

type Hist = Arc<Mutex<Histogram<u64>>>;
/// Called by a consumer with each body it receives.
type Seen = Arc<dyn Fn(&[u8]) + Send + Sync>;
/// Tells consumers when to stop.
type Done = Arc<dyn Fn() -> bool + Send + Sync>;

fn histogram() -> Hist {
    Arc::new(Mutex::new(
        Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ))
}

fn ms(h: &Hist, q: f64) -> f64 {
    h.lock().unwrap().value_at_quantile(q) as f64 / 1000.0
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

async fn channel(uri: &str) -> anyhow::Result<(Connection, Channel)> {
    let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch))
}

fn body(stamp: u64) -> Vec<u8> {
    let mut b = stamp.to_be_bytes().to_vec();
    b.resize(SIZE, b'x');
    b
}

async fn publish(ch: &Channel, payload: &[u8]) -> anyhow::Result<()> {
    let confirm = ch
        .basic_publish(
            "",
            QUEUE,
            BasicPublishOptions::default(),
            payload,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?;
    anyhow::ensure!(confirm.await?.is_ack(), "a publish was nacked");
    Ok(())
}

/// Publishers, closed loop or (`rate` > 0) `rate` messages a second in
/// all, each one's batches on a schedule and sent at once when behind it.
async fn send_phase(
    uris: &[String],
    clients: usize,
    seconds: u64,
    rate: u64,
) -> anyhow::Result<(u64, Hist)> {
    let sent = Arc::new(AtomicU64::new(0));
    let latency = histogram();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let every = (rate > 0).then(|| Duration::from_secs_f64((BATCH * clients) as f64 / rate as f64));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let uri = uris[i % uris.len()].clone();
        let (sent, latency) = (sent.clone(), latency.clone());
        tasks.push(tokio::spawn(async move {
            let (_conn, ch) = channel(&uri).await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            let payload = body(0);
            let mut due =
                every.map(|every| (Instant::now() + every * i as u32 / clients as u32, every));
            while Instant::now() < deadline {
                if let Some((at, every)) = due.as_mut() {
                    tokio::time::sleep_until((*at).into()).await;
                    *at += *every;
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                let start = Instant::now();
                let mut confirms = Vec::with_capacity(BATCH);
                for _ in 0..BATCH {
                    confirms.push(
                        ch.basic_publish(
                            "",
                            QUEUE,
                            BasicPublishOptions::default(),
                            &payload,
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await?,
                    );
                }
                for c in confirms {
                    anyhow::ensure!(c.await?.is_ack(), "a publish was nacked");
                }
                latency
                    .lock()
                    .unwrap()
                    .saturating_record(start.elapsed().as_micros().max(1) as u64);
                sent.fetch_add(BATCH as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((sent.load(Ordering::Relaxed), latency))
}

/// Consumers that ack every delivery (one `multiple` ack per 10) and call
/// `seen` with each body; they stop when `done` says so.
async fn consumers(
    uris: &[String],
    clients: usize,
    seen: Seen,
    done: Done,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    let mut tasks = Vec::new();
    for i in 0..clients {
        let uri = uris[i % uris.len()].clone();
        let (seen, done) = (seen.clone(), done.clone());
        let (conn, ch) = channel(&uri).await?;
        ch.basic_qos(BATCH as u16, BasicQosOptions::default())
            .await?;
        let mut consumer = ch
            .basic_consume(
                QUEUE,
                &format!("c{i}"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tasks.push(tokio::spawn(async move {
            let _conn = conn;
            // The latest delivery not yet acked: one `multiple` ack takes
            // it and every earlier one.
            let mut pending = None;
            let mut unacked = 0;
            loop {
                let next = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await;
                match next {
                    Ok(Some(delivery)) => {
                        let delivery = delivery?;
                        seen(&delivery.data);
                        unacked += 1;
                        pending = Some(delivery.acker);
                    }
                    Ok(None) => return Ok(()),
                    Err(_) => {}
                }
                let finished = done();
                if unacked == BATCH || (finished && unacked > 0) {
                    if let Some(acker) = pending.take() {
                        acker.ack(BasicAckOptions { multiple: true }).await?;
                    }
                    unacked = 0;
                }
                if finished {
                    return Ok(());
                }
            }
        }));
    }
    Ok(tasks)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let uris: Vec<String> = args
        .get(1)
        .map_or("amqp://guest:guest@127.0.0.1:5672/%2f", String::as_str)
        .split(',')
        .map(str::to_string)
        .collect();
    let clients: usize = args.get(2).map_or(Ok(16), |a| a.parse())?;
    let seconds: u64 = args.get(3).map_or(Ok(10), |a| a.parse())?;
    let rate: u64 = args.get(4).map_or(Ok(0), |a| a.parse())?;

    let (_conn, admin) = channel(&uris[0]).await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    admin
        .queue_declare(
            QUEUE,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await?;
    admin
        .queue_purge(QUEUE, QueuePurgeOptions::default())
        .await?;

    let started = Instant::now();
    let (sent, send_latency) = send_phase(&uris, clients, seconds, 0).await?;
    let send_rate = sent as f64 / started.elapsed().as_secs_f64();

    let acked = Arc::new(AtomicU64::new(0));
    let count = acked.clone();
    let total = sent;
    let seen: Seen = Arc::new(move |_| {
        count.fetch_add(1, Ordering::Relaxed);
    });
    let counted = acked.clone();
    let done: Done = Arc::new(move || counted.load(Ordering::Relaxed) >= total);
    let started = Instant::now();
    for t in consumers(&uris, clients, seen, done).await? {
        t.await??;
    }
    let receive_rate = acked.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();

    let e2e = histogram();
    let received = Arc::new(AtomicU64::new(0));
    let (hist, got) = (e2e.clone(), received.clone());
    let seen: Seen = Arc::new(move |data| {
        let stamp = u64::from_be_bytes(data[..8].try_into().unwrap());
        hist.lock()
            .unwrap()
            .saturating_record(now_us().saturating_sub(stamp).max(1));
        got.fetch_add(1, Ordering::Relaxed);
    });
    let expected = seconds * 100;
    let counted = received.clone();
    let done: Done = Arc::new(move || counted.load(Ordering::Relaxed) >= expected);
    let waiting = consumers(&uris, clients, seen, done).await?;
    let (_pconn, publisher) = channel(&uris[0]).await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for _ in 0..expected {
        tick.tick().await;
        publish(&publisher, &body(now_us())).await?;
    }
    for t in waiting {
        t.await??;
    }

    let half = (clients / 2).max(1);
    let until = Instant::now() + Duration::from_secs(seconds);
    let consumed = Arc::new(AtomicU64::new(0));
    let count = consumed.clone();
    let seen: Seen = Arc::new(move |_| {
        if Instant::now() < until {
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
    let done: Done = Arc::new(move || Instant::now() >= until);
    let consuming = consumers(&uris, half, seen, done).await?;
    let (mixed_sent, _) = send_phase(&uris, half, seconds, rate).await?;
    for t in consuming {
        t.await??;
    }
    println!(
        "{}",
        serde_json::json!({
            "clients": clients,
            "send": { "messages": sent, "messages_per_sec": send_rate,
                      "batch_p50_ms": ms(&send_latency, 0.5), "batch_p99_ms": ms(&send_latency, 0.99) },
            "receive_ack": { "messages": acked.load(Ordering::Relaxed), "messages_per_sec": receive_rate },
            "latency": { "messages": received.load(Ordering::Relaxed),
                         "p50_ms": ms(&e2e, 0.5), "p99_ms": ms(&e2e, 0.99) },
            "at_once": { "rate": rate, "send_messages_per_sec": mixed_sent as f64 / seconds as f64,
                         "receive_ack_messages_per_sec": consumed.load(Ordering::Relaxed) as f64 / seconds as f64 },
        })
    );
    Ok(())
}
