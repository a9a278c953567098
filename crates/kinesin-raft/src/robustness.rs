//! Property tests of the decoders a peer's bytes reach: Raft requests
//! (append, vote, pre-vote, transfer), snapshot headers and chunks, and the
//! stored log entries and votes. Any bytes decode or are refused with an
//! error; none panics.

use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use proptest::prelude::*;
use serde::Deserialize;

use crate::network::SnapshotHeader;
use crate::state_machine::SnapshotChunk;
use crate::types::{decode, Entry, TypeConfig, Vote};

fn survives<T: for<'a> Deserialize<'a>>(bytes: &[u8]) {
    let _ = decode::<T>("message", bytes);
}

proptest! {
    #[test]
    fn any_bytes_decode_to_a_raft_message_or_an_error(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        survives::<AppendEntriesRequest<TypeConfig>>(&bytes);
        survives::<VoteRequest<TypeConfig>>(&bytes);
        survives::<TransferLeaderRequest<TypeConfig>>(&bytes);
        survives::<SnapshotHeader>(&bytes);
        survives::<SnapshotChunk>(&bytes);
        survives::<Entry>(&bytes);
        survives::<Vote>(&bytes);
    }
}
