//! Shard iterators and paging tokens: opaque base64 text that carries where
//! to continue and when it was issued (they expire, after 5 minutes by
//! default).

use base64::Engine;
use kinesin_shard::ReadStart;
use kinesin_types::SequenceNumber;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::ApiError;

/// First byte of every token: bump it when the encoding changes.
const VERSION: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Position {
    TrimHorizon,
    At(u128),
    After(u128),
    AtTimestamp(u64),
}

impl Position {
    pub fn read_start(self) -> ReadStart {
        match self {
            Position::TrimHorizon => ReadStart::TrimHorizon,
            Position::At(s) => ReadStart::At(SequenceNumber(s)),
            Position::After(s) => ReadStart::After(SequenceNumber(s)),
            Position::AtTimestamp(t) => ReadStart::AtTimestamp(t),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardIterator {
    pub stream: String,
    /// Creation time of the stream, so that an iterator of a deleted and
    /// re-created stream of the same name is refused.
    pub stream_created_ms: u64,
    pub shard: u32,
    pub position: Position,
    pub issued_ms: u64,
}

pub fn encode<T: Serialize>(token: &T) -> String {
    let mut bytes = vec![VERSION];
    bytes.extend(postcard::to_stdvec(token).expect("encoding to a Vec cannot fail"));
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes a token; `what` names it in the error ("ShardIterator").
pub fn decode<T: DeserializeOwned>(text: &str, what: &str) -> Result<T, ApiError> {
    let invalid = || ApiError::invalid_argument(format!("Invalid {what}."));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| invalid())?;
    match bytes.split_first() {
        Some((&VERSION, rest)) => postcard::from_bytes(rest).map_err(|_| invalid()),
        _ => Err(invalid()),
    }
}

/// How far ahead of this node's clock a token's issue time may be: another
/// node's clock may run ahead (nodes should be kept in sync by NTP; the
/// chaos harness skews one by up to 10 minutes).
const MAX_ISSUED_AHEAD_MS: u64 = 3_600_000;

/// Whether a token issued at `issued_ms` has expired by `now_ms`. A token
/// that claims to be issued more than an hour (or its validity, if longer)
/// from now was not issued by a node: it is refused as invalid, since it
/// would otherwise stay valid for as long as its forger liked.
pub fn expired(
    issued_ms: u64,
    now_ms: u64,
    validity_ms: u64,
    what: &str,
) -> Result<bool, ApiError> {
    let ahead = validity_ms.max(MAX_ISSUED_AHEAD_MS);
    if issued_ms > now_ms.saturating_add(ahead) {
        return Err(ApiError::invalid_argument(format!("Invalid {what}.")));
    }
    Ok(now_ms.saturating_sub(issued_ms) > validity_ms)
}

/// A ListStreams / ListShards continuation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageToken {
    pub stream: String,
    /// The last item returned (stream name or shard id).
    pub after: String,
    pub filter: Option<String>,
    pub issued_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iterators_round_trip_and_reject_garbage() {
        let it = ShardIterator {
            stream: "s".repeat(128),
            stream_created_ms: 1,
            shard: 7,
            position: Position::After(u128::MAX),
            issued_ms: 99,
        };
        let text = encode(&it);
        assert!(text.len() <= 512, "{} chars", text.len());
        assert_eq!(decode::<ShardIterator>(&text, "ShardIterator").unwrap(), it);
        let err = decode::<ShardIterator>("not-an-iterator", "ShardIterator").unwrap_err();
        assert_eq!(err.name, "InvalidArgumentException");
        let err = decode::<ShardIterator>("AgAA", "ShardIterator").unwrap_err();
        assert_eq!(err.name, "InvalidArgumentException");
    }

    #[test]
    fn a_token_expires_after_its_validity_and_one_from_the_future_is_refused() {
        let (now, validity) = (10_000_000, 300_000);
        assert!(!expired(now, now, validity, "ShardIterator").unwrap());
        assert!(!expired(now - validity, now, validity, "ShardIterator").unwrap());
        assert!(expired(now - validity - 1, now, validity, "ShardIterator").unwrap());
        // Another node's clock may run ahead, by up to an hour.
        let hour = MAX_ISSUED_AHEAD_MS;
        assert!(!expired(now + hour, now, validity, "ShardIterator").unwrap());
        let err = expired(now + hour + 1, now, validity, "NextToken").unwrap_err();
        assert_eq!(err.name, "InvalidArgumentException");
        assert_eq!(err.message, "Invalid NextToken.");
        assert!(expired(u64::MAX, now, validity, "NextToken").is_err());
        // A validity longer than an hour allows as much ahead.
        assert!(!expired(now + 2 * hour, now, 2 * hour, "NextToken").unwrap());
    }
}
