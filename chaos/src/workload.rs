//! The Kinesis log workload: producers put unique values through random
//! nodes; readers follow every shard with iterator chains; after heal, a
//! final read of every shard from TRIM_HORIZON through every node.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::client::{CallError, Client};
use crate::cluster::{Cluster, Members};
use crate::history::{Event, History, Kind};

pub const STREAM: &str = "chaos";
const CALL_TIMEOUT: Duration = Duration::from_secs(12);

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(v: &Value) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or_default())
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One client per node, made when first used.
fn client(clients: &mut HashMap<u32, Client>, node: u32) -> &mut Client {
    clients
        .entry(node)
        .or_insert_with(|| Client::new(Cluster::api_url(node), CALL_TIMEOUT))
}

/// Puts unique values `p<id>-<n>` until `stop`. A put with an unknown
/// outcome is retried once with the same value, as SDKs do, so the checker
/// can tell those duplicates from real ones.
pub async fn producer(
    id: u32,
    members: Members,
    seed: u64,
    history: History,
    stop: Arc<AtomicBool>,
) {
    let process = format!("producer-{id}");
    let mut rng = StdRng::seed_from_u64(seed ^ (0x5eed_0000 + u64::from(id)));
    let mut clients = HashMap::new();
    let mut next = 0u64;
    let mut retry: Vec<(String, String)> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let node = members.pick(&mut rng);
        let batch = if rng.random_bool(0.7) { 1 } else { 5 };
        let is_retry = !retry.is_empty();
        let (values, keys): (Vec<String>, Vec<String>) = if is_retry {
            std::mem::take(&mut retry).into_iter().unzip()
        } else {
            (0..batch)
                .map(|_| {
                    next += 1;
                    (
                        format!("p{id}-{next}"),
                        format!("k{}", rng.random_range(0..16)),
                    )
                })
                .unzip()
        };
        for v in &values {
            history.log(
                Event::new(&process, Kind::Invoke, "put")
                    .value(v)
                    .node(node),
            );
        }
        let client = client(&mut clients, node);
        let mut unknown = Vec::new();
        if values.len() == 1 {
            let body =
                json!({"StreamName": STREAM, "Data": b64(&values[0]), "PartitionKey": keys[0]});
            match client.call("PutRecord", &body).await {
                Ok(r) => history.log(
                    Event::new(&process, Kind::Ok, "put")
                        .value(&values[0])
                        .node(node)
                        .key(&keys[0])
                        .shard(r["ShardId"].as_str().unwrap_or_default())
                        .seq(r["SequenceNumber"].as_str().unwrap_or_default()),
                ),
                Err(e) => {
                    let kind = if e.definite() { Kind::Fail } else { Kind::Info };
                    history.log(
                        Event::new(&process, kind, "put")
                            .value(&values[0])
                            .node(node)
                            .error(&e),
                    );
                    if kind == Kind::Info {
                        unknown.push((values[0].clone(), keys[0].clone()));
                    }
                }
            }
        } else {
            let records: Vec<Value> = values
                .iter()
                .zip(&keys)
                .map(|(v, k)| json!({"Data": b64(v), "PartitionKey": k}))
                .collect();
            let body = json!({"StreamName": STREAM, "Records": records});
            match client.call("PutRecords", &body).await {
                Ok(r) => {
                    let mut results = r["Records"].as_array().cloned().unwrap_or_default();
                    // A short answer leaves the rest unknown, not unlogged.
                    results.resize(values.len(), json!({"ErrorCode": "MissingResult"}));
                    for ((v, k), res) in values.iter().zip(&keys).zip(results.iter()) {
                        match res["ErrorCode"].as_str() {
                            None => history.log(
                                Event::new(&process, Kind::Ok, "put")
                                    .value(v)
                                    .node(node)
                                    .key(k)
                                    .shard(res["ShardId"].as_str().unwrap_or_default())
                                    .seq(res["SequenceNumber"].as_str().unwrap_or_default()),
                            ),
                            Some(code) => {
                                let kind = if code == "ProvisionedThroughputExceededException" {
                                    Kind::Fail
                                } else {
                                    unknown.push((v.clone(), k.clone()));
                                    Kind::Info
                                };
                                history.log(
                                    Event::new(&process, kind, "put")
                                        .value(v)
                                        .node(node)
                                        .error(code),
                                );
                            }
                        }
                    }
                }
                Err(e) => {
                    let kind = if e.definite() { Kind::Fail } else { Kind::Info };
                    for (v, k) in values.iter().zip(&keys) {
                        history.log(
                            Event::new(&process, kind, "put")
                                .value(v)
                                .node(node)
                                .error(&e),
                        );
                        if kind == Kind::Info {
                            unknown.push((v.clone(), k.clone()));
                        }
                    }
                }
            }
        }
        if !is_retry {
            retry = unknown;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Default)]
struct Cursor {
    iterator: Option<String>,
    last_seq: Option<String>,
    finished: bool,
}

async fn list_shards(client: &mut Client) -> Result<Vec<String>, CallError> {
    let mut shards = Vec::new();
    let mut body = json!({"StreamName": STREAM});
    for _ in 0..100 {
        let r = client.call("ListShards", &body).await?;
        for s in r["Shards"].as_array().into_iter().flatten() {
            shards.push(s["ShardId"].as_str().unwrap_or_default().to_string());
        }
        match r["NextToken"].as_str() {
            Some(t) => body = json!({"NextToken": t}),
            None => return Ok(shards),
        }
    }
    Err(CallError::Unknown(
        "ListShards paged more than 100 times".into(),
    ))
}

