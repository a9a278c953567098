//! Sequence numbers. A sequence number is a 128-bit integer written in
//! decimal, laid out (most significant first) as
//!
//! | bits | field | why |
//! |---|---|---|
//! | 32 | shard generation | children (generation = max parent + 1) sort above parents |
//! | 32 | shard number | names the shard, so a number from another shard is rejected |
//! | 48 | Raft log index | assigned at apply time, identical on every replica |
//! | 16 | position in the batch | several records share one log entry |
//!
//! Within a shard the generation and number are fixed, so order follows the
//! log index and then the position: strictly increasing, deterministic.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::{InvalidValue, ShardId};

/// Most records one log entry may carry (the position field is 16 bits).
pub const MAX_RECORDS_PER_ENTRY: usize = 1 << 16;
/// Largest log index a sequence number can carry (48 bits).
pub const MAX_LOG_INDEX: u64 = (1 << 48) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SequenceNumber(pub u128);

impl SequenceNumber {
    pub fn new(generation: u32, shard: ShardId, log_index: u64, position: u16) -> Self {
        assert!(
            log_index <= MAX_LOG_INDEX,
            "log index {log_index} exceeds 48 bits"
        );
        SequenceNumber(
            (u128::from(generation) << 96)
                | (u128::from(shard.0) << 64)
                | (u128::from(log_index) << 16)
                | u128::from(position),
        )
    }

    /// The lowest sequence number a shard of this generation can hold.
    pub fn first_of(generation: u32, shard: ShardId) -> Self {
        SequenceNumber::new(generation, shard, 0, 0)
    }

    pub fn generation(self) -> u32 {
        (self.0 >> 96) as u32
    }

    pub fn shard(self) -> ShardId {
        ShardId((self.0 >> 64) as u32)
    }

    pub fn log_index(self) -> u64 {
        ((self.0 >> 16) as u64) & MAX_LOG_INDEX
    }

    pub fn position(self) -> u16 {
        self.0 as u16
    }

    /// Big-endian bytes: byte order equals numeric order, for storage keys.
    pub fn to_be_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    pub fn from_be_bytes(bytes: [u8; 16]) -> Self {
        SequenceNumber(u128::from_be_bytes(bytes))
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for SequenceNumber {
    type Err = InvalidValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidValue(format!("sequence number {s:?} is not valid"));
        if s.is_empty() || s.len() > 128 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        s.parse::<u128>().map(SequenceNumber).map_err(|_| invalid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let seq = SequenceNumber::new(3, ShardId(17), 123_456_789, 499);
        assert_eq!(seq.generation(), 3);
        assert_eq!(seq.shard(), ShardId(17));
        assert_eq!(seq.log_index(), 123_456_789);
        assert_eq!(seq.position(), 499);
        let text = seq.to_string();
        assert_eq!(text.parse::<SequenceNumber>().unwrap(), seq);
        assert_eq!(SequenceNumber::from_be_bytes(seq.to_be_bytes()), seq);
    }

    #[test]
    fn order_follows_log_index_then_position() {
        let a = SequenceNumber::new(0, ShardId(1), 10, 65535);
        let b = SequenceNumber::new(0, ShardId(1), 11, 0);
        let c = SequenceNumber::new(0, ShardId(1), 11, 1);
        assert!(a < b && b < c);
        // Clients compare decimal strings as big integers.
        let parse = |s: SequenceNumber| s.to_string().parse::<u128>().unwrap();
        assert!(parse(a) < parse(b) && parse(b) < parse(c));
    }

    #[test]
    fn children_sort_above_every_parent_number() {
        let parent_tip = SequenceNumber::new(0, ShardId(u32::MAX), MAX_LOG_INDEX, u16::MAX);
        let child_first = SequenceNumber::first_of(1, ShardId(0));
        assert!(child_first > parent_tip);
    }

    #[test]
    fn malformed_numbers_are_rejected() {
        for bad in ["", "-1", "1.5", "abc", &"9".repeat(129), &"9".repeat(60)] {
            assert!(bad.parse::<SequenceNumber>().is_err(), "{bad} accepted");
        }
    }
}
