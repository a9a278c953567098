//! The metadata state machine. The whole map is small (nodes and shard maps,
//! no records), so it is stored as one value and kept in memory; every node
//! holds a replica (voter or learner) and watches it for changes.

use std::io;
use std::sync::{Arc, Mutex};

use kinesin_raft::GroupStateMachine;
use kinesin_storage::{keys, Cf, Storage, WriteBatch};
use kinesin_types::{
    GroupId, HashKeyRange, ShardInfo, ShardState, StreamInfo, StreamName, StreamSettings,
    StreamStatus,
};
use tokio::sync::watch;

use crate::command::{encode_reply, MetaCommand, MetaError, MetaReply, StreamChange};
use crate::state::MetaState;

const STATE_KEY: &[u8] = b"meta";

pub struct MetaStateMachine {
    storage: Storage,
    working: Mutex<MetaState>,
    published: watch::Sender<Arc<MetaState>>,
}

impl MetaStateMachine {
    pub fn open(storage: Storage) -> io::Result<Self> {
        let state: MetaState = match storage.get(
            Cf::StateMachine,
            &keys::named_key(GroupId::META.0, STATE_KEY),
        )? {
            Some(v) => postcard::from_bytes(&v)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
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

    fn apply_command(state: &mut MetaState, command: MetaCommand) -> MetaReply {
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
            } => {
                let stream_name =
                    StreamName::new(name.clone()).map_err(|e| MetaError::Invalid(e.0))?;
                if state.streams.contains_key(&name) {
                    return Err(MetaError::StreamExists(name));
                }
                if shard_count == 0
                    || placements.len() != shard_count as usize
                    || placements.iter().any(|p| p.is_empty())
                {
                    return Err(MetaError::Invalid(
                        "every shard needs at least one replica".into(),
                    ));
                }
                let shards = HashKeyRange::split_evenly(shard_count)
                    .into_iter()
                    .zip(placements)
                    .enumerate()
                    .map(|(i, (range, replicas))| {
                        let group = GroupId(state.next_group + i as u64);
                        ShardInfo {
                            shard_id: kinesin_types::ShardId(i as u32),
                            group,
                            range,
                            state: ShardState::Open,
                            parent: None,
                            adjacent_parent: None,
                            generation: 0,
                            replicas,
                            ending_sequence: None,
                        }
                    })
                    .collect();
                state.next_group += u64::from(shard_count);
                state.streams.insert(
                    name,
                    StreamInfo {
                        name: stream_name,
                        status: StreamStatus::Active,
                        created_at_ms: now_ms,
                        retention_hours,
                        max_record_bytes,
                        replication_factor,
                        epoch: 1,
                        shards,
                        settings: StreamSettings::default(),
                    },
                );
                Ok(())
            }
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
                if replicas.is_empty() {
                    return Err(MetaError::Invalid(
                        "a shard needs at least one replica".into(),
                    ));
                }
                let s = state
                    .streams
                    .get_mut(&stream)
                    .ok_or_else(|| MetaError::StreamNotFound(stream.clone()))?;
                let sh = s
                    .shards
                    .iter_mut()
                    .find(|sh| sh.shard_id == shard)
                    .ok_or_else(|| MetaError::ShardNotFound(shard.to_string()))?;
                sh.replicas = replicas;
                s.epoch += 1;
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
        }
    }
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
    }
}

impl GroupStateMachine for MetaStateMachine {
    fn apply(&self, index: u64, command: &[u8], batch: &mut WriteBatch) -> Vec<u8> {
        let mut state = self.working.lock().expect("meta lock");
        let reply = MetaCommand::decode(command).and_then(|c| Self::apply_command(&mut state, c));
        state.applied_index = index;
        batch.put_cf(
            self.storage.cf(Cf::StateMachine),
            keys::named_key(GroupId::META.0, STATE_KEY),
            postcard::to_stdvec(&*state).expect("encoding to a Vec cannot fail"),
        );
        encode_reply(&reply)
    }

    fn publish(&self) {
        let state = self.working.lock().expect("meta lock").clone();
        if **self.published.borrow() != state {
            self.published.send_replace(Arc::new(state));
        }
    }

    fn snapshot_state(&self) -> Vec<u8> {
        postcard::to_stdvec(&*self.state()).expect("encoding to a Vec cannot fail")
    }

    fn restore(&self, state: &[u8], batch: &mut WriteBatch) -> io::Result<()> {
        let restored: MetaState = postcard::from_bytes(state)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        batch.put_cf(
            self.storage.cf(Cf::StateMachine),
            keys::named_key(GroupId::META.0, STATE_KEY),
            state,
        );
        *self.working.lock().expect("meta lock") = restored;
        Ok(())
    }
}
