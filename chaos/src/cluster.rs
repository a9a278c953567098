//! Kinesin nodes as real processes, one per namespace, each with its own data
//! directory and log. Process faults go to the recorded PID, never by name.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use rand::Rng;

use crate::net::{namespace, node_addr, HOST_ADDR};

pub const API_PORT: u16 = 7450;
const GRPC_PORT: u16 = 7451;
const ADMIN_PORT: u16 = 7452;
/// Node `id`'s delay proxy listens on the host at this port + `id`.
const PROXY_PORT_BASE: u16 = 7500;

pub struct NodeProc {
    pub id: u32,
    dir: PathBuf,
    child: Option<Child>,
    pub paused: bool,
    /// Removed from the cluster by a membership change, or refused to start
    /// on a damaged disk: never restarted.
    pub retired: bool,
    /// Refused to start after a disk fault: its files are not dumped.
    pub damaged: bool,
}

/// How every node of a run is set up.
#[derive(Default, Clone)]
pub struct NodeSetup {
    /// Extra environment (the chaos modes of the server).
    pub env: Vec<(String, String)>,
    /// Extra lines of kinesin.toml (the broken no-fsync build).
    pub config: String,
    /// Nodes reach each other through the delay proxies.
    pub proxied: bool,
}

/// Node ids that are members of the cluster now: the workload and the faults
/// pick from these (a replaced node leaves, its replacement joins).
#[derive(Clone)]
pub struct Members(Arc<RwLock<Vec<u32>>>);

impl Members {
    pub fn new(count: u32) -> Members {
        Members(Arc::new(RwLock::new((1..=count).collect())))
    }

    pub fn list(&self) -> Vec<u32> {
        self.0.read().expect("members lock").clone()
    }

    pub fn pick(&self, rng: &mut impl Rng) -> u32 {
        let list = self.list();
        list[rng.random_range(0..list.len())]
    }

    pub fn add(&self, id: u32) {
        self.0.write().expect("members lock").push(id);
    }

    pub fn remove(&self, id: u32) {
        self.0.write().expect("members lock").retain(|n| *n != id);
    }
}

pub struct Cluster {
    binary: PathBuf,
    root: PathBuf,
    pub nodes: Vec<NodeProc>,
    setup: NodeSetup,
}

impl NodeProc {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("node.log")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The file whose content (ms) skews this node's wall clock.
    fn clock_file(&self) -> PathBuf {
        self.dir.join("clock-skew-ms")
    }
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .context("cannot run kill")?;
    anyhow::ensure!(status.success(), "kill {sig} {pid} failed");
    Ok(())
}

impl Cluster {
    pub fn new(
        binary: &Path,
        root: &Path,
        count: u32,
        setup: NodeSetup,
    ) -> anyhow::Result<Cluster> {
        let mut cluster = Cluster {
            binary: binary.to_path_buf(),
            root: root.to_path_buf(),
            nodes: Vec::new(),
            setup,
        };
        for id in 1..=count {
            let seeds = if id == 1 { vec![] } else { vec![1] };
            cluster.add_node(id, &seeds)?;
        }
        Ok(cluster)
    }

    /// Writes the config of node `id` (the next id), joining through `seeds`
    /// (none: it bootstraps a new cluster). Does not start it.
    pub fn add_node(&mut self, id: u32, seeds: &[u32]) -> anyhow::Result<()> {
        anyhow::ensure!(
            id as usize == self.nodes.len() + 1,
            "node ids are added in order"
        );
        let dir = self.root.join(format!("n{id}"));
        std::fs::create_dir_all(&dir)?;
        let seeds: Vec<String> = seeds
            .iter()
            .map(|s| format!("\"{}\"", self.peer_addr(*s)))
            .collect();
        let addr = node_addr(id);
        let advertise_grpc = self.peer_addr(id);
        std::fs::write(
            dir.join("kinesin.toml"),
            format!(
                "node_id = {id}\n\
                 data_dir = \"{data}\"\n\
                 listen_api = \"0.0.0.0:{API_PORT}\"\n\
                 listen_grpc = \"0.0.0.0:{GRPC_PORT}\"\n\
                 listen_admin = \"0.0.0.0:{ADMIN_PORT}\"\n\
                 advertise_grpc = \"{advertise_grpc}\"\n\
                 advertise_api = \"{addr}:{API_PORT}\"\n\
                 seeds = [{seeds}]\n\
                 replication_factor = 3\n\
                 shard_heartbeat_ms = 200\n\
                 shard_election_min_ms = 1000\n\
                 shard_election_max_ms = 2000\n\
                 shard_snapshot_every = 500\n\
                 repair_after_secs = 3600\n\
                 auth = \"none\"\n\
                 insecure_internal = true\n{extra}",
                data = dir.join("data").display(),
                seeds = seeds.join(", "),
                extra = self.setup.config,
            ),
        )?;
        self.nodes.push(NodeProc {
            id,
            dir,
            child: None,
            paused: false,
            retired: false,
            damaged: false,
        });
        Ok(())
    }

