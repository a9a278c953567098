//! One chaos run: hosts, cluster, workload, faults, heal, final reads,
//! replica dumps, check. Everything it starts it stops.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use tokio::sync::Mutex;

use crate::checker::{self, Replicas, Report};
use crate::client::{get, Client};
use crate::cluster::{Cluster, Members, NodeProc, NodeSetup};
use crate::history::{self, Event, History, Kind};
use crate::nemesis::{scenario, Nemesis};
use crate::net::{Net, HOST_ADDR};
use crate::proxy::Proxies;
use crate::sqs;
use crate::workload::{self, STREAM};

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub scenario: String,
    pub seed: u64,
    pub duration: Duration,
    pub nodes: u32,
    pub binary: PathBuf,
    pub out: PathBuf,
    /// Run a deliberately broken server: the checker must catch it.
    pub broken: Option<Broken>,
    /// Run the SQS workload (`crate::sqs`) beside the stream workload.
    pub sqs: bool,
}

/// The deliberately broken servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Broken {
    /// Leaders acknowledge appends not committed within 200 ms.
    UnsafeAck,
    /// No fsync before acknowledging (`fsync = "never-unsafe"`): loses
    /// acknowledged records when combined with the power-fail fault.
    NoFsync,
}

impl Broken {
    pub fn name(self) -> &'static str {
        match self {
            Broken::UnsafeAck => "unsafe-ack",
            Broken::NoFsync => "no-fsync",
        }
    }
}

impl RunConfig {
    pub fn replay_command(&self) -> String {
        format!(
            "kinesin-chaos run --scenario {} --seed {} --duration {} --nodes {} --binary {}{}",
            self.scenario,
            self.seed,
            self.duration.as_secs(),
            self.nodes,
            self.binary.display(),
            self.broken
                .map(|b| format!(" --broken {}", b.name()))
                .unwrap_or_default()
        ) + if self.sqs { " --sqs" } else { "" }
    }

    /// The run's directory name: scenario, nodes, seed, broken mode.
    pub fn dir_name(&self) -> String {
        format!(
            "{}-n{}-s{}{}",
            self.scenario,
            self.nodes,
            self.seed,
            self.broken
                .map(|b| format!("-{}", b.name()))
                .unwrap_or_default()
        ) + if self.sqs { "-sqs" } else { "" }
    }
}

const PRODUCERS: u32 = 4;
const READERS: u32 = 2;
const LIVENESS_BOUND: Duration = Duration::from_secs(60);

