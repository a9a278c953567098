//! The metadata state machine. The whole map is small (nodes and shard maps,
//! no records), so it is stored as one value and kept in memory; every node
//! holds a replica (voter or learner) and watches it for changes.

use std::io;
use std::sync::{Arc, Mutex};

use kinesin_raft::GroupStateMachine;
use kinesin_storage::{keys, Cf, Storage, WriteBatch};
use kinesin_types::{
    GroupId, HashKeyRange, NodeId, ShardId, ShardInfo, ShardState, StreamInfo, StreamName,
    StreamSettings, StreamStatus,
};
use tokio::sync::watch;

use crate::command::{
    encode_reply, MetaCommand, MetaError, MetaReply, NewShard, NewStream, StreamChange,
};
use crate::limits::closed_shard_room;
use crate::state::{GroupSpec, MetaState};
use crate::token_key::TOKEN_KEY_LEN;
use crate::version;

const STATE_KEY: &[u8] = b"meta";

pub struct MetaStateMachine {
    storage: Storage,
    working: Mutex<MetaState>,
    published: watch::Sender<Arc<MetaState>>,
}

impl MetaStateMachine {
    /// Opens the stored map, upgrading a value written in an older data
    /// version in place (durably, before anything else reads it).
    pub fn open(storage: Storage) -> io::Result<Self> {
        let key = keys::named_key(GroupId::META.0, STATE_KEY);
        let state = match storage.get(Cf::StateMachine, &key)? {
            Some(v) => {
                let decoded = version::decode(&v)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let to = version::written_version(&decoded.state);
                if decoded.version != to {
                    let mut batch = WriteBatch::default();
                    batch.put_cf(
                        storage.cf(Cf::StateMachine),
                        &key,
                        version::encode(&decoded.state),
                    );
                    storage.write_durable(batch).map_err(io::Error::other)?;
                    tracing::info!(
                        from = decoded.version,
                        to,
                        "upgraded the stored metadata map"
                    );
                }
                decoded.state
            }
            None => MetaState {
                next_group: 1,
                ..Default::default()
            },
        };
        let (published, _) = watch::channel(Arc::new(state.clone()));
        Ok(MetaStateMachine {
            storage,
            working: Mutex::new(state),
            published,
        })
    }

    /// The latest applied cluster map.
    pub fn state(&self) -> Arc<MetaState> {
        self.published.borrow().clone()
    }

