//! The SQS workload (`--sqs`), beside the stream workload: producers send
//! unique bodies to a standard and a FIFO queue (one message group per
//! producer) through random nodes, consumers receive and delete through
//! random nodes; after heal, every queue is drained through every node.
//!
//! History ops: `sqs-send` (value = body, shard = queue, key = message
//! group), `sqs-recv` (records = (message id, body) in answer order, shard
//! = queue) and `sqs-delete` (value = body, seq = message id).
//!
//! Checked: an acknowledged send is received (lost), nothing is received
//! that was never sent (phantom), a failed send is never received, one
//! body is one message (a retried FIFO send is deduplicated; standard sends
//! are not retried), FIFO order within a group, and no receive after a
//! delete that certainly removed the message. Receives do not check the
//! visibility timeout: the clock-skew fault moves server clocks.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::checker::Report;
use crate::client::Client;
use crate::cluster::{Cluster, Members};
use crate::history::{Event, History, Kind};

pub const QUEUES: [&str; 2] = ["chaos", "chaos.fifo"];
pub const PRODUCERS: u32 = 2;
pub const CONSUMERS: u32 = 2;
const CALL_TIMEOUT: Duration = Duration::from_secs(12);
/// Short, so that messages a lost answer hid come back before the drain.
const VISIBILITY_SECONDS: u32 = 5;

fn url(node: u32, queue: &str) -> String {
    format!("http://{}/000000000000/{queue}", Cluster::api_url(node))
}

fn client(clients: &mut HashMap<u32, Client>, node: u32) -> &mut Client {
    clients
        .entry(node)
        .or_insert_with(|| Client::sqs(Cluster::api_url(node), CALL_TIMEOUT))
}

