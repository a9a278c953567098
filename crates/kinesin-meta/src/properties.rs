//! Property tests of resharding: any sequence of splits, merges, uniform
//! scalings and removals of sealed shards leaves the open shards tiling the
//! hash-key space and never reuses a shard id, and a reshard command whose
//! new shards do not tile its closed ones exactly is refused without
//! changing the map.

use kinesin_types::{HashKey, NodeId, ShardId, ShardState, StreamInfo};
use proptest::prelude::*;

use crate::command::MetaCommand;
use crate::reshard::{self, Plan};
use crate::state::MetaState;
use crate::state_machine::MetaStateMachine;

/// Open shards beyond this are not grown further (keeps a case fast).
const MAX_OPEN: usize = 48;

#[derive(Debug, Clone)]
enum Step {
    Split {
        shard: prop::sample::Index,
        at: u128,
    },
    Merge {
        shard: prop::sample::Index,
    },
    Uniform {
        target: u8,
    },
    /// Removes a sealed shard (its records past retention).
    Retire {
        shard: prop::sample::Index,
    },
}

/// How a plan is broken before it is proposed.
#[derive(Debug, Clone, Copy)]
enum Tamper {
    None,
    /// A child ends one key early: a gap.
    Gap,
    /// A child starts one key early: an overlap.
    Overlap,
    DropChild,
    /// The last child reaches one key beyond its parents.
    Beyond,
    /// Every parent and child twice.
    Twice,
    /// An extra child that holds no key (its start is above its end).
    Inverted,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (any::<prop::sample::Index>(), any::<u128>())
            .prop_map(|(shard, at)| Step::Split { shard, at }),
        any::<prop::sample::Index>().prop_map(|shard| Step::Merge { shard }),
        any::<u8>().prop_map(|target| Step::Uniform { target }),
        any::<prop::sample::Index>().prop_map(|shard| Step::Retire { shard }),
    ]
}

fn tamper() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        4 => Just(Tamper::None),
        1 => Just(Tamper::Gap),
        1 => Just(Tamper::Overlap),
        1 => Just(Tamper::DropChild),
        1 => Just(Tamper::Beyond),
        1 => Just(Tamper::Twice),
        1 => Just(Tamper::Inverted),
    ]
}

fn plan(stream: &StreamInfo, step: &Step) -> Option<Plan> {
    let open = reshard::open_in_key_order(stream);
    match step {
        Step::Split { shard, at } => {
            if open.len() >= MAX_OPEN {
                return None;
            }
            let parent = shard.get(&open);
            let width = parent.range.end.0 - parent.range.start.0;
            if width == 0 {
                return None;
            }
            let at = parent.range.start.0 + 1 + at % width;
            Some(reshard::split(parent, HashKey(at)).expect("a key inside the range"))
        }
        Step::Merge { shard } => {
            if open.len() < 2 {
                return None;
            }
            let k = shard.index(open.len() - 1);
            Some(reshard::merge(open[k], open[k + 1]).expect("neighbours are adjacent"))
        }
        Step::Uniform { target } => {
            let target = 1 + usize::from(*target) % (2 * open.len());
            if target > MAX_OPEN {
                return None;
            }
            reshard::uniform(stream, target)
                .ok()
                .filter(|p| !p.parents.is_empty())
        }
        Step::Retire { .. } => None,
    }
}

/// The plan broken as `how` says, or None where that does not apply.
fn tampered(mut plan: Plan, how: Tamper) -> Option<Plan> {
    plan.children.sort_by_key(|c| c.range.start);
    let children = &mut plan.children;
    match how {
        Tamper::None => {}
        Tamper::Gap => {
            let c = children.iter_mut().find(|c| c.range.start < c.range.end)?;
            c.range.end.0 -= 1;
        }
        Tamper::Overlap => {
            let c = children.get_mut(1)?;
            c.range.start.0 -= 1;
        }
        Tamper::DropChild => {
            children.pop();
        }
        Tamper::Beyond => {
            let last = children.last_mut()?;
            last.range.end.0 = last.range.end.0.checked_add(1)?;
        }
        Tamper::Twice => {
            plan.parents.extend(plan.parents.clone());
            plan.children.extend(plan.children.clone());
        }
        Tamper::Inverted => {
            let mut extra = children.last()?.clone();
            extra.range.start.0 = extra.range.end.0.checked_add(1)?;
            children.push(extra);
        }
    }
    Some(plan)
}

