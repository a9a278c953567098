//! A small key-value group kind: the second kind beside stream shards,
//! proving that a kind registered with the nodes runs end to end (created
//! from the map, written and read through the router, snapshotted, and
//! installed on a replica that joins after the log was purged).
//!
//! Each key is a row of its own in the rows column family, changed in place
//! by puts and deletes: the kind's snapshots carry mutable rows
//! ([`SnapshotRows::Mutable`]), the shape a queue's message state has.

use std::io;
use std::sync::Arc;

use kinesin_raft::{GroupKind, GroupStateMachine, SnapshotRows};
use kinesin_storage::{keys, Cf, Storage, WriteBatch};
use kinesin_types::GroupId;
use serde::{Deserialize, Serialize};

/// The kind's registered name.
pub const KV_KIND: &str = "test-kv";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvQuery {
    Get { key: String },
    Len,
}

/// Reply to a query: the value (Get) or the number of keys (Len, as
/// little-endian u64 bytes). Commands reply with nothing: computing a
/// previous value would read storage while applying, which a replica
/// applying a backlog in one batch cannot do correctly.
pub type KvReply = Option<Vec<u8>>;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("encoding to a Vec cannot fail")
}

pub fn decode_reply(bytes: &[u8]) -> KvReply {
    postcard::from_bytes(bytes).expect("a kv reply decodes")
}

pub struct KvKind;

impl GroupKind for KvKind {
    fn open(
        &self,
        storage: Storage,
        group: GroupId,
        _config: &[u8],
    ) -> io::Result<Arc<dyn GroupStateMachine>> {
        Ok(Arc::new(KvStateMachine {
            storage,
            group: group.0,
        }))
    }
}

struct KvStateMachine {
    storage: Storage,
    group: u64,
}

impl KvStateMachine {
    fn row(&self, key: &str) -> Vec<u8> {
        keys::named_key(self.group, key.as_bytes())
    }
}

impl GroupStateMachine for KvStateMachine {
    fn apply(&self, _index: u64, command: &[u8], batch: &mut WriteBatch) -> io::Result<Vec<u8>> {
        let rows = self.storage.cf(Cf::Rows);
        match postcard::from_bytes(command) {
            Ok(KvCommand::Put { key, value }) => batch.put_cf(rows, self.row(&key), value),
            Ok(KvCommand::Delete { key }) => batch.delete_cf(rows, self.row(&key)),
            Err(_) => {}
        }
        Ok(Vec::new())
    }

    fn publish(&self) {}

    fn snapshot_state(&self) -> Vec<u8> {
        Vec::new()
    }

    fn restore(&self, _state: &[u8], _batch: &mut WriteBatch) -> io::Result<()> {
        Ok(())
    }

    fn snapshot_rows(&self) -> SnapshotRows {
        SnapshotRows::Mutable {
            columns: &[Cf::Rows],
            fixed: None,
        }
    }

    fn query(&self, query: &[u8]) -> Result<Vec<u8>, String> {
        let reply: KvReply = match postcard::from_bytes(query).map_err(|e| e.to_string())? {
            KvQuery::Get { key } => self
                .storage
                .get(Cf::Rows, &self.row(&key))
                .map_err(|e| e.to_string())?,
            KvQuery::Len => {
                let (from, to) = keys::group_bounds(self.group);
                let mut count = 0u64;
                for row in self.storage.scan(Cf::Rows, &from, &to) {
                    row.map_err(|e| e.to_string())?;
                    count += 1;
                }
                Some(count.to_le_bytes().to_vec())
            }
        };
        Ok(encode(&reply))
    }
}
