//! Faults, drawn from the run's seed: the same seed gives the same schedule
//! (which fault, which nodes, how long). Faults aimed at "the leader" pick
//! the node that leads the most groups at that moment.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::Mutex;

use crate::client::{get, Client};
use crate::cluster::{Cluster, Members};
use crate::disk;
use crate::history::{Event, History, Kind};
use crate::net::Net;
use crate::proxy::Delay;
use crate::run::wait_ready;
use crate::workload::STREAM;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Random halves (the smaller side a minority).
    PartitionHalves,
    /// Cut the busiest leader off from every other node (clients still reach it).
    IsolateLeader,
    KillOne,
    KillMinority,
    KillAll,
    /// SIGSTOP a node (half the time the busiest leader), SIGCONT later.
    Pause,
    /// 20–40 % packet loss between nodes.
    Loss,
    /// UpdateShardCount up or down under load.
    Reshard,
    /// Leadership moved between replicas of random groups every few
    /// hundred milliseconds (`kinesin cluster transfer-leader`).
    TransferStorm,
    /// A new node joins, then a random member is drained and removed
    /// (`kinesin cluster remove-node`) under load.
    ReplaceNode,
    /// One node talks to both halves of the rest; the halves cannot talk.
    Bridge,
    /// kill -9 of a minority / of every node while every node runs in the
    /// lose-unsynced storage mode: what no fsync covered is gone.
    PowerFailMinority,
    PowerFailAll,
    /// A node is killed, a file of its RocksDB truncated or bit-flipped,
    /// and it is restarted: it must recover or refuse to start, never serve
    /// wrong data. At most a minority of the nodes is damaged per run.
    DiskCorrupt,
    /// One node's wall clock jumps by up to ±10 minutes (back at heal).
    ClockSkew,
    /// 20–150 ms delay plus up to 100 ms jitter on every node-to-node byte
    /// (the delay proxies; not combined with the nftables faults).
    Latency,
    /// kill -9 of one node; while it is down, a new stream is created and
    /// written to, and the workload stream is resharded, through a
    /// survivor. Every group keeps a live majority, so every step must
    /// finish in time and every partition key must keep taking writes
    /// (the checker's `no-write-accepted`).
    Degraded,
}

impl Fault {
    /// Every node must run in the lose-unsynced storage mode.
    pub fn needs_power_fail_mode(self) -> bool {
        matches!(self, PowerFailMinority | PowerFailAll)
    }

    /// Nodes must reach each other through the delay proxies.
    pub fn needs_proxies(self) -> bool {
        self == Latency
    }

    /// Works by nftables rules on node addresses, which the proxies hide.
    fn filters_node_addresses(self) -> bool {
        matches!(self, PartitionHalves | IsolateLeader | Loss | Bridge)
    }
}

use Fault::*;

/// Everything but the delay proxy (its scenario cannot have address-based
/// network faults).
const ALL: &[Fault] = &[
    PartitionHalves,
    IsolateLeader,
    KillOne,
    KillMinority,
    KillAll,
    Pause,
    Loss,
    Reshard,
    TransferStorm,
    ReplaceNode,
    Bridge,
    PowerFailMinority,
    PowerFailAll,
    DiskCorrupt,
    ClockSkew,
    Degraded,
];

/// Named fault mixes: the scenarios of the smoke and long matrices.
pub const SCENARIOS: &[(&str, &[Fault])] = &[
    ("none", &[]),
    ("partition", &[PartitionHalves, IsolateLeader]),
    ("isolate-leader", &[IsolateLeader]),
    ("kill", &[KillOne, KillMinority]),
    ("kill-all", &[KillAll]),
    ("pause", &[Pause]),
    ("loss", &[Loss]),
    ("reshard", &[Reshard]),
    ("transfer-storm", &[TransferStorm]),
    ("membership", &[ReplaceNode]),
    ("bridge", &[Bridge]),
    ("power-fail", &[PowerFailMinority, PowerFailAll]),
    ("disk", &[DiskCorrupt, KillOne]),
    ("clock-skew", &[ClockSkew]),
    ("latency", &[Latency, KillOne]),
    ("degraded", &[Degraded]),
    ("mixed", ALL),
];

pub fn scenario(name: &str) -> Option<Vec<Fault>> {
    let faults = SCENARIOS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, faults)| faults.to_vec())?;
    let proxied = faults.iter().any(|f| f.needs_proxies());
    assert!(
        !proxied
            || !faults
                .iter()
                .any(|f| f.filters_node_addresses() || *f == ReplaceNode),
        "scenario {name} mixes the delay proxies with faults they hide"
    );
    Some(faults)
}