fn apply(state: &mut MetaState, command: MetaCommand) -> crate::MetaReply {
    MetaStateMachine::apply_command(state, command)
}

/// The ids of stream "s"'s shards in `wanted`.
fn shards_in(state: &MetaState, wanted: ShardState) -> Vec<ShardId> {
    state.streams["s"]
        .shards
        .iter()
        .filter(|s| s.state == wanted)
        .map(|s| s.shard_id)
        .collect()
}

/// What the controller does once the parents' groups seal and the children
/// answer: the stream is ACTIVE again.
fn settle(state: &mut MetaState) {
    for shard in shards_in(state, ShardState::Sealing) {
        let sealed = MetaCommand::ShardSealed {
            stream: "s".into(),
            shard,
            ending: None,
        };
        apply(state, sealed).unwrap();
    }
    let epoch = state.streams["s"].epoch;
    let ready = MetaCommand::StreamReady {
        stream: "s".into(),
        epoch,
    };
    apply(state, ready).unwrap();
}

fn check_map(state: &MetaState) -> Result<(), TestCaseError> {
    crate::fuzzing::check_map(state).map_err(TestCaseError::fail)
}

/// Removes the sealed shard `shard` picks, if there is one.
fn retire(state: &mut MetaState, shard: &prop::sample::Index) -> Result<(), TestCaseError> {
    let sealed = shards_in(state, ShardState::Sealed);
    if sealed.is_empty() {
        return Ok(());
    }
    let remove = MetaCommand::RemoveSealedShard {
        stream: "s".into(),
        shard: *shard.get(&sealed),
    };
    let reply = apply(state, remove);
    prop_assert!(reply.is_ok(), "{:?}", reply);
    Ok(())
}

proptest! {
    #[test]
    fn reshards_keep_the_open_shards_tiling_the_space_and_broken_ones_are_refused(
        initial in 1u32..6,
        steps in prop::collection::vec((step(), tamper()), 1..24),
    ) {
        let mut state = MetaState { next_group: 1, ..Default::default() };
        let create = MetaCommand::CreateStream {
            name: "s".into(),
            shard_count: initial,
            retention_hours: 24,
            max_record_bytes: 1 << 20,
            replication_factor: 1,
            now_ms: 1,
            placements: vec![vec![NodeId(1)]; initial as usize],
        };
        apply(&mut state, create).unwrap();
        settle(&mut state);
        check_map(&state)?;
        let mut highest = state.streams["s"].shards.iter().map(|s| s.shard_id).max();
        for (step, how) in steps {
            if let Step::Retire { shard } = &step {
                retire(&mut state, shard)?;
                check_map(&state)?;
                continue;
            }
            let Some(plan) = plan(&state.streams["s"], &step) else { continue };
            let (plan, broken) = match tampered(plan.clone(), how) {
                Some(t) if !matches!(how, Tamper::None) => (t, true),
                _ => (plan, false),
            };
            let before = state.clone();
            let reply = apply(&mut state, plan.command("s"));
            if broken {
                prop_assert!(reply.is_err(), "{:?} was applied", how);
                prop_assert_eq!(&state, &before);
            } else {
                prop_assert!(reply.is_ok(), "{:?}: {:?}", step, reply);
                // New shards take ids above every id ever given, removed
                // ones included.
                let new: Vec<_> = state.streams["s"].shards.iter()
                    .map(|s| s.shard_id)
                    .filter(|id| before.streams["s"].shard(*id).is_none())
                    .collect();
                prop_assert!(new.iter().all(|id| Some(*id) > highest), "{:?} after {:?}", new, highest);
                highest = new.into_iter().max().or(highest);
                settle(&mut state);
            }
            check_map(&state)?;
        }
    }
}

proptest! {
    /// Commands, replies and stored maps of any bytes decode or are refused
    /// with an error, and commands that decode are applied or refused; none
    /// panics (the checks of `crate::fuzzing`, which fuzz targets run too).
    #[test]
    fn any_bytes_decode_to_a_command_reply_or_map_or_an_error(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        commands in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..60), 0..6),
    ) {
        crate::fuzzing::metadata_bytes(&bytes);
        crate::fuzzing::metadata_commands(commands.iter().map(Vec::as_slice));
    }
}
