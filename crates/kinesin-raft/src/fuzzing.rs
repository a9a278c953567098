//! The check a peer's bytes must pass, shared by the random-input property
//! test (`robustness`) and the coverage-guided fuzz targets (`fuzz/`, built
//! with `--cfg fuzzing`): Raft requests (append, vote, pre-vote, transfer),
//! snapshot headers and chunks, and the stored log entries and votes decode
//! or are refused with an error; none panics.

use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use serde::Deserialize;

use crate::network::SnapshotHeader;
use crate::state_machine::SnapshotChunk;
use crate::types::{decode, Entry, TypeConfig, Vote};

fn survives<T: for<'a> Deserialize<'a>>(bytes: &[u8]) {
    let _ = decode::<T>("message", bytes);
}

/// Decodes `bytes` as each message a peer sends or the log stores.
pub fn peer_message(bytes: &[u8]) {
    survives::<AppendEntriesRequest<TypeConfig>>(bytes);
    survives::<VoteRequest<TypeConfig>>(bytes);
    survives::<TransferLeaderRequest<TypeConfig>>(bytes);
    survives::<SnapshotHeader>(bytes);
    survives::<SnapshotChunk>(bytes);
    survives::<Entry>(bytes);
    survives::<Vote>(bytes);
}