/// The node leading the most Raft groups, by every node's own report.
async fn busiest_leader(nodes: &[u32]) -> Option<u32> {
    let mut best: Option<(usize, u32)> = None;
    for &n in nodes {
        let Ok((200, body)) = get(
            &Cluster::admin_url(n),
            "/admin/cluster",
            Duration::from_secs(2),
        )
        .await
        else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
            continue;
        };
        let leads = v["groups"]
            .as_array()
            .map(|g| g.iter().filter(|g| g["role"] == "leader").count())
            .unwrap_or(0);
        if best.is_none_or(|(b, _)| leads > b) {
            best = Some((leads, n));
        }
    }
    best.map(|(_, n)| n)
}

pub struct Nemesis {
    pub faults: Vec<Fault>,
    /// The kinesin binary (its CLI moves leaders).
    pub binary: PathBuf,
    pub seed: u64,
    pub members: Members,
    pub history: History,
    pub cluster: Arc<Mutex<Cluster>>,
    pub net: Arc<Net>,
    /// The delay proxies' setting, when the nodes talk through them.
    pub delay: Option<Arc<Delay>>,
    /// How many nodes a disk fault may still leave damaged.
    pub damage_budget: AtomicU32,
}

impl Nemesis {
    /// Quiet, fault, hold, heal — until `stop`. Every fault is healed before
    /// this returns.
    pub async fn run(&self, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
        if self.faults.is_empty() {
            return Ok(());
        }
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut shards = 2u32;
        let mut created = 0u32;
        while !stop.load(Ordering::SeqCst) {
            let quiet = Duration::from_millis(rng.random_range(2000..4000));
            let fault = self.faults[rng.random_range(0..self.faults.len())];
            let hold = Duration::from_millis(rng.random_range(3000..8000));
            let members = self.members.list();
            let mut order = members.clone();
            order.shuffle(&mut rng);
            let percent = rng.random_range(20..=40);
            let pause_leader = rng.random_bool(0.5);
            let skew_ms =
                rng.random_range(1_000..600_000i64) * if rng.random_bool(0.5) { 1 } else { -1 };
            let (delay_ms, jitter_ms) = (rng.random_range(20..150u64), rng.random_range(0..100u64));
            // Faults that draw many numbers use their own generator, so the
            // rest of the schedule does not depend on how many they drew.
            let sub_seed: u64 = rng.random();
            sleep_unless(quiet, &stop).await;
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let minority = ((members.len() - 1) / 2).max(1);
            let mut damaged = None;
            let mut degraded = false;
            let description = match fault {
                Fault::PartitionHalves => {
                    let (a, b) = order.split_at(minority);
                    self.net.partition(&[a.to_vec(), b.to_vec()])?;
                    json!({"fault": "partition", "sides": [a, b]})
                }
                Fault::IsolateLeader => {
                    let leader = busiest_leader(&members).await.unwrap_or(order[0]);
                    let rest: Vec<u32> = members.iter().copied().filter(|n| *n != leader).collect();
                    self.net.partition(&[vec![leader], rest])?;
                    json!({"fault": "isolate-leader", "node": leader})
                }
                // A power failure is a kill: the nodes run in the
                // lose-unsynced storage mode, so what no fsync covered is gone.
                Fault::KillOne | Fault::KillMinority | Fault::PowerFailMinority => {
                    let count = if fault == Fault::KillOne { 1 } else { minority };
                    let victims = &order[..count];
                    let mut c = self.cluster.lock().await;
                    for v in victims {
                        c.kill(*v)?;
                    }
                    let name = if fault == Fault::PowerFailMinority {
                        "power-fail"
                    } else {
                        "kill"
                    };
                    json!({"fault": name, "nodes": victims})
                }
                Fault::KillAll | Fault::PowerFailAll => {
                    let mut c = self.cluster.lock().await;
                    for v in &order {
                        c.kill(*v)?;
                    }
                    if fault == Fault::PowerFailAll {
                        json!({"fault": "power-fail", "nodes": order})
                    } else {
                        json!({"fault": "kill-all"})
                    }
                }
                Fault::Bridge => {
                    let (bridge, rest) = order.split_first().context("no members")?;
                    let (left, right) = rest.split_at(rest.len() / 2);
                    self.net.partition(&[left.to_vec(), right.to_vec()])?;
                    json!({"fault": "bridge", "bridge": bridge, "sides": [left, right]})
                }
                Fault::DiskCorrupt => {
                    let victim = order[0];
                    if self.damage_budget.load(Ordering::SeqCst) == 0 {
                        json!({"fault": "disk", "skipped": "a minority is damaged already"})
                    } else {
                        let mut c = self.cluster.lock().await;
                        c.kill(victim)?;
                        let db = c.node(victim).data_dir().join("db");
                        let damage = disk::damage(&db, &mut StdRng::seed_from_u64(sub_seed))?;
                        damaged = Some(victim);
                        json!({"fault": "disk", "node": victim, "damage": damage})
                    }
                }
                Fault::ClockSkew => {
                    self.cluster
                        .lock()
                        .await
                        .set_clock_skew(order[0], skew_ms)?;
                    json!({"fault": "clock-skew", "node": order[0], "skew_ms": skew_ms})
                }
                Fault::Latency => {
                    self.delay
                        .as_ref()
                        .context("latency without the delay proxies")?
                        .set(delay_ms, jitter_ms);
                    json!({"fault": "latency", "delay_ms": delay_ms, "jitter_ms": jitter_ms})
                }
                Fault::Degraded => {
                    // Every group keeps a live majority only if no node is
                    // gone already (a damaged disk's node leaves its
                    // replicas unrepaired for a while).
                    let mut c = self.cluster.lock().await;
                    if members.len() < 3 || c.nodes.iter().any(|n| n.damaged) {
                        json!({"fault": "degraded", "skipped": "a node is gone already"})
                    } else {
                        let victim = order[0];
                        c.kill(victim)?;
                        degraded = true;
                        self.history
                            .log(Event::new("nemesis", Kind::Invoke, "degraded").node(victim));
                        json!({"fault": "degraded", "node": victim})
                    }
                }
                Fault::Pause => {
                    let node = if pause_leader {
                        busiest_leader(&members).await.unwrap_or(order[0])
                    } else {
                        order[0]
                    };
                    self.cluster.lock().await.pause(node)?;
                    json!({"fault": "pause", "node": node})
                }
                Fault::Loss => {
                    for &n in &members {
                        self.net.loss(n, percent)?;
                    }
                    json!({"fault": "loss", "percent": percent})
                }
                Fault::TransferStorm => {
                    json!({"fault": "transfer-storm", "for_ms": hold.as_millis() as u64})
                }
                Fault::ReplaceNode => {
                    let victim = order[0];
                    let added = self.cluster.lock().await.nodes.len() as u32 + 1;
                    let started = tokio::time::Instant::now();
                    let result = self.replace(victim, added).await;
                    let event = json!({"fault": "replace-node", "removed": victim, "added": added,
                        "took_ms": started.elapsed().as_millis() as u64});
                    match &result {
                        Ok(()) => self.history.log(
                            Event::new("nemesis", Kind::Ok, "membership").value(&event.to_string()),
                        ),
                        Err(e) => self.history.log(
                            Event::new("nemesis", Kind::Fail, "membership")
                                .value(&event.to_string())
                                .error(format!("{e:#}")),
                        ),
                    }
                    event
                }
                Fault::Reshard => {
                    let target = if shards == 2 { 4 } else { 2 };
                    let mut client =
                        Client::new(Cluster::api_url(order[0]), Duration::from_secs(15));
                    let result = client
                        .call(
                            "UpdateShardCount",
                            &json!({"StreamName": STREAM, "TargetShardCount": target,
                                "ScalingType": "UNIFORM_SCALING"}),
                        )
                        .await;
                    if result.is_ok() {
                        shards = target;
                    }
                    json!({"fault": "reshard", "target": target, "result": result.map(|_| "ok".to_string()).unwrap_or_else(|e| e.to_string())})
                }
            };
            self.history
                .log(Event::new("nemesis", Kind::Invoke, "fault").value(&description.to_string()));
            if fault == Fault::TransferStorm {
                let moved = self
                    .transfer_storm(hold, &mut StdRng::seed_from_u64(sub_seed), &stop)
                    .await;
                self.history
                    .log(Event::new("nemesis", Kind::Info, "fault").value(
                        &json!({"fault": "transfer-storm", "transfers": moved}).to_string(),
                    ));
            } else if degraded {
                let end = tokio::time::Instant::now() + hold;
                created += 1;
                self.work_while_degraded(order[1], created, &mut shards)
                    .await;
                sleep_unless(
                    end.saturating_duration_since(tokio::time::Instant::now()),
                    &stop,
                )
                .await;
                self.history
                    .log(Event::new("nemesis", Kind::Ok, "degraded").node(order[0]));
            } else if matches!(fault, Fault::KillAll | Fault::PowerFailAll) {
                // Everything is down: bring it back soon (a power cut).
                sleep_unless(Duration::from_millis(rng.random_range(1000..3000)), &stop).await;
            } else {
                sleep_unless(hold, &stop).await;
            }
            self.heal().await?;
            if let Some(node) = damaged {
                self.after_damage(node).await?;
            }
        }
        Ok(())
    }

