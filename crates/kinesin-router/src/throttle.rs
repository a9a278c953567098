//! Per-shard throughput limits, enforced by the shard's leader (so they hold
//! cluster-wide): token buckets that refill at the configured rate, hold at
//! most one second of it, and may go into debt, so that one large batch is
//! accepted whole and the shard is then throttled until the debt is repaid.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use kinesin_types::GroupId;

/// Per-shard limits; 0 means unlimited. AWS: writes 1 MiB/s and 1000
/// records/s, reads 5 calls/s and 2 MiB/s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardLimits {
    pub write_bytes_per_sec: u64,
    pub write_records_per_sec: u64,
    pub read_calls_per_sec: u64,
    pub read_bytes_per_sec: u64,
}

impl ShardLimits {
    pub fn is_unlimited(&self) -> bool {
        *self == ShardLimits::default()
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: u64, now: Instant) {
        let rate = rate as f64;
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(rate);
        self.at = now;
    }
}

#[derive(Debug, Default)]
pub(crate) struct Throttle {
    limits: ShardLimits,
    // (group, which) → bucket; which: 0 write bytes, 1 write records,
    // 2 read calls, 3 read bytes.
    buckets: Mutex<HashMap<(GroupId, u8), Bucket>>,
}

impl Throttle {
    pub(crate) fn new(limits: ShardLimits) -> Self {
        Throttle {
            limits,
            buckets: Mutex::default(),
        }
    }

    /// Takes `amounts` from the buckets `which` if none of them is empty.
    fn take(&self, group: GroupId, wanted: &[(u8, u64, u64)]) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("throttle lock");
        let mut ok = true;
        for &(which, rate, _) in wanted {
            if rate == 0 {
                continue;
            }
            let b = buckets.entry((group, which)).or_insert(Bucket {
                tokens: rate as f64,
                at: now,
            });
            b.refill(rate, now);
            ok &= b.tokens > 0.0;
        }
        if ok {
            for &(which, rate, amount) in wanted {
                if let Some(b) = buckets.get_mut(&(group, which)).filter(|_| rate > 0) {
                    b.tokens -= amount as f64;
                }
            }
        }
        ok
    }

    /// May these records be appended now?
    pub(crate) fn write(&self, group: GroupId, records: usize, bytes: usize) -> bool {
        let l = self.limits;
        self.take(
            group,
            &[
                (0, l.write_bytes_per_sec, bytes as u64),
                (1, l.write_records_per_sec, records as u64),
            ],
        )
    }

    /// May this shard be read now? Charges one call.
    pub(crate) fn read(&self, group: GroupId) -> bool {
        let l = self.limits;
        self.take(
            group,
            &[(2, l.read_calls_per_sec, 1), (3, l.read_bytes_per_sec, 0)],
        )
    }

    /// Charges the bytes a read returned, into debt if need be (the read
    /// already happened).
    pub(crate) fn read_bytes(&self, group: GroupId, bytes: usize) {
        let rate = self.limits.read_bytes_per_sec;
        if rate > 0 {
            let now = Instant::now();
            let mut buckets = self.buckets.lock().expect("throttle lock");
            let b = buckets.entry((group, 3)).or_insert(Bucket {
                tokens: rate as f64,
                at: now,
            });
            b.refill(rate, now);
            b.tokens -= bytes as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_admits_its_rate_then_refuses_until_repaid() {
        let t = Throttle::new(ShardLimits {
            write_records_per_sec: 100,
            ..ShardLimits::default()
        });
        let g = GroupId(1);
        // One large batch goes through whole and leaves a debt.
        assert!(t.write(g, 250, 0));
        assert!(!t.write(g, 1, 0));
        // Another group has its own bucket.
        assert!(t.write(GroupId(2), 1, 0));
        // Read bytes are charged even when the bucket is already in debt.
        let reads = Throttle::new(ShardLimits {
            read_bytes_per_sec: 100,
            ..ShardLimits::default()
        });
        assert!(reads.read(g));
        reads.read_bytes(g, 150);
        reads.read_bytes(g, 150);
        assert!(!reads.read(g));
        let debt = reads.buckets.lock().unwrap()[&(g, 3)].tokens;
        assert!(debt < -190.0, "{debt}");
        let unlimited = Throttle::new(ShardLimits::default());
        assert!((0..10_000).all(|_| unlimited.write(g, 500, 1 << 20)));
    }
}
