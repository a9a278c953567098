//! Key encodings. Every key starts with the 8-byte big-endian group id, so a
//! group's data is one contiguous range in each column family and can be
//! dropped with one range delete.

pub const TAG_VOTE: u8 = 1;
pub const TAG_COMMITTED: u8 = 2;
pub const TAG_PURGED: u8 = 3;

/// `group | index`, both big-endian.
pub fn log_key(group: u64, index: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

pub fn log_index_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[8..16].try_into().expect("log keys are 16 bytes"))
}

/// `group | tag`.
pub fn state_key(group: u64, tag: u8) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8] = tag;
    k
}

/// `group | sequence number`, big-endian so byte order is numeric order.
pub fn record_key(group: u64, seq: u128) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub fn record_seq_of(key: &[u8]) -> u128 {
    u128::from_be_bytes(key[8..24].try_into().expect("record keys are 24 bytes"))
}

/// `group | arrival time ms | first sequence number of the batch`.
pub fn record_time_key(group: u64, time_ms: u64, seq: u128) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..16].copy_from_slice(&time_ms.to_be_bytes());
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub fn record_time_parts(key: &[u8]) -> (u64, u128) {
    (
        u64::from_be_bytes(key[8..16].try_into().expect("time keys are 32 bytes")),
        u128::from_be_bytes(key[16..32].try_into().expect("time keys are 32 bytes")),
    )
}

/// `group | name`, for small named state-machine values.
pub fn named_key(group: u64, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + name.len());
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(name);
    k
}

/// The half-open key range `[group, group + 1)` holding all of a group's keys.
pub fn group_bounds(group: u64) -> (Vec<u8>, Vec<u8>) {
    let from = group.to_be_bytes().to_vec();
    let to = match group.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 9],
    };
    (from, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_by_group_then_index() {
        let mut keys = vec![
            log_key(2, 1),
            log_key(1, 300),
            log_key(1, 2),
            log_key(1, 256),
        ];
        keys.sort();
        assert_eq!(
            keys,
            vec![
                log_key(1, 2),
                log_key(1, 256),
                log_key(1, 300),
                log_key(2, 1)
            ]
        );
        assert_eq!(log_index_of(&log_key(9, 12345)), 12345);
    }

    #[test]
    fn record_keys_sort_numerically_and_stay_inside_group_bounds() {
        let a = record_key(5, 1);
        let b = record_key(5, 1 << 70);
        let c = record_key(5, u128::MAX);
        assert!(a < b && b < c);
        let (from, to) = group_bounds(5);
        for k in [a, b, c] {
            assert!(k.as_slice() >= from.as_slice() && k.as_slice() < to.as_slice());
        }
        assert_eq!(record_seq_of(&b), 1 << 70);
        let (t, s) = record_time_parts(&record_time_key(5, 99, 42));
        assert_eq!((t, s), (99, 42));
    }
}
