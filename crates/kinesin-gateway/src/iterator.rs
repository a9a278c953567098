//! Shard iterators and paging tokens: opaque base64 text that carries where
//! to continue and when it was issued (they expire, after 5 minutes by
//! default), signed with the cluster's token key (`kinesin_meta::TokenKey`)
//! so that every node accepts them and nobody can forge or alter one.
//!
//! A signed token is `2 | postcard of the token | tag`, the tag being the
//! first [`TAG_LEN`] bytes of the HMAC-SHA256 of the token's kind
//! ([`Token::KIND`]) and what precedes the tag. Until the
//! cluster has a key (an upgrade from a release without one is not
//! complete) tokens are unsigned, `1 | postcard`, as that release wrote them.

use base64::Engine;
use hmac::{Hmac, Mac};
use kinesin_shard::ReadStart;
use kinesin_types::SequenceNumber;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::Sha256;

use crate::error::ApiError;

/// First byte of a token made without a key.
const UNSIGNED: u8 = 1;
/// First byte of a signed token.
const SIGNED: u8 = 2;
/// Bytes of the HMAC a signed token ends with: 128 bits.
const TAG_LEN: usize = 16;

/// An iterator or a paging token.
pub trait Token: Serialize + DeserializeOwned {
    /// Signed with the token, so that one kind is never taken for another.
    const KIND: u8;
    /// Makes the token count as issued at time 0: expired.
    fn expire(&mut self);
}

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

impl Token for ShardIterator {
    const KIND: u8 = 1;

    fn expire(&mut self) {
        self.issued_ms = 0;
    }
}

fn hmac<T: Token>(key: &[u8], bytes: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(&[T::KIND]);
    mac.update(bytes);
    mac
}

/// A token's text, signed with `key` if the cluster has one.
pub fn encode<T: Token>(token: &T, key: Option<&[u8]>) -> String {
    let body = postcard::to_stdvec(token).expect("encoding to a Vec cannot fail");
    let bytes = match key {
        Some(key) => signed_body::<T>(key, &body),
        None => [&[UNSIGNED][..], &body].concat(),
    };
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A signed token's bytes: the version, `body` and their tag.
pub(crate) fn signed_body<T: Token>(key: &[u8], body: &[u8]) -> Vec<u8> {
    let mut bytes = [&[SIGNED][..], body].concat();
    let tag = hmac::<T>(key, &bytes).finalize().into_bytes();
    bytes.extend_from_slice(&tag[..TAG_LEN]);
    bytes
}

/// Decodes a token; `what` names it in the error ("ShardIterator"). With a
/// `key`, a token must carry its tag: one whose tag does not match is
/// refused as invalid, and an unsigned one (made before the cluster had its
/// key) counts as issued at time 0, so that the caller reports it expired
/// and its client asks for a new one. A signed token on a node without the
/// key (it has not applied the cluster's yet) cannot be checked: it gets a
/// 503, which SDKs retry, rather than passing unchecked.
pub fn decode<T: Token>(text: &str, what: &str, key: Option<&[u8]>) -> Result<T, ApiError> {
    let invalid = || ApiError::invalid_argument(format!("Invalid {what}."));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| invalid())?;
    let (body, tagged) = match bytes.first() {
        Some(&SIGNED) => {
            // The version byte, then the tag at least.
            let split = bytes
                .len()
                .checked_sub(TAG_LEN)
                .filter(|&split| split > 0)
                .ok_or_else(invalid)?;
            let (signed, tag) = bytes.split_at(split);
            let key = key.ok_or_else(|| {
                ApiError::new(
                    "ServiceUnavailable",
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    format!("This node cannot check the {what} yet: it is catching up with the cluster's map. Retry."),
                )
            })?;
            hmac::<T>(key, signed)
                .verify_truncated_left(tag)
                .map_err(|_| invalid())?;
            (&signed[1..], true)
        }
        Some(&UNSIGNED) => (&bytes[1..], false),
        _ => return Err(invalid()),
    };
    let mut token: T = postcard::from_bytes(body).map_err(|_| invalid())?;
    if !tagged && key.is_some() {
        token.expire();
    }
    Ok(token)
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

impl Token for PageToken {
    const KIND: u8 = 2;

    fn expire(&mut self) {
        self.issued_ms = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: Option<&[u8]> = Some(&[3; 32]);

    fn longest() -> ShardIterator {
        ShardIterator {
            stream: format!("210987654321:{}", "s".repeat(128)),
            stream_created_ms: u64::MAX,
            shard: u32::MAX,
            position: Position::After(u128::MAX),
            issued_ms: u64::MAX,
        }
    }

    #[test]
    fn iterators_round_trip_and_reject_garbage() {
        let it = longest();
        for key in [KEY, None] {
            let text = encode(&it, key);
            assert!(text.len() <= 512, "{} chars", text.len());
            assert_eq!(
                decode::<ShardIterator>(&text, "ShardIterator", key).unwrap(),
                it
            );
        }
        // The kind is signed too: a paging token is no iterator.
        let token = PageToken {
            stream: it.stream.clone(),
            after: String::new(),
            filter: None,
            issued_ms: 1,
        };
        let page = encode(&token, KEY);
        assert_eq!(decode::<PageToken>(&page, "NextToken", KEY).unwrap(), token);
        assert!(decode::<ShardIterator>(&page, "ShardIterator", KEY).is_err());
        // The last two: a signed token's first byte and a tag, nothing
        // between; the first byte alone and no tag.
        for garbage in [
            "not-an-iterator",
            "AgAA",
            "AQ==",
            "",
            "AgAAAAAAAAAAAAAAAAAAAA==",
            "Ag==",
        ] {
            let err = decode::<ShardIterator>(garbage, "ShardIterator", KEY).unwrap_err();
            assert_eq!(err.name, "InvalidArgumentException");
        }
    }

    #[test]
    fn a_token_altered_or_signed_with_another_key_is_refused() {
        let it = longest();
        let bytes = |text: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .unwrap()
        };
        let text = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let signed = bytes(&encode(&it, KEY));
        // Any changed byte, in the token or in its tag.
        for at in 1..signed.len() {
            let mut altered = signed.clone();
            altered[at] ^= 1;
            let err = decode::<ShardIterator>(&text(&altered), "ShardIterator", KEY).unwrap_err();
            assert_eq!(err.message, "Invalid ShardIterator.", "byte {at}");
        }
        // A shorter tag, and a token signed with another key.
        let cut = text(&signed[..signed.len() - 1]);
        assert!(decode::<ShardIterator>(&cut, "ShardIterator", KEY).is_err());
        let other = encode(&it, Some(&[4; 32]));
        assert!(decode::<ShardIterator>(&other, "ShardIterator", KEY).is_err());
        // A node without the key yet cannot check the tag: it asks for a
        // retry.
        let err = decode::<ShardIterator>(&other, "ShardIterator", None).unwrap_err();
        assert_eq!(err.name, "ServiceUnavailable");
    }

    #[test]
    fn an_unsigned_token_counts_as_expired_once_there_is_a_key() {
        let token = PageToken {
            stream: "s".into(),
            after: "shardId-000000000001".into(),
            filter: None,
            issued_ms: 99,
        };
        let unsigned = encode(&token, None);
        let keyed: PageToken = decode(&unsigned, "NextToken", KEY).unwrap();
        assert_eq!(keyed.issued_ms, 0);
        assert_eq!(keyed.after, token.after);
        assert_eq!(
            decode::<PageToken>(&unsigned, "NextToken", None).unwrap(),
            token
        );
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