async fn iterator_after(
    client: &mut Client,
    shard: &str,
    after: Option<&str>,
) -> Result<String, CallError> {
    let body = match after {
        Some(seq) => json!({"StreamName": STREAM, "ShardId": shard,
            "ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "StartingSequenceNumber": seq}),
        None => {
            json!({"StreamName": STREAM, "ShardId": shard, "ShardIteratorType": "TRIM_HORIZON"})
        }
    };
    let r = client.call("GetShardIterator", &body).await?;
    Ok(r["ShardIterator"].as_str().unwrap_or_default().to_string())
}

fn records_of(r: &Value) -> Vec<(String, String)> {
    r["Records"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            (
                x["SequenceNumber"].as_str().unwrap_or_default().to_string(),
                unb64(&x["Data"]),
            )
        })
        .collect()
}

/// Follows every shard (new ones too, after a reshard) from TRIM_HORIZON.
/// When a chain breaks (error, expired iterator), it resumes after the last
/// sequence number it saw, possibly through another node.
pub async fn reader(id: u32, members: Members, seed: u64, history: History, stop: Arc<AtomicBool>) {
    let process = format!("reader-{id}");
    let mut rng = StdRng::seed_from_u64(seed ^ (0x7ead_0000 + u64::from(id)));
    let mut clients = HashMap::new();
    let mut cursors: BTreeMap<String, Cursor> = BTreeMap::new();
    let mut listed = tokio::time::Instant::now() - Duration::from_secs(10);
    while !stop.load(Ordering::SeqCst) {
        if listed.elapsed() > Duration::from_secs(2) {
            let node = members.pick(&mut rng);
            if let Ok(shards) = list_shards(client(&mut clients, node)).await {
                for s in shards {
                    cursors.entry(s).or_default();
                }
                listed = tokio::time::Instant::now();
            }
        }
        for (shard, cursor) in cursors.iter_mut().filter(|(_, c)| !c.finished) {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let node = members.pick(&mut rng);
            let client = client(&mut clients, node);
            let iterator = match cursor.iterator.clone() {
                Some(i) => i,
                None => match iterator_after(client, shard, cursor.last_seq.as_deref()).await {
                    Ok(i) => i,
                    Err(_) => continue,
                },
            };
            match client
                .call(
                    "GetRecords",
                    &json!({"ShardIterator": iterator, "Limit": 200}),
                )
                .await
            {
                Ok(r) => {
                    let records = records_of(&r);
                    if let Some((seq, _)) = records.last() {
                        cursor.last_seq = Some(seq.clone());
                        history.log(
                            Event::new(&process, Kind::Ok, "read")
                                .node(node)
                                .shard(shard)
                                .records(records),
                        );
                    }
                    match r["NextShardIterator"].as_str() {
                        Some(next) => cursor.iterator = Some(next.to_string()),
                        None => cursor.finished = true,
                    }
                }
                Err(_) => cursor.iterator = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads every shard completely through `node`, retrying errors for up to
/// `budget` per shard. One `final-read` event per shard.
pub async fn final_read(node: u32, history: &History, budget: Duration) {
    let process = format!("final-n{node}");
    let mut client = Client::new(Cluster::api_url(node), CALL_TIMEOUT);
    let deadline = tokio::time::Instant::now() + budget;
    let shards = loop {
        match list_shards(&mut client).await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() > deadline => {
                history.log(
                    Event::new(&process, Kind::Fail, "final-read")
                        .node(node)
                        .error(e),
                );
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    for shard in shards {
        match read_shard(&mut client, &shard, deadline).await {
            Ok(records) => history.log(
                Event::new(&process, Kind::Ok, "final-read")
                    .node(node)
                    .shard(&shard)
                    .records(records),
            ),
            Err(e) => history.log(
                Event::new(&process, Kind::Fail, "final-read")
                    .node(node)
                    .shard(&shard)
                    .error(e),
            ),
        }
    }
}

async fn read_shard(
    client: &mut Client,
    shard: &str,
    deadline: tokio::time::Instant,
) -> Result<Vec<(String, String)>, CallError> {
    let mut all: Vec<(String, String)> = Vec::new();
    let mut iterator: Option<String> = None;
    loop {
        let attempt = async {
            let it = match &iterator {
                Some(i) => i.clone(),
                None => iterator_after(client, shard, all.last().map(|(s, _)| s.as_str())).await?,
            };
            client
                .call("GetRecords", &json!({"ShardIterator": it, "Limit": 1000}))
                .await
        };
        match attempt.await {
            Ok(r) => {
                let records = records_of(&r);
                let caught_up = records.is_empty() && r["MillisBehindLatest"].as_u64() == Some(0);
                all.extend(records);
                match r["NextShardIterator"].as_str() {
                    None => return Ok(all),
                    Some(_) if caught_up => return Ok(all),
                    Some(_) if tokio::time::Instant::now() > deadline => {
                        return Err(CallError::Unknown(
                            "shard not read to its end in time".into(),
                        ))
                    }
                    Some(next) => iterator = Some(next.to_string()),
                }
            }
            Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
            Err(_) => {
                iterator = None;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}