    /// Through `via` while a node is down: a new stream becomes ACTIVE and
    /// every one of its shards takes a write, then the workload stream is
    /// resharded and becomes ACTIVE again, each step within
    /// `DEGRADED_STEP`. A step that does not is a `degraded-op` failure.
    async fn work_while_degraded(&self, via: u32, n: u32, shards: &mut u32) {
        let mut client = Client::new(Cluster::api_url(via), DEGRADED_STEP);
        let name = format!("chaos-degraded-{n}");
        let failed = |step: &str, error: String| {
            self.history.log(
                Event::new("nemesis", Kind::Fail, "degraded-op")
                    .node(via)
                    .value(step)
                    .error(error),
            );
        };
        let created = client
            .call(
                "CreateStream",
                &json!({"StreamName": name, "ShardCount": DEGRADED_SHARDS}),
            )
            .await;
        match created {
            Err(e) => failed("create-stream", e.to_string()),
            Ok(_) => match wait_active(&mut client, &name).await {
                Err(e) => failed("create-stream-active", e),
                Ok(()) => {
                    if let Err(e) = put_to_every_shard(&mut client, &name).await {
                        failed("put-new-stream", e);
                    }
                }
            },
        }
        if let Err(e) = wait_active(&mut client, STREAM).await {
            failed("stream-active-before-reshard", e);
            return;
        }
        let target = if *shards == 2 { 4 } else { 2 };
        let resharded = client
            .call(
                "UpdateShardCount",
                &json!({"StreamName": STREAM, "TargetShardCount": target,
                    "ScalingType": "UNIFORM_SCALING"}),
            )
            .await;
        match resharded {
            Err(e) => failed("reshard", e.to_string()),
            Ok(_) => {
                *shards = target;
                if let Err(e) = wait_active(&mut client, STREAM).await {
                    failed("reshard-active", e);
                }
            }
        }
        self.history.log(
            Event::new("nemesis", Kind::Info, "degraded-op")
                .node(via)
                .value(&json!({"created": name, "resharded_to": target}).to_string()),
        );
    }

