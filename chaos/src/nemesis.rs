//! Faults, drawn from the run's seed: the same seed gives the same schedule
//! (which fault, which nodes, how long). Faults aimed at "the leader" pick
//! the node that leads the most groups at that moment.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::history::{Event, History, Kind};
use crate::net::Net;
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
}

use Fault::*;

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
    ("mixed", ALL),
];

pub fn scenario(name: &str) -> Option<Vec<Fault>> {
    SCENARIOS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, faults)| faults.to_vec())
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
        while !stop.load(Ordering::SeqCst) {
            let quiet = Duration::from_millis(rng.random_range(2000..4000));
            let fault = self.faults[rng.random_range(0..self.faults.len())];
            let hold = Duration::from_millis(rng.random_range(3000..8000));
            let members = self.members.list();
            let mut order = members.clone();
            order.shuffle(&mut rng);
            let percent = rng.random_range(20..=40);
            let pause_leader = rng.random_bool(0.5);
            // Faults that draw many numbers use their own generator, so the
            // rest of the schedule does not depend on how many they drew.
            let sub_seed: u64 = rng.random();
            sleep_unless(quiet, &stop).await;
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let minority = ((members.len() - 1) / 2).max(1);
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
                Fault::KillOne | Fault::KillMinority => {
                    let count = if fault == Fault::KillOne { 1 } else { minority };
                    let victims = &order[..count];
                    let mut c = self.cluster.lock().await;
                    for v in victims {
                        c.kill(*v)?;
                    }
                    json!({"fault": "kill", "nodes": victims})
                }
                Fault::KillAll => {
                    let mut c = self.cluster.lock().await;
                    for v in &order {
                        c.kill(*v)?;
                    }
                    json!({"fault": "kill-all"})
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
            } else if fault == Fault::KillAll {
                // Everything is down: bring it back soon (a power cut).
                sleep_unless(Duration::from_millis(rng.random_range(1000..3000)), &stop).await;
            } else {
                sleep_unless(hold, &stop).await;
            }
            self.heal().await?;
        }
        Ok(())
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
        self.cluster.lock().await.heal()?;
        self.history.log(Event::new("nemesis", Kind::Ok, "heal"));
        Ok(())
    }
}

async fn sleep_unless(d: Duration, stop: &AtomicBool) {
    let end = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < end && !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