/// Creates both queues through node 1 and waits until every node answers
/// for them.
pub async fn create_queues(nodes: u32) -> anyhow::Result<()> {
    let mut c = Client::sqs(Cluster::api_url(1), Duration::from_secs(15));
    for q in QUEUES {
        let mut attributes = json!({ "VisibilityTimeout": VISIBILITY_SECONDS.to_string() });
        // The standard queue has three partitions, so that faults hit
        // receives that span groups; a FIFO queue has one.
        let mut tags = json!({ "kinesin:partitions": "3" });
        if q.ends_with(".fifo") {
            attributes["FifoQueue"] = json!("true");
            tags = json!({});
        }
        c.call(
            "CreateQueue",
            &json!({ "QueueName": q, "Attributes": attributes, "tags": tags }),
        )
        .await
        .map_err(|e| anyhow::anyhow!("CreateQueue {q}: {e}"))?;
    }
    let start = Instant::now();
    for n in 1..=nodes {
        let mut c = Client::sqs(Cluster::api_url(n), Duration::from_secs(5));
        for q in QUEUES {
            while c
                .call("GetQueueAttributes", &json!({ "QueueUrl": url(n, q) }))
                .await
                .is_err()
            {
                anyhow::ensure!(
                    start.elapsed() < Duration::from_secs(60),
                    "queue {q} not answering on node {n} within 60 s"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Ok(())
}

/// Sends bodies `q<id>-<n>` alternately to both queues until `stop`. A FIFO
/// send with an unknown outcome is sent again with the same deduplication
/// id before the next one, as SDKs retry.
pub async fn producer(
    id: u32,
    members: Members,
    seed: u64,
    history: History,
    stop: Arc<AtomicBool>,
) {
    let process = format!("sqs-producer-{id}");
    let mut rng = StdRng::seed_from_u64(seed ^ (0x5150_0000 + u64::from(id)));
    let mut clients = HashMap::new();
    let mut next = 0u64;
    let group = format!("g{id}");
    while !stop.load(Ordering::SeqCst) {
        next += 1;
        let queue = QUEUES[(next % 2) as usize];
        let fifo = queue.ends_with(".fifo");
        let value = format!("q{id}-{next}");
        let mut body = json!({ "MessageBody": value });
        if fifo {
            body["MessageGroupId"] = json!(group);
            body["MessageDeduplicationId"] = json!(value);
        }
        let attempts = if fifo { 2 } else { 1 };
        for _ in 0..attempts {
            let node = members.pick(&mut rng);
            body["QueueUrl"] = json!(url(node, queue));
            history.log(
                Event::new(&process, Kind::Invoke, "sqs-send")
                    .value(&value)
                    .shard(queue)
                    .key(&group)
                    .node(node),
            );
            let outcome = client(&mut clients, node).call("SendMessage", &body).await;
            let event = match &outcome {
                Ok(r) => Event::new(&process, Kind::Ok, "sqs-send")
                    .seq(r["MessageId"].as_str().unwrap_or_default()),
                Err(e) if e.definite() => Event::new(&process, Kind::Fail, "sqs-send").error(e),
                Err(e) => Event::new(&process, Kind::Info, "sqs-send").error(e),
            };
            history.log(event.value(&value).shard(queue).key(&group).node(node));
            match outcome {
                Err(e) if !e.definite() => continue,
                _ => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One receive and the deletes of what it got; returns how many messages
/// came.
async fn receive_and_delete(
    process: &str,
    client: &mut Client,
    node: u32,
    queue: &str,
    wait: u32,
    history: &History,
) -> usize {
    history.log(
        Event::new(process, Kind::Invoke, "sqs-recv")
            .shard(queue)
            .node(node),
    );
    let answer = client
        .call(
            "ReceiveMessage",
            &json!({ "QueueUrl": url(node, queue), "MaxNumberOfMessages": 10, "WaitTimeSeconds": wait }),
        )
        .await;
    let messages = match answer {
        Ok(r) => r["Messages"].as_array().cloned().unwrap_or_default(),
        Err(e) => {
            let kind = if e.definite() { Kind::Fail } else { Kind::Info };
            history.log(
                Event::new(process, kind, "sqs-recv")
                    .shard(queue)
                    .node(node)
                    .error(e),
            );
            return 0;
        }
    };
    let text = |m: &Value, k: &str| m[k].as_str().unwrap_or_default().to_string();
    history.log(
        Event::new(process, Kind::Ok, "sqs-recv")
            .shard(queue)
            .node(node)
            .records(
                messages
                    .iter()
                    .map(|m| (text(m, "MessageId"), text(m, "Body")))
                    .collect(),
            ),
    );
    for m in &messages {
        let (id, body) = (text(m, "MessageId"), text(m, "Body"));
        history.log(
            Event::new(process, Kind::Invoke, "sqs-delete")
                .value(&body)
                .seq(&id)
                .shard(queue)
                .node(node),
        );
        let done = client
            .call(
                "DeleteMessage",
                &json!({ "QueueUrl": url(node, queue), "ReceiptHandle": m["ReceiptHandle"] }),
            )
            .await;
        let kind = match &done {
            Ok(_) => Kind::Ok,
            Err(e) if e.definite() => Kind::Fail,
            Err(_) => Kind::Info,
        };
        history.log(
            Event::new(process, kind, "sqs-delete")
                .value(&body)
                .seq(&id)
                .shard(queue)
                .node(node),
        );
    }
    messages.len()
}

pub async fn consumer(
    id: u32,
    members: Members,
    seed: u64,
    history: History,
    stop: Arc<AtomicBool>,
) {
    let process = format!("sqs-consumer-{id}");
    let mut rng = StdRng::seed_from_u64(seed ^ (0xc0c0_0000 + u64::from(id)));
    let mut clients = HashMap::new();
    while !stop.load(Ordering::SeqCst) {
        let node = members.pick(&mut rng);
        let queue = QUEUES[rng.random_range(0..2)];
        receive_and_delete(
            &process,
            client(&mut clients, node),
            node,
            queue,
            1,
            &history,
        )
        .await;
    }
}

/// After heal: waits out the visibility timeout of anything a lost answer
/// hid, then receives from every queue through every member until each
/// answers empty three times in a row, within `budget`.
pub async fn drain(members: &[u32], history: &History, budget: Duration) {
    tokio::time::sleep(Duration::from_secs(u64::from(VISIBILITY_SECONDS) + 1)).await;
    let deadline = Instant::now() + budget;
    let mut clients = HashMap::new();
    for queue in QUEUES {
        let mut empty = 0;
        let mut turn = 0usize;
        while empty < 3 && Instant::now() < deadline {
            let node = members[turn % members.len()];
            turn += 1;
            let got = receive_and_delete(
                "sqs-drain",
                client(&mut clients, node),
                node,
                queue,
                1,
                history,
            )
            .await;
            empty = if got == 0 { empty + 1 } else { 0 };
        }
    }
}

#[derive(Default)]
struct Sent {
    queue: String,
    group: String,
    oks: u32,
    fails: u32,
    infos: u32,
}

/// One delivery of a body: the receive's invoke and ok positions in the
/// history, its process, the message id, and its place in the answer.
struct Delivery<'a> {
    invoke: usize,
    ok: usize,
    process: &'a str,
    id: &'a str,
    place: usize,
}

/// A FIFO body's place in its producer's order, where it was first
/// received (history position, place in the answer), and the body.
type FirstReceipt<'a> = (u64, (usize, usize), &'a str);

pub fn check(history: &[Event], r: &mut Report) {
    if !history.iter().any(|e| e.op == "sqs-send") {
        return;
    }
    let mut sent: BTreeMap<&str, Sent> = BTreeMap::new();
    let mut deliveries: BTreeMap<&str, Vec<Delivery>> = BTreeMap::new();
    let mut recv_invoke: HashMap<&str, usize> = HashMap::new();
    // (process, body) -> the ok position of its latest delivery of it.
    let mut latest: HashMap<(&str, &str), usize> = HashMap::new();
    // Deletes that succeeded: (body, process, position, its delivery's ok).
    let mut deletes: Vec<(&str, &str, usize, usize)> = Vec::new();
    // Receives whose answer never came: (queue, invoke, end). They may
    // have taken a message, which makes an earlier receipt stale.
    let mut unanswered: Vec<(&str, usize, usize)> = Vec::new();
    for (i, e) in history.iter().enumerate() {
        match (e.op.as_str(), e.kind) {
            ("sqs-send", kind) => {
                let Some(v) = e.value.as_deref() else {
                    continue;
                };
                let s = sent.entry(v).or_default();
                s.queue = e.shard.clone().unwrap_or_default();
                s.group = e.key.clone().unwrap_or_default();
                match kind {
                    Kind::Ok => s.oks += 1,
                    Kind::Fail => s.fails += 1,
                    Kind::Info => s.infos += 1,
                    Kind::Invoke => {}
                }
            }
            ("sqs-recv", Kind::Invoke) => {
                recv_invoke.insert(&e.process, i);
            }
            ("sqs-recv", Kind::Ok) => {
                let invoke = recv_invoke.get(e.process.as_str()).copied().unwrap_or(i);
                for (place, (id, body)) in e.records.iter().enumerate() {
                    deliveries.entry(body).or_default().push(Delivery {
                        invoke,
                        ok: i,
                        process: &e.process,
                        id,
                        place,
                    });
                    latest.insert((&e.process, body), i);
                }
            }
            ("sqs-recv", Kind::Info) => {
                let invoke = recv_invoke.get(e.process.as_str()).copied().unwrap_or(i);
                unanswered.push((e.shard.as_deref().unwrap_or_default(), invoke, i));
            }
            ("sqs-delete", Kind::Ok) => {
                let Some(v) = e.value.as_deref() else {
                    continue;
                };
                if let Some(&ok) = latest.get(&(e.process.as_str(), v)) {
                    deletes.push((v, &e.process, i, ok));
                }
            }
            _ => {}
        }
    }
    r.count(
        "sqs-sent-acked",
        sent.values().filter(|s| s.oks > 0).count() as u64,
    );
    r.count("sqs-received-bodies", deliveries.len() as u64);
    for (v, s) in &sent {
        let got = deliveries.get(v);
        if s.oks > 0 && got.is_none() {
            r.error("sqs-lost", json!({ "value": v, "queue": s.queue }));
        }
        if s.oks == 0 && s.infos == 0 && got.is_some() {
            r.error("sqs-failed-send-received", json!({ "value": v }));
        }
        if s.oks == 0 && s.infos > 0 && got.is_none() {
            r.note("sqs-unseen-unknown-outcome", json!({ "value": v }));
        }
        if let Some(got) = got {
            let mut ids: Vec<&str> = got.iter().map(|d| d.id).collect();
            ids.sort_unstable();
            ids.dedup();
            if ids.len() > 1 {
                r.error("sqs-duplicate", json!({ "value": v, "message_ids": ids }));
            }
        }
    }
    for v in deliveries.keys() {
        if !sent.contains_key(v) {
            r.error("sqs-phantom", json!({ "value": v }));
        }
    }
    // FIFO: per group, acknowledged bodies are first received in the order
    // they were sent (a producer's counter).
    let mut groups: BTreeMap<&str, Vec<FirstReceipt>> = BTreeMap::new();
    for (v, s) in &sent {
        if !s.queue.ends_with(".fifo") || s.oks == 0 {
            continue;
        }
        let Some(first) = deliveries
            .get(v)
            .and_then(|d| d.iter().map(|d| (d.ok, d.place)).min())
        else {
            continue;
        };
        let n = v
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        groups.entry(&s.group).or_default().push((n, first, v));
    }
    for (group, mut order) in groups {
        order.sort();
        for pair in order.windows(2) {
            if pair[1].1 < pair[0].1 {
                r.error(
                    "sqs-fifo-order",
                    json!({ "group": group, "sent_first": pair[0].2, "received_first": pair[1].2 }),
                );
            }
        }
    }
    // A delete whose delivery no other delivery may have overtaken (none
    // answered after that delivery was asked for, and asked for before the
    // delete answered) removed the message: no receive asked for later may
    // return it.
    for (v, process, at, ok) in deletes {
        let Some(all) = deliveries.get(v) else {
            continue;
        };
        let Some(mine) = all.iter().find(|d| d.ok == ok && d.process == process) else {
            continue;
        };
        let queue = sent.get(v).map_or("", |s| s.queue.as_str());
        let overtaken = all
            .iter()
            .any(|d| d.ok != mine.ok && d.ok > mine.invoke && d.invoke < at)
            || unanswered
                .iter()
                .any(|(q, invoke, end)| *q == queue && *end > mine.invoke && *invoke < at);
        if overtaken {
            continue;
        }
        if let Some(after) = all.iter().find(|d| d.invoke > at) {
            r.error(
                "sqs-received-after-delete",
                json!({ "value": v, "deleted_at": at, "received_by": after.process, "asked_at": after.invoke }),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(p: &str, v: &str, queue: &str, kind: Kind) -> Event {
        Event::new(p, kind, "sqs-send")
            .value(v)
            .shard(queue)
            .key("g0")
    }

    fn recv(p: &str, got: &[(&str, &str)]) -> [Event; 2] {
        [
            Event::new(p, Kind::Invoke, "sqs-recv"),
            Event::new(p, Kind::Ok, "sqs-recv").records(
                got.iter()
                    .map(|(i, b)| (i.to_string(), b.to_string()))
                    .collect(),
            ),
        ]
    }

    fn check_of(h: &[Event]) -> Report {
        let mut r = Report::default();
        check(h, &mut r);
        r
    }

    #[test]
    fn a_clean_history_passes_and_each_violation_is_named() {
        let mut h = vec![
            send("p", "q0-1", "chaos.fifo", Kind::Invoke),
            send("p", "q0-1", "chaos.fifo", Kind::Ok),
            send("p", "q0-2", "chaos.fifo", Kind::Invoke),
            send("p", "q0-2", "chaos.fifo", Kind::Ok),
        ];
        h.extend(recv("c", &[("m1", "q0-1"), ("m2", "q0-2")]));
        h.push(Event::new("c", Kind::Ok, "sqs-delete").value("q0-1"));
        assert!(check_of(&h).errors.is_empty(), "{:?}", check_of(&h).errors);

        let mut out_of_order = h[..4].to_vec();
        out_of_order.extend(recv("c", &[("m2", "q0-2"), ("m1", "q0-1")]));
        assert!(check_of(&out_of_order)
            .errors
            .contains_key("sqs-fifo-order"));

        let lost = h[..4].to_vec();
        assert_eq!(check_of(&lost).errors["sqs-lost"].count, 2);

        let mut again = h.clone();
        again.extend(recv("c", &[("m1", "q0-1")]));
        assert!(check_of(&again)
            .errors
            .contains_key("sqs-received-after-delete"));

        let mut twice = h.clone();
        twice.extend(recv("d", &[("m9", "q0-2")]));
        assert!(check_of(&twice).errors.contains_key("sqs-duplicate"));

        let mut phantom = h.clone();
        phantom.extend(recv("d", &[("m7", "never-sent")]));
        assert!(check_of(&phantom).errors.contains_key("sqs-phantom"));
    }

    #[test]
    fn a_receive_without_answer_may_have_overtaken_a_delete_too() {
        let mut h = vec![
            send("p", "q0-1", "chaos", Kind::Invoke),
            send("p", "q0-1", "chaos", Kind::Ok),
        ];
        h.extend(recv("c", &[("m1", "q0-1")]));
        h.push(Event::new("d", Kind::Invoke, "sqs-recv").shard("chaos"));
        h.push(Event::new("d", Kind::Info, "sqs-recv").shard("chaos"));
        h.push(Event::new("c", Kind::Ok, "sqs-delete").value("q0-1"));
        h.extend(recv("e", &[("m1", "q0-1")]));
        assert!(check_of(&h).errors.is_empty(), "{:?}", check_of(&h).errors);
    }

    #[test]
    fn a_delete_another_delivery_may_have_overtaken_proves_nothing() {
        let mut h = vec![
            send("p", "q0-1", "chaos", Kind::Invoke),
            send("p", "q0-1", "chaos", Kind::Ok),
        ];
        h.extend(recv("c", &[("m1", "q0-1")]));
        // Another consumer got it again (visibility ran out) before c's
        // delete answered: c's receipt may be stale.
        h.extend(recv("d", &[("m1", "q0-1")]));
        h.push(Event::new("c", Kind::Ok, "sqs-delete").value("q0-1"));
        h.extend(recv("e", &[("m1", "q0-1")]));
        assert!(check_of(&h).errors.is_empty(), "{:?}", check_of(&h).errors);
    }
}
