//! Identifier newtypes, validated at construction.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::InvalidValue;

/// A node of the cluster. 0 is never a valid node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A Raft group: 0 is the metadata group, every other id is one shard's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupId(pub u64);

impl GroupId {
    pub const META: GroupId = GroupId(0);

    pub fn is_meta(self) -> bool {
        self == Self::META
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// A stream's key in the cluster map: its name, 1–128 characters of
/// `[a-zA-Z0-9_.-]` as AWS Kinesis, qualified as `<12-digit account>:<name>`
/// unless the stream is the home account's (`kinesin_meta::stream_key`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StreamName(String);

impl StreamName {
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidValue> {
        let name = name.into();
        let (account, bare) = match name.split_once(':') {
            Some((account, bare)) => (Some(account), bare),
            None => (None, name.as_str()),
        };
        if account.is_some_and(|a| a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit())) {
            return Err(InvalidValue(format!(
                "stream key {name:?} must name a 12-digit account before ':'"
            )));
        }
        let valid_chars = bare
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
        if bare.is_empty() || bare.len() > 128 || !valid_chars {
            return Err(InvalidValue(format!(
                "stream name {bare:?} must be 1-128 characters of [a-zA-Z0-9_.-]"
            )));
        }
        Ok(StreamName(name))
    }

    /// Whether the key names another account than the home account.
    pub fn is_qualified(&self) -> bool {
        self.0.contains(':')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A shard within its stream, written `shardId-000000000007` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardId(pub u32);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shardId-{:012}", self.0)
    }
}

impl FromStr for ShardId {
    type Err = InvalidValue;

    /// Accepts `shardId-000000000007` and, as AWS does, the bare number.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix("shardId-").unwrap_or(s);
        if digits.is_empty() || digits.len() > 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidValue(format!(
                "shard id {s:?} is not of the form shardId-NNNNNNNNNNNN"
            )));
        }
        digits
            .parse::<u32>()
            .map(ShardId)
            .map_err(|_| InvalidValue(format!("shard id {s:?} is out of range")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ids_round_trip_in_aws_form() {
        assert_eq!(ShardId(7).to_string(), "shardId-000000000007");
        assert_eq!(
            "shardId-000000000007".parse::<ShardId>().unwrap(),
            ShardId(7)
        );
        assert_eq!("12".parse::<ShardId>().unwrap(), ShardId(12));
        assert!("shardId-x".parse::<ShardId>().is_err());
        assert!("shardId-9999999999999".parse::<ShardId>().is_err());
    }

    #[test]
    fn stream_names_follow_the_aws_pattern() {
        assert!(StreamName::new("orders.v2-eu_1").is_ok());
        assert!(StreamName::new("").is_err());
        assert!(StreamName::new("a b").is_err());
        assert!(StreamName::new("x".repeat(129)).is_err());
        assert!(StreamName::new("x".repeat(128)).is_ok());
        let qualified = StreamName::new("123456789012:orders").unwrap();
        assert!(qualified.is_qualified());
        assert!(!StreamName::new("orders").unwrap().is_qualified());
        assert!(StreamName::new("12345:orders").is_err());
        assert!(StreamName::new("123456789012:").is_err());
        assert!(StreamName::new("123456789012:a:b").is_err());
    }
}
