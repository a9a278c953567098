//! The check a shard replica's log entries must pass, shared by the
//! random-input property test (`model`) and a coverage-guided fuzz target
//! (`fuzz/`, built with `--cfg fuzzing`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use kinesin_raft::GroupStateMachine;
use kinesin_storage::{FsyncPolicy, Storage, WriteBatch};
use kinesin_types::ShardId;

use crate::{ShardCommand, ShardRejection, ShardReply, ShardStateMachine};

/// A shard replica on real storage that applies whatever it is given.
pub struct Replica {
    sm: ShardStateMachine,
    index: AtomicU64,
}

impl Replica {
    pub fn open(dir: &Path) -> Replica {
        let storage = Storage::open(dir, FsyncPolicy::NeverUnsafe).expect("storage");
        let sm = ShardStateMachine::open(storage, 7, ShardId(2), 1).expect("replica");
        Replica {
            sm,
            index: AtomicU64::new(10),
        }
    }

    /// An entry of any bytes is refused as malformed or applied as the
    /// command it decodes to, and a reply of any bytes decodes or fails:
    /// none panics or stops the replica.
    pub fn entry(&self, bytes: &[u8]) {
        let _ = ShardReply::decode(bytes);
        let index = self.index.fetch_add(1, Ordering::Relaxed) + 1;
        let mut batch = WriteBatch::default();
        let reply = self
            .sm
            .apply(index, bytes, &mut batch)
            .expect("an entry never stops the replica");
        let reply = ShardReply::decode(&reply).expect("a reply the replica wrote");
        if ShardCommand::decode(bytes).is_err() {
            assert_eq!(reply, ShardReply::Rejected(ShardRejection::Malformed));
        }
    }
}