    /// Notified on every change of the map.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MetaState>> {
        self.published.subscribe()
    }

    /// Applies `command` only if `limits` (given the map before it and the
    /// command) pass. The command's own refusals come first (the stream
    /// exists, it is not ACTIVE), then the limits, against the map before.
    fn apply_within(
        state: &mut MetaState,
        command: MetaCommand,
        limits: impl FnOnce(&MetaState, &MetaCommand) -> MetaReply,
    ) -> MetaReply {
        let mut after = state.clone();
        Self::apply_command(&mut after, command.clone())?;
        limits(state, &command)?;
        *state = after;
        Ok(())
    }

    pub(crate) fn apply_command(state: &mut MetaState, command: MetaCommand) -> MetaReply {
        match command {
            MetaCommand::Bootstrap { cluster_id } => {
                if state.cluster_id.is_empty() {
                    state.cluster_id = cluster_id;
                }
                Ok(())
            }
            MetaCommand::RegisterNode(info) => {
                state.nodes.insert(info.id, info);
                Ok(())
            }
            MetaCommand::SetNodeState { node, state: ns } => {
                let n = state
                    .nodes
                    .get_mut(&node)
                    .ok_or_else(|| MetaError::Invalid(format!("node {node} is not a member")))?;
                n.state = ns;
                Ok(())
            }
            MetaCommand::CreateStream {
                name,
                shard_count,
                retention_hours,
                max_record_bytes,
                replication_factor,
                now_ms,
                placements,
            } => create_stream(
                state,
                NewStream {
                    name,
                    shard_count,
                    retention_hours,
                    max_record_bytes,
                    replication_factor,
                    now_ms,
                    placements,
                },
                StreamSettings::default(),
            ),
            MetaCommand::CreateStreamWithSettings { stream, mode, tags } => create_stream(
                state,
                stream,
                StreamSettings {
                    mode,
                    tags,
                    ..Default::default()
                },
            ),
            MetaCommand::DeleteStream { name } => state
                .streams
                .remove(&name)
                .map(|_| ())
                .ok_or(MetaError::StreamNotFound(name)),
            MetaCommand::SetReplicas {
                stream,
                shard,
                replicas,
            } => {
                replica_list(&replicas)?;
                let (s, k) = stream_and_shard(state, &stream, shard)?;
                s.shards[k].replicas = replicas;
                s.epoch += 1;
                Ok(())
            }
            MetaCommand::Reshard {
                stream,
                parents,
                children,
            } => {
                let next_group = state.next_group;
                let s = state
                    .streams
                    .get_mut(&stream)
                    .ok_or_else(|| MetaError::StreamNotFound(stream.clone()))?;
                let added = reshard(s, &parents, children, next_group)?;
                state.next_group += added;
                Ok(())
            }
            MetaCommand::ShardSealed {
                stream,
                shard,
                ending,
            } => {
                let (s, k) = stream_and_shard(state, &stream, shard)?;
                let sh = &mut s.shards[k];
                if sh.state == ShardState::Sealing {
                    sh.state = ShardState::Sealed;
                    sh.ending_sequence = ending;
                    s.epoch += 1;
                }
                Ok(())
            }
            MetaCommand::UpdateStream { name, change } => {
                let s = state
                    .streams
                    .get_mut(&name)
                    .ok_or(MetaError::StreamNotFound(name))?;
                apply_change(s, change);
                Ok(())
            }
            MetaCommand::StreamReady { stream, epoch } => {
                let s = state
                    .streams
                    .get_mut(&stream)
                    .ok_or(MetaError::StreamNotFound(stream))?;
                if s.epoch == epoch && s.awaits_leaders() {
                    s.status = StreamStatus::Active;
                }
                Ok(())
            }
            MetaCommand::CreateGroup {
                name,
                kind,
                replicas,
                replication_factor,
                config,
            } => {
                if state.groups.contains_key(&name) {
                    return Err(MetaError::GroupExists(name));
                }
                if kind.is_empty() || name.is_empty() {
                    return Err(MetaError::Invalid("a group needs a name and a kind".into()));
                }
                replica_list(&replicas)?;
                let group = GroupId(state.next_group);
                state.next_group += 1;
                state.groups.insert(
                    name,
                    GroupSpec {
                        group,
                        kind,
                        replicas,
                        replication_factor,
                        config,
                        ready: false,
                    },
                );
                Ok(())
            }
            MetaCommand::DeleteGroup { name } => state
                .groups
                .remove(&name)
                .map(|_| ())
                .ok_or(MetaError::GroupNotFound(name)),
            MetaCommand::SetGroupReplicas { name, replicas } => {
                replica_list(&replicas)?;
                let spec = state
                    .groups
                    .get_mut(&name)
                    .ok_or(MetaError::GroupNotFound(name))?;
                // Until ready, replicas may still be making the first
                // membership from this list: every one must see the same.
                if !spec.ready {
                    return Err(MetaError::Invalid(
                        "the group has no leader yet; change its replicas once it is ready".into(),
                    ));
                }
                spec.replicas = replicas;
                Ok(())
            }
            MetaCommand::GroupReady { name } => {
                let spec = state
                    .groups
                    .get_mut(&name)
                    .ok_or(MetaError::GroupNotFound(name))?;
                spec.ready = true;
                Ok(())
            }
            MetaCommand::Limited { limits, command } => {
                let command = MetaCommand::decode(&command)?;
                if matches!(command, MetaCommand::Limited { .. }) {
                    return Err(MetaError::Invalid("a limited command nests another".into()));
                }
                Self::apply_within(state, command, |before, command| {
                    limits.check(before, command)
                })
            }
            MetaCommand::LimitedReshard {
                limits,
                closed_shards,
                command,
            } => {
                let command = MetaCommand::decode(&command)?;
                let MetaCommand::Reshard { parents, .. } = &command else {
                    return Err(MetaError::Invalid(
                        "a limited reshard holds a command other than a reshard".into(),
                    ));
                };
                let closing = parents.len();
                Self::apply_within(state, command, |before, command| {
                    limits.check(before, command)?;
                    closed_shard_room(closed_shards, before, closing)
                })
            }
            MetaCommand::RemoveSealedShard { stream, shard } => {
                let (s, k) = stream_and_shard(state, &stream, shard)?;
                if s.shards[k].state != ShardState::Sealed {
                    return Err(MetaError::Invalid(format!(
                        "shard {shard} of {stream} is not sealed"
                    )));
                }
                s.shards.remove(k);
                s.epoch += 1;
                Ok(())
            }
            MetaCommand::SetTokenKey { key } => {
                if !key.has_valid_length() {
                    return Err(MetaError::Invalid(format!(
                        "a token key has {TOKEN_KEY_LEN} bytes"
                    )));
                }
                if state.token_key.bytes().is_none() {
                    state.token_key = key;
                }
                Ok(())
            }
        }
    }
}

