//! One Kinesin node: storage, the Raft host with the metadata group and the
//! local shard replicas, the router, and the network servers. Used by
//! `kinesin server`, `kinesin dev` and the in-process test clusters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use kinesin_meta::{MetaCommand, MetaStateMachine, NodeInfo, NodeState};
use kinesin_proto::tls::{Dialer, InternalTls};
use kinesin_proto::v1::node_client::NodeClient;
use kinesin_proto::v1::{ClusterInfoRequest, JoinRequest};
use kinesin_raft::{GroupKinds, RaftHost, Role, TimingProfile, TransportFilter};
use kinesin_router::{LocalShards, Router, RouterConfig};
use kinesin_storage::data_version::{self, DATA_VERSION};
use kinesin_storage::{Cf, FsyncPolicy, Storage, WriteBatch};
use kinesin_types::{GroupId, NodeId};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::config::{Config, FsyncSetting};
use crate::{admin, controller, failover, reconcile};

const IDENTITY_KEY: &[u8] = b"identity";

/// What the data directory says about whom it belongs to, and the data
/// version its contents are in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Identity {
    cluster_id: String,
    node_id: u64,
    /// Absent in directories written before data versions existed.
    #[serde(default = "first_data_version")]
    data_version: u32,
}

fn first_data_version() -> u32 {
    1
}

pub struct Node {
    pub config: Config,
    pub host: RaftHost,
    pub router: Arc<Router>,
    pub meta: Arc<MetaStateMachine>,
    pub shards: Arc<LocalShards>,
    storage: Storage,
    joined: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn load_identity(storage: &Storage) -> anyhow::Result<Option<Identity>> {
    match storage.get(Cf::Node, IDENTITY_KEY)? {
        Some(v) => Ok(Some(
            serde_json::from_slice(&v).context("corrupt node identity")?,
        )),
        None => Ok(None),
    }
}

fn save_identity(storage: &Storage, identity: &Identity) -> anyhow::Result<()> {
    let mut batch = WriteBatch::default();
    batch.put_cf(
        storage.cf(Cf::Node),
        IDENTITY_KEY,
        serde_json::to_vec(identity)?,
    );
    storage.write_durable(batch)?;
    Ok(())
}

pub fn shard_timing(config: &Config) -> TimingProfile {
    TimingProfile {
        heartbeat_ms: config.shard_heartbeat_ms,
        election_min_ms: config.shard_election_min_ms,
        election_max_ms: config.shard_election_max_ms,
        snapshot_every: config.shard_snapshot_every,
        keep_below_snapshot: config.shard_snapshot_every.min(2_000),
    }
}

impl Node {
    /// Opens the data directory, starts the servers, and bootstraps or joins.
    /// `kinds` are the group kinds (besides stream shards and the built-in
    /// SQS queues and Firehose delivery streams) this node runs when the map places one here.
    pub async fn start(
        mut config: Config,
        filter: Arc<dyn TransportFilter>,
        timing: (TimingProfile, TimingProfile),
        mut kinds: GroupKinds,
    ) -> anyhow::Result<Node> {
        config.validate()?;
        kinds.register(
            kinesin_queue::QUEUE_KIND,
            Arc::new(kinesin_queue::QueueKind),
        );
        kinds.register(
            kinesin_firehose::FIREHOSE_KIND,
            Arc::new(kinesin_firehose::FirehoseKind),
        );
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!("cannot create data directory {}", config.data_dir.display())
        })?;
        let policy = match config.fsync {
            FsyncSetting::Always => FsyncPolicy::Always,
            FsyncSetting::NeverUnsafe => FsyncPolicy::NeverUnsafe,
        };
        let db_dir = config.data_dir.join("db");
        let storage = if lose_unsynced_on_crash() {
            Storage::open_losing_unsynced_on_crash(&db_dir, policy)
        } else {
            Storage::open(&db_dir, policy)
        }
        .with_context(|| format!("cannot open storage in {}", config.data_dir.display()))?;
        let mut identity = load_identity(&storage)?;
        if let Some(id) = &identity {
            data_version::check_readable(id.data_version)
                .with_context(|| format!("cannot open {}", config.data_dir.display()))?;
            if id.node_id != config.node_id {
                bail!(
                    "data directory {} belongs to node {} of cluster {}, not node {}",
                    config.data_dir.display(),
                    id.node_id,
                    id.cluster_id,
                    config.node_id
                );
            }
        }
        let node_id = NodeId(config.node_id);
        let internal_tls = config.internal_tls()?;
        let dialer = internal_tls
            .clone()
            .map_or_else(Dialer::plaintext, Dialer::tls);
        let host = RaftHost::new(node_id, storage.clone(), filter, dialer);
        let meta = Arc::new(MetaStateMachine::open(storage.clone())?);
        if let Some(id) = identity
            .as_mut()
            .filter(|id| id.data_version < DATA_VERSION)
        {
            let from = id.data_version;
            id.data_version = DATA_VERSION;
            save_identity(&storage, id)?;
            tracing::info!(
                from,
                to = DATA_VERSION,
                dir = %config.data_dir.display(),
                "upgraded the data directory"
            );
        }
        let (meta_timing, shard_timing) = timing;
        host.start_group(GroupId::META, meta.clone(), &meta_timing)
            .await?;
        let shards = Arc::new(LocalShards::default());
        let router = Arc::new(Router::new(
            host.clone(),
            meta.clone(),
            shards.clone(),
            RouterConfig {
                default_replication_factor: config.replication_factor,
                default_retention_hours: config.retention_hours,
                shard_limits: kinesin_router::ShardLimits {
                    write_bytes_per_sec: config.shard_write_bytes_per_sec,
                    write_records_per_sec: config.shard_write_records_per_sec,
                    read_calls_per_sec: config.shard_read_calls_per_sec,
                    read_bytes_per_sec: config.shard_read_bytes_per_sec,
                },
                per_shard_metrics: config.per_shard_metrics,
                shard_limit: config.shard_limit,
                unsafe_ack_after: unsafe_ack_after(),
                ..RouterConfig::default()
            },
        ));
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        if let Some(path) = std::env::var_os("KINESIN_CHAOS_CLOCK_FILE") {
            tasks.push(tokio::spawn(follow_clock_file(
                path.into(),
                stop_rx.clone(),
            )));
        }

