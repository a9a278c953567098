//! The shard state machine proper.

use std::io;
use std::sync::{Mutex, RwLock};

use kinesin_raft::{GroupStateMachine, SnapshotRows};
use kinesin_storage::{keys, Cf, Storage, WriteBatch};
use kinesin_types::{SequenceNumber, ShardId};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::command::{ShardCommand, ShardRejection, ShardReply, StoredRecord};

const STATE_KEY: &[u8] = b"shard";
/// When this replica applied its shard's seal, by its own wall clock
/// (8 bytes, big-endian ms). Neither replicated nor in snapshots (an
/// install keeps the replica's own): how long a shard has been sealed
/// survives restarts and leader changes, and a replica that got the seal
/// by snapshot counts from when it first looks (`retire`), which delays a
/// removal and never hastens one. Written with the rest of an apply, so
/// without the WAL: the seal's publish flushes it (see
/// [`ShardStateMachine::publish`]), or a crash would lose it and the seal,
/// applied again from the log, would start the count anew.
const SEALED_AT_KEY: &[u8] = b"sealed-at";

/// The shard's small state (everything but the records).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStats {
    /// Highest sequence number written, if any.
    pub last_sequence: Option<u128>,
    /// Arrival time of the newest record; arrival times never go backwards.
    pub last_arrival_ms: u64,
    pub sealed: bool,
    /// Lowest sequence number still kept; lower ones were trimmed.
    pub trim_horizon: u128,
    pub appended_records: u64,
    pub appended_bytes: u64,
}

pub struct ShardStateMachine {
    pub(crate) storage: Storage,
    pub(crate) group: u64,
    pub(crate) shard: ShardId,
    pub(crate) generation: u32,
    /// What readers see: only what storage already holds.
    published: RwLock<ShardStats>,
    /// Ahead of `published` between apply and publish.
    working: Mutex<ShardStats>,
    /// Signalled at every publish: reads waiting for records wake on it.
    publishes: watch::Sender<()>,
}

impl ShardStateMachine {
    pub fn open(storage: Storage, group: u64, shard: ShardId, generation: u32) -> io::Result<Self> {
        let stats = match storage.get(Cf::StateMachine, &keys::named_key(group, STATE_KEY))? {
            Some(v) => postcard::from_bytes(&v)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            None => ShardStats {
                trim_horizon: SequenceNumber::first_of(generation, shard).0,
                ..Default::default()
            },
        };
        Ok(ShardStateMachine {
            storage,
            group,
            shard,
            generation,
            published: RwLock::new(stats.clone()),
            working: Mutex::new(stats),
            publishes: watch::Sender::new(()),
        })
    }

    pub fn stats(&self) -> ShardStats {
        self.published.read().expect("stats lock").clone()
    }

    /// Changes whenever applied entries become visible to readers (new
    /// records, a seal, a trim); what is current when called counts as seen.
    pub fn watch_published(&self) -> watch::Receiver<()> {
        self.publishes.subscribe()
    }

    /// Reads holding a [`Self::watch_published`] receiver now.
    pub fn watching_reads(&self) -> usize {
        self.publishes.receiver_count()
    }

    /// Flushes the state just published, the seal's time with it, off the
    /// apply path (inline where there is no runtime, as in unit tests). A
    /// crash before the flush ends only delays the shard's removal.
    fn persist_seal_time(&self) {
        let storage = self.storage.clone();
        let group = self.group;
        let persist = move || {
            if let Err(e) = storage.persist_patiently_blocking() {
                tracing::warn!(group, error = %e, "cannot flush a shard's seal time");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(persist)),
            Err(_) => persist(),
        }
    }

