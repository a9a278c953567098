//! Hash keys: MD5 of the partition key read as an unsigned 128-bit
//! big-endian integer, and the inclusive ranges shards own.

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::InvalidValue;

/// A point of the hash-key space 0..=2^128-1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HashKey(pub u128);

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for HashKey {
    type Err = InvalidValue;

    /// Parses an ExplicitHashKey: a decimal string without sign or spaces.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 39 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidValue(format!(
                "hash key {s:?} is not a decimal integer in 0..=2^128-1"
            )));
        }
        s.parse::<u128>()
            .map(HashKey)
            .map_err(|_| InvalidValue(format!("hash key {s:?} is larger than 2^128-1")))
    }
}

/// The hash key of a partition key: MD5 of its UTF-8 bytes, big-endian.
pub fn hash_key_for_partition_key(partition_key: &str) -> HashKey {
    let digest = Md5::digest(partition_key.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest);
    HashKey(u128::from_be_bytes(bytes))
}

/// An inclusive range of hash keys owned by one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HashKeyRange {
    pub start: HashKey,
    pub end: HashKey,
}

impl HashKeyRange {
    /// The whole hash-key space.
    pub const FULL: HashKeyRange = HashKeyRange {
        start: HashKey(0),
        end: HashKey(u128::MAX),
    };

    pub fn new(start: u128, end: u128) -> Result<Self, InvalidValue> {
        if start > end {
            return Err(InvalidValue(format!(
                "hash key range start {start} is above its end {end}"
            )));
        }
        Ok(HashKeyRange {
            start: HashKey(start),
            end: HashKey(end),
        })
    }

    pub fn contains(&self, key: HashKey) -> bool {
        self.start <= key && key <= self.end
    }

    /// Splits the whole space into `count` contiguous ranges whose sizes
    /// differ by at most one, as CreateStream does: range i starts at
    /// floor(i * 2^128 / count).
    pub fn split_evenly(count: u32) -> Vec<HashKeyRange> {
        assert!(count > 0, "a stream has at least one shard");
        if count == 1 {
            // 2^128 itself (the quotient below) does not fit.
            return vec![HashKeyRange {
                start: HashKey(0),
                end: HashKey(u128::MAX),
            }];
        }
        let n = u128::from(count);
        // 2^128 = q * n + r with 0 <= r < n, computed without overflowing.
        let (mut q, mut r) = (u128::MAX / n, u128::MAX % n + 1);
        if r == n {
            q += 1;
            r = 0;
        }
        let start_of = |i: u128| i * q + (i * r) / n;
        (0..n)
            .map(|i| {
                let end = if i + 1 == n {
                    u128::MAX
                } else {
                    start_of(i + 1) - 1
                };
                HashKeyRange {
                    start: HashKey(start_of(i)),
                    end: HashKey(end),
                }
            })
            .collect()
    }

    /// Splits this range at `at`, which must lie strictly inside it: the
    /// first half ends at `at - 1`, the second starts at `at`.
    pub fn split_at(&self, at: HashKey) -> Result<(HashKeyRange, HashKeyRange), InvalidValue> {
        if at <= self.start || at > self.end {
            return Err(InvalidValue(format!(
                "new starting hash key {at} must lie strictly inside {}..={}",
                self.start, self.end
            )));
        }
        Ok((
            HashKeyRange {
                start: self.start,
                end: HashKey(at.0 - 1),
            },
            HashKeyRange {
                start: at,
                end: self.end,
            },
        ))
    }

