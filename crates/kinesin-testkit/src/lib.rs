//! In-process test clusters: N real nodes (real RocksDB, real gRPC on
//! loopback, real Raft) in one process, with a transport filter that can
//! partition, drop and delay Raft traffic between them. Their nodes also run
//! the test key-value group kind ([`kv`]).

pub mod kv;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kinesin_raft::{FilterAction, GroupKinds, TimingProfile, TransportFilter};
use kinesin_server::{Config, FsyncSetting, Node};
use kinesin_types::{GroupId, NodeId};

/// Rules for Raft traffic between nodes; the default lets everything pass.
#[derive(Default)]
pub struct NetFilter {
    rules: Mutex<HashMap<(u64, u64), FilterAction>>,
}

impl NetFilter {
    /// Cuts all traffic between the two sides, both ways.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        let mut rules = self.rules.lock().expect("rules lock");
        for x in a {
            for y in b {
                rules.insert((*x, *y), FilterAction::Drop);
                rules.insert((*y, *x), FilterAction::Drop);
            }
        }
    }

    /// Delays every message from `from` to `to`.
    pub fn delay(&self, from: u64, to: u64, by: Duration) {
        self.rules
            .lock()
            .expect("rules lock")
            .insert((from, to), FilterAction::Delay(by));
    }

    pub fn heal(&self) {
        self.rules.lock().expect("rules lock").clear();
    }
}

impl TransportFilter for NetFilter {
    fn check(&self, from: u64, to: u64) -> FilterAction {
        self.rules
            .lock()
            .expect("rules lock")
            .get(&(from, to))
            .copied()
            .unwrap_or(FilterAction::Pass)
    }
}

/// Timers and snapshot settings of a test cluster.
#[derive(Debug, Clone)]
pub struct TestOptions {
    pub meta: TimingProfile,
    pub shard: TimingProfile,
    pub fsync: FsyncSetting,
    /// Seconds an unreachable node keeps its replicas.
    pub repair_after_secs: u64,
    /// Mutual TLS on the internal port: the CA, certificate and key files
    /// every node uses. None: plaintext (`insecure_internal`).
    pub internal_tls: Option<[PathBuf; 3]>,
    /// Changes every node's configuration last (limits, timeouts).
    pub configure: fn(&mut Config),
}

impl Default for TestOptions {
    /// Faster timers than production, still safe on a loaded 2-core machine.
    fn default() -> Self {
        TestOptions {
            meta: TimingProfile {
                heartbeat_ms: 100,
                election_min_ms: 800,
                election_max_ms: 1600,
                ..TimingProfile::meta()
            },
            shard: TimingProfile {
                heartbeat_ms: 150,
                election_min_ms: 1000,
                election_max_ms: 2000,
                ..TimingProfile::shard()
            },
            fsync: FsyncSetting::Always,
            repair_after_secs: 3600,
            internal_tls: None,
            configure: |_| {},
        }
    }
}

pub struct TestCluster {
    nodes: Vec<Option<Node>>,
    configs: Vec<Config>,
    pub filter: Arc<NetFilter>,
    options: TestOptions,
    _dir: tempfile::TempDir,
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("timed out after {timeout:?} waiting for {what}")
}

pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KINESIN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

impl TestCluster {
    pub async fn start(n: usize) -> anyhow::Result<TestCluster> {
        Self::start_with(n, TestOptions::default()).await
    }

