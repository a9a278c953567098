//! The router proper.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kinesin_meta::{
    decode_reply, place_replicas, MetaCommand, MetaState, MetaStateMachine, NewStream, NodeState,
    Owner, StreamChange,
};
use kinesin_proto::v1::node_client::NodeClient;
use kinesin_proto::v1::{self as pb};
use kinesin_raft::RaftHost;
use kinesin_shard::{
    NewRecord, ReadBatch, ReadStart, ShardCommand, ShardRejection, ShardReply, ShardStateMachine,
    StoredRecord,
};
use kinesin_storage::data_version::DATA_VERSION;
use kinesin_types::{
    hash_key_for_partition_key, GroupId, HashKey, NodeId, SequenceNumber, ShardId, ShardState,
    StreamInfo, StreamMode, StreamName, StreamStatus, MAX_RECORD_BYTES_LIMIT,
};
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

/// The data version that introduced `CreateStreamWithSettings`.
const STREAM_SETTINGS_VERSION: u32 = 3;

/// The data version from which stream keys may name an account
/// (`kinesin_meta::stream_key`).
const ACCOUNT_KEYS_VERSION: u32 = 3;

/// The changes that give a stream created without settings its `options`.
fn legacy_settings(options: &StreamOptions) -> Vec<StreamChange> {
    let mut changes = Vec::new();
    if options.mode != StreamMode::Provisioned {
        changes.push(StreamChange::Mode(options.mode));
    }
    if !options.tags.is_empty() {
        changes.push(StreamChange::AddTags(options.tags.clone()));
    }
    changes
}

/// What a stream is created with besides its size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamOptions {
    pub mode: StreamMode,
    pub tags: BTreeMap<String, String>,
}

/// A record as a client submits it.
#[derive(Debug, Clone)]
pub struct RecordIn {
    pub partition_key: String,
    pub data: Vec<u8>,
    pub explicit_hash_key: Option<String>,
}

/// The fate of one record of a put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    Stored {
        shard: ShardId,
        sequence: SequenceNumber,
    },
    /// Not acknowledged; it may or may not have been stored.
    Failed(RouterError),
}

/// Where and how to read.
#[derive(Debug, Clone, Copy)]
pub struct ReadRequest {
    pub start: ReadStart,
    pub limit: usize,
    pub max_bytes: usize,
    /// With nothing to return, how long the leader may wait for records
    /// to be applied before answering empty (a long poll; zero: at once).
    pub wait: Duration,
}

/// The longest a read may wait at the leader for new records.
pub const MAX_READ_WAIT: Duration = Duration::from_secs(2);

/// Who serves one attempt: this node or a remote one.
pub(crate) enum Target {
    Local,
    Remote(NodeClient<Channel>),
}

pub struct Router {
    host: RaftHost,
    meta: Arc<MetaStateMachine>,
    shards: Arc<LocalShards>,
    clients: NodeClients,
    leaders: Mutex<HashMap<GroupId, NodeId>>,
    liveness: Liveness,
    throttle: Throttle,
    config: RouterConfig,
}

/// A node that acknowledged the metadata leader within this many ms counts
/// as up when replicas are placed.
pub const LIVE_WITHIN_MS: u64 = 3_000;
/// Longest CreateStream waits for the new shards' leaders before it returns
/// a stream that is still CREATING.
const CREATE_WAIT: Duration = Duration::from_secs(10);

/// Longest pause between two attempts to find a leader: short, since a
/// failed-over group has a new leader within a second.
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// Releases up to data version 2 do not report theirs: a node not heard
/// from, or answering without a version, may run one of them.
const UNREPORTED_VERSION: u32 = 2;

/// How long a shard leader waits for its map to reach a sender's epoch.
const MAP_CATCH_UP: Duration = Duration::from_secs(1);

/// What the local map says about an append to a group routed at a map epoch.
#[derive(Debug, PartialEq, Eq)]
enum AppendRoute {
    Open,
    /// Closed by a reshard (or gone with its stream).
    Closed,
    /// The local map is older than the sender's, or does not know the group.
    MapBehind,
}

fn append_route(state: &MetaState, group: GroupId, epoch: u64) -> AppendRoute {
    let found = state.placed().find_map(|p| match p.owner {
        Owner::Shard { stream, shard } if p.group == group => Some((stream, shard)),
        _ => None,
    });
    match found {
        // Known to the map once and no longer in it: its stream was deleted.
        None if group.0 < state.next_group => AppendRoute::Closed,
        None => AppendRoute::MapBehind,
        Some((stream, _)) if stream.epoch < epoch => AppendRoute::MapBehind,
        Some((_, shard)) if shard.state != ShardState::Open => AppendRoute::Closed,
        Some(_) => AppendRoute::Open,
    }
}

/// Bounds of the time one attempt at one node may take.
const ATTEMPT_MIN: Duration = Duration::from_millis(500);
const ATTEMPT_MAX: Duration = Duration::from_secs(5);

/// How far this process's wall clock is shifted from the system's, in ms.
static CLOCK_SKEW_MS: AtomicI64 = AtomicI64::new(0);

/// Shifts this process's wall clock ([`wall_clock`], [`now_ms`]) by `ms`:
/// the chaos harness's clock-skew fault. Zero is the system clock.
pub fn set_clock_skew_ms(ms: i64) {
    CLOCK_SKEW_MS.store(ms, Ordering::Relaxed);
}