    /// Joins two adjacent ranges (in either order).
    pub fn merge(&self, other: &HashKeyRange) -> Result<HashKeyRange, InvalidValue> {
        let (low, high) = if self.start < other.start {
            (self, other)
        } else {
            (other, self)
        };
        if low.end.0.checked_add(1) != Some(high.start.0) {
            return Err(InvalidValue(
                "shards can only be merged when their hash key ranges are adjacent".into(),
            ));
        }
        Ok(HashKeyRange {
            start: low.start,
            end: high.end,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_routing_matches_known_vectors() {
        // MD5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(
            hash_key_for_partition_key(""),
            HashKey(0xd41d8cd98f00b204e9800998ecf8427e)
        );
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661
        assert_eq!(
            hash_key_for_partition_key("a"),
            HashKey(0x0cc175b9c0f1b6a831c399e269772661)
        );
        // Non-ASCII keys hash their UTF-8 bytes, not UTF-16 or Latin-1.
        let utf8 = hash_key_for_partition_key("\u{00fc}");
        let bytes: [u8; 16] = Md5::digest([0xc3u8, 0xbc]).into();
        assert_eq!(utf8, HashKey(u128::from_be_bytes(bytes)));
    }

    #[test]
    fn even_split_covers_the_whole_space_without_gaps() {
        for count in [1u32, 2, 3, 7, 8, 10, 1000] {
            let ranges = HashKeyRange::split_evenly(count);
            assert_eq!(ranges.len(), count as usize);
            assert_eq!(ranges[0].start, HashKey(0));
            assert_eq!(ranges.last().unwrap().end, HashKey(u128::MAX));
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end.0 + 1, pair[1].start.0);
            }
            let sizes: Vec<u128> = ranges.iter().map(|r| r.end.0 - r.start.0).collect();
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "sizes differ by more than one for {count}");
        }
    }

    #[test]
    fn even_split_matches_aws_boundaries() {
        let two = HashKeyRange::split_evenly(2);
        assert_eq!(
            two[0].end.to_string(),
            "170141183460469231731687303715884105727"
        );
        assert_eq!(
            two[1].start.to_string(),
            "170141183460469231731687303715884105728"
        );
        let four = HashKeyRange::split_evenly(4);
        assert_eq!(
            four[1].start.to_string(),
            "85070591730234615865843651857942052864"
        );
    }

    #[test]
    fn split_and_merge_are_inverse() {
        let full = HashKeyRange::FULL;
        let (a, b) = full.split_at(HashKey(1 << 100)).unwrap();
        assert_eq!(a.end.0 + 1, b.start.0);
        assert_eq!(a.merge(&b).unwrap(), full);
        assert_eq!(b.merge(&a).unwrap(), full);
        assert!(full.split_at(HashKey(0)).is_err());
        let (c, _) = a.split_at(HashKey(5)).unwrap();
        assert!(c.merge(&b).is_err());
    }

    #[test]
    fn explicit_hash_keys_are_validated() {
        assert_eq!("0".parse::<HashKey>().unwrap(), HashKey(0));
        assert_eq!(
            "340282366920938463463374607431768211455"
                .parse::<HashKey>()
                .unwrap(),
            HashKey(u128::MAX)
        );
        assert!("340282366920938463463374607431768211456"
            .parse::<HashKey>()
            .is_err());
        assert!("-1".parse::<HashKey>().is_err());
        assert!("".parse::<HashKey>().is_err());
        assert!("12a".parse::<HashKey>().is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A range of any width, from a single key to the whole space.
        fn range() -> impl Strategy<Value = HashKeyRange> {
            (any::<u128>(), any::<u128>())
                .prop_map(|(a, b)| HashKeyRange::new(a.min(b), a.max(b)).unwrap())
        }

        proptest! {
            #[test]
            fn an_even_split_tiles_the_space_in_sizes_one_apart(count in 1u32..=200_000) {
                let ranges = HashKeyRange::split_evenly(count);
                prop_assert_eq!(ranges.len(), count as usize);
                prop_assert_eq!(ranges[0].start, HashKey(0));
                prop_assert_eq!(ranges[ranges.len() - 1].end, HashKey(u128::MAX));
                let (mut min, mut max) = (u128::MAX, 0);
                for r in &ranges {
                    prop_assert!(r.start <= r.end);
                    min = min.min(r.end.0 - r.start.0);
                    max = max.max(r.end.0 - r.start.0);
                }
                for pair in ranges.windows(2) {
                    prop_assert_eq!(pair[0].end.0 + 1, pair[1].start.0);
                }
                prop_assert!(max - min <= 1);
            }

            #[test]
            fn a_split_inside_a_range_merges_back_and_outside_is_refused(
                r in range(),
                at in any::<u128>(),
            ) {
                let at = HashKey(at);
                match r.split_at(at) {
                    Ok((low, high)) => {
                        prop_assert!(r.start < at && at <= r.end);
                        prop_assert_eq!((low.start, low.end.0 + 1, high.start, high.end), (r.start, at.0, at, r.end));
                        prop_assert_eq!(low.merge(&high).unwrap(), r);
                        prop_assert_eq!(high.merge(&low).unwrap(), r);
                        for key in [at.0 - 1, at.0] {
                            prop_assert!(low.contains(HashKey(key)) != high.contains(HashKey(key)));
                        }
                    }
                    Err(_) => prop_assert!(at <= r.start || at > r.end),
                }
            }

            #[test]
            fn only_adjacent_ranges_merge(a in range(), b in range(), touch in any::<bool>()) {
                // Half the cases put b right above a.
                let b = match a.end.0.checked_add(1) {
                    Some(next) if touch => HashKeyRange::new(next, b.end.0.max(next)).unwrap(),
                    _ => b,
                };
                let adjacent = a.end.0.checked_add(1) == Some(b.start.0)
                    || b.end.0.checked_add(1) == Some(a.start.0);
                match a.merge(&b) {
                    Ok(m) => {
                        prop_assert!(adjacent);
                        prop_assert_eq!(m, b.merge(&a).unwrap());
                        prop_assert_eq!(m.end.0 - m.start.0, (a.end.0 - a.start.0) + (b.end.0 - b.start.0) + 1);
                    }
                    Err(_) => prop_assert!(!adjacent),
                }
            }
        }
    }
}