    /// Stops a node that has left the cluster for good.
    pub fn retire(&mut self, id: u32) -> anyhow::Result<()> {
        self.kill(id)?;
        self.node(id).retired = true;
        Ok(())
    }

    pub fn node(&mut self, id: u32) -> &mut NodeProc {
        &mut self.nodes[(id - 1) as usize]
    }

    pub fn start(&mut self, id: u32) -> anyhow::Result<()> {
        let binary = self.binary.clone();
        let env = self.setup.env.clone();
        let node = self.node(id);
        if node.child.is_some() || node.retired {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.log_path())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &namespace(id)])
            .arg(&binary)
            .args(["server", "--config"])
            .arg(node.dir.join("kinesin.toml"))
            .envs(env)
            .env("KINESIN_CHAOS_CLOCK_FILE", node.clock_file())
            .env(
                "KINESIN_LOG",
                "info,openraft=warn,h2=warn,tower=warn,hyper=warn",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start node {id}"))?;
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    /// SIGKILL by PID, then reap.
    pub fn kill(&mut self, id: u32) -> anyhow::Result<()> {
        let node = self.node(id);
        if let Some(mut child) = node.child.take() {
            child.kill()?;
            child.wait()?;
        }
        node.paused = false;
        Ok(())
    }

    pub fn pause(&mut self, id: u32) -> anyhow::Result<()> {
        let node = self.node(id);
        if let Some(pid) = node.pid() {
            signal(pid, "-STOP")?;
            node.paused = true;
        }
        Ok(())
    }

    pub fn resume(&mut self, id: u32) -> anyhow::Result<()> {
        let node = self.node(id);
        if let (Some(pid), true) = (node.pid(), node.paused) {
            signal(pid, "-CONT")?;
            node.paused = false;
        }
        Ok(())
    }

    /// Resumes paused nodes and starts stopped ones.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        for id in 1..=self.nodes.len() as u32 {
            self.resume(id)?;
            self.start(id)?;
        }
        Ok(())
    }

    /// SIGTERM (a clean stop), SIGKILL after `grace`.
    pub async fn stop_all(&mut self, grace: Duration) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            let Some(mut child) = node.child.take() else {
                continue;
            };
            if child.try_wait()?.is_some() {
                continue;
            }
            if node.paused {
                signal(child.id(), "-CONT")?;
            }
            signal(child.id(), "-TERM")?;
            let deadline = tokio::time::Instant::now() + grace;
            loop {
                if child.try_wait()?.is_some() {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    child.kill()?;
                    child.wait()?;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Where other nodes reach node `id`'s gRPC port: directly, or through
    /// its delay proxy.
    fn peer_addr(&self, id: u32) -> String {
        if self.setup.proxied {
            format!("{HOST_ADDR}:{}", Cluster::proxy_port(id))
        } else {
            format!("{}:{GRPC_PORT}", node_addr(id))
        }
    }

    pub fn proxy_port(id: u32) -> u16 {
        PROXY_PORT_BASE + id as u16
    }

    /// Node `id`'s gRPC address on its own host (the proxy's target).
    pub fn grpc_addr(id: u32) -> std::net::SocketAddr {
        (node_addr(id), GRPC_PORT).into()
    }

    /// Shifts node `id`'s wall clock by `ms` (0 = back to the system clock).
    pub fn set_clock_skew(&mut self, id: u32, ms: i64) -> anyhow::Result<()> {
        std::fs::write(self.node(id).clock_file(), ms.to_string())?;
        Ok(())
    }

    /// Whether node `id` was started and has exited on its own since.
    pub fn exited(&mut self, id: u32) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match self.node(id).child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => Ok(None),
        }
    }

    pub fn api_url(id: u32) -> String {
        format!("{}:{API_PORT}", node_addr(id))
    }

    pub fn grpc_url(id: u32) -> String {
        format!("{}:{GRPC_PORT}", node_addr(id))
    }

    pub fn admin_url(id: u32) -> String {
        format!("{}:{ADMIN_PORT}", node_addr(id))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
