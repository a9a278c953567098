//! A small key-value group kind: the second kind beside stream shards,
//! proving that a kind registered with the nodes runs end to end (created
//! from the map, written and read through the router, snapshotted, and
//! installed on a replica that joins after the log was purged).
//!
//! The whole map is the group's small state: one value in the state-machine
//! column family, rewritten by every command. Fine for tests; a kind with
//! much state would keep rows of its own.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kinesin_raft::{GroupKind, GroupStateMachine};
use kinesin_storage::{keys, Cf, Storage, WriteBatch};
use kinesin_types::GroupId;
use serde::{Deserialize, Serialize};

/// The kind's registered name.
pub const KV_KIND: &str = "test-kv";

const STATE_KEY: &[u8] = b"kv";

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

/// Reply to a command: the key's previous value. Reply to a query: the
/// value (Get) or the number of keys (Len, as little-endian u64 bytes).
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
        Ok(Arc::new(KvStateMachine::open(storage, group.0)?))
    }
}

struct KvStateMachine {
    storage: Storage,
    group: u64,
    /// Holds only committed commands (applies come in commit order), so a
    /// query may read it even before the batch that stores it is written.
    map: Mutex<BTreeMap<String, Vec<u8>>>,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl KvStateMachine {
    fn open(storage: Storage, group: u64) -> io::Result<Self> {
        let map = match storage
            .get(Cf::StateMachine, &keys::named_key(group, STATE_KEY))
            .map_err(invalid)?
        {
            Some(v) => postcard::from_bytes(&v).map_err(invalid)?,
            None => BTreeMap::new(),
        };
        Ok(KvStateMachine {
            storage,
            group,
            map: Mutex::new(map),
        })
    }

    fn stage(&self, map: &BTreeMap<String, Vec<u8>>, batch: &mut WriteBatch) {
        batch.put_cf(
            self.storage.cf(Cf::StateMachine),
            keys::named_key(self.group, STATE_KEY),
            encode(map),
        );
    }
}

impl GroupStateMachine for KvStateMachine {
    fn apply(&self, _index: u64, command: &[u8], batch: &mut WriteBatch) -> Vec<u8> {
        let mut map = self.map.lock().expect("kv lock");
        let previous: KvReply = match postcard::from_bytes(command) {
            Ok(KvCommand::Put { key, value }) => map.insert(key, value),
            Ok(KvCommand::Delete { key }) => map.remove(&key),
            Err(_) => None,
        };
        self.stage(&map, batch);
        encode(&previous)
    }

    fn publish(&self) {}

    fn snapshot_state(&self) -> Vec<u8> {
        encode(&*self.map.lock().expect("kv lock"))
    }

    fn restore(&self, state: &[u8], batch: &mut WriteBatch) -> io::Result<()> {
        let restored: BTreeMap<String, Vec<u8>> = postcard::from_bytes(state).map_err(invalid)?;
        self.stage(&restored, batch);
        *self.map.lock().expect("kv lock") = restored;
        Ok(())
    }

    fn query(&self, query: &[u8]) -> Result<Vec<u8>, String> {
        let map = self.map.lock().expect("kv lock");
        let reply: KvReply = match postcard::from_bytes(query).map_err(|e| e.to_string())? {
            KvQuery::Get { key } => map.get(&key).cloned(),
            KvQuery::Len => Some((map.len() as u64).to_le_bytes().to_vec()),
        };
        Ok(encode(&reply))
    }
}