    /// When this replica applied the seal (wall-clock ms), if it did.
    pub fn sealed_at_ms(&self) -> io::Result<Option<u64>> {
        let stored = self.storage.get(
            Cf::StateMachine,
            &keys::named_key(self.group, SEALED_AT_KEY),
        )?;
        Ok(stored
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map(u64::from_be_bytes))
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    fn apply_command(
        &self,
        index: u64,
        command: ShardCommand,
        stats: &mut ShardStats,
        batch: &mut WriteBatch,
    ) -> ShardReply {
        match command {
            ShardCommand::Append {
                arrival_ms,
                records,
            } => {
                if stats.sealed {
                    return ShardReply::Rejected(ShardRejection::Sealed);
                }
                if records.is_empty() || records.len() > kinesin_types::MAX_RECORDS_PER_ENTRY {
                    return ShardReply::Rejected(ShardRejection::Malformed);
                }
                // Arrival times stay monotonic even if leaders' clocks differ,
                // so time order and sequence order agree.
                let arrival_ms = arrival_ms.max(stats.last_arrival_ms);
                let first = SequenceNumber::new(self.generation, self.shard, index, 0);
                let records_cf = self.storage.cf(Cf::Records);
                let count = records.len() as u32;
                for (position, record) in records.into_iter().enumerate() {
                    let seq =
                        SequenceNumber::new(self.generation, self.shard, index, position as u16);
                    stats.appended_bytes += (record.data.len() + record.partition_key.len()) as u64;
                    let stored = StoredRecord {
                        partition_key: record.partition_key,
                        data: record.data,
                        arrival_ms,
                    };
                    let value =
                        postcard::to_stdvec(&stored).expect("encoding to a Vec cannot fail");
                    batch.put_cf(records_cf, keys::record_key(self.group, seq.0), value);
                    stats.last_sequence = Some(seq.0);
                }
                batch.put_cf(
                    self.storage.cf(Cf::RecordTime),
                    keys::record_time_key(self.group, arrival_ms, first.0),
                    [],
                );
                stats.appended_records += u64::from(count);
                stats.last_arrival_ms = arrival_ms;
                ShardReply::Appended {
                    first: first.0,
                    count,
                }
            }
            ShardCommand::Seal => {
                if !stats.sealed {
                    batch.put_cf(
                        self.storage.cf(Cf::StateMachine),
                        keys::named_key(self.group, SEALED_AT_KEY),
                        kinesin_raft::clock::now_ms().to_be_bytes(),
                    );
                }
                stats.sealed = true;
                ShardReply::Sealed {
                    ending: stats.last_sequence,
                }
            }
            ShardCommand::Trim { before_ms, horizon } => {
                // Never past what this shard has written.
                let horizon = horizon.min(self.next_sequence(stats));
                if horizon > stats.trim_horizon {
                    let (from, _) = keys::group_bounds(self.group);
                    batch.delete_range_cf(
                        self.storage.cf(Cf::Records),
                        &from[..],
                        &keys::record_key(self.group, horizon)[..],
                    );
                    batch.delete_range_cf(
                        self.storage.cf(Cf::RecordTime),
                        &from[..],
                        &keys::record_time_key(self.group, before_ms, 0)[..],
                    );
                    stats.trim_horizon = horizon;
                }
                ShardReply::Trimmed {
                    horizon: stats.trim_horizon,
                }
            }
        }
    }

    /// The trim horizon for a retention cut-off at `before_ms`, from the
    /// published state; the leader puts it into the Trim command.
    pub fn trim_point(&self, before_ms: u64) -> u128 {
        self.first_sequence_at_or_after(before_ms, &self.stats())
    }

    /// First sequence number of a record that arrived at or after `time_ms`,
    /// or the next number to be written if none did.
    pub(crate) fn first_sequence_at_or_after(&self, time_ms: u64, stats: &ShardStats) -> u128 {
        let from = keys::record_time_key(self.group, time_ms, 0);
        let (_, to) = keys::group_bounds(self.group);
        match self.storage.scan(Cf::RecordTime, &from, &to).next() {
            Some(Ok((k, _))) => keys::record_time_parts(&k).1,
            _ => self.next_sequence(stats),
        }
    }

    /// The sequence number just above the last written one (exclusive tip).
    pub(crate) fn next_sequence(&self, stats: &ShardStats) -> u128 {
        match stats.last_sequence {
            Some(s) => s + 1,
            None => stats.trim_horizon,
        }
    }
}

impl GroupStateMachine for ShardStateMachine {
    fn apply(&self, index: u64, command: &[u8], batch: &mut WriteBatch) -> io::Result<Vec<u8>> {
        let mut stats = self.working.lock().expect("working lock");
        let reply = match ShardCommand::decode(command) {
            Ok(cmd) => self.apply_command(index, cmd, &mut stats, batch),
            Err(_) => ShardReply::Rejected(ShardRejection::Malformed),
        };
        batch.put_cf(
            self.storage.cf(Cf::StateMachine),
            keys::named_key(self.group, STATE_KEY),
            postcard::to_stdvec(&*stats).expect("encoding to a Vec cannot fail"),
        );
        Ok(reply.encode())
    }

    fn publish(&self) {
        let working = self.working.lock().expect("working lock").clone();
        let sealed_now = working.sealed;
        let was_sealed =
            std::mem::replace(&mut *self.published.write().expect("stats lock"), working).sealed;
        self.publishes.send_replace(());
        if sealed_now && !was_sealed {
            self.persist_seal_time();
        }
    }

    fn snapshot_state(&self) -> Vec<u8> {
        postcard::to_stdvec(&self.stats()).expect("encoding to a Vec cannot fail")
    }

    fn restore(&self, state: &[u8], batch: &mut WriteBatch) -> io::Result<()> {
        let stats: ShardStats = postcard::from_bytes(state)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        batch.put_cf(
            self.storage.cf(Cf::StateMachine),
            keys::named_key(self.group, STATE_KEY),
            state,
        );
        // The install clears the group's small state: a replica that
        // applied the seal itself keeps its time.
        if let (true, Some(at)) = (stats.sealed, self.sealed_at_ms()?) {
            batch.put_cf(
                self.storage.cf(Cf::StateMachine),
                keys::named_key(self.group, SEALED_AT_KEY),
                at.to_be_bytes(),
            );
        }
        *self.working.lock().expect("working lock") = stats;
        Ok(())
    }

    /// Records never change once written and their sequence numbers carry
    /// the log index that wrote them.
    fn snapshot_rows(&self) -> SnapshotRows {
        SnapshotRows::Immutable {
            columns: &[Cf::Records, Cf::RecordTime],
            writer_index: record_writer_index,
        }
    }
}

/// Log index of the entry that wrote a record key or record-time key.
fn record_writer_index(cf: Cf, key: &[u8]) -> u64 {
    let seq = match cf {
        Cf::Records => keys::record_seq_of(key),
        _ => keys::record_time_parts(key).1,
    };
    SequenceNumber(seq).log_index()
}