/// Waits until no node serves an AWS API request (its
/// `kinesin_api_requests_in_flight` is 0), within `bound`. A node that does
/// not answer is reported and the run goes on: the final reads and the
/// checker then say what that cost.
async fn wait_requests_settled(nodes: &[u32], bound: Duration) {
    let start = Instant::now();
    for &n in nodes {
        loop {
            if let Ok((200, body)) =
                get(&Cluster::admin_url(n), "/metrics", Duration::from_secs(2)).await
            {
                let in_flight = body
                    .lines()
                    .find_map(|l| l.strip_prefix("kinesin_api_requests_in_flight "))
                    .and_then(|v| v.trim().parse::<f64>().ok());
                if in_flight == Some(0.0) {
                    break;
                }
            }
            if start.elapsed() > bound {
                eprintln!("chaos: node {n} still serves requests (or is silent) after {bound:?}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

pub async fn wait_ready(nodes: &[u32], bound: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for &n in nodes {
        loop {
            if let Ok((200, _)) = get(
                &Cluster::admin_url(n),
                "/health/ready",
                Duration::from_secs(2),
            )
            .await
            {
                break;
            }
            if start.elapsed() > bound {
                bail!("node {n} not ready within {bound:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(start.elapsed())
}

async fn create_stream(nodes: u32) -> anyhow::Result<()> {
    let mut c = Client::new(Cluster::api_url(1), Duration::from_secs(15));
    c.call(
        "CreateStream",
        &json!({"StreamName": STREAM, "ShardCount": 2}),
    )
    .await
    .map_err(|e| anyhow::anyhow!("CreateStream: {e}"))?;
    let start = Instant::now();
    for n in 1..=nodes {
        let mut c = Client::new(Cluster::api_url(n), Duration::from_secs(5));
        loop {
            let r = c
                .call("DescribeStreamSummary", &json!({"StreamName": STREAM}))
                .await;
            if let Ok(v) = r {
                if v["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE" {
                    break;
                }
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("stream not ACTIVE on node {n} within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Every node is ready (joined, every local group knows its leader) within
/// the bound after heal.
async fn check_liveness(members: &[u32], history: &History) {
    match wait_ready(members, LIVENESS_BOUND).await {
        Ok(took) => history.log(
            Event::new("liveness", Kind::Ok, "liveness")
                .value(&format!("all nodes ready after {} ms", took.as_millis())),
        ),
        Err(e) => history.log(Event::new("liveness", Kind::Fail, "liveness").error(e)),
    }
}

/// `panicked at` lines of every node log in a run directory.
pub fn find_panics_in(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("node.log"))
        .filter(|p| p.exists())
        .collect();
    logs.sort();
    for path in logs {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        for line in log.lines().filter(|l| l.contains("panicked at")) {
            found.push(format!("{}: {line}", path.display()));
        }
    }
    found
}

/// Stops the workload and fault tasks when a run ends for any reason
/// (error, Ctrl-C), so that they cannot touch the next run's cluster.
struct Tasks {
    stops: Vec<Arc<AtomicBool>>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for s in &self.stops {
            s.store(true, Ordering::SeqCst);
        }
        for h in &self.handles {
            h.abort();
        }
    }
}

/// The output of `kinesin debug <what> --data-dir` on a stopped node.
fn debug_dump(binary: &Path, node: &NodeProc, what: &str) -> anyhow::Result<Vec<u8>> {
    let out = std::process::Command::new(binary)
        .args(["debug", what, "--data-dir"])
        .arg(node.data_dir())
        .output()
        .with_context(|| format!("cannot run kinesin debug {what}"))?;
    if !out.status.success() {
        bail!(
            "kinesin debug {what} on node {}: {}",
            node.id,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

fn dump_replicas(binary: &Path, cluster: &Cluster) -> anyhow::Result<Replicas> {
    let mut replicas = Replicas::new();
    for node in cluster.nodes.iter().filter(|n| !n.damaged) {
        let out = debug_dump(binary, node, "records")?;
        let mut groups: BTreeMap<u64, Vec<(String, String)>> = BTreeMap::new();
        for line in String::from_utf8_lossy(&out).lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            groups
                .entry(v["group"].as_u64().unwrap_or_default())
                .or_default()
                .push((
                    v["seq"].as_str().unwrap_or_default().to_string(),
                    v["data"].as_str().unwrap_or_default().to_string(),
                ));
        }
        replicas.insert(node.id, groups);
    }
    Ok(replicas)
}

/// Each node's Raft state (`kinesin debug raft`) into `raft-nN.jsonl`, for
/// finding out why replicas disagree: which log ids each holds, under which
/// vote, applied how far.
fn dump_raft_state(binary: &Path, cluster: &Cluster, out: &Path) -> anyhow::Result<()> {
    for node in cluster.nodes.iter().filter(|n| !n.damaged) {
        let dump = debug_dump(binary, node, "raft")?;
        std::fs::write(out.join(format!("raft-n{}.jsonl", node.id)), dump)?;
    }
    Ok(())
}

pub async fn run(config: &RunConfig) -> anyhow::Result<Report> {
    let faults = scenario(&config.scenario)
        .with_context(|| format!("unknown scenario {}", config.scenario))?;
    if config.out.exists() {
        std::fs::remove_dir_all(&config.out)?;
    }
    std::fs::create_dir_all(&config.out)?;
    let net = Arc::new(Net::create(config.nodes)?);
    let mut setup = NodeSetup::default();
    match config.broken {
        Some(Broken::UnsafeAck) => setup
            .env
            .push(("KINESIN_CHAOS_UNSAFE_ACK_MS".to_string(), "200".to_string())),
        Some(Broken::NoFsync) => setup.config = "fsync = \"never-unsafe\"\n".to_string(),
        None => {}
    }
    if faults.iter().any(|f| f.needs_power_fail_mode()) {
        setup
            .env
            .push(("KINESIN_CHAOS_LOSE_UNSYNCED".to_string(), "1".to_string()));
    }
    setup.proxied = faults.iter().any(|f| f.needs_proxies());
    let mut proxies = Proxies::new();
    if setup.proxied {
        for n in 1..=config.nodes {
            proxies
                .add(
                    (HOST_ADDR, Cluster::proxy_port(n)).into(),
                    Cluster::grpc_addr(n),
                )
                .await?;
        }
    }
    let delay = setup.proxied.then(|| proxies.delay.clone());
    let cluster = Arc::new(Mutex::new(Cluster::new(
        &config.binary,
        &config.out,
        config.nodes,
        setup,
    )?));
    {
        let mut c = cluster.lock().await;
        c.start(1)?;
        wait_ready(&[1], Duration::from_secs(60)).await?;
        for n in 2..=config.nodes {
            c.start(n)?;
        }
    }
    wait_ready(
        &(1..=config.nodes).collect::<Vec<_>>(),
        Duration::from_secs(90),
    )
    .await?;
    create_stream(config.nodes).await?;
    if config.sqs {
        sqs::create_queues(config.nodes).await?;
    }

    let history = History::create(&config.out.join("history.jsonl"))?;
    let members = Members::new(config.nodes);
    let stop_workload = Arc::new(AtomicBool::new(false));
    let stop_faults = Arc::new(AtomicBool::new(false));
    let mut tasks = Tasks {
        stops: vec![stop_workload.clone(), stop_faults.clone()],
        handles: Vec::new(),
    };
    for p in 0..PRODUCERS {
        tasks.handles.push(tokio::spawn(workload::producer(
            p,
            members.clone(),
            config.seed,
            history.clone(),
            stop_workload.clone(),
        )));
    }
    for r in 0..READERS {
        tasks.handles.push(tokio::spawn(workload::reader(
            r,
            members.clone(),
            config.seed,
            history.clone(),
            stop_workload.clone(),
        )));
    }
    if config.sqs {
        for p in 0..sqs::PRODUCERS {
            tasks.handles.push(tokio::spawn(sqs::producer(
                p,
                members.clone(),
                config.seed,
                history.clone(),
                stop_workload.clone(),
            )));
        }
        for c in 0..sqs::CONSUMERS {
            tasks.handles.push(tokio::spawn(sqs::consumer(
                c,
                members.clone(),
                config.seed,
                history.clone(),
                stop_workload.clone(),
            )));
        }
    }
    let nemesis = Nemesis {
        faults,
        binary: config.binary.clone(),
        seed: config.seed,
        members: members.clone(),
        history: history.clone(),
        cluster: cluster.clone(),
        net: net.clone(),
        delay,
        damage_budget: AtomicU32::new((config.nodes - 1) / 2),
    };
    let nemesis_stop = stop_faults.clone();
    let nemesis = Arc::new(nemesis);
    let faults = {
        let nemesis = nemesis.clone();
        tokio::spawn(async move { nemesis.run(nemesis_stop).await })
    };
    tokio::time::sleep(config.duration).await;
    stop_faults.store(true, Ordering::SeqCst);
    let result = faults.await?;
    nemesis.heal().await?;
    result?;
    check_liveness(&members.list(), &history).await;
    // Keep the workload running briefly on the healed cluster.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_workload.store(true, Ordering::SeqCst);
    for t in std::mem::take(&mut tasks.handles) {
        t.await?;
    }
    // Appends a client gave up on may still be retried inside the cluster:
    // let every node finish the requests it serves before the final reads.
    wait_requests_settled(&members.list(), Duration::from_secs(30)).await;
    // Through every member at once: one bound for all of them.
    let mut reads = tokio::task::JoinSet::new();
    for n in members.list() {
        let history = history.clone();
        reads.spawn(async move {
            workload::final_read(n, &history, Duration::from_secs(60)).await;
        });
    }
    while reads.join_next().await.transpose()?.is_some() {}
    if config.sqs {
        sqs::drain(&members.list(), &history, Duration::from_secs(60)).await;
    }
    history.flush()?;

    let mut c = cluster.lock().await;
    c.stop_all(Duration::from_secs(20)).await?;
    let replicas = dump_replicas(&config.binary, &c)?;
    std::fs::write(
        config.out.join("replicas.json"),
        serde_json::to_vec(&replicas)?,
    )?;
    dump_raft_state(&config.binary, &c, &config.out)?;
    let panics = find_panics_in(&config.out);
    drop(c);
    drop(proxies);
    drop(net);
    let events = history::load(&config.out.join("history.jsonl"))?;
    let report = checker::check(&events, &replicas, &panics);
    write_outputs(config, &report)?;
    Ok(report)
}

/// results.json and summary.txt of a run.
pub fn write_outputs(config: &RunConfig, report: &Report) -> anyhow::Result<()> {
    let results = json!({
        "valid": report.valid,
        "scenario": config.scenario,
        "seed": config.seed,
        "duration_secs": config.duration.as_secs(),
        "nodes": config.nodes,
        "broken": config.broken.map(Broken::name),
        "replay": config.replay_command(),
        "counts": report.counts,
        "errors": report.errors,
        "notes": report.notes,
    });
    std::fs::write(
        config.out.join("results.json"),
        serde_json::to_vec_pretty(&results)?,
    )?;
    std::fs::write(config.out.join("summary.txt"), summary(config, report))?;
    Ok(())
}

pub fn summary(config: &RunConfig, report: &Report) -> String {
    let mut s = format!(
        "scenario {} seed {}: {}\n",
        config.scenario,
        config.seed,
        if report.valid { "VALID" } else { "INVALID" }
    );
    for (k, v) in &report.counts {
        s += &format!("  {k}: {v}\n");
    }
    for (k, v) in &report.errors {
        s += &format!("  ERROR {k}: {} (e.g. {})\n", v.count, v.examples[0]);
    }
    for (k, v) in &report.notes {
        s += &format!("  note {k}: {}\n", v.count);
    }
    s += &format!("  replay: {}\n", config.replay_command());
    s
}