fn create_stream(state: &mut MetaState, new: NewStream, settings: StreamSettings) -> MetaReply {
    let NewStream {
        name,
        shard_count,
        retention_hours,
        max_record_bytes,
        replication_factor,
        now_ms,
        placements,
    } = new;
    let stream_name = StreamName::new(name.clone()).map_err(|e| MetaError::Invalid(e.0))?;
    if state.streams.contains_key(&name) {
        return Err(MetaError::StreamExists(name));
    }
    if shard_count == 0 || placements.len() != shard_count as usize {
        return Err(MetaError::Invalid(
            "every shard needs a list of replicas".into(),
        ));
    }
    placements.iter().try_for_each(|p| replica_list(p))?;
    let shards = HashKeyRange::split_evenly(shard_count)
        .into_iter()
        .zip(placements)
        .enumerate()
        .map(|(i, (range, replicas))| ShardInfo {
            shard_id: kinesin_types::ShardId(i as u32),
            group: GroupId(state.next_group + i as u64),
            range,
            state: ShardState::Open,
            parent: None,
            adjacent_parent: None,
            generation: 0,
            replicas,
            ending_sequence: None,
        })
        .collect();
    state.next_group += u64::from(shard_count);
    state.streams.insert(
        name,
        StreamInfo {
            name: stream_name,
            // ACTIVE once every shard has a leader (`StreamReady`).
            status: StreamStatus::Creating,
            created_at_ms: now_ms,
            retention_hours,
            max_record_bytes,
            replication_factor,
            epoch: 1,
            shards,
            settings,
        },
    );
    Ok(())
}

/// A group's replicas: at least one, never two on one node (placement
/// never proposes that; a command that does is refused, not stored).
pub(crate) fn replica_list(replicas: &[NodeId]) -> Result<(), MetaError> {
    let distinct: std::collections::BTreeSet<&NodeId> = replicas.iter().collect();
    if replicas.is_empty() || distinct.len() != replicas.len() {
        return Err(MetaError::Invalid(format!(
            "a group needs one or more replicas on distinct nodes, not {replicas:?}"
        )));
    }
    Ok(())
}

/// A stream of the map and the position of one of its shards.
fn stream_and_shard<'s>(
    state: &'s mut MetaState,
    stream: &str,
    shard: ShardId,
) -> Result<(&'s mut StreamInfo, usize), MetaError> {
    let s = state
        .streams
        .get_mut(stream)
        .ok_or_else(|| MetaError::StreamNotFound(stream.to_string()))?;
    let k = s
        .shards
        .iter()
        .position(|sh| sh.shard_id == shard)
        .ok_or_else(|| MetaError::ShardNotFound(shard.to_string()))?;
    Ok((s, k))
}

