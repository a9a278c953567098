//! Streams in the cluster map: metadata writes at the metadata leader (with
//! the version gate for mixed clusters), stream creation and deletion, and
//! the waits that make a change visible on this node before a call returns.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kinesin_meta::{
    can_pass_limits, closed_shard_room, decode_reply, open_shard_room, place_replicas, Limits,
    MetaCommand, MetaState, NewStream, NodeState, StreamChange, CLOSED_LIMIT_VERSION,
    LIMITS_VERSION,
};
use kinesin_proto::v1::{self as pb};
use kinesin_shard::ReadStart;
use kinesin_storage::data_version::DATA_VERSION;
use kinesin_types::{
    GroupId, NodeId, ShardState, StreamInfo, StreamMode, StreamName, StreamStatus,
    MAX_RECORD_BYTES_LIMIT,
};

use crate::error::RouterError;
use crate::records::{shard_read_request, ReadRequest};
use crate::router::{Router, Target, LIVE_WITHIN_MS};
use kinesin_raft::clock::now_ms;

/// The data version that introduced `CreateStreamWithSettings`.
pub(crate) const STREAM_SETTINGS_VERSION: u32 = 3;
/// Largest metadata command proposed. Every replica holds and applies each
/// one (again at every restart until a snapshot covers it); the largest
/// legitimate one, a stream of 10,000 shards, is well under 1 MiB.
const MAX_META_COMMAND_BYTES: usize = 1 << 20;

/// The data version from which stream keys may name an account
/// (`kinesin_meta::stream_key`).
pub(crate) const ACCOUNT_KEYS_VERSION: u32 = 3;

/// The changes that give a stream created without settings its `options`.
pub(crate) fn legacy_settings(options: &StreamOptions) -> Vec<StreamChange> {
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
    /// Limits the new stream must keep, checked where the command applies
    /// once every node decodes such commands (`MetaCommand::Limited`).
    pub limits: Option<Limits>,
}

pub(crate) fn limits_to_proto(l: Limits) -> pb::StreamLimits {
    pb::StreamLimits {
        open_shards: l.open_shards,
        on_demand_streams: l.on_demand_streams,
        consumers_per_stream: l.consumers_per_stream,
        tags_per_stream: l.tags_per_stream,
    }
}

pub(crate) fn limits_from_proto(l: pb::StreamLimits) -> Limits {
    Limits {
        open_shards: l.open_shards,
        on_demand_streams: l.on_demand_streams,
        consumers_per_stream: l.consumers_per_stream,
        tags_per_stream: l.tags_per_stream,
    }
}

/// Longest CreateStream waits for the new shards' leaders before it returns
/// a stream that is still CREATING.
pub(crate) const CREATE_WAIT: Duration = Duration::from_secs(10);

/// Releases up to data version 2 do not report theirs: a node not heard
/// from, or answering without a version, may run one of them.
pub(crate) const UNREPORTED_VERSION: u32 = 2;