        let grpc_listener = bind(&mut config.listen_grpc, "grpc").await?;
        let admin_listener = bind(&mut config.listen_admin, "admin").await?;
        let api_listener = bind(&mut config.listen_api, "api").await?;
        tasks.push(tokio::spawn(serve_grpc(
            grpc_listener,
            internal_tls,
            host.clone(),
            router.clone(),
            stop_rx.clone(),
        )));
        let joined = Arc::new(AtomicBool::new(identity.is_some()));
        tasks.push(tokio::spawn(admin::serve(
            admin_listener,
            router.clone(),
            joined.clone(),
            config.data_dir.clone(),
            stop_rx.clone(),
        )));
        let tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert_chain), Some(private_key)) => Some(
                kinesin_gateway::tls_acceptor(&kinesin_gateway::TlsFiles {
                    cert_chain: cert_chain.clone(),
                    private_key: private_key.clone(),
                })
                .map_err(|e| anyhow::anyhow!("TLS: {e}"))?,
            ),
            _ => None,
        };
        tasks.push(tokio::spawn(kinesin_gateway::serve(
            api_listener,
            router.clone(),
            kinesin_gateway::GatewayConfig {
                region: config.region.clone(),
                credentials: config.credentials.clone(),
                home_account: config.home_account(),
                shard_limit: config.shard_limit,
                iterator_validity_ms: config.iterator_validity_secs * 1000,
                public_url: format!(
                    "{}://{}",
                    if tls.is_some() { "https" } else { "http" },
                    config.api_address()
                ),
                glue_tables: Arc::new(config.glue_tables()?),
                max_connections: config.api_max_connections,
                header_timeout: Duration::from_millis(config.api_header_timeout_ms),
                idle_timeout: Duration::from_millis(config.api_idle_timeout_ms),
                body_timeout: Duration::from_millis(config.api_body_timeout_ms),
                subscription_lifetime: Duration::from_millis(config.api_subscription_lifetime_ms),
            },
            tls,
            stop_rx.clone(),
        )));

        let node = Node {
            config,
            host,
            router,
            meta,
            shards,
            storage,
            joined,
            stop,
            tasks,
        };
        match identity {
            Some(id) => node.check_cluster(&id).await?,
            None if node.config.seeds.is_empty() => node.bootstrap().await?,
            None => node.join().await?,
        }
        let mut node = node;
        let ctx = reconcile::Context {
            config: node.config.clone(),
            host: node.host.clone(),
            router: node.router.clone(),
            meta: node.meta.clone(),
            shards: node.shards.clone(),
            storage: node.storage.clone(),
            shard_timing,
            kinds,
        };
        node.tasks.push(tokio::spawn(reconcile::run_reconciler(
            ctx.clone(),
            stop_rx.clone(),
        )));
        node.tasks.push(tokio::spawn(controller::run_controller(
            ctx.clone(),
            stop_rx.clone(),
        )));
        node.tasks.push(tokio::spawn(controller::run_stream_settler(
            ctx.clone(),
            stop_rx.clone(),
        )));
        node.tasks
            .push(tokio::spawn(kinesin_router::liveness::run_pings(
                ctx.router.clone(),
                stop_rx.clone(),
            )));
        node.tasks.push(tokio::spawn(failover::run_failover(
            ctx.host, ctx.router, stop_rx,
        )));
        Ok(node)
    }

    fn self_info(&self) -> NodeInfo {
        NodeInfo {
            id: NodeId(self.config.node_id),
            raft_addr: self.config.grpc_address(),
            api_addr: self.config.api_address(),
            zone: self.config.zone.clone(),
            state: NodeState::Active,
        }
    }

    async fn bootstrap(&self) -> anyhow::Result<()> {
        let cluster_id = format!("kc-{}", hex::encode(rand::random::<[u8; 8]>()));
        let me = NodeId(self.config.node_id);
        self.host
            .initialize(
                GroupId::META,
                BTreeMap::from([(me, self.config.grpc_address())]),
            )
            .await?;
        self.host
            .wait_for_leader(GroupId::META, Duration::from_secs(30))
            .await
            .context("the new cluster's metadata group elected no leader")?;
        // The metadata leader refuses joins until the cluster id is set
        // (`join_on_leader`), so the writes before it see this node alone,
        // whose data version decodes the token key.
        self.router
            .meta_write(MetaCommand::RegisterNode(self.self_info()))
            .await?;
        self.router
            .meta_write(crate::controller::new_token_key())
            .await?;
        self.router
            .meta_write(MetaCommand::Bootstrap {
                cluster_id: cluster_id.clone(),
            })
            .await?;
        save_identity(
            &self.storage,
            &Identity {
                cluster_id: cluster_id.clone(),
                node_id: me.0,
                data_version: DATA_VERSION,
            },
        )?;
        self.joined.store(true, Ordering::SeqCst);
        tracing::info!(%cluster_id, node = me.0, "bootstrapped a new cluster");
        Ok(())
    }

    /// Asks the seeds to admit this node, retrying until one does (a seed may
    /// start after us) or two minutes pass.
    async fn join(&self) -> anyhow::Result<()> {
        let me = self.self_info();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let mut last_error = String::from("no seed answered");
        while tokio::time::Instant::now() < deadline {
            for seed in &self.config.seeds {
                let request = JoinRequest {
                    node_id: me.id.0,
                    raft_addr: me.raft_addr.clone(),
                    api_addr: me.api_addr.clone(),
                    zone: me.zone.clone(),
                    cluster_id: String::new(),
                };
                match join_via(self.host.dialer(), seed, request).await {
                    Ok(cluster_id) => {
                        save_identity(
                            &self.storage,
                            &Identity {
                                cluster_id: cluster_id.clone(),
                                node_id: me.id.0,
                                data_version: DATA_VERSION,
                            },
                        )?;
                        self.joined.store(true, Ordering::SeqCst);
                        tracing::info!(%cluster_id, %seed, "joined the cluster");
                        return Ok(());
                    }
                    Err(JoinError::Refused(e)) => {
                        bail!("the cluster refused to admit this node: {e}")
                    }
                    Err(JoinError::Retry(e)) => last_error = format!("{seed}: {e}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!(
            "could not join through seeds {:?}: {last_error}",
            self.config.seeds
        )
    }

    /// On restart: refuse to serve a cluster other than the one the data
    /// directory belongs to.
    async fn check_cluster(&self, identity: &Identity) -> anyhow::Result<()> {
        for seed in &self.config.seeds {
            if seed == &self.config.grpc_address() {
                continue;
            }
            if let Ok(mut client) = connect_node(self.host.dialer(), seed).await {
                if let Ok(info) = client.cluster_info(ClusterInfoRequest {}).await {
                    let theirs = info.into_inner().cluster_id;
                    if !theirs.is_empty() && theirs != identity.cluster_id {
                        bail!(
                            "data directory {} belongs to cluster {}, but seed {seed} serves cluster {theirs}",
                            self.config.data_dir.display(),
                            identity.cluster_id
                        );
                    }
                    break;
                }
            }
        }
        tracing::info!(cluster_id = %identity.cluster_id, "restarted from the data directory");
        Ok(())
    }

    pub fn node_id(&self) -> NodeId {
        NodeId(self.config.node_id)
    }

    /// host:port of the AWS-compatible API as clients reach it.
    pub fn api_address(&self) -> String {
        self.config.api_address()
    }

    /// Hands leadership of every group it leads to another voter, waiting
    /// up to `budget` in all, so that a planned stop costs no election
    /// timeout.
    pub async fn hand_over_leadership(&self, budget: Duration) {
        let deadline = tokio::time::Instant::now() + budget;
        for group in self.host.group_ids() {
            let Some(status) = self.host.status(group) else {
                continue;
            };
            if status.role != Role::Leader {
                continue;
            }
            let Some(to) = status
                .voters
                .iter()
                .find(|v| **v != self.node_id())
                .copied()
            else {
                continue;
            };
            if self.host.transfer_leader(group, to).await.is_err() {
                continue;
            }
            while tokio::time::Instant::now() < deadline && self.host.is_leader(group) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Stops servers and groups. Data stays on disk.
    pub async fn shutdown(self) {
        let storage = self.storage.clone();
        self.halt().await;
        // Unlogged shard state would otherwise be re-applied from the log
        // at the next start.
        let _ = storage.persist();
    }

    /// Stops as a crash would, in process: servers and groups end and
    /// nothing is flushed, so state written without the WAL (what groups
    /// applied since the last flush) is rebuilt from the Raft log at the
    /// next start, as after a kill -9. No leadership hand-over.
    pub async fn crash(self) {
        self.halt().await;
    }

    async fn halt(self) {
        let _ = self.stop.send(true);
        self.host.shutdown().await;
        // Peers keep their Raft streams open, so a graceful server stop
        // would wait for them forever: give servers a moment, then abort.
        for mut task in self.tasks {
            if tokio::time::timeout(Duration::from_secs(1), &mut task)
                .await
                .is_err()
            {
                task.abort();
                let _ = task.await;
            }
        }
    }
}

/// Binds a listener; a port of 0 is replaced by the one the OS chose.
async fn bind(addr: &mut std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(*addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))?;
    *addr = listener.local_addr()?;
    Ok(listener)
}

/// Why a join attempt failed: worth retrying, or refused for good.
enum JoinError {
    Retry(String),
    Refused(String),
}

/// A connection to `addr`'s internal port, or why there is none (in 3 s).
async fn connect_node(dialer: &Dialer, addr: &str) -> Result<NodeClient<Channel>, String> {
    let endpoint = dialer.endpoint(addr)?;
    let channel = tokio::time::timeout(Duration::from_secs(3), endpoint.connect())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
    Ok(NodeClient::new(channel))
}

async fn join_via(dialer: &Dialer, seed: &str, request: JoinRequest) -> Result<String, JoinError> {
    let mut client = connect_node(dialer, seed).await.map_err(JoinError::Retry)?;
    let response = tokio::time::timeout(Duration::from_secs(15), client.join(request))
        .await
        .map_err(|_| JoinError::Retry("join timed out".to_string()))?
        .map_err(|s| match s.code() {
            tonic::Code::InvalidArgument => JoinError::Refused(s.message().to_string()),
            _ => JoinError::Retry(s.message().to_string()),
        })?;
    Ok(response.into_inner().cluster_id)
}

/// The gRPC server's connections. The builder's `tcp_nodelay` does not reach
/// sockets accepted from our own listener; without it Nagle's algorithm holds
/// a small Raft reply that follows another until the peer's delayed ACK
/// (~40 ms), which was most of the PutRecord tail on a 3-node cluster.
fn grpc_incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

async fn serve_grpc(
    listener: TcpListener,
    tls: Option<InternalTls>,
    host: RaftHost,
    router: Arc<Router>,
    mut stop: watch::Receiver<bool>,
) {
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = match server.tls_config(tls.server_config()) {
            Ok(server) => server,
            Err(e) => {
                tracing::error!(error = %e, "internal TLS configuration refused: the gRPC port stays closed");
                return;
            }
        };
    }
    let result = server
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .add_service(host.service())
        .add_service(kinesin_router::NodeService::server(router))
        .serve_with_incoming_shutdown(grpc_incoming(listener), async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// The chaos harness's power-fail mode (see
/// `Storage::open_losing_unsynced_on_crash`): environment only, loudly.
fn lose_unsynced_on_crash() -> bool {
    let on = std::env::var_os("KINESIN_CHAOS_LOSE_UNSYNCED").is_some_and(|v| v == "1");
    if on {
        tracing::warn!(
            "KINESIN_CHAOS_LOSE_UNSYNCED=1: a crash of this node loses every write not yet fsynced, as a power failure would"
        );
    }
    on
}

/// The chaos harness's clock-skew fault: while `KINESIN_CHAOS_CLOCK_FILE`
/// names a file, its content (signed milliseconds, missing = 0) shifts this
/// node's wall clock; the file is read every 100 ms so the skew can change
/// while the node runs, as a stepped clock does.
async fn follow_clock_file(path: std::path::PathBuf, mut stop: watch::Receiver<bool>) {
    tracing::warn!(path = %path.display(), "KINESIN_CHAOS_CLOCK_FILE is set: this node's wall clock follows the skew in that file");
    let mut current = 0;
    loop {
        let skew = tokio::fs::read_to_string(&path)
            .await
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .unwrap_or(0);
        if skew != current {
            tracing::warn!(skew_ms = skew, "wall clock skew changed");
            kinesin_router::set_clock_skew_ms(skew);
            current = skew;
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// The chaos harness's deliberately broken mode (see
/// `RouterConfig::unsafe_ack_after`): only from the environment, never from
/// the config file, and loudly.
fn unsafe_ack_after() -> Option<Duration> {
    let ms: u64 = std::env::var("KINESIN_CHAOS_UNSAFE_ACK_MS")
        .ok()?
        .parse()
        .ok()?;
    tracing::error!(
        ms,
        "KINESIN_CHAOS_UNSAFE_ACK_MS is set: appends not committed within {ms} ms are acknowledged anyway; acknowledged records WILL be lost"
    );
    Some(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    #[tokio::test]
    async fn grpc_connections_are_accepted_without_nagle() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = grpc_incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