    /// A node restarted on a damaged disk must either come back (and then
    /// is checked like any other) or refuse to start; one that refused
    /// leaves the run like a removed node.
    async fn after_damage(&self, node: u32) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let exited = self.cluster.lock().await.exited(node)?;
            if let Some(status) = exited {
                let log = {
                    let mut c = self.cluster.lock().await;
                    c.retire(node)?;
                    c.node(node).damaged = true;
                    std::fs::read_to_string(c.node(node).log_path()).unwrap_or_default()
                };
                let last = log
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                self.members.remove(node);
                self.damage_budget.fetch_sub(1, Ordering::SeqCst);
                self.history.log(
                    Event::new("nemesis", Kind::Info, "disk-fault-refused")
                        .node(node)
                        .value(
                            &json!({"exit": status.to_string(), "last_log_line": last}).to_string(),
                        ),
                );
                return Ok(());
            }
            if wait_ready(&[node], Duration::from_millis(500))
                .await
                .is_ok()
            {
                self.history
                    .log(Event::new("nemesis", Kind::Info, "disk-fault-recovered").node(node));
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                self.history.log(
                    Event::new("nemesis", Kind::Info, "disk-fault-hung")
                        .node(node)
                        .value("neither ready nor exited within 60 s"),
                );
                return Ok(());
            }
        }
    }

    /// Moves leaders of random groups to random voters until `hold` ends;
    /// returns how many transfers succeeded.
    async fn transfer_storm(&self, hold: Duration, rng: &mut StdRng, stop: &AtomicBool) -> u32 {
        let end = tokio::time::Instant::now() + hold;
        let mut moved = 0;
        let mut in_flight = Vec::new();
        while tokio::time::Instant::now() < end && !stop.load(Ordering::SeqCst) {
            let node = self.members.pick(rng);
            let pause = Duration::from_millis(rng.random_range(200..500));
            let choice = rng.random_range(0..u32::MAX);
            let groups = match get(
                &Cluster::admin_url(node),
                "/admin/cluster",
                Duration::from_secs(2),
            )
            .await
            {
                Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["groups"].as_array().cloned())
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            if !groups.is_empty() {
                let g = &groups[choice as usize % groups.len()];
                let voters: Vec<u64> = g["voters"]
                    .as_array()
                    .map(|v| v.iter().filter_map(|x| x.as_u64()).collect())
                    .unwrap_or_default();
                if !voters.is_empty() {
                    let to = voters[(choice as usize / 7) % voters.len()];
                    let status = tokio::process::Command::new(&self.binary)
                        .args(["cluster", "transfer-leader", "--endpoint"])
                        .arg(Cluster::grpc_url(node))
                        .args(["--group", &g["group"].to_string(), "--to", &to.to_string()])
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .kill_on_drop(true)
                        .status();
                    // Transfers overlap: a storm, not a queue.
                    in_flight.push(tokio::spawn(async move {
                        matches!(
                            tokio::time::timeout(Duration::from_secs(15), status).await,
                            Ok(Ok(s)) if s.success()
                        )
                    }));
                }
            }
            tokio::time::sleep(pause).await;
        }
        for t in in_flight {
            if t.await.unwrap_or(false) {
                moved += 1;
            }
        }
        moved
    }

    /// Starts node `added` (joining through the members), waits until it is
    /// ready, drains and removes `victim` through the CLI, then stops it.
    async fn replace(&self, victim: u32, added: u32) -> anyhow::Result<()> {
        self.net.add_host(added)?;
        let seeds = self.members.list();
        {
            let mut c = self.cluster.lock().await;
            c.add_node(added, &seeds)?;
            c.start(added)?;
        }
        wait_ready(&[added], Duration::from_secs(60)).await?;
        self.members.add(added);
        let via = self
            .members
            .list()
            .into_iter()
            .find(|n| *n != victim)
            .context("no other member")?;
        let remove = tokio::process::Command::new(&self.binary)
            .args([
                "cluster",
                "remove-node",
                "--node",
                &victim.to_string(),
                "--endpoint",
            ])
            .arg(Cluster::grpc_url(via))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(180), remove)
            .await
            .context("remove-node did not finish within 180 s")??;
        anyhow::ensure!(
            out.status.success(),
            "remove-node failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        self.members.remove(victim);
        self.cluster.lock().await.retire(victim)?;
        Ok(())
    }

    pub async fn heal(&self) -> anyhow::Result<()> {
        self.net.heal()?;
        if let Some(delay) = &self.delay {
            delay.set(0, 0);
        }
        let mut c = self.cluster.lock().await;
        for n in 1..=c.nodes.len() as u32 {
            c.set_clock_skew(n, 0)?;
        }
        c.heal()?;
        drop(c);
        self.history.log(Event::new("nemesis", Kind::Ok, "heal"));
        Ok(())
    }
}