/// Validates and applies a reshard; returns how many groups it used.
fn reshard(
    stream: &mut StreamInfo,
    parents: &[ShardId],
    children: Vec<NewShard>,
    next_group: u64,
) -> Result<u64, MetaError> {
    if stream.status != StreamStatus::Active {
        return Err(MetaError::Invalid(format!(
            "stream {} is {} and cannot be resharded now",
            stream.name,
            stream.status.as_aws_str()
        )));
    }
    if parents.is_empty() || children.is_empty() {
        return Err(MetaError::Invalid(
            "a reshard needs parents and children".into(),
        ));
    }
    // Each range check below assumes distinct parents and ranges that hold
    // keys: a parent named twice with its range given twice, or a child
    // whose start is above its end, would otherwise pass the tiling check.
    let distinct: std::collections::BTreeSet<&ShardId> = parents.iter().collect();
    if distinct.len() != parents.len() {
        return Err(MetaError::Invalid(
            "a reshard names a closed shard twice".into(),
        ));
    }
    if children.iter().any(|c| c.range.start > c.range.end) {
        return Err(MetaError::Invalid(
            "a new shard's hash key range starts above its end".into(),
        ));
    }
    let mut generation = 0;
    let mut covered: Vec<HashKeyRange> = Vec::new();
    for p in parents {
        let sh = stream
            .shard(*p)
            .ok_or_else(|| MetaError::ShardNotFound(p.to_string()))?;
        if sh.state != ShardState::Open {
            return Err(MetaError::Invalid(format!("shard {p} is not open")));
        }
        generation = generation.max(sh.generation + 1);
        covered.push(sh.range);
    }
    // The children must tile exactly the parents' hash-key space.
    let mut parent_ranges = covered;
    parent_ranges.sort_by_key(|r| r.start);
    let mut child_ranges: Vec<HashKeyRange> = children.iter().map(|c| c.range).collect();
    child_ranges.sort_by_key(|r| r.start);
    if merged(&parent_ranges) != merged(&child_ranges) {
        return Err(MetaError::Invalid(
            "the new shards must cover exactly the hash keys of the closed ones".into(),
        ));
    }
    if children.iter().any(|c| {
        !parents.contains(&c.parent) || c.adjacent_parent.is_some_and(|a| !parents.contains(&a))
    }) {
        return Err(MetaError::Invalid(
            "every new shard needs parents among the closed shards".into(),
        ));
    }
    children
        .iter()
        .try_for_each(|c| replica_list(&c.replicas))?;
    let mut next_id = stream
        .shards
        .iter()
        .map(|s| s.shard_id.0 + 1)
        .max()
        .unwrap_or(0);
    for p in parents {
        if let Some(sh) = stream.shards.iter_mut().find(|s| s.shard_id == *p) {
            sh.state = ShardState::Sealing;
        }
    }
    let count = children.len() as u64;
    for (k, c) in children.into_iter().enumerate() {
        stream.shards.push(ShardInfo {
            shard_id: ShardId(next_id),
            group: GroupId(next_group + k as u64),
            range: c.range,
            state: ShardState::Open,
            parent: Some(c.parent),
            adjacent_parent: c.adjacent_parent,
            generation,
            replicas: c.replicas,
            ending_sequence: None,
        });
        next_id += 1;
    }
    stream.status = StreamStatus::Updating;
    stream.epoch += 1;
    Ok(count)
}

/// Sorted ranges joined where they touch; gaps stay visible.
pub(crate) fn merged(sorted: &[HashKeyRange]) -> Vec<(u128, u128)> {
    let mut out: Vec<(u128, u128)> = Vec::new();
    for r in sorted {
        match out.last_mut() {
            Some(last) if last.1.checked_add(1) == Some(r.start.0) => last.1 = r.end.0,
            _ => out.push((r.start.0, r.end.0)),
        }
    }
    out
}

fn apply_change(stream: &mut StreamInfo, change: StreamChange) {
    let settings = &mut stream.settings;
    match change {
        StreamChange::RetentionHours(h) => stream.retention_hours = h,
        StreamChange::MaxRecordBytes(b) => stream.max_record_bytes = b,
        StreamChange::Mode(m) => settings.mode = m,
        StreamChange::AddTags(tags) => settings.tags.extend(tags),
        StreamChange::RemoveTags(keys) => {
            for k in keys {
                settings.tags.remove(&k);
            }
        }
        StreamChange::EnableMetrics(names) => settings.shard_level_metrics.extend(names),
        StreamChange::DisableMetrics(names) => {
            for n in names {
                settings.shard_level_metrics.remove(&n);
            }
        }
        StreamChange::EncryptionKey(k) => settings.encryption_key = k,
        StreamChange::ResourcePolicy(p) => settings.resource_policy = p,
        StreamChange::RegisterConsumer { name, now_ms } => {
            settings.consumers.entry(name).or_insert(now_ms);
        }
        StreamChange::DeregisterConsumer(name) => {
            settings.consumers.remove(&name);
        }
    }
}

