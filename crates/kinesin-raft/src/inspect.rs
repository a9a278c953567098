//! Offline view of the Raft state a stopped node keeps: what `kinesin debug
//! raft` prints when replicas of a group disagree and one must find out
//! which entry each of them holds, applied and voted for.

use std::collections::BTreeSet;
use std::io;

use kinesin_storage::keys::{self, TAG_COMMITTED, TAG_PURGED, TAG_VOTE};
use kinesin_storage::{Cf, Storage};
use openraft::entry::RaftEntry;
use openraft::EntryPayload;
use serde::Serialize;

use crate::state_machine::applied_of;
use crate::types::{decode, Entry, LogId, Vote};

/// One group's durable Raft state on this node.
#[derive(Serialize)]
pub struct GroupDump {
    pub group: u64,
    pub vote: Option<String>,
    pub committed: Option<String>,
    pub purged: Option<String>,
    pub last_log: Option<String>,
    pub applied: Option<String>,
    /// The log as runs of consecutive indexes written in one term by one
    /// leader: `first..=last @ leader-term`.
    pub terms: Vec<String>,
    /// The entries asked for by index: log id and payload (lossy text).
    pub entries: Vec<String>,
}

fn show<T: std::fmt::Display>(v: Option<T>) -> Option<String> {
    v.map(|v| v.to_string())
}

/// Every group with Raft state in `storage`, with the entries at `indexes`.
pub fn dump(storage: &Storage, indexes: &BTreeSet<u64>) -> io::Result<Vec<GroupDump>> {
    let mut groups = BTreeSet::new();
    for kv in storage.scan(Cf::RaftState, &[], &[0xff; 10]) {
        let (key, _) = kv?;
        if let Some(g) = key.get(..8) {
            groups.insert(u64::from_be_bytes(g.try_into().expect("8 bytes")));
        }
    }
    groups
        .into_iter()
        .map(|g| dump_group(storage, g, indexes))
        .collect()
}

fn dump_group(storage: &Storage, group: u64, indexes: &BTreeSet<u64>) -> io::Result<GroupDump> {
    let state = |tag| storage.get(Cf::RaftState, &keys::state_key(group, tag));
    let vote: Option<Vote> = match state(TAG_VOTE)? {
        Some(v) => Some(decode("vote", &v)?),
        None => None,
    };
    let committed: Option<LogId> = match state(TAG_COMMITTED)? {
        Some(v) => decode("committed log id", &v)?,
        None => None,
    };
    let purged: Option<LogId> = match state(TAG_PURGED)? {
        Some(v) => decode("purged log id", &v)?,
        None => None,
    };
    let mut terms: Vec<(u64, u64, String)> = Vec::new();
    let mut entries = Vec::new();
    let mut last_log = None;
    let (from, to) = (keys::log_key(group, 0), keys::log_key(group, u64::MAX));
    for kv in storage.scan(Cf::RaftLog, &from, &to) {
        let (_, v) = kv?;
        let entry: Entry = decode("log entry", &v)?;
        let id = entry.log_id();
        let leader = id.committed_leader_id().to_string();
        match terms.last_mut() {
            Some((_, last, l)) if *l == leader && *last + 1 == id.index => *last = id.index,
            _ => terms.push((id.index, id.index, leader)),
        }
        if indexes.contains(&id.index) {
            let payload = match &entry.payload {
                EntryPayload::Normal(c) => String::from_utf8_lossy(&c.0).into_owned(),
                other => format!("{other:?}"),
            };
            entries.push(format!("{id}: {payload}"));
        }
        last_log = Some(id);
    }
    Ok(GroupDump {
        group,
        vote: show(vote),
        committed: show(committed),
        purged: show(purged),
        last_log: show(last_log),
        applied: show(applied_of(storage, group)?),
        terms: terms
            .into_iter()
            .map(|(a, b, l)| format!("{a}..={b} @ {l}"))
            .collect(),
        entries,
    })
}
