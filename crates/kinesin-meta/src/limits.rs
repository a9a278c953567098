//! Limits a command must keep, checked where the metadata group applies it.
//!
//! The gateway checks the same limits against its node's copy of the map
//! before proposing, which gives the clearest message, but two requests at
//! once (or through two nodes) can both pass that check. Commands are
//! ordered when they apply, so the check there holds whatever the timing.
//! The limits travel in the command ([`crate::MetaCommand::Limited`]): every
//! replica checks the same numbers, whatever its own configuration or
//! release says.

use kinesin_types::{StreamInfo, StreamMode};
use serde::{Deserialize, Serialize};

use crate::command::{MetaCommand, MetaError, MetaReply, StreamChange};
use crate::names::split_stream_key;
use crate::state::MetaState;

/// The data version whose releases first decode [`MetaCommand::Limited`].
pub const LIMITS_VERSION: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Open shards of every stream of the cluster.
    pub open_shards: u32,
    /// Streams of one account in ON_DEMAND mode.
    pub on_demand_streams: u32,
    /// Enhanced fan-out consumers of one stream.
    pub consumers_per_stream: u32,
    /// Tags of one stream.
    pub tags_per_stream: u32,
}

/// Refuses `added` more open shards if the map would then hold more than
/// `limit` (the cluster's `shard_limit`).
pub fn open_shard_room(limit: u32, state: &MetaState, added: i64) -> MetaReply {
    let open = state.open_shard_count() as i64;
    if added > 0 && open + added > i64::from(limit) {
        return Err(MetaError::LimitExceeded(format!(
            "This request would exceed the shard limit of {limit} for the cluster ({open} open shards, {added} more requested)."
        )));
    }
    Ok(())
}

/// Refuses a reshard closing `closing` shards if the map would then keep
/// more than `limit` closed ones. The shards a reshard closes keep their
/// Raft groups until their records pass retention, so repeated resharding
/// would otherwise grow the live groups without bound. Checked again where
/// a [`MetaCommand::LimitedReshard`] applies (data version 8), so that
/// reshards proposed at once cannot pass it by what each of them closes.
pub fn closed_shard_room(limit: u32, state: &MetaState, closing: usize) -> MetaReply {
    let kept = state.closed_shard_count();
    if closing > 0 && kept + closing > limit as usize {
        return Err(MetaError::LimitExceeded(format!(
            "This reshard would close {closing} more shards, and the cluster already keeps {kept} closed shards until their records pass retention; at most {limit} may be kept. Retry once older closed shards pass retention."
        )));
    }
    Ok(())
}

/// Whether applying `command` can take the map past one of the [`Limits`]:
/// only these are proposed as [`MetaCommand::Limited`].
pub fn can_pass_limits(command: &MetaCommand) -> bool {
    match command {
        MetaCommand::CreateStreamWithSettings { .. } => true,
        MetaCommand::Reshard {
            parents, children, ..
        } => children.len() > parents.len(),
        MetaCommand::UpdateStream { change, .. } => matches!(
            change,
            StreamChange::Mode(StreamMode::OnDemand)
                | StreamChange::AddTags(_)
                | StreamChange::RegisterConsumer { .. }
        ),
        _ => false,
    }
}