    /// Starts node 1 (which bootstraps), then the others joining through it.
    pub async fn start_with(n: usize, options: TestOptions) -> anyhow::Result<TestCluster> {
        init_logging();
        let dir = tempfile::tempdir()?;
        let mut cluster = TestCluster {
            nodes: Vec::new(),
            configs: Vec::new(),
            filter: Arc::new(NetFilter::default()),
            options,
            _dir: dir,
        };
        for i in 0..n {
            let id = i as u64 + 1;
            let mut config = Config {
                node_id: id,
                data_dir: PathBuf::from(cluster._dir.path()).join(format!("node-{id}")),
                listen_api: "127.0.0.1:0".parse()?,
                listen_grpc: "127.0.0.1:0".parse()?,
                listen_admin: "127.0.0.1:0".parse()?,
                replication_factor: n.min(3),
                fsync: cluster.options.fsync,
                repair_after_secs: cluster.options.repair_after_secs,
                insecure_internal: cluster.options.internal_tls.is_none(),
                ..Config::default()
            };
            if let Some([ca, cert, key]) = cluster.options.internal_tls.clone() {
                config.internal_tls_ca_file = Some(ca);
                config.internal_tls_cert_file = Some(cert);
                config.internal_tls_key_file = Some(key);
            }
            if i > 0 {
                config.seeds = vec![cluster.configs[0].grpc_address()];
            }
            (cluster.options.configure)(&mut config);
            let node = cluster.launch(config).await?;
            cluster.configs.push(node.config.clone());
            cluster.nodes.push(Some(node));
        }
        cluster.wait_for_meta_voters(n.min(3)).await?;
        Ok(cluster)
    }

    async fn launch(&self, config: Config) -> anyhow::Result<Node> {
        let mut kinds = GroupKinds::default();
        kinds.register(kv::KV_KIND, Arc::new(kv::KvKind));
        Node::start(
            config,
            self.filter.clone(),
            (self.options.meta.clone(), self.options.shard.clone()),
            kinds,
        )
        .await
    }

    /// Waits until the metadata group has `count` voters, no membership
    /// change under way (a node stopped during joint consensus could leave
    /// it without a quorum), and every live node has the same map.
    pub async fn wait_for_meta_voters(&self, count: usize) -> anyhow::Result<()> {
        wait_until("metadata voters", Duration::from_secs(60), || async {
            let Some(leader) = self.live().find(|n| n.host.is_leader(GroupId::META)) else {
                return false;
            };
            let Some(status) = leader.host.status(GroupId::META) else {
                return false;
            };
            let applied = leader.meta.state().applied_index;
            status.voters.len() == count
                && !status.joint
                && self.live().all(|n| n.meta.state().applied_index >= applied)
        })
        .await
    }

    pub fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().flatten()
    }

    pub fn node(&self, id: u64) -> &Node {
        self.nodes[(id - 1) as usize]
            .as_ref()
            .expect("node is running")
    }

    pub fn any_node(&self) -> &Node {
        self.live().next().expect("a live node")
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.nodes[(id - 1) as usize].is_some()
    }

    /// Stops a node abruptly, as a kill -9 would: no leadership hand-over
    /// and no flush ([`Node::crash`]). What it wrote to the WAL stays; what
    /// its groups applied since the last flush is re-applied from the log
    /// when it restarts.
    pub async fn stop(&mut self, id: u64) {
        if let Some(node) = self.nodes[(id - 1) as usize].take() {
            node.crash().await;
        }
    }

    /// Restarts a stopped node from its data directory on its old addresses.
    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let config = self.configs[(id - 1) as usize].clone();
        // Tasks of the stopped node may hold the database for a moment.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let node = loop {
            match self.launch(config.clone()).await {
                Ok(node) => break node,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("restart of node {id} failed, retrying: {e:#}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.nodes[(id - 1) as usize] = Some(node);
        Ok(())
    }

    /// Creates a stream and waits until every shard group has a leader that
    /// every replica knows.
    pub async fn create_stream(&self, name: &str, shards: u32) -> anyhow::Result<()> {
        self.any_node()
            .router
            .create_stream(name, shards, 0, 0)
            .await?;
        wait_until("shard leaders", Duration::from_secs(60), || async {
            let state = self.any_node().meta.state();
            let Some(stream) = state.streams.get(name) else {
                return false;
            };
            stream.shards.iter().all(|s| {
                s.replicas.iter().all(|r| {
                    self.nodes[(r.0 - 1) as usize].as_ref().is_some_and(|n| {
                        n.host.status(s.group).is_some_and(|st| st.leader.is_some())
                    })
                })
            })
        })
        .await
    }

    /// The node currently leading `group`, as the live replicas see it.
    pub fn leader_of(&self, group: GroupId) -> Option<NodeId> {
        self.live()
            .find(|n| n.host.is_leader(group))
            .map(|n| n.node_id())
    }

    pub async fn shutdown(self) {
        for node in self.nodes.into_iter().flatten() {
            node.shutdown().await;
        }
    }
}