/// The wall clock every timestamp of this node comes from (arrival times,
/// retention cut-offs, iterator expiry, request signatures).
pub fn wall_clock() -> SystemTime {
    let now = SystemTime::now();
    let skew = CLOCK_SKEW_MS.load(Ordering::Relaxed);
    let by = Duration::from_millis(skew.unsigned_abs());
    if skew >= 0 {
        now + by
    } else {
        now.checked_sub(by).unwrap_or(UNIX_EPOCH)
    }
}

/// Wall-clock milliseconds since the Unix epoch, as leaders stamp commands.
pub fn now_ms() -> u64 {
    wall_clock()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Router {
    pub fn new(
        host: RaftHost,
        meta: Arc<MetaStateMachine>,
        shards: Arc<LocalShards>,
        config: RouterConfig,
    ) -> Self {
        Router {
            host,
            meta,
            shards,
            clients: NodeClients::default(),
            leaders: Mutex::default(),
            liveness: Liveness::default(),
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
    fn addr_of(&self, node: NodeId) -> Option<String> {
        if let Some(n) = self.meta.state().nodes.get(&node) {
            return Some(n.raft_addr.clone());
        }
        self.host
            .status(GroupId::META)
            .and_then(|s| s.addresses.get(&node).cloned())
    }

    pub(crate) fn client_for(&self, node: NodeId) -> Result<NodeClient<Channel>, RouterError> {
        let addr = self
            .addr_of(node)
            .ok_or_else(|| RouterError::Unavailable(format!("address of node {node} unknown")))?;
        self.clients.get(&addr).map_err(RouterError::Internal)
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
                .or_else(|| self.host.status(group).and_then(|s| s.leader))
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
                self.client_for(target_node).map(Target::Remote)
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

    fn meta_candidates(&self) -> Vec<NodeId> {
        match self.host.status(GroupId::META) {
            Some(s) => s.voters.into_iter().collect(),
            None => Vec::new(),
        }
    }

    /// The lowest data version among the map's nodes (removed ones aside)
    /// as their pings report it. See [`MetaCommand::introduced_in`].
    pub fn cluster_data_version(&self) -> u32 {
        let me = self.host.node_id();
        self.meta
            .state()
            .nodes
            .values()
            .filter(|n| n.id != me && n.state != NodeState::Removed)
            .map(|n| self.liveness.data_version(n.id).max(UNREPORTED_VERSION))
            .fold(DATA_VERSION, u32::min)
    }

    /// Refuses a command some node of the cluster could not decode.
    fn check_cluster_decodes(&self, command: &MetaCommand) -> Result<(), RouterError> {
        let needed = command.introduced_in();
        let cluster = self.cluster_data_version();
        if needed > cluster {
            return Err(RouterError::Unavailable(format!(
                "this change needs every node at data version {needed} or later, and a node reports {cluster} (or was not heard from): finish the upgrade first"
            )));
        }
        Ok(())
    }

    /// Proposes a metadata command through the metadata leader.
    pub async fn meta_write(&self, command: MetaCommand) -> Result<(), RouterError> {
        self.check_cluster_decodes(&command)?;
        let bytes = command.encode();
        let candidates = self.meta_candidates();
        self.at_leader(GroupId::META, &candidates, true, |target| {
            let bytes = bytes.clone();
            async move {
                match target {
                    Target::Local => self.meta_write_local(bytes).await,
                    Target::Remote(mut c) => {
                        let applied = c
                            .meta_write(pb::MetaWriteRequest {
                                command: bytes.into(),
                            })
                            .await?
                            .into_inner()
                            .applied_index;
                        self.catch_up_meta(applied).await;
                        Ok(())
                    }
                }
            }
        })
        .await
    }

    /// This node's applied index of the metadata group.
    pub fn meta_applied_index(&self) -> u64 {
        self.host
            .status(GroupId::META)
            .map_or(0, |s| s.applied_index)
    }

    /// Waits (at most 5 s) until this node's metadata replica has applied
    /// `index`, so a change made through another node's leader is visible
    /// here when the call that made it returns: a client that creates a
    /// stream through this node and describes it next finds it.
    async fn catch_up_meta(&self, index: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.meta_applied_index() < index && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub(crate) async fn meta_write_local(&self, command: Vec<u8>) -> Result<(), RouterError> {
        let reply = self.host.propose(GroupId::META, command).await?;
        decode_reply(&reply)?;
        Ok(())
    }

    /// Creates a stream with default settings; see [`Router::create_stream_with`].
    pub async fn create_stream(
        &self,
        name: &str,
        shard_count: u32,
        replication: usize,
        max_record_bytes: u32,
    ) -> Result<(), RouterError> {
        let options = StreamOptions::default();
        self.create_stream_with(name, shard_count, replication, max_record_bytes, &options)
            .await
    }

    /// Creates a stream with its `options` in one metadata command;
    /// placement is computed on the metadata leader.
    pub async fn create_stream_with(
        &self,
        name: &str,
        shard_count: u32,
        replication: usize,
        max_record_bytes: u32,
        options: &StreamOptions,
    ) -> Result<(), RouterError> {
        let key = StreamName::new(name).map_err(|e| RouterError::InvalidArgument(e.0))?;
        if key.is_qualified() && self.cluster_data_version() < ACCOUNT_KEYS_VERSION {
            // An older node's map would refuse the key and lack the stream.
            return Err(RouterError::Unavailable(format!(
                "streams of accounts other than the home account need every node at data version {ACCOUNT_KEYS_VERSION}; finish the rolling upgrade first"
            )));
        }
        if shard_count == 0 || shard_count > 10_000 {
            return Err(RouterError::InvalidArgument(
                "shard count must be between 1 and 10000".into(),
            ));
        }
        if max_record_bytes > MAX_RECORD_BYTES_LIMIT {
            return Err(RouterError::InvalidArgument(format!(
                "max record size may be at most {MAX_RECORD_BYTES_LIMIT} bytes"
            )));
        }
        let candidates = self.meta_candidates();
        self.at_leader(GroupId::META, &candidates, true, |target| async move {
            match target {
                Target::Local => {
                    self.create_stream_on_leader(
                        name,
                        shard_count,
                        replication,
                        max_record_bytes,
                        options,
                    )
                    .await
                }
                Target::Remote(mut c) => {
                    let applied = c
                        .create_stream(pb::CreateStreamRequest {
                            stream: name.to_string(),
                            shard_count,
                            replication_factor: replication as u32,
                            max_record_bytes,
                            on_demand: options.mode == StreamMode::OnDemand,
                            tags: options.tags.clone().into_iter().collect(),
                        })
                        .await?
                        .into_inner()
                        .applied_index;
                    self.catch_up_meta(applied).await;
                    Ok(())
                }
            }
        })
        .await?;
        if self.cluster_data_version() < STREAM_SETTINGS_VERSION {
            // The metadata leader may run a release that ignores the mode
            // and tags of a forwarded request: set them as those releases
            // did (both changes are idempotent).
            for change in legacy_settings(options) {
                let update = MetaCommand::UpdateStream {
                    name: name.to_string(),
                    change,
                };
                self.meta_write(update).await?;
            }
        }
        // Not inside the call above: a forwarded attempt that outlived its
        // time budget would be retried and find the stream existing.
        self.wait_until_created(name, CREATE_WAIT).await;
        Ok(())
    }

    /// On the metadata leader: has `node` acknowledged the metadata group
    /// within [`LIVE_WITHIN_MS`]? Every node replicates the metadata group
    /// (voter or learner), so this is the cluster's view of who is up.
    pub fn meta_leader_hears(&self, node: NodeId) -> bool {
        node == self.host.node_id()
            || self.host.status(GroupId::META).is_some_and(|s| {
                s.follower_ack_age_ms
                    .get(&node)
                    .copied()
                    .flatten()
                    .is_some_and(|ms| ms < LIVE_WITHIN_MS)
            })
    }

    /// Waits (at most `limit`) until `stream` is no longer CREATING in this
    /// node's map, so that a client's first DescribeStream after
    /// CreateStream finds it ACTIVE. A stream still CREATING then is
    /// reported as such; the controller keeps working on it.
    async fn wait_until_created(&self, stream: &str, limit: Duration) {
        let mut changes = self.meta.subscribe();
        let creating = |state: &MetaState| {
            state
                .streams
                .get(stream)
                .is_some_and(|s| s.status == StreamStatus::Creating)
        };
        let _ = tokio::time::timeout(limit, changes.wait_for(|state| !creating(state))).await;
    }

    /// Does every open shard of `stream` have a leader that answers? Asks
    /// each shard's leader for a read of nothing new (through the usual
    /// leader lookup, so a shard without a leader fails after the retry
    /// budget).
    pub async fn open_shards_led(&self, stream: &StreamInfo) -> bool {
        let open: Vec<(GroupId, Vec<NodeId>)> = stream
            .shards
            .iter()
            .filter(|s| s.state == ShardState::Open)
            .map(|s| (s.group, s.replicas.clone()))
            .collect();
        for chunk in open.chunks(64) {
            let probes = chunk
                .iter()
                .map(|(group, replicas)| self.leader_answers(*group, replicas));
            if !futures::future::join_all(probes)
                .await
                .into_iter()
                .all(|ok| ok)
            {
                return false;
            }
        }
        true
    }

    /// A read of nothing new at the leader of `group`: does it have one?
    async fn leader_answers(&self, group: GroupId, replicas: &[NodeId]) -> bool {
        let request = ReadRequest {
            start: ReadStart::Latest,
            limit: 1,
            max_bytes: 1,
            wait: Duration::ZERO,
        };
        self.at_leader(group, replicas, true, |target| async move {
            match target {
                Target::Local => self.check_leader(group),
                // Counts as a read call where read limits are set.
                Target::Remote(mut c) => {
                    c.shard_read(shard_read_request(group, request)).await?;
                    Ok(())
                }
            }
        })
        .await
        .is_ok()
    }

    pub(crate) async fn create_stream_on_leader(
        &self,
        name: &str,
        shard_count: u32,
        replication: usize,
        max_record_bytes: u32,
        options: &StreamOptions,
    ) -> Result<(), RouterError> {
        if !self.host.is_leader(GroupId::META) {
            let leader = self.host.status(GroupId::META).and_then(|s| s.leader);
            return Err(RouterError::NotLeader(leader));
        }
        let state = self.meta.state();
        if state.streams.contains_key(name) {
            return Err(RouterError::ResourceInUse(format!(
                "stream {name} already exists"
            )));
        }
        let wanted = if replication == 0 {
            self.config.default_replication_factor
        } else {
            replication
        };
        // Replicas go to nodes heard from recently and not found down by
        // this node's pings (faster to notice a kill), so that every new
        // shard can elect a leader now; the controller adds the missing ones when
        // nodes come back.
        let unreachable: BTreeSet<NodeId> = state
            .active_nodes()
            .map(|n| n.id)
            .filter(|n| !self.meta_leader_hears(*n) || self.liveness.is_down(*n))
            .collect();
        let live = state.active_nodes().count() - unreachable.len();
        let replication = wanted.min(live.max(1));
        let mut load = state.replica_load();
        let placements: Vec<Vec<NodeId>> = (0..shard_count)
            .map(|i| {
                place_replicas(
                    &state,
                    &format!("{name}/{i}"),
                    replication,
                    &unreachable,
                    &mut load,
                )
            })
            .collect();
        if placements.iter().any(|p| p.is_empty()) {
            return Err(RouterError::Unavailable(
                "no active node can hold replicas".into(),
            ));
        }
        let placements = spread_preferred_leaders(placements);
        let stream = NewStream {
            name: name.to_string(),
            shard_count,
            retention_hours: self.config.default_retention_hours,
            max_record_bytes: if max_record_bytes == 0 {
                kinesin_types::DEFAULT_MAX_RECORD_BYTES
            } else {
                max_record_bytes
            },
            replication_factor: wanted as u32,
            now_ms: now_ms(),
            placements,
        };
        let command = MetaCommand::CreateStreamWithSettings {
            stream: stream.clone(),
            mode: options.mode,
            tags: options.tags.clone(),
        };
        if self.check_cluster_decodes(&command).is_ok() {
            return self.meta_write_local(command.encode()).await;
        }
        self.create_stream_in_steps(stream, options).await
    }

    /// With a node of an older release in the cluster: creates the stream,
    /// then sets its mode and tags, as those releases did.
    async fn create_stream_in_steps(
        &self,
        stream: NewStream,
        options: &StreamOptions,
    ) -> Result<(), RouterError> {
        let name = stream.name.clone();
        let create = MetaCommand::CreateStream {
            name: stream.name,
            shard_count: stream.shard_count,
            retention_hours: stream.retention_hours,
            max_record_bytes: stream.max_record_bytes,
            replication_factor: stream.replication_factor,
            now_ms: stream.now_ms,
            placements: stream.placements,
        };
        self.meta_write_local(create.encode()).await?;
        for change in legacy_settings(options) {
            let update = MetaCommand::UpdateStream {
                name: name.clone(),
                change,
            };
            self.meta_write_local(update.encode()).await?;
        }
        Ok(())
    }

    pub async fn delete_stream(&self, name: &str) -> Result<(), RouterError> {
        self.meta_write(MetaCommand::DeleteStream {
            name: name.to_string(),
        })
        .await
    }

    /// Looks a stream up in this node's metadata replica. A stream this
    /// replica does not know yet may have been created through another node
    /// a moment ago: before answering "not found" the replica catches up
    /// with the metadata leader, so once CreateStream returned on any node,
    /// every node finds the stream. Without a reachable leader the local
    /// answer stands.
    pub async fn describe_stream(&self, name: &str) -> Result<StreamInfo, RouterError> {
        if let Some(info) = self.meta.state().streams.get(name) {
            return Ok(info.clone());
        }
        if let Err(e) = self.sync_meta().await {
            tracing::debug!(stream = name, error = %e, "cannot confirm a missing stream with the metadata leader");
        }
        self.meta
            .state()
            .streams
            .get(name)
            .cloned()
            .ok_or_else(|| RouterError::ResourceNotFound(format!("Stream {name} not found")))
    }

    /// Waits until this node's metadata replica has applied everything the
    /// metadata leader had applied when asked.
    async fn sync_meta(&self) -> Result<(), RouterError> {
        let candidates = self.meta_candidates();
        let index = self
            .at_leader(GroupId::META, &candidates, true, |target| async move {
                match target {
                    Target::Local => self.meta_index_local(),
                    Target::Remote(mut c) => Ok(c
                        .meta_index(pb::MetaIndexRequest {})
                        .await?
                        .into_inner()
                        .applied_index),
                }
            })
            .await?;
        self.catch_up_meta(index).await;
        Ok(())
    }

    /// The metadata group's applied index, answered by its leader only.
    pub(crate) fn meta_index_local(&self) -> Result<u64, RouterError> {
        if !self.host.is_leader(GroupId::META) {
            let leader = self.host.status(GroupId::META).and_then(|s| s.leader);
            return Err(RouterError::NotLeader(leader));
        }
        Ok(self.meta_applied_index())
    }

    pub fn list_streams(&self) -> Vec<String> {
        self.meta.state().streams.keys().cloned().collect()
    }

    /// Puts records, each routed by its hash key; results mirror the order
    /// of `records`. A malformed record fails the whole call. Records that
    /// meet a shard closed by a reshard are routed again by the new map.
    pub async fn put_records(
        &self,
        stream: &str,
        records: Vec<RecordIn>,
    ) -> Result<Vec<AppendOutcome>, RouterError> {
        let mut info = self.describe_stream(stream).await?;
        let mut pending: Vec<(usize, HashKey, NewRecord)> = Vec::with_capacity(records.len());
        for (i, r) in records.into_iter().enumerate() {
            let chars = r.partition_key.chars().count();
            if chars == 0 || chars > 256 {
                return Err(RouterError::InvalidArgument(format!(
                    "record {i}: partition key must be 1 to 256 characters"
                )));
            }
            let key = match &r.explicit_hash_key {
                Some(h) => h
                    .parse::<HashKey>()
                    .map_err(|e| RouterError::InvalidArgument(format!("record {i}: {e}")))?,
                None => hash_key_for_partition_key(&r.partition_key),
            };
            let size = r.data.len() + r.partition_key.len();
            if size > info.max_record_bytes as usize {
                return Err(RouterError::InvalidArgument(format!(
                    "record {i}: {size} bytes of data and partition key exceed the stream's limit of {} bytes",
                    info.max_record_bytes
                )));
            }
            pending.push((
                i,
                key,
                NewRecord {
                    partition_key: r.partition_key,
                    data: r.data,
                },
            ));
        }
        let mut outcomes = vec![
            AppendOutcome::Failed(RouterError::Internal("not attempted".into()));
            pending.len()
        ];
        let deadline = Instant::now() + self.config.retry_budget;
        loop {
            let closed = self
                .put_routed(stream, &info, std::mem::take(&mut pending), &mut outcomes)
                .await?;
            if closed.is_empty() {
                return Ok(outcomes);
            }
            // A reshard closed a shard under these records: wait for the map
            // that routes them to its children.
            let closed_shards: BTreeSet<ShardId> = closed
                .iter()
                .filter_map(|(_, key, _)| info.shard_for(*key).map(|s| s.shard_id))
                .collect();
            pending = closed;
            loop {
                info = self.describe_stream(stream).await?;
                let moved = pending.iter().all(|(_, key, _)| {
                    info.shard_for(*key)
                        .is_some_and(|s| !closed_shards.contains(&s.shard_id))
                });
                if moved {
                    break;
                }
                if Instant::now() >= deadline {
                    for (pos, _, _) in pending {
                        outcomes[pos] = AppendOutcome::Failed(RouterError::Unavailable(
                            "the shard was closed by a reshard and no new shard took over in time"
                                .into(),
                        ));
                    }
                    return Ok(outcomes);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Appends `pending` to the shards `info` routes them to, filling in
    /// `outcomes`; returns the records whose shard turned out to be closed.
    async fn put_routed(
        &self,
        stream: &str,
        info: &StreamInfo,
        pending: Vec<(usize, HashKey, NewRecord)>,
        outcomes: &mut [AppendOutcome],
    ) -> Result<Vec<(usize, HashKey, NewRecord)>, RouterError> {
        let mut by_shard: BTreeMap<ShardId, Vec<(usize, HashKey, NewRecord)>> = BTreeMap::new();
        for (i, key, record) in pending {
            let shard = info.shard_for(key).ok_or_else(|| {
                RouterError::Internal(format!("no open shard holds hash key {key}"))
            })?;
            by_shard
                .entry(shard.shard_id)
                .or_default()
                .push((i, key, record));
        }
        let appends = by_shard.into_iter().map(|(shard_id, entries)| {
            let shard = info
                .shard(shard_id)
                .expect("shard from the same map")
                .clone();
            let epoch = info.epoch;
            async move {
                let records: Vec<NewRecord> = entries.iter().map(|(_, _, r)| r.clone()).collect();
                let result = self
                    .append(shard.group, &shard.replicas, epoch, records)
                    .await;
                (shard_id, entries, result)
            }
        });
        let mut closed = Vec::new();
        for (shard, entries, result) in futures::future::join_all(appends).await {
            match result {
                Ok(first) => {
                    let bytes: usize = entries
                        .iter()
                        .map(|(_, _, r)| r.data.len() + r.partition_key.len())
                        .sum();
                    metrics::counter!("kinesin_stream_incoming_records_total", "stream" => stream.to_string())
                        .increment(entries.len() as u64);
                    metrics::counter!("kinesin_stream_incoming_bytes_total", "stream" => stream.to_string())
                        .increment(bytes as u64);
                    if self.config.per_shard_metrics {
                        let labels = [("stream", stream.to_string()), ("shard", shard.to_string())];
                        metrics::counter!("kinesin_shard_incoming_records_total", &labels)
                            .increment(entries.len() as u64);
                        metrics::counter!("kinesin_shard_incoming_bytes_total", &labels)
                            .increment(bytes as u64);
                    }
                    for (k, (pos, _, _)) in entries.into_iter().enumerate() {
                        outcomes[pos] = AppendOutcome::Stored {
                            shard,
                            sequence: SequenceNumber(first.0 + k as u128),
                        };
                    }
                }
                Err(RouterError::ShardClosed(_)) => closed.extend(entries),
                Err(RouterError::Throttled(message)) => {
                    metrics::counter!("kinesin_stream_throttled_total", "stream" => stream.to_string(), "direction" => "write")
                        .increment(entries.len() as u64);
                    for (pos, _, _) in entries {
                        outcomes[pos] =
                            AppendOutcome::Failed(RouterError::Throttled(message.clone()));
                    }
                }
                Err(e) => {
                    for (pos, _, _) in entries {
                        outcomes[pos] = AppendOutcome::Failed(e.clone());
                    }
                }
            }
        }
        Ok(closed)
    }

    async fn append(
        &self,
        group: GroupId,
        replicas: &[NodeId],
        epoch: u64,
        records: Vec<NewRecord>,
    ) -> Result<SequenceNumber, RouterError> {
        self.at_leader(group, replicas, false, |target| {
            let records = records.clone();
            async move {
                match target {
                    Target::Local => self.append_local(group, epoch, records).await,
                    Target::Remote(mut c) => {
                        let req = pb::ShardAppendRequest {
                            group: group.0,
                            epoch,
                            records: records
                                .into_iter()
                                .map(|r| pb::Record {
                                    partition_key: r.partition_key,
                                    data: r.data.into(),
                                    explicit_hash_key: String::new(),
                                })
                                .collect(),
                        };
                        let resp = c.shard_append(req).await?.into_inner();
                        resp.first_sequence_number
                            .parse::<SequenceNumber>()
                            .map_err(|e| RouterError::Internal(e.to_string()))
                    }
                }
            }
        })
        .await
    }

    /// At a shard's leader: refuses an append that the map (at the
    /// sender's epoch, or this node's if newer) no longer routes here. A
    /// reshard closes the parent in the map before its group seals itself;
    /// without this check a sender with the old map could still append to
    /// the parent after the children took writes for the same keys. When
    /// the sender's map is newer than this node's, this node catches up
    /// first (briefly), so that neither side decides on a stale map.
    async fn check_append_route(&self, group: GroupId, epoch: u64) -> Result<(), RouterError> {
        let mut changes = self.meta.subscribe();
        let caught_up = |state: &MetaState| {
            !matches!(append_route(state, group, epoch), AppendRoute::MapBehind)
        };
        if !caught_up(&self.meta.state()) {
            let _ = tokio::time::timeout(MAP_CATCH_UP, changes.wait_for(|s| caught_up(s))).await;
        }
        match append_route(&self.meta.state(), group, epoch) {
            AppendRoute::Open => Ok(()),
            AppendRoute::Closed => Err(RouterError::ShardClosed(format!(
                "{group} was closed by a reshard; route by the new shard map"
            ))),
            AppendRoute::MapBehind => Err(RouterError::Unavailable(format!(
                "this node's map is behind the sender's for {group}"
            ))),
        }
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
                        let leader = self.host.status(group).and_then(|s| s.leader);
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
                Target::Remote(mut c) => {
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

    /// Appends on this node, which must lead the group.
    pub async fn append_local(
        &self,
        group: GroupId,
        epoch: u64,
        records: Vec<NewRecord>,
    ) -> Result<SequenceNumber, RouterError> {
        if !self.host.has_group(group) {
            return Err(RouterError::NotLeader(None));
        }
        if !self.host.is_leader(group) {
            let leader = self.host.status(group).and_then(|s| s.leader);
            return Err(RouterError::NotLeader(leader));
        }
        self.check_append_route(group, epoch).await?;
        let bytes = records
            .iter()
            .map(|r| r.data.len() + r.partition_key.len())
            .sum();
        if !self.throttle.write(group, records.len(), bytes) {
            return Err(RouterError::Throttled(format!(
                "Rate exceeded for the shard of {group}"
            )));
        }
        let started = Instant::now();
        let command = ShardCommand::Append {
            arrival_ms: now_ms(),
            records,
        };
        let proposal = self.host.propose(group, command.encode());
        let reply = match self.config.unsafe_ack_after {
            None => proposal.await?,
            Some(after) => match tokio::time::timeout(after, proposal).await {
                Ok(reply) => reply?,
                Err(_) => {
                    let sm = self.shards.get(group).ok_or(RouterError::NotLeader(None))?;
                    return Ok(sm.resolve(ReadStart::Latest)?);
                }
            },
        };
        metrics::histogram!("kinesin_raft_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match ShardReply::decode(&reply)? {
            ShardReply::Appended { first, .. } => Ok(SequenceNumber(first)),
            ShardReply::Rejected(ShardRejection::Sealed) => Err(RouterError::ShardClosed(format!(
                "{group} is sealed by a reshard"
            ))),
            ShardReply::Rejected(r) => Err(RouterError::Unavailable(format!(
                "shard refused the append: {r:?}"
            ))),
            other => Err(RouterError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Reads from a shard at its leader.
    pub async fn get_records(
        &self,
        stream: &str,
        shard_id: ShardId,
        request: ReadRequest,
    ) -> Result<ReadBatch, RouterError> {
        let info = self.describe_stream(stream).await?;
        let shard = info
            .shard(shard_id)
            .ok_or_else(|| {
                RouterError::ResourceNotFound(format!(
                    "Shard {shard_id} in stream {stream} not found"
                ))
            })?
            .clone();
        let group = shard.group;
        let result = self
            .at_leader(group, &shard.replicas, true, |target| async move {
                match target {
                    Target::Local => self.read_local(group, request).await,
                    Target::Remote(mut c) => {
                        let resp = c
                            .shard_read(shard_read_request(group, request))
                            .await?
                            .into_inner();
                        decode_read(resp)
                    }
                }
            })
            .await;
        if let Err(RouterError::Throttled(_)) = &result {
            metrics::counter!("kinesin_stream_throttled_total", "stream" => stream.to_string(), "direction" => "read")
                .increment(1);
        }
        result
    }

    /// Reads on this node, which must lead the group (so that every
    /// acknowledged record is visible). With nothing to return and a
    /// `wait`, it sleeps until the state machine publishes new entries
    /// (woken by them, not polling) or the wait ends; one read call.
    pub async fn read_local(
        &self,
        group: GroupId,
        request: ReadRequest,
    ) -> Result<ReadBatch, RouterError> {
        let sm = self.shards.get(group).ok_or(RouterError::NotLeader(None))?;
        self.check_leader(group)?;
        if !self.throttle.read(group) {
            return Err(RouterError::Throttled(format!(
                "Rate exceeded for reads of the shard of {group}"
            )));
        }
        let mut published = sm.watch_published();
        let start = sm.resolve(request.start)?;
        let until = tokio::time::Instant::now() + request.wait.min(MAX_READ_WAIT);
        loop {
            let batch = sm.read(
                start,
                request.limit.max(1),
                request.max_bytes.max(1),
                now_ms(),
            )?;
            if batch.records.is_empty() && !batch.sealed_and_drained {
                let woken = tokio::time::timeout_at(until, published.changed()).await;
                if matches!(woken, Ok(Ok(()))) {
                    // Still the leader, or what it applies next may be incomplete.
                    self.check_leader(group)?;
                    continue;
                }
            }
            self.throttle
                .read_bytes(group, batch.records.iter().map(|(_, r)| r.data.len()).sum());
            return Ok(batch);
        }
    }

    fn check_leader(&self, group: GroupId) -> Result<(), RouterError> {
        if self.host.is_leader(group) {
            return Ok(());
        }
        let leader = self.host.status(group).and_then(|s| s.leader);
        Err(RouterError::NotLeader(leader))
    }
}

/// Rotates each replica list so that preferred leaders (the first entry)
/// spread evenly over nodes.
fn spread_preferred_leaders(placements: Vec<Vec<NodeId>>) -> Vec<Vec<NodeId>> {
    let mut leads: BTreeMap<NodeId, usize> = BTreeMap::new();
    placements
        .into_iter()
        .map(|mut replicas| {
            let best = (0..replicas.len())
                .min_by_key(|&i| (leads.get(&replicas[i]).copied().unwrap_or(0), i))
                .unwrap_or(0);
            replicas.rotate_left(best);
            *leads.entry(replicas[0]).or_default() += 1;
            replicas
        })
        .collect()
}

/// The internal RPC for `request` at the leader of `group`.
fn shard_read_request(group: GroupId, request: ReadRequest) -> pb::ShardReadRequest {
    let (from, sequence_number, timestamp_ms) = encode_start(request.start);
    pb::ShardReadRequest {
        group: group.0,
        from: from as i32,
        sequence_number,
        timestamp_ms,
        limit: request.limit as u32,
        max_bytes: request.max_bytes as u64,
        wait_ms: request.wait.min(MAX_READ_WAIT).as_millis() as u32,
    }
}

pub(crate) fn encode_start(start: ReadStart) -> (pb::IteratorType, String, u64) {
    match start {
        ReadStart::TrimHorizon => (pb::IteratorType::TrimHorizon, String::new(), 0),
        ReadStart::Latest => (pb::IteratorType::Latest, String::new(), 0),
        ReadStart::At(s) => (pb::IteratorType::AtSequenceNumber, s.to_string(), 0),
        ReadStart::After(s) => (pb::IteratorType::AfterSequenceNumber, s.to_string(), 0),
        ReadStart::AtTimestamp(t) => (pb::IteratorType::AtTimestamp, String::new(), t),
    }
}

pub(crate) fn decode_start(from: i32, seq: &str, ts: u64) -> Result<ReadStart, RouterError> {
    let parse = || {
        seq.parse::<SequenceNumber>()
            .map_err(|e| RouterError::InvalidArgument(e.0))
    };
    Ok(
        match pb::IteratorType::try_from(from)
            .map_err(|_| RouterError::InvalidArgument("unknown iterator type".into()))?
        {
            pb::IteratorType::TrimHorizon => ReadStart::TrimHorizon,
            pb::IteratorType::Latest => ReadStart::Latest,
            pb::IteratorType::AtSequenceNumber => ReadStart::At(parse()?),
            pb::IteratorType::AfterSequenceNumber => ReadStart::After(parse()?),
            pb::IteratorType::AtTimestamp => ReadStart::AtTimestamp(ts),
        },
    )
}

pub(crate) fn encode_read(batch: ReadBatch) -> pb::ShardReadResponse {
    pb::ShardReadResponse {
        records: batch
            .records
            .into_iter()
            .map(|(s, r)| stored_to_pb(s, r))
            .collect(),
        millis_behind_latest: batch.millis_behind_latest,
        sealed_and_drained: batch.sealed_and_drained,
        next_sequence_number: batch.next.to_string(),
    }
}

pub(crate) fn stored_to_pb(seq: SequenceNumber, r: StoredRecord) -> pb::StoredRecord {
    pb::StoredRecord {
        sequence_number: seq.to_string(),
        partition_key: r.partition_key,
        data: r.data.into(),
        arrival_ms: r.arrival_ms,
    }
}

fn decode_read(resp: pb::ShardReadResponse) -> Result<ReadBatch, RouterError> {
    let bad = |e: kinesin_types::InvalidValue| RouterError::Internal(e.0);
    let records = resp
        .records
        .into_iter()
        .map(|r| {
            Ok((
                r.sequence_number.parse::<SequenceNumber>().map_err(bad)?,
                StoredRecord {
                    partition_key: r.partition_key,
                    data: r.data.to_vec(),
                    arrival_ms: r.arrival_ms,
                },
            ))
        })
        .collect::<Result<Vec<_>, RouterError>>()?;
    Ok(ReadBatch {
        records,
        next: resp.next_sequence_number.parse().map_err(bad)?,
        millis_behind_latest: resp.millis_behind_latest,
        sealed_and_drained: resp.sealed_and_drained,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kinesin_types::{HashKeyRange, ShardInfo, StreamStatus};

    fn map_with_shard(epoch: u64, state: ShardState) -> MetaState {
        let shard = ShardInfo {
            shard_id: ShardId(0),
            group: GroupId(7),
            range: HashKeyRange::new(0, u128::MAX).unwrap(),
            state,
            parent: None,
            adjacent_parent: None,
            generation: 0,
            replicas: vec![NodeId(1)],
            ending_sequence: None,
        };
        let stream = StreamInfo {
            name: StreamName::new("s").unwrap(),
            status: StreamStatus::Active,
            created_at_ms: 0,
            retention_hours: 24,
            max_record_bytes: 1 << 20,
            replication_factor: 1,
            epoch,
            shards: vec![shard],
            settings: Default::default(),
        };
        MetaState {
            streams: BTreeMap::from([("s".to_string(), stream)]),
            ..Default::default()
        }
    }

    #[test]
    fn appends_are_refused_once_the_map_closed_the_shard() {
        let open = map_with_shard(3, ShardState::Open);
        assert_eq!(append_route(&open, GroupId(7), 3), AppendRoute::Open);
        // A sender with an older map is fine while the shard is open.
        assert_eq!(append_route(&open, GroupId(7), 1), AppendRoute::Open);
        // A sender whose map is newer: this node must catch up first.
        assert_eq!(append_route(&open, GroupId(7), 4), AppendRoute::MapBehind);
        assert_eq!(append_route(&open, GroupId(8), 3), AppendRoute::MapBehind);
        let mut deleted = map_with_shard(3, ShardState::Open);
        deleted.next_group = 8;
        deleted.streams.clear();
        assert_eq!(append_route(&deleted, GroupId(7), 3), AppendRoute::Closed);
        for closed in [ShardState::Sealing, ShardState::Sealed] {
            let map = map_with_shard(4, closed);
            assert_eq!(append_route(&map, GroupId(7), 3), AppendRoute::Closed);
            assert_eq!(append_route(&map, GroupId(7), 4), AppendRoute::Closed);
        }
    }

    #[test]
    fn preferred_leaders_spread_over_nodes() {
        let n = |i| NodeId(i);
        let placements = vec![vec![n(1), n(2), n(3)]; 6];
        let spread = spread_preferred_leaders(placements);
        let mut leads: BTreeMap<NodeId, usize> = BTreeMap::new();
        for p in &spread {
            *leads.entry(p[0]).or_default() += 1;
            let set: BTreeSet<_> = p.iter().collect();
            assert_eq!(set.len(), 3);
        }
        assert_eq!(leads.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
    }

    /// A router on a node that hosts no group yet: every attempt goes to
    /// the local node, so `at_leader`'s retry rules can be driven directly.
    fn lone_router(dir: &std::path::Path) -> Router {
        let storage =
            kinesin_storage::Storage::open(dir, kinesin_storage::FsyncPolicy::NeverUnsafe)
                .expect("open storage");
        let host = RaftHost::new(NodeId(1), storage.clone(), Arc::new(kinesin_raft::NoFilter));
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

    #[test]
    fn commands_a_node_cannot_decode_wait_until_every_node_reports_their_version() {
        use kinesin_raft::GroupStateMachine;
        let dir = tempfile::tempdir().unwrap();
        let router = lone_router(dir.path());
        let group = MetaCommand::CreateGroup {
            name: "g".into(),
            kind: "test-kv".into(),
            replicas: vec![NodeId(1)],
            replication_factor: 1,
            config: Vec::new(),
        };
        let old = MetaCommand::DeleteStream { name: "s".into() };
        assert_eq!(router.cluster_data_version(), DATA_VERSION);
        assert!(router.check_cluster_decodes(&group).is_ok());
        let second = kinesin_meta::NodeInfo {
            id: NodeId(2),
            raft_addr: "127.0.0.1:1".into(),
            api_addr: String::new(),
            zone: String::new(),
            state: NodeState::Active,
        };
        let mut batch = kinesin_storage::WriteBatch::default();
        router
            .meta
            .apply(1, &MetaCommand::RegisterNode(second).encode(), &mut batch)
            .unwrap();
        router.meta.publish();
        // Node 2 was not heard from: it may run an older release, which
        // decodes the older commands only.
        assert_eq!(router.cluster_data_version(), UNREPORTED_VERSION);
        assert!(matches!(
            router.check_cluster_decodes(&group),
            Err(RouterError::Unavailable(_))
        ));
        assert!(router.check_cluster_decodes(&old).is_ok());
        // An older node's map refuses a key that names an account.
        let create = |name: &str| MetaCommand::CreateStream {
            name: name.into(),
            shard_count: 1,
            retention_hours: 24,
            max_record_bytes: 1 << 20,
            replication_factor: 1,
            placements: vec![vec![NodeId(1)]],
            now_ms: 0,
        };
        assert!(router.check_cluster_decodes(&create("orders")).is_ok());
        assert!(matches!(
            router.check_cluster_decodes(&create("123456789012:orders")),
            Err(RouterError::Unavailable(_))
        ));
        let refused = futures::executor::block_on(router.create_stream_with(
            "123456789012:orders",
            1,
            1,
            1 << 20,
            &StreamOptions::default(),
        ));
        assert!(
            matches!(refused, Err(RouterError::Unavailable(_))),
            "{refused:?}"
        );
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