impl Limits {
    /// Refuses `command` if applying it to `state` would pass a limit.
    /// Commands that cannot grow what is limited pass unchecked. The
    /// gateway calls it on its node's map before proposing; the metadata
    /// group again where a [`MetaCommand::Limited`] applies.
    pub fn check(&self, state: &MetaState, command: &MetaCommand) -> MetaReply {
        match command {
            MetaCommand::CreateStreamWithSettings { stream, mode, tags } => {
                self.check_new_stream(state, &stream.name, stream.shard_count, *mode, tags.len())
            }
            MetaCommand::Reshard {
                parents, children, ..
            } => self.open_shards_after(state, children.len() as i64 - parents.len() as i64),
            MetaCommand::UpdateStream { name, change } => match state.streams.get(name) {
                Some(s) => self.change_fits(state, s, name, change),
                // Apply refuses it as not found.
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Refuses a new stream `name` that would pass a limit.
    pub fn check_new_stream(
        &self,
        state: &MetaState,
        name: &str,
        shards: u32,
        mode: StreamMode,
        tags: usize,
    ) -> MetaReply {
        self.open_shards_after(state, i64::from(shards))?;
        if mode == StreamMode::OnDemand {
            self.on_demand_room(state, name)?;
        }
        self.tags_fit(tags, name)
    }

    fn open_shards_after(&self, state: &MetaState, added: i64) -> MetaReply {
        open_shard_room(self.open_shards, state, added)
    }

    fn on_demand_room(&self, state: &MetaState, stream: &str) -> MetaReply {
        let account = split_stream_key(stream).0;
        let on_demand = state.on_demand_streams(|key| split_stream_key(key).0 == account);
        if on_demand >= self.on_demand_streams as usize {
            return Err(MetaError::LimitExceeded(format!(
                "At most {} streams of an account may be in ON_DEMAND mode.",
                self.on_demand_streams
            )));
        }
        Ok(())
    }

    fn tags_fit(&self, count: usize, stream: &str) -> MetaReply {
        if count > self.tags_per_stream as usize {
            return Err(MetaError::LimitExceeded(format!(
                "Stream {} would have {count} tags; at most {} are allowed.",
                display(stream),
                self.tags_per_stream
            )));
        }
        Ok(())
    }

    fn change_fits(
        &self,
        state: &MetaState,
        s: &StreamInfo,
        name: &str,
        change: &StreamChange,
    ) -> MetaReply {
        let settings = &s.settings;
        match change {
            StreamChange::Mode(StreamMode::OnDemand) if settings.mode != StreamMode::OnDemand => {
                self.on_demand_room(state, name)
            }
            StreamChange::AddTags(tags) => {
                let added = tags
                    .keys()
                    .filter(|k| !settings.tags.contains_key(*k))
                    .count();
                self.tags_fit(settings.tags.len() + added, name)
            }
            StreamChange::RegisterConsumer { name: consumer, .. }
                if !settings.consumers.contains_key(consumer)
                    && settings.consumers.len() >= self.consumers_per_stream as usize =>
            {
                Err(MetaError::LimitExceeded(format!(
                    "Stream {} already has {} consumers.",
                    display(name),
                    self.consumers_per_stream
                )))
            }
            _ => Ok(()),
        }
    }
}

/// A stream's name without the account that qualifies its key.
fn display(key: &str) -> &str {
    split_stream_key(key).1
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kinesin_types::{HashKey, NodeId, ShardId};

    use super::*;
    use crate::command::{NewShard, NewStream, CLOSED_LIMIT_VERSION};
    use crate::state_machine::MetaStateMachine;

    const LIMITS: Limits = Limits {
        open_shards: 6,
        on_demand_streams: 2,
        consumers_per_stream: 3,
        tags_per_stream: 4,
    };

    fn create(name: &str, shards: u32, mode: StreamMode) -> MetaCommand {
        MetaCommand::CreateStreamWithSettings {
            stream: NewStream {
                name: name.into(),
                shard_count: shards,
                retention_hours: 24,
                max_record_bytes: 1 << 20,
                replication_factor: 1,
                now_ms: 1,
                placements: vec![vec![NodeId(1)]; shards as usize],
            },
            mode,
            tags: BTreeMap::new(),
        }
    }

    fn limited(command: MetaCommand) -> MetaCommand {
        command.limited(LIMITS)
    }

    fn change(name: &str, change: StreamChange) -> MetaCommand {
        MetaCommand::UpdateStream {
            name: name.into(),
            change,
        }
    }

    fn apply(state: &mut MetaState, command: MetaCommand) -> MetaReply {
        let before = state.clone();
        let reply = MetaStateMachine::apply_command(state, command);
        if reply.is_err() {
            assert_eq!(*state, before, "a refused command changed the map");
        }
        reply
    }

    fn refused(reply: MetaReply) {
        assert!(
            matches!(reply, Err(MetaError::LimitExceeded(_))),
            "{reply:?}"
        );
    }

    /// What the settler proposes once every shard of `stream` answers.
    fn ready(state: &mut MetaState, stream: &str) {
        let epoch = state.streams[stream].epoch;
        let ready = MetaCommand::StreamReady {
            stream: stream.into(),
            epoch,
        };
        apply(state, ready).unwrap();
    }

    fn register(name: &str) -> StreamChange {
        StreamChange::RegisterConsumer {
            name: name.into(),
            now_ms: 1,
        }
    }

    fn tags(keys: std::ops::Range<u32>) -> StreamChange {
        StreamChange::AddTags(keys.map(|k| (format!("t{k}"), String::new())).collect())
    }

    /// Two gateways may both see room for one more and propose; the
    /// commands are ordered where they apply, and the limits hold there.
    #[test]
    fn a_limited_command_that_would_pass_a_limit_changes_nothing() {
        let mut state = MetaState::default();
        apply(&mut state, limited(create("a", 4, StreamMode::Provisioned))).unwrap();
        refused(apply(
            &mut state,
            limited(create("b", 3, StreamMode::Provisioned)),
        ));
        apply(&mut state, limited(create("b", 2, StreamMode::Provisioned))).unwrap();

        // Splitting a shard adds an open shard.
        let split = split_first(&state, "a");
        // Its own refusal comes first: the stream is not ACTIVE yet.
        assert!(matches!(
            apply(&mut state, limited(split.clone())),
            Err(MetaError::Invalid(_))
        ));
        ready(&mut state, "a");
        refused(apply(&mut state, limited(split)));
        // So does a name that exists, at the limit.
        assert!(matches!(
            apply(&mut state, limited(create("a", 1, StreamMode::Provisioned))),
            Err(MetaError::StreamExists(_))
        ));
        // Merging two shards takes one away, at the limit too.
        let merge = merge_first_two(&state, "a");
        apply(&mut state, limited(merge)).unwrap();
        assert_eq!(state.open_shard_count(), 5);

        for k in 0..LIMITS.consumers_per_stream {
            apply(&mut state, limited(change("a", register(&format!("c{k}"))))).unwrap();
        }
        refused(apply(&mut state, limited(change("a", register("late")))));
        // Registering one that exists is not one more.
        apply(&mut state, limited(change("a", register("c0")))).unwrap();

        apply(&mut state, limited(change("a", tags(0..3)))).unwrap();
        refused(apply(&mut state, limited(change("a", tags(2..5)))));
        apply(&mut state, limited(change("a", tags(2..4)))).unwrap();
        refused(apply(
            &mut state,
            limited(MetaCommand::CreateStreamWithSettings {
                stream: NewStream {
                    name: "tagged".into(),
                    shard_count: 1,
                    retention_hours: 24,
                    max_record_bytes: 1 << 20,
                    replication_factor: 1,
                    now_ms: 1,
                    placements: vec![vec![NodeId(1)]],
                },
                mode: StreamMode::Provisioned,
                tags: (0..5).map(|k| (format!("t{k}"), String::new())).collect(),
            }),
        ));
    }

    #[test]
    fn the_on_demand_limit_counts_the_streams_account() {
        let limits = Limits {
            open_shards: 100,
            ..LIMITS
        };
        let mut state = MetaState::default();
        let limited = |command: MetaCommand| command.limited(limits);
        apply(&mut state, limited(create("a", 1, StreamMode::OnDemand))).unwrap();
        apply(&mut state, limited(create("b", 1, StreamMode::Provisioned))).unwrap();
        apply(
            &mut state,
            limited(change("b", StreamChange::Mode(StreamMode::OnDemand))),
        )
        .unwrap();
        refused(apply(
            &mut state,
            limited(create("c", 1, StreamMode::OnDemand)),
        ));
        apply(&mut state, limited(create("c", 1, StreamMode::Provisioned))).unwrap();
        refused(apply(
            &mut state,
            limited(change("c", StreamChange::Mode(StreamMode::OnDemand))),
        ));
        // A stream already ON_DEMAND may be set so again.
        apply(
            &mut state,
            limited(change("a", StreamChange::Mode(StreamMode::OnDemand))),
        )
        .unwrap();
        // Another account has room of its own.
        apply(
            &mut state,
            limited(create("210987654321:c", 1, StreamMode::OnDemand)),
        )
        .unwrap();
    }

    /// The first shard of `stream` split in two halves.
    fn split_first(state: &MetaState, stream: &str) -> MetaCommand {
        let range = state.streams[stream].shards[0].range;
        let (low, high) = range
            .split_at(HashKey(range.start.0 + (range.end.0 - range.start.0) / 2))
            .unwrap();
        MetaCommand::Reshard {
            stream: stream.into(),
            parents: vec![ShardId(0)],
            children: [low, high]
                .into_iter()
                .map(|range| NewShard {
                    range,
                    parent: ShardId(0),
                    adjacent_parent: None,
                    replicas: vec![NodeId(1)],
                })
                .collect(),
        }
    }

    /// The first two shards of `stream` merged into one.
    fn merge_first_two(state: &MetaState, stream: &str) -> MetaCommand {
        let [first, second] = [0, 1].map(|k| state.streams[stream].shards[k].range);
        MetaCommand::Reshard {
            stream: stream.into(),
            parents: vec![ShardId(0), ShardId(1)],
            children: vec![NewShard {
                range: first.merge(&second).unwrap(),
                parent: ShardId(0),
                adjacent_parent: Some(ShardId(1)),
                replicas: vec![NodeId(1)],
            }],
        }
    }

    /// Two reshards proposed at once each find room on the map before
    /// either applies for the shards it closes; where they apply, in
    /// order, the second is refused. As `Limited` commands both applied
    /// and the cluster kept more closed shards than its limit.
    #[test]
    fn reshards_applied_in_order_keep_the_closed_shard_limit() {
        let mut state = MetaState::default();
        for stream in ["a", "b"] {
            apply(&mut state, create(stream, 2, StreamMode::Provisioned)).unwrap();
            ready(&mut state, stream);
        }
        let merges = ["a", "b"].map(|stream| merge_first_two(&state, stream));
        for merge in &merges {
            let MetaCommand::Reshard { parents, .. } = merge else {
                unreachable!()
            };
            closed_shard_room(3, &state, parents.len()).unwrap();
        }

        let mut unordered = state.clone();
        for merge in merges.clone() {
            apply(&mut unordered, limited(merge)).unwrap();
        }
        assert_eq!(unordered.closed_shard_count(), 4);

        let [first, second] = merges.map(|merge| merge.limited_reshard(LIMITS, 3));
        assert_eq!(first.introduced_in(), CLOSED_LIMIT_VERSION);
        apply(&mut state, first).unwrap();
        refused(apply(&mut state, second));
        assert_eq!(state.closed_shard_count(), 2);
        // The open-shard limit holds in it as in `Limited`.
        let splits = Limits {
            open_shards: state.open_shard_count() as u32,
            ..LIMITS
        };
        let split = split_first(&state, "b");
        refused(apply(&mut state, split.limited_reshard(splits, 100)));
        // It holds a reshard and nothing else.
        for other in [
            create("c", 1, StreamMode::Provisioned),
            merge_first_two(&state, "b").limited_reshard(LIMITS, 100),
        ] {
            assert!(matches!(
                apply(&mut state, other.limited_reshard(LIMITS, 100)),
                Err(MetaError::Invalid(_))
            ));
        }
    }

    /// A command without limits applies as releases before them applied
    /// it: during a rolling upgrade every replica must reach the same map.
    #[test]
    fn commands_without_limits_apply_as_before() {
        let mut state = MetaState::default();
        apply(&mut state, create("a", 1, StreamMode::Provisioned)).unwrap();
        for k in 0..=LIMITS.consumers_per_stream {
            apply(&mut state, change("a", register(&format!("c{k}")))).unwrap();
        }
        let nested = limited(limited(change("a", register("x"))));
        assert!(matches!(
            apply(&mut state, nested),
            Err(MetaError::Invalid(_))
        ));
        let garbage = MetaCommand::Limited {
            limits: LIMITS,
            command: vec![0xFF; 3],
        };
        assert!(matches!(
            apply(&mut state, garbage),
            Err(MetaError::Invalid(_))
        ));
        assert_eq!(
            limited(change("a", register("y"))).introduced_in(),
            LIMITS_VERSION
        );
    }

    /// A peer may send a limited command nested as deep as a metadata
    /// command's size allows: nothing follows the nesting (a recursion
    /// that deep would overflow the stack and abort the node).
    #[test]
    fn a_deeply_nested_limited_command_is_refused_without_recursing() {
        let mut bytes = change("a", register("x")).encode();
        let header = |inner: usize| {
            let mut h = Vec::new();
            h.extend(postcard::to_stdvec(&LIMITS).unwrap());
            h.extend(postcard::to_stdvec(&(inner as u64)).unwrap());
            h
        };
        let variant = &limited(change("a", register("x"))).encode()[..1];
        let mut headers = Vec::new();
        let mut length = bytes.len();
        for _ in 0..200_000 {
            let mut h = variant.to_vec();
            h.extend(header(length));
            length += h.len();
            headers.push(h);
        }
        let mut nested = Vec::with_capacity(length);
        for h in headers.iter().rev() {
            nested.extend_from_slice(h);
        }
        nested.append(&mut bytes);
        let command = MetaCommand::decode(&nested).unwrap();
        assert!(matches!(command, MetaCommand::Limited { .. }));
        assert_eq!(command.introduced_in(), LIMITS_VERSION);
        let mut state = MetaState::default();
        apply(&mut state, create("a", 1, StreamMode::Provisioned)).unwrap();
        assert!(matches!(
            apply(&mut state, command),
            Err(MetaError::Invalid(_))
        ));
    }
}