impl GroupStateMachine for MetaStateMachine {
    fn apply(&self, index: u64, command: &[u8], batch: &mut WriteBatch) -> io::Result<Vec<u8>> {
        // Every command is proposed by a metadata leader that encoded it
        // (`Router::meta_write`; `GroupPropose` refuses this group), after
        // the version gate: one this replica cannot decode was written by a
        // newer release, and its map must not go on without it.
        let command = MetaCommand::decode(command).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "metadata command at index {index}: {e}; it was written by a newer release: upgrade this node"
                ),
            )
        })?;
        let mut state = self.working.lock().expect("meta lock");
        let reply = Self::apply_command(&mut state, command);
        state.applied_index = index;
        batch.put_cf(
            self.storage.cf(Cf::StateMachine),
            keys::named_key(GroupId::META.0, STATE_KEY),
            version::encode(&state),
        );
        Ok(encode_reply(&reply))
    }

    fn publish(&self) {
        let state = self.working.lock().expect("meta lock").clone();
        if **self.published.borrow() != state {
            self.published.send_replace(Arc::new(state));
        }
    }

    fn snapshot_state(&self) -> Vec<u8> {
        version::encode(&self.state())
    }

    fn restore(&self, state: &[u8], batch: &mut WriteBatch) -> io::Result<()> {
        // A snapshot built by an older release (or stored before an
        // upgrade) is in its data version; it is kept in the current one.
        let restored = version::decode(state)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            .state;
        batch.put_cf(
            self.storage.cf(Cf::StateMachine),
            keys::named_key(GroupId::META.0, STATE_KEY),
            version::encode(&restored),
        );
        *self.working.lock().expect("meta lock") = restored;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use kinesin_types::{NodeId, SequenceNumber, StreamMode};

    use crate::TokenKey;

    #[test]
    fn a_command_this_replica_cannot_decode_stops_it_instead_of_being_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), kinesin_storage::FsyncPolicy::NeverUnsafe).unwrap();
        let sm = MetaStateMachine::open(storage).unwrap();
        let mut batch = WriteBatch::default();
        let bootstrap = MetaCommand::Bootstrap {
            cluster_id: "kc-1".into(),
        };
        sm.apply(1, &bootstrap.encode(), &mut batch).unwrap();
        // What a newer release's command looks like here: a variant tag
        // this release does not have.
        let err = sm.apply(2, &[0xF0, 0x01], &mut batch).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("index 2"), "{err}");
        // A command that decodes but is refused is answered, not fatal.
        let refused = MetaCommand::DeleteStream {
            name: "nope".into(),
        };
        let reply = sm.apply(3, &refused.encode(), &mut batch).unwrap();
        assert!(crate::command::decode_reply(&reply).is_err());
    }

    fn state_with_stream(shards: u32) -> MetaState {
        let mut state = MetaState {
            next_group: 1,
            ..Default::default()
        };
        MetaStateMachine::apply_command(
            &mut state,
            MetaCommand::CreateStream {
                name: "s".into(),
                shard_count: shards,
                retention_hours: 24,
                max_record_bytes: 1024,
                replication_factor: 1,
                now_ms: 1,
                placements: vec![vec![NodeId(1)]; shards as usize],
            },
        )
        .unwrap();
        assert_eq!(state.streams["s"].status, StreamStatus::Creating);
        ready(&mut state);
        assert_eq!(state.streams["s"].status, StreamStatus::Active);
        state
    }

    /// What the controller proposes once every open shard answers.
    fn ready(state: &mut MetaState) {
        let epoch = state.streams["s"].epoch;
        MetaStateMachine::apply_command(
            state,
            MetaCommand::StreamReady {
                stream: "s".into(),
                epoch,
            },
        )
        .unwrap();
    }

    fn child(range: HashKeyRange, parent: u32, adjacent: Option<u32>) -> NewShard {
        NewShard {
            range,
            parent: ShardId(parent),
            adjacent_parent: adjacent.map(ShardId),
            replicas: vec![NodeId(1)],
        }
    }

    /// Shard 0 split in two at 2^100.
    fn split_shard_0() -> MetaCommand {
        let (a, b) = HashKeyRange::FULL
            .split_at(kinesin_types::HashKey(1 << 100))
            .unwrap();
        MetaCommand::Reshard {
            stream: "s".into(),
            parents: vec![ShardId(0)],
            children: vec![child(a, 0, None), child(b, 0, None)],
        }
    }

    #[test]
    fn a_split_seals_the_parent_and_opens_children_above_it() {
        let mut state = state_with_stream(1);
        let split = split_shard_0();
        MetaStateMachine::apply_command(&mut state, split.clone()).unwrap();
        let s = &state.streams["s"];
        assert_eq!(s.status, StreamStatus::Updating);
        assert_eq!(s.shards[0].state, ShardState::Sealing);
        assert_eq!(s.shards[1].shard_id, ShardId(1));
        assert_eq!(s.shards[2].group, GroupId(3));
        assert_eq!(s.shards[2].generation, 1);
        assert_eq!(s.open_shard_count(), 2);
        assert_eq!(state.next_group, 4);
        // A second reshard waits until the first finished.
        assert!(MetaStateMachine::apply_command(&mut state, split).is_err());

        let ending = Some(SequenceNumber::new(0, ShardId(0), 7, 0));
        MetaStateMachine::apply_command(
            &mut state,
            MetaCommand::ShardSealed {
                stream: "s".into(),
                shard: ShardId(0),
                ending,
            },
        )
        .unwrap();
        let s = &state.streams["s"];
        assert_eq!(s.shards[0].state, ShardState::Sealed);
        assert_eq!(s.shards[0].ending_sequence, ending);
        // UPDATING until the children are known to have leaders; a readiness
        // check made before the last change of the map counts for nothing.
        assert_eq!(s.status, StreamStatus::Updating);
        let stale = MetaCommand::StreamReady {
            stream: "s".into(),
            epoch: s.epoch - 1,
        };
        MetaStateMachine::apply_command(&mut state, stale).unwrap();
        assert_eq!(state.streams["s"].status, StreamStatus::Updating);
        ready(&mut state);
        assert_eq!(state.streams["s"].status, StreamStatus::Active);
    }

    #[test]
    fn the_first_token_key_stays_and_a_short_one_is_refused() {
        let mut state = MetaState::default();
        let set = |key: TokenKey| MetaCommand::SetTokenKey { key };
        let first = TokenKey::new([1; TOKEN_KEY_LEN]);
        assert_eq!(set(first.clone()).introduced_in(), crate::TOKEN_KEY_VERSION);
        MetaStateMachine::apply_command(&mut state, set(first.clone())).unwrap();
        MetaStateMachine::apply_command(&mut state, set(TokenKey::new([2; TOKEN_KEY_LEN])))
            .unwrap();
        assert_eq!(state.token_key, first);
        let short: TokenKey = postcard::from_bytes(&[2, 9, 9]).unwrap();
        let mut keyless = MetaState::default();
        let err = MetaStateMachine::apply_command(&mut keyless, set(short)).unwrap_err();
        assert!(matches!(err, MetaError::Invalid(_)), "{err:?}");
        assert_eq!(keyless.token_key.bytes(), None);
    }

    #[test]
    fn only_a_sealed_shard_is_removed_and_later_shards_keep_new_ids() {
        let mut state = state_with_stream(1);
        let remove = |shard: u32| MetaCommand::RemoveSealedShard {
            stream: "s".into(),
            shard: ShardId(shard),
        };
        assert_eq!(remove(0).introduced_in(), crate::SHARD_REMOVAL_VERSION);
        let open = MetaStateMachine::apply_command(&mut state, remove(0)).unwrap_err();
        assert!(matches!(open, MetaError::Invalid(_)), "{open:?}");
        MetaStateMachine::apply_command(&mut state, split_shard_0()).unwrap();
        // Sealing: its group may still take its last appends.
        assert!(MetaStateMachine::apply_command(&mut state, remove(0)).is_err());
        let sealed = MetaCommand::ShardSealed {
            stream: "s".into(),
            shard: ShardId(0),
            ending: None,
        };
        MetaStateMachine::apply_command(&mut state, sealed).unwrap();
        ready(&mut state);
        let epoch = state.streams["s"].epoch;
        MetaStateMachine::apply_command(&mut state, remove(0)).unwrap();
        let s = &state.streams["s"];
        assert_eq!(s.epoch, epoch + 1, "routers see the map changed");
        let ids: Vec<u32> = s.shards.iter().map(|sh| sh.shard_id.0).collect();
        assert_eq!(ids, [1, 2]);
        assert_eq!(s.status, StreamStatus::Active);
        let shard_1 = s.shards[0].range;
        let again = MetaStateMachine::apply_command(&mut state, remove(0)).unwrap_err();
        assert!(matches!(again, MetaError::ShardNotFound(_)), "{again:?}");
        // The next reshard numbers its shards after the highest id, not
        // after the count of shards left.
        let (a, b) = shard_1.split_at(kinesin_types::HashKey(1 << 60)).unwrap();
        let split_1 = MetaCommand::Reshard {
            stream: "s".into(),
            parents: vec![ShardId(1)],
            children: vec![child(a, 1, None), child(b, 1, None)],
        };
        MetaStateMachine::apply_command(&mut state, split_1).unwrap();
        let ids: Vec<u32> = state.streams["s"]
            .shards
            .iter()
            .map(|sh| sh.shard_id.0)
            .collect();
        assert_eq!(ids, [1, 2, 3, 4]);
    }

    #[test]
    fn a_stream_is_not_ready_while_a_parent_is_sealing() {
        let mut state = state_with_stream(1);
        let split = split_shard_0();
        MetaStateMachine::apply_command(&mut state, split).unwrap();
        assert!(!state.streams["s"].awaits_leaders());
        ready(&mut state);
        assert_eq!(state.streams["s"].status, StreamStatus::Updating);
    }

    #[test]
    fn children_must_tile_the_parents_exactly() {
        let mut state = state_with_stream(2);
        let r0 = state.streams["s"].shards[0].range;
        let r1 = state.streams["s"].shards[1].range;
        let gap = HashKeyRange::new(r0.start.0, r0.end.0 - 1).unwrap();
        let bad = MetaCommand::Reshard {
            stream: "s".into(),
            parents: vec![ShardId(0)],
            children: vec![child(gap, 0, None)],
        };
        assert!(MetaStateMachine::apply_command(&mut state, bad).is_err());
        let merge = MetaCommand::Reshard {
            stream: "s".into(),
            parents: vec![ShardId(0), ShardId(1)],
            children: vec![child(r0.merge(&r1).unwrap(), 0, Some(1))],
        };
        MetaStateMachine::apply_command(&mut state, merge).unwrap();
        assert_eq!(state.streams["s"].open_shard_count(), 1);
        assert_eq!(state.streams["s"].status, StreamStatus::Updating);
    }

    /// Found by the `metadata` fuzz target: a replica list naming a node
    /// twice (which placement never proposes) was stored, so a group
    /// counted replicas it did not have.
    #[test]
    fn every_command_that_places_replicas_refuses_a_node_named_twice() {
        let mut state = state_with_stream(1);
        let ready = [
            MetaCommand::CreateGroup {
                name: "h".into(),
                kind: "test-kv".into(),
                replicas: vec![NodeId(1), NodeId(2)],
                replication_factor: 2,
                config: vec![],
            },
            MetaCommand::GroupReady { name: "h".into() },
        ];
        for command in ready {
            MetaStateMachine::apply_command(&mut state, command).unwrap();
        }
        let twice = vec![NodeId(1), NodeId(2), NodeId(1)];
        let before = state.clone();
        let (a, b) = HashKeyRange::FULL
            .split_at(kinesin_types::HashKey(1 << 100))
            .unwrap();
        let mut doubled = child(b, 0, None);
        doubled.replicas = twice.clone();
        let commands = [
            MetaCommand::SetReplicas {
                stream: "s".into(),
                shard: ShardId(0),
                replicas: twice.clone(),
            },
            MetaCommand::Reshard {
                stream: "s".into(),
                parents: vec![ShardId(0)],
                children: vec![child(a, 0, None), doubled],
            },
            MetaCommand::CreateStream {
                name: "t".into(),
                shard_count: 1,
                retention_hours: 24,
                max_record_bytes: 1024,
                replication_factor: 3,
                now_ms: 1,
                placements: vec![twice.clone()],
            },
            MetaCommand::CreateGroup {
                name: "g".into(),
                kind: "test-kv".into(),
                replicas: twice.clone(),
                replication_factor: 3,
                config: vec![],
            },
            MetaCommand::SetGroupReplicas {
                name: "h".into(),
                replicas: twice.clone(),
            },
        ];
        for command in commands {
            let refused = MetaStateMachine::apply_command(&mut state, command.clone());
            assert!(
                matches!(refused, Err(MetaError::Invalid(_))),
                "{command:?}: {refused:?}"
            );
            assert_eq!(state, before, "{command:?} changed the map");
        }
    }

    #[test]
    fn a_stream_is_created_with_its_mode_and_tags_in_one_command() {
        let mut state = MetaState {
            next_group: 1,
            ..Default::default()
        };
        let tags = BTreeMap::from([("team".to_string(), "payments".to_string())]);
        MetaStateMachine::apply_command(
            &mut state,
            MetaCommand::CreateStreamWithSettings {
                stream: NewStream {
                    name: "orders".into(),
                    shard_count: 2,
                    retention_hours: 24,
                    max_record_bytes: 1 << 20,
                    replication_factor: 1,
                    now_ms: 5,
                    placements: vec![vec![NodeId(1)]; 2],
                },
                mode: StreamMode::OnDemand,
                tags: tags.clone(),
            },
        )
        .unwrap();
        let stream = &state.streams["orders"];
        assert_eq!(stream.shards.len(), 2);
        assert_eq!(stream.settings.mode, StreamMode::OnDemand);
        assert_eq!(stream.settings.tags, tags);
        assert_eq!(state.next_group, 3);
    }

    #[test]
    fn groups_are_created_named_once_and_deleted() {
        let mut state = state_with_stream(1);
        let create = |name: &str| MetaCommand::CreateGroup {
            name: name.into(),
            kind: "test-kv".into(),
            replicas: vec![NodeId(1)],
            replication_factor: 3,
            config: vec![7],
        };
        let next = state.next_group;
        MetaStateMachine::apply_command(&mut state, create("a")).unwrap();
        let spec = state.groups["a"].clone();
        assert_eq!(spec.group, GroupId(next));
        assert!(!spec.ready);
        assert_eq!(state.next_group, next + 1);
        assert_eq!(
            MetaStateMachine::apply_command(&mut state, create("a")),
            Err(MetaError::GroupExists("a".into()))
        );
        assert!(matches!(
            MetaStateMachine::apply_command(&mut state, create("")),
            Err(MetaError::Invalid(_))
        ));
        assert_eq!(
            state.placed_group(spec.group).map(|p| p.kind),
            Some("test-kv")
        );
        MetaStateMachine::apply_command(
            &mut state,
            MetaCommand::CreateGroup {
                name: "b".into(),
                kind: "test-kv".into(),
                replicas: vec![NodeId(4)],
                replication_factor: 1,
                config: Vec::new(),
            },
        )
        .unwrap();
        // A node that rejoins without its data is refused by what it holds:
        // a group's replicas count as well as a shard's.
        assert!(state.holds_replicas(NodeId(4)), "a group's replica");
        assert!(state.holds_replicas(NodeId(1)), "a shard's replica");
        assert!(!state.holds_replicas(NodeId(5)));
        MetaStateMachine::apply_command(&mut state, MetaCommand::GroupReady { name: "a".into() })
            .unwrap();
        assert!(state.groups["a"].ready);
        MetaStateMachine::apply_command(&mut state, MetaCommand::DeleteGroup { name: "a".into() })
            .unwrap();
        assert_eq!(
            MetaStateMachine::apply_command(
                &mut state,
                MetaCommand::SetGroupReplicas {
                    name: "a".into(),
                    replicas: vec![NodeId(1)],
                },
            ),
            Err(MetaError::GroupNotFound("a".into()))
        );
    }
}
