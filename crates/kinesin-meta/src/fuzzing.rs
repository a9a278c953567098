//! The checks metadata bytes must pass, shared by the random-input property
//! test (`properties`) and the coverage-guided fuzz targets (`fuzz/`, built
//! with `--cfg fuzzing`).

use std::collections::BTreeSet;

use kinesin_types::{NodeId, ShardState};

use crate::command::{decode_reply, MetaCommand};
use crate::reshard;
use crate::state::MetaState;
use crate::state_machine::{merged, replica_list, MetaStateMachine};

/// Commands, replies and stored maps of any bytes decode or are refused
/// with an error; none panics.
pub fn metadata_bytes(bytes: &[u8]) {
    let _ = MetaCommand::decode(bytes);
    let _ = decode_reply(bytes);
    let mut versioned = vec![0xFF, b'K', b'M', b'V', 3, 0, 0, 0];
    versioned.extend_from_slice(bytes);
    for value in [bytes, &versioned] {
        let _ = crate::version::decode(value);
    }
}

/// Each of `commands` is applied in turn to a map with one stream of two
/// shards: a replica applies whatever decodes, refusing what it must,
/// without panicking, and the map keeps what [`check_map`] asks after each.
pub fn metadata_commands<'a>(commands: impl IntoIterator<Item = &'a [u8]>) {
    let mut state = two_shard_map(&[NodeId(1)]);
    for command in commands {
        if let Ok(command) = MetaCommand::decode(command) {
            let shown = format!("{command:?}");
            let _ = MetaStateMachine::apply_command(&mut state, command);
            if let Err(broken) = check_map(&state) {
                panic!("{shown} broke the map: {broken}");
            }
        }
    }
}

/// A map with one stream, "s", of two shards on `replicas` (not yet
/// ready: it awaits `StreamReady`).
fn two_shard_map(replicas: &[NodeId]) -> MetaState {
    let mut state = MetaState {
        next_group: 1,
        ..Default::default()
    };
    let create = MetaCommand::CreateStream {
        name: "s".into(),
        shard_count: 2,
        retention_hours: 24,
        max_record_bytes: 1 << 20,
        replication_factor: replicas.len() as u32,
        now_ms: 1,
        placements: vec![replicas.to_vec(); 2],
    };
    MetaStateMachine::apply_command(&mut state, create).expect("a valid stream");
    state
}

/// What any map must hold, whatever commands made it: each stream's open
/// shards tile the hash-key space, its shard ids are distinct, a shard's
/// parents are closed (sealing or sealed) or removed, every group (shard or other) has its own
/// id below `next_group` and at least one replica, never two on one node.
pub fn check_map(state: &MetaState) -> Result<(), String> {
    for (name, stream) in &state.streams {
        let open: Vec<_> = reshard::open_in_key_order(stream)
            .iter()
            .map(|s| s.range)
            .collect();
        if open.iter().any(|r| r.start > r.end) || merged(&open) != [(0, u128::MAX)] {
            return Err(format!(
                "the open shards of {name} do not tile the key space: {open:?}"
            ));
        }
        let ids: BTreeSet<_> = stream.shards.iter().map(|s| s.shard_id).collect();
        if ids.len() != stream.shards.len() {
            return Err(format!("{name} has two shards of one id"));
        }
        for s in &stream.shards {
            for p in s.parent.iter().chain(&s.adjacent_parent) {
                if stream
                    .shard(*p)
                    .is_some_and(|p| p.state == ShardState::Open)
                {
                    return Err(format!(
                        "the parent {p} of {name}/{} is still open",
                        s.shard_id
                    ));
                }
            }
        }
    }
    let mut groups = BTreeSet::new();
    for placed in state.placed() {
        let name = placed.owner.name();
        if !groups.insert(placed.group) || placed.group.0 == 0 {
            return Err(format!(
                "{name} has the group {} of another",
                placed.group.0
            ));
        }
        if placed.group.0 >= state.next_group {
            return Err(format!("{name} has a group at or past next_group"));
        }
        replica_list(placed.replicas).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kinesin_types::{GroupId, HashKey, ShardId, ShardInfo};

    use crate::command::NewShard;

    use super::*;

    /// The map of two shards on two nodes, which `check_map` passes.
    fn two_shards() -> MetaState {
        let state = two_shard_map(&[NodeId(1), NodeId(2)]);
        check_map(&state).unwrap();
        state
    }

    /// Shard `k` of the stream "s".
    fn shard(state: &mut MetaState, k: usize) -> &mut ShardInfo {
        &mut state.streams.get_mut("s").unwrap().shards[k]
    }

    /// Each way of breaking the map is caught: the fuzz target's only
    /// oracle must not pass what it is there to find.
    #[test]
    fn check_map_finds_each_broken_rule() {
        type Break = fn(&mut MetaState);
        let breaks: [(&str, Break); 7] = [
            ("a gap", |m| shard(m, 1).range.start = HashKey(1 << 127 | 1)),
            ("an overlap", |m| shard(m, 0).range.end = HashKey(u128::MAX)),
            ("one id twice", |m| shard(m, 1).shard_id = ShardId(0)),
            ("an open parent", |m| shard(m, 1).parent = Some(ShardId(0))),
            ("one group twice", |m| shard(m, 1).group = GroupId(1)),
            ("a group past next_group", |m| m.next_group = 2),
            ("a node named twice", |m| {
                shard(m, 0).replicas[1] = NodeId(1)
            }),
        ];
        for (what, break_it) in breaks {
            let mut state = two_shards();
            break_it(&mut state);
            assert!(check_map(&state).is_err(), "{what} passed");
        }
    }

    /// A valid split of the fuzz target's stream, before the controller
    /// seals its parent: a map every cluster holds for a moment, which the
    /// target must pass (it once asked for sealed parents).
    #[test]
    fn a_split_awaiting_its_seal_passes() {
        let ready = MetaCommand::StreamReady {
            stream: "s".into(),
            epoch: two_shards().streams["s"].epoch,
        };
        let parent = two_shards().streams["s"].shards[0].range;
        let (low, high) = parent.split_at(HashKey(1 << 100)).unwrap();
        let child = |range| NewShard {
            range,
            parent: ShardId(0),
            adjacent_parent: None,
            replicas: vec![NodeId(1)],
        };
        let split = MetaCommand::Reshard {
            stream: "s".into(),
            parents: vec![ShardId(0)],
            children: vec![child(low), child(high)],
        };
        let mut state = two_shards();
        for command in [&ready, &split] {
            MetaStateMachine::apply_command(&mut state, command.clone()).unwrap();
        }
        assert_eq!(state.streams["s"].shards[0].state, ShardState::Sealing);
        check_map(&state).unwrap();
        let (ready, split) = (ready.encode(), split.encode());
        metadata_commands([ready.as_slice(), split.as_slice()]);
    }
}
