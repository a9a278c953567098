//! The check a shard replica's log entries must pass, shared by the
//! random-input property test (`model`) and a coverage-guided fuzz target
//! (`fuzz/`, built with `--cfg fuzzing`).

use kinesin_raft::GroupStateMachine;
use kinesin_storage::{Storage, WriteBatch};
use kinesin_types::ShardId;

use crate::{ShardCommand, ShardRejection, ShardReply, ShardStateMachine};

/// A shard replica on real storage that applies whatever it is given.
/// Dropped, it deletes its rows, so that one storage serves a long run
/// (opening RocksDB for each input would be most of the time) and each
/// input starts from an empty shard.
pub struct Replica<'a> {
    storage: &'a Storage,
    group: u64,
    sm: ShardStateMachine,
    index: u64,
}

impl<'a> Replica<'a> {
    /// A replica of an empty shard as group `group`, which must hold no
    /// rows.
    pub fn open(storage: &'a Storage, group: u64) -> Replica<'a> {
        let sm =
            ShardStateMachine::open(storage.clone(), group, ShardId(2), 1).expect("open replica");
        Replica {
            storage,
            group,
            sm,
            index: 10,
        }
    }

    /// An entry of any bytes is refused as malformed or applied as the
    /// command it decodes to (written and published as the Raft adapter
    /// does), and a reply of any bytes decodes or fails: none panics or
    /// stops the replica.
    pub fn entry(&mut self, bytes: &[u8]) {
        let _ = ShardReply::decode(bytes);
        self.index += 1;
        let mut batch = WriteBatch::default();
        let reply = self
            .sm
            .apply(self.index, bytes, &mut batch)
            .expect("an entry never stops the replica");
        self.storage.write(batch).expect("write");
        self.sm.publish();
        let reply = ShardReply::decode(&reply).expect("a reply the replica wrote");
        if ShardCommand::decode(bytes).is_err() {
            assert_eq!(reply, ShardReply::Rejected(ShardRejection::Malformed));
        }
    }
}

impl Drop for Replica<'_> {
    fn drop(&mut self) {
        kinesin_raft::delete_group_state(self.storage, self.group)
            .expect("delete the replica's rows");
    }
}
