//! The router proper.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use kinesin_meta::{MetaState, MetaStateMachine};
use kinesin_proto::v1::node_client::NodeClient;
use kinesin_proto::v1::{self as pb};
use kinesin_raft::RaftHost;
use kinesin_shard::ShardStateMachine;
use kinesin_types::{GroupId, NodeId};
use tonic::transport::Channel;

use crate::clients::NodeClients;
use crate::error::RouterError;
use crate::liveness::Liveness;
use crate::throttle::{ShardLimits, Throttle};

#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// How long one request may keep retrying to find a leader.
    pub retry_budget: Duration,
    pub default_replication_factor: usize,
    pub default_retention_hours: u32,
    /// Per-shard throughput limits, enforced where the shard leads.
    pub shard_limits: ShardLimits,
    /// Also export per-shard series (`kinesin_shard_*`): one series per
    /// shard, so off by default.
    pub per_shard_metrics: bool,
    /// Open shards the cluster may hold (`shard_limit`), and closed shards
    /// it may keep: the metadata leader checks every command that adds or
    /// closes shards against it, whoever sent it.
    pub shard_limit: u32,
    /// Deliberately broken, for proving the chaos harness can fail: an
    /// append whose commit is not confirmed within this time is acknowledged
    /// anyway, with a guessed sequence number. Never set in production; the
    /// server only sets it from `KINESIN_CHAOS_UNSAFE_ACK_MS`.
    pub unsafe_ack_after: Option<Duration>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            retry_budget: Duration::from_secs(10),
            default_replication_factor: 3,
            default_retention_hours: 24,
            shard_limits: ShardLimits::default(),
            per_shard_metrics: false,
            shard_limit: 10_000,
            unsafe_ack_after: None,
        }
    }
}

/// Shard state machines with a replica on this node, for local reads.
#[derive(Default)]
pub struct LocalShards {
    map: RwLock<HashMap<GroupId, Arc<ShardStateMachine>>>,
}

impl LocalShards {
    pub fn insert(&self, group: GroupId, sm: Arc<ShardStateMachine>) {
        self.map.write().expect("shards lock").insert(group, sm);
    }

    pub fn remove(&self, group: GroupId) {
        self.map.write().expect("shards lock").remove(&group);
    }

    pub fn get(&self, group: GroupId) -> Option<Arc<ShardStateMachine>> {
        self.map.read().expect("shards lock").get(&group).cloned()
    }

    pub fn groups(&self) -> Vec<GroupId> {
        self.map
            .read()
            .expect("shards lock")
            .keys()
            .copied()
            .collect()
    }
}

/// Who serves one attempt: this node or a remote one.
pub(crate) enum Target {
    Local,
    /// The node's client, the node, and its internal address.
    Remote(NodeClient<Channel>, NodeId, String),
}

pub struct Router {
    pub(crate) host: RaftHost,
    pub(crate) meta: Arc<MetaStateMachine>,
    pub(crate) shards: Arc<LocalShards>,
    pub(crate) clients: NodeClients,
    pub(crate) leaders: Mutex<HashMap<GroupId, NodeId>>,
    pub(crate) liveness: Liveness,
    pub(crate) throttle: Throttle,
    pub(crate) config: RouterConfig,
}

/// A node that acknowledged the metadata leader within this many ms counts
/// as up when replicas are placed.
pub const LIVE_WITHIN_MS: u64 = 3_000;

/// Longest pause between two attempts to find a leader: short, since a
/// failed-over group has a new leader within a second.
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// Bounds of the time one attempt at one node may take.
const ATTEMPT_MIN: Duration = Duration::from_millis(500);
const ATTEMPT_MAX: Duration = Duration::from_secs(5);

impl Router {
    pub fn new(
        host: RaftHost,
        meta: Arc<MetaStateMachine>,
        shards: Arc<LocalShards>,
        config: RouterConfig,
    ) -> Self {
        let clients = NodeClients::new(host.dialer().clone());
        let liveness = Liveness::open(host.storage().clone());
        Router {
            host,
            meta,
            shards,
            clients,
            leaders: Mutex::default(),
            liveness,
            throttle: Throttle::new(config.shard_limits),
            config,
        }
    }

    pub fn host(&self) -> &RaftHost {
        &self.host
    }

    /// Which other nodes answer (see [`crate::liveness`]).
    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// `node` is down: requests stop going to it as a cached leader.
    pub(crate) fn forget_leader_node(&self, node: NodeId) {
        self.leaders
            .lock()
            .expect("leaders lock")
            .retain(|_, leader| *leader != node);
    }

    pub fn meta_state(&self) -> Arc<MetaState> {
        self.meta.state()
    }

    pub(crate) fn meta_subscribe(&self) -> tokio::sync::watch::Receiver<Arc<MetaState>> {
        self.meta.subscribe()
    }

    pub(crate) fn config(&self) -> &RouterConfig {
        &self.config
    }

    pub fn local_shards(&self) -> &LocalShards {
        &self.shards
    }

