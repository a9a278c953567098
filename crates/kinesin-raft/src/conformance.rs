//! openraft's storage conformance suite against the RocksDB log store and
//! the state-machine adapter (with a minimal group state machine).

use std::io;
use std::sync::Arc;

use kinesin_storage::{FsyncPolicy, Storage, WriteBatch};
use openraft::testing::log::{StoreBuilder, Suite};

use crate::log_store::{LogStore, TailBudget, NODE_TAIL_BYTES};
use crate::state_machine::{GroupStateMachine, StateMachineStore};
use crate::types::TypeConfig;

/// Replies with the command it was given; keeps no state of its own.
pub(crate) struct Echo;

impl GroupStateMachine for Echo {
    fn apply(&self, _index: u64, command: &[u8], _batch: &mut WriteBatch) -> io::Result<Vec<u8>> {
        Ok(command.to_vec())
    }
    fn publish(&self) {}
    fn snapshot_state(&self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(&self, _state: &[u8], _batch: &mut WriteBatch) -> io::Result<()> {
        Ok(())
    }
}

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), openraft::StorageError<TypeConfig>>
    {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = Storage::open(dir.path(), FsyncPolicy::Always).expect("open storage");
        let log =
            LogStore::open(storage.clone(), 7, TailBudget::new(NODE_TAIL_BYTES)).expect("open log");
        let sm = StateMachineStore::new(storage, 7, Arc::new(Echo));
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocksdb_log_store_passes_openraft_conformance_suite() {
    Suite::test_all(Builder).await.expect("conformance suite");
}