/// How long each step of the degraded work may take.
const DEGRADED_STEP: Duration = Duration::from_secs(15);
const DEGRADED_SHARDS: u32 = 3;

/// Polls until `stream` is ACTIVE, within `DEGRADED_STEP`.
async fn wait_active(client: &mut Client, stream: &str) -> Result<(), String> {
    let end = tokio::time::Instant::now() + DEGRADED_STEP;
    let mut last = String::new();
    while tokio::time::Instant::now() < end {
        match client
            .call("DescribeStreamSummary", &json!({"StreamName": stream}))
            .await
        {
            Ok(v) => {
                let status = &v["StreamDescriptionSummary"]["StreamStatus"];
                if status == "ACTIVE" {
                    return Ok(());
                }
                last = format!("status {status}");
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "{stream} not ACTIVE within {DEGRADED_STEP:?} ({last})"
    ))
}

/// One PutRecord aimed at each open shard's first hash key.
async fn put_to_every_shard(client: &mut Client, stream: &str) -> Result<(), String> {
    let shards = client
        .call("ListShards", &json!({"StreamName": stream}))
        .await
        .map_err(|e| format!("ListShards: {e}"))?;
    for shard in shards["Shards"].as_array().into_iter().flatten() {
        let id = shard["ShardId"].as_str().unwrap_or_default();
        let start = shard["HashKeyRange"]["StartingHashKey"]
            .as_str()
            .unwrap_or("0");
        let put = client
            .call(
                "PutRecord",
                &json!({"StreamName": stream, "Data": "cHJvYmU=", "PartitionKey": "probe",
                    "ExplicitHashKey": start}),
            )
            .await
            .map_err(|e| format!("PutRecord to {id}: {e}"))?;
        if put["ShardId"] != id {
            return Err(format!("PutRecord to {id} landed in {}", put["ShardId"]));
        }
    }
    Ok(())
}

async fn sleep_unless(d: Duration, stop: &AtomicBool) {
    let end = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < end && !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