/// Rotates each replica list so that preferred leaders (the first entry)
/// spread evenly over nodes, counting the groups each already leads.
pub(crate) fn spread_preferred_leaders(
    placements: Vec<Vec<NodeId>>,
    mut leads: BTreeMap<NodeId, usize>,
) -> Vec<Vec<NodeId>> {
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

impl Router {
    pub(crate) fn meta_candidates(&self) -> Vec<NodeId> {
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
    pub(crate) fn check_cluster_decodes(&self, command: &MetaCommand) -> Result<(), RouterError> {
        let needed = command.introduced_in();
        let cluster = self.cluster_data_version();
        if needed > cluster {
            return Err(RouterError::Unavailable(format!(
                "this change needs every node at data version {needed} or later, and a node reports {cluster} (or was not heard from): finish the upgrade first"
            )));
        }
        Ok(())
    }

    /// Proposes `command`, to apply only if the map keeps `limits`, once
    /// every node decodes such commands; before that (a rolling upgrade from
    /// a release without them) the command alone, which the proposer's own
    /// check of the limits guards, though not against a racing request.
    pub async fn meta_write_limited(
        &self,
        command: MetaCommand,
        limits: Limits,
    ) -> Result<(), RouterError> {
        self.meta_write(self.limited(command, limits)).await
    }

    fn limited(&self, command: MetaCommand, limits: Limits) -> MetaCommand {
        let version = self.cluster_data_version();
        if matches!(command, MetaCommand::Reshard { .. }) && version >= CLOSED_LIMIT_VERSION {
            // The shard limit bounds the closed shards kept, too.
            return command.limited_reshard(limits, limits.open_shards);
        }
        if !can_pass_limits(&command) || version < LIMITS_VERSION {
            return command;
        }
        command.limited(limits)
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
                    Target::Remote(mut c, ..) => {
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
    pub(crate) async fn catch_up_meta(&self, index: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.meta_applied_index() < index && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Proposes an encoded metadata command on this node, the metadata
    /// leader. Bytes from another node are decoded and version-checked
    /// first: a command a replica cannot apply would stop it, so only
    /// commands every node can decode are ever proposed.
    pub(crate) async fn meta_write_local(&self, command: Vec<u8>) -> Result<(), RouterError> {
        if command.len() > MAX_META_COMMAND_BYTES {
            return Err(RouterError::InvalidArgument(format!(
                "a metadata command of {} bytes exceeds the limit of {MAX_META_COMMAND_BYTES}",
                command.len()
            )));
        }
        let decoded = MetaCommand::decode(&command)
            .map_err(|e| RouterError::InvalidArgument(e.to_string()))?;
        let wrapped = match &decoded {
            MetaCommand::Limited { command, .. } => Some(
                MetaCommand::decode(command)
                    .ok()
                    .filter(can_pass_limits)
                    .ok_or_else(|| {
                        RouterError::InvalidArgument(
                            "a limited metadata command must wrap a change the limits concern"
                                .into(),
                        )
                    })?,
            ),
            MetaCommand::LimitedReshard { command, .. } => Some(
                MetaCommand::decode(command)
                    .ok()
                    .filter(|c| matches!(c, MetaCommand::Reshard { .. }))
                    .ok_or_else(|| {
                        RouterError::InvalidArgument("a limited reshard must wrap a reshard".into())
                    })?,
            ),
            _ => None,
        };
        let change = wrapped.as_ref().unwrap_or(&decoded);
        self.check_created_stream(change)?;
        self.check_shard_room(change)?;
        self.check_cluster_decodes(&decoded)?;
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

    /// Refuses a stream the cluster must not create. Called where a
    /// request enters and again on the metadata leader, which a native-API
    /// request or a raw MetaWrite can reach directly: nothing unchecked is
    /// ever proposed.
    fn check_new_stream(
        &self,
        name: &str,
        shard_count: u32,
        replication: usize,
        max_record_bytes: u32,
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
        if replication > 5 {
            return Err(RouterError::InvalidArgument(
                "replication factor must be between 1 and 5".into(),
            ));
        }
        Ok(())
    }

    /// A stream that a metadata command creates passes the checks of a
    /// CreateStream request: the internal MetaWrite takes raw commands, and
    /// a stream of millions of shards would be an entry every replica must
    /// hold and apply at every restart.
    fn check_created_stream(&self, command: &MetaCommand) -> Result<(), RouterError> {
        let (name, shards, replication, max_record_bytes) = match command {
            MetaCommand::CreateStream {
                name,
                shard_count,
                replication_factor,
                max_record_bytes,
                ..
            } => (name, *shard_count, *replication_factor, *max_record_bytes),
            MetaCommand::CreateStreamWithSettings { stream, .. } => (
                &stream.name,
                stream.shard_count,
                stream.replication_factor,
                stream.max_record_bytes,
            ),
            _ => return Ok(()),
        };
        self.check_new_stream(name, shards, replication as usize, max_record_bytes)
    }

    /// Refuses a command that would take the cluster past its shard limit
    /// in this leader's map: more open shards (a new stream, a reshard
    /// adding children), or more closed shards kept than the limit (a
    /// reshard closing its parents). The gateway checks the same on its
    /// node's map, but a native-API request or a raw MetaWrite reaches the
    /// leader directly, and without `Limited` nothing else counts shards
    /// where the command applies. Commands in flight can still pass it
    /// together; a `Limited` one is checked again where it applies.
    fn check_shard_room(&self, command: &MetaCommand) -> Result<(), RouterError> {
        let (added, closed) = match command {
            MetaCommand::CreateStream { shard_count, .. } => (i64::from(*shard_count), 0),
            MetaCommand::CreateStreamWithSettings { stream, .. } => {
                (i64::from(stream.shard_count), 0)
            }
            MetaCommand::Reshard {
                parents, children, ..
            } => (children.len() as i64 - parents.len() as i64, parents.len()),
            _ => return Ok(()),
        };
        let (limit, state) = (self.config.shard_limit, self.meta_state());
        open_shard_room(limit, &state, added)?;
        closed_shard_room(limit, &state, closed)?;
        Ok(())
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
        self.check_new_stream(name, shard_count, replication, max_record_bytes)?;
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
                Target::Remote(mut c, ..) => {
                    let applied = c
                        .create_stream(pb::CreateStreamRequest {
                            stream: name.to_string(),
                            shard_count,
                            replication_factor: replication as u32,
                            max_record_bytes,
                            on_demand: options.mode == StreamMode::OnDemand,
                            tags: options.tags.clone().into_iter().collect(),
                            limits: options.limits.map(limits_to_proto),
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

    /// On the metadata leader: milliseconds since `node` last acknowledged
    /// the metadata group (`None`: not in this term, or not the leader).
    /// Every node replicates the metadata group (voter or learner), so this
    /// is the cluster's view of who is up.
    fn meta_ack_age_ms(&self, node: NodeId) -> Option<u64> {
        self.host
            .status(GroupId::META)
            .and_then(|s| s.follower_ack_age_ms.get(&node).copied().flatten())
    }

    /// On the metadata leader: has `node` acknowledged the metadata group
    /// within [`LIVE_WITHIN_MS`]?
    pub fn meta_leader_hears(&self, node: NodeId) -> bool {
        node == self.host.node_id()
            || self
                .meta_ack_age_ms(node)
                .is_some_and(|ms| ms < LIVE_WITHIN_MS)
    }

    /// On the metadata leader: is `node` to be left out of a new stream's
    /// replicas? It is when this node's pings find it down, or when it has
    /// not acknowledged the metadata group for [`LIVE_WITHIN_MS`]. A node
    /// this leader has no acknowledgement from at all (it was elected a
    /// moment ago, and the node's first answer is on its way) counts by the
    /// pings alone: otherwise a stream created then got fewer replicas than
    /// the live nodes allow (one of three, in a CI run).
    pub fn left_out_of_placement(&self, node: NodeId) -> bool {
        node != self.host.node_id()
            && (self.liveness.is_down(node)
                || self
                    .meta_ack_age_ms(node)
                    .is_some_and(|ms| ms >= LIVE_WITHIN_MS))
    }

    /// Waits (at most `limit`) until `stream` is in this node's map and no
    /// longer CREATING, so that a client's first DescribeStream after
    /// CreateStream, through this node, finds it ACTIVE. The applied index
    /// the leader answered with is waited for first; this also covers a
    /// node whose replica has not applied the creation for any other
    /// reason. A stream still CREATING then is reported as such; the
    /// controller keeps working on it.
    pub(crate) async fn wait_until_created(&self, stream: &str, limit: Duration) {
        let mut changes = self.meta.subscribe();
        let created = |state: &MetaState| {
            state
                .streams
                .get(stream)
                .is_some_and(|s| s.status != StreamStatus::Creating)
        };
        let _ = tokio::time::timeout(limit, changes.wait_for(|state| created(state))).await;
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
    pub(crate) async fn leader_answers(&self, group: GroupId, replicas: &[NodeId]) -> bool {
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
                Target::Remote(mut c, ..) => {
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
            let leader = self.host.leader(GroupId::META);
            return Err(RouterError::NotLeader(leader));
        }
        self.check_new_stream(name, shard_count, replication, max_record_bytes)?;
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
        // Replicas go to nodes not silent toward the metadata group and not
        // found down by this node's pings (faster to notice a kill), so that
        // every new shard can elect a leader now; the controller adds the
        // missing ones when nodes come back.
        let unreachable: BTreeSet<NodeId> = state
            .active_nodes()
            .map(|n| n.id)
            .filter(|n| self.left_out_of_placement(*n))
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
        let placements = spread_preferred_leaders(placements, state.preferred_leads());
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
        let mut command = MetaCommand::CreateStreamWithSettings {
            stream: stream.clone(),
            mode: options.mode,
            tags: options.tags.clone(),
        };
        if let Some(limits) = options.limits {
            command = self.limited(command, limits);
        }
        if self.check_cluster_decodes(&command).is_ok() {
            return self.meta_write_local(command.encode()).await;
        }
        self.create_stream_in_steps(stream, options).await
    }

    /// With a node of an older release in the cluster: creates the stream,
    /// then sets its mode and tags, as those releases did.
    pub(crate) async fn create_stream_in_steps(
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
    pub(crate) async fn sync_meta(&self) -> Result<(), RouterError> {
        let candidates = self.meta_candidates();
        let index = self
            .at_leader(GroupId::META, &candidates, true, |target| async move {
                match target {
                    Target::Local => self.meta_index_local(),
                    Target::Remote(mut c, ..) => Ok(c
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
            let leader = self.host.leader(GroupId::META);
            return Err(RouterError::NotLeader(leader));
        }
        Ok(self.meta_applied_index())
    }

    pub fn list_streams(&self) -> Vec<String> {
        self.meta.state().streams.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::tests::lone_router;

    #[test]
    fn preferred_leaders_spread_over_nodes() {
        let n = |i| NodeId(i);
        let placements = vec![vec![n(1), n(2), n(3)]; 5];
        let already = BTreeMap::from([(n(1), 1)]);
        let spread = spread_preferred_leaders(placements, already);
        let mut leads: BTreeMap<NodeId, usize> = BTreeMap::from([(n(1), 1)]);
        for p in &spread {
            *leads.entry(p[0]).or_default() += 1;
            let set: BTreeSet<_> = p.iter().collect();
            assert_eq!(set.len(), 3);
        }
        assert_eq!(leads.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
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
        let limits = Limits {
            open_shards: 1,
            on_demand_streams: 1,
            consumers_per_stream: 1,
            tags_per_stream: 1,
        };
        let grows = MetaCommand::UpdateStream {
            name: "s".into(),
            change: StreamChange::AddTags(BTreeMap::from([("k".into(), "v".into())])),
        };
        assert!(matches!(
            router.limited(grows.clone(), limits),
            MetaCommand::Limited { .. }
        ));
        // A command that cannot pass a limit goes alone.
        assert_eq!(router.limited(old.clone(), limits), old);
        // A reshard carries the closed shards it may leave, too.
        let reshard = MetaCommand::Reshard {
            stream: "s".into(),
            parents: vec![kinesin_types::ShardId(0)],
            children: Vec::new(),
        };
        assert_eq!(
            router.limited(reshard.clone(), limits),
            reshard.clone().limited_reshard(limits, limits.open_shards)
        );
        // A limited command must wrap one that limits concern, once.
        for wrapped in [
            MetaCommand::Limited {
                limits,
                command: grows.clone().limited(limits).encode(),
            },
            MetaCommand::Limited {
                limits,
                command: old.encode(),
            },
            MetaCommand::Limited {
                limits,
                command: vec![0xFF],
            },
            grows.clone().limited_reshard(limits, 1),
        ] {
            let refused = futures::executor::block_on(router.meta_write_local(wrapped.encode()));
            assert!(
                matches!(refused, Err(RouterError::InvalidArgument(_))),
                "{refused:?}"
            );
        }
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
        // Limits checked at apply wait for every node too; meanwhile the
        // command goes alone.
        assert_eq!(router.limited(grows.clone(), limits), grows);
        assert_eq!(router.limited(reshard.clone(), limits), reshard);
    }
}
