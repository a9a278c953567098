//! The checks metadata bytes must pass, shared by the random-input property
//! test (`properties`) and the coverage-guided fuzz targets (`fuzz/`, built
//! with `--cfg fuzzing`).

use kinesin_types::NodeId;

use crate::command::{decode_reply, MetaCommand};
use crate::state::MetaState;
use crate::state_machine::MetaStateMachine;

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
/// without panicking.
pub fn metadata_commands<'a>(commands: impl IntoIterator<Item = &'a [u8]>) {
    let mut state = MetaState {
        next_group: 1,
        ..Default::default()
    };
    let create = MetaCommand::CreateStream {
        name: "s".into(),
        shard_count: 2,
        retention_hours: 24,
        max_record_bytes: 1 << 20,
        replication_factor: 1,
        now_ms: 1,
        placements: vec![vec![NodeId(1)]; 2],
    };
    MetaStateMachine::apply_command(&mut state, create).expect("a valid stream");
    for command in commands {
        if let Ok(command) = MetaCommand::decode(command) {
            let _ = MetaStateMachine::apply_command(&mut state, command);
        }
    }
}