    /// The internal gRPC address of a node: from the cluster map, or from the
    /// metadata group's membership for nodes not registered yet.
    pub(crate) fn addr_of(&self, node: NodeId) -> Option<String> {
        if let Some(n) = self.meta.state().nodes.get(&node) {
            return Some(n.raft_addr.clone());
        }
        self.host
            .status(GroupId::META)
            .and_then(|s| s.addresses.get(&node).cloned())
    }

    pub(crate) fn client_for(&self, node: NodeId) -> Result<NodeClient<Channel>, RouterError> {
        self.remote(node).map(|(client, _)| client)
    }

    /// The client of `node`, and the address it was made for.
    fn remote(&self, node: NodeId) -> Result<(NodeClient<Channel>, String), RouterError> {
        let addr = self
            .addr_of(node)
            .ok_or_else(|| RouterError::Unavailable(format!("address of node {node} unknown")))?;
        let client = self.clients.get(&addr).map_err(RouterError::Internal)?;
        Ok((client, addr))
    }

    /// Runs `op` against the leader of `group`, following leader hints and
    /// retrying on other `candidates` until the retry budget is spent.
    pub(crate) async fn at_leader<T, F, Fut>(
        &self,
        group: GroupId,
        candidates: &[NodeId],
        idempotent: bool,
        op: F,
    ) -> Result<T, RouterError>
    where
        F: Fn(Target) -> Fut,
        Fut: Future<Output = Result<T, RouterError>>,
    {
        let deadline = Instant::now() + self.config.retry_budget;
        let mut backoff = Duration::from_millis(20);
        let mut next_candidate = 0usize;
        let mut last_error;
        loop {
            let cached = self
                .leaders
                .lock()
                .expect("leaders lock")
                .get(&group)
                .copied();
            // A leader on a node known to be down is no leader: its group is
            // electing another, which the candidates will name.
            let known = cached
                .or_else(|| self.host.leader(group))
                .filter(|n| !self.liveness.is_down(*n));
            let target_node = match known {
                Some(n) => n,
                None if candidates.is_empty() => self.host.node_id(),
                None => {
                    let live: Vec<NodeId> = candidates
                        .iter()
                        .copied()
                        .filter(|c| !self.liveness.is_down(*c))
                        .collect();
                    let pool = if live.is_empty() { candidates } else { &live };
                    next_candidate += 1;
                    pool[(next_candidate - 1) % pool.len()]
                }
            };
            let target = if target_node == self.host.node_id() {
                Ok(Target::Local)
            } else {
                self.remote(target_node)
                    .map(|(c, addr)| Target::Remote(c, target_node, addr))
            };
            // A paused or partitioned node must not hold a request forever.
            let attempt_budget = deadline
                .saturating_duration_since(Instant::now())
                .clamp(ATTEMPT_MIN, ATTEMPT_MAX);
            let result = match target {
                Ok(t) => match tokio::time::timeout(attempt_budget, op(t)).await {
                    Ok(Err(RouterError::Indeterminate(m))) if idempotent => {
                        Err(RouterError::Unavailable(m))
                    }
                    Ok(r) => r,
                    // The request may have been applied: only an idempotent
                    // one may be tried again.
                    Err(_) if idempotent => Err(RouterError::Unavailable(format!(
                        "node {target_node} did not answer for {group}"
                    ))),
                    Err(_) => Err(RouterError::Indeterminate(format!(
                        "node {target_node} did not answer for {group} in time; the write may or may not have been stored"
                    ))),
                },
                Err(e) => Err(e),
            };
            match result {
                Ok(v) => {
                    self.leaders
                        .lock()
                        .expect("leaders lock")
                        .insert(group, target_node);
                    return Ok(v);
                }
                Err(RouterError::NotLeader(Some(hint)))
                    if hint != target_node && !self.liveness.is_down(hint) =>
                {
                    self.leaders
                        .lock()
                        .expect("leaders lock")
                        .insert(group, hint);
                    last_error = RouterError::NotLeader(Some(hint));
                }
                Err(e) if e.is_retryable() => {
                    self.leaders.lock().expect("leaders lock").remove(&group);
                    if known.is_some() {
                        // The known leader failed: try the others next.
                        next_candidate += 1;
                    }
                    last_error = e;
                    if Instant::now() + backoff > deadline {
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    if matches!(e, RouterError::Indeterminate(_)) {
                        // The node that may have taken the write is not
                        // answering: route the next request by Raft's view.
                        self.leaders.lock().expect("leaders lock").remove(&group);
                    }
                    return Err(e);
                }
            }
            if Instant::now() > deadline {
                break;
            }
        }
        Err(match last_error {
            RouterError::NotLeader(_) => {
                RouterError::Unavailable(format!("no leader of {group} answered in time"))
            }
            e => e,
        })
    }

    /// Voters of `group` as the cluster map (or, for the metadata group,
    /// the local Raft membership) names them.
    pub fn group_replicas(&self, group: GroupId) -> Result<Vec<NodeId>, RouterError> {
        if group == GroupId::META {
            return Ok(self.meta_candidates());
        }
        self.meta_state()
            .placed_group(group)
            .map(|p| p.replicas.to_vec())
            .ok_or_else(|| RouterError::ResourceNotFound(format!("{group} is not in the map")))
    }

    /// Whether a majority of `group`'s replicas in the map are down as this
    /// node's liveness sees them: such a group can neither elect a leader
    /// nor commit, so a caller with a choice (a queue's partitions) goes
    /// elsewhere instead of spending the retry budget on it.
    pub fn lacks_quorum(&self, group: GroupId) -> bool {
        let Ok(replicas) = self.group_replicas(group) else {
            return false;
        };
        let down = replicas
            .iter()
            .filter(|n| self.liveness.is_down(**n))
            .count();
        !replicas.is_empty() && down > (replicas.len() - 1) / 2
    }

    /// Moves leadership of `group` to `to` (a voter) at the current leader
    /// and waits until `to` leads; returns the new leader.
    pub async fn transfer_leader(&self, group: GroupId, to: NodeId) -> Result<NodeId, RouterError> {
        let replicas = self.group_replicas(group)?;
        if !replicas.contains(&to) {
            let voters: Vec<String> = replicas.iter().map(|r| r.0.to_string()).collect();
            return Err(RouterError::InvalidArgument(format!(
                "node {} is not a voter of group {} (voters: {})",
                to.0,
                group.0,
                voters.join(", ")
            )));
        }
        self.at_leader(group, &replicas, true, |target| async move {
            match target {
                Target::Local => {
                    if !self.host.is_leader(group) {
                        let leader = self.host.leader(group);
                        return Err(RouterError::NotLeader(leader));
                    }
                    if to != self.host.node_id() {
                        self.host.transfer_leader(group, to).await?;
                    }
                    let leader = self
                        .host
                        .wait_for_leader_change(group, to, Duration::from_secs(10))
                        .await;
                    leader.ok_or_else(|| {
                        RouterError::Unavailable(format!("{to} did not take over {group} in time"))
                    })
                }
                Target::Remote(mut c, ..) => {
                    let r = c
                        .transfer_leader(pb::TransferLeaderRequest {
                            group: group.0,
                            to: to.0,
                        })
                        .await?
                        .into_inner();
                    Ok(NodeId(r.leader))
                }
            }
        })
        .await
    }

    pub(crate) fn check_leader(&self, group: GroupId) -> Result<(), RouterError> {
        if self.host.is_leader(group) {
            return Ok(());
        }
        let leader = self.host.leader(group);
        Err(RouterError::NotLeader(leader))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A router on a node that hosts no group yet: every attempt goes to
    /// the local node, so `at_leader`'s retry rules can be driven directly.
    pub(crate) fn lone_router(dir: &std::path::Path) -> Router {
        let storage =
            kinesin_storage::Storage::open(dir, kinesin_storage::FsyncPolicy::NeverUnsafe)
                .expect("open storage");
        let host = RaftHost::new(
            NodeId(1),
            storage.clone(),
            Arc::new(kinesin_raft::NoFilter),
            kinesin_proto::tls::Dialer::plaintext(),
        );
        let meta = Arc::new(MetaStateMachine::open(storage).expect("meta state machine"));
        Router::new(
            host,
            meta,
            Arc::default(),
            RouterConfig {
                retry_budget: Duration::from_secs(1),
                ..RouterConfig::default()
            },
        )
    }

    /// Runs `at_leader` with an operation whose first attempt ends with
    /// `first` (None: never answers) and whose later attempts succeed;
    /// returns the outcome and how many attempts were made.
    async fn first_attempt_then_ok(
        router: &Router,
        idempotent: bool,
        first: Option<RouterError>,
    ) -> (Result<u32, RouterError>, u32) {
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let first = Mutex::new(first);
        let result = router
            .at_leader(GroupId(7), &[], idempotent, |_| {
                let n = attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                let first = first.lock().unwrap().take();
                async move {
                    if n > 1 {
                        return Ok(n);
                    }
                    match first {
                        Some(e) => Err(e),
                        None => std::future::pending().await,
                    }
                }
            })
            .await;
        (result, attempts.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// A write whose outcome is unknown (the attempt timed out, or the
    /// leader lost the entry after appending it) must not be sent again: a
    /// retry would store the records twice. Idempotent calls retry.
    #[tokio::test]
    async fn writes_with_unknown_outcome_are_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let router = lone_router(dir.path());
        let unknown = || Some(RouterError::Indeterminate("entry discarded".into()));

        let (r, attempts) = first_attempt_then_ok(&router, false, unknown()).await;
        assert!(matches!(r, Err(RouterError::Indeterminate(_))), "{r:?}");
        assert_eq!(attempts, 1);
        let (r, attempts) = first_attempt_then_ok(&router, false, None).await;
        assert!(matches!(r, Err(RouterError::Indeterminate(_))), "{r:?}");
        assert_eq!(attempts, 1);

        assert_eq!(
            first_attempt_then_ok(&router, true, unknown())
                .await
                .0
                .unwrap(),
            2
        );
        // Refused before anything was appended: safe to send again.
        let refused = Some(RouterError::NotLeader(None));
        assert_eq!(
            first_attempt_then_ok(&router, false, refused)
                .await
                .0
                .unwrap(),
            2
        );
    }
}
