//! When a replica of a kind whose snapshots copy rows
//! ([`crate::SnapshotRows::Mutable`], a queue's message state) builds its
//! next snapshot.
//!
//! A build copies every such row the group holds. On a fixed number of
//! entries between builds, a large backlog pays for a whole copy every few
//! seconds, however little of it changed: a queue holding 200,000 messages
//! built one every 6–10 s under a receive + delete load and lost about 11 %
//! of its rate and half of its loop's p99 to them (docs/benchmarks.md,
//! session 45). So the log between two builds grows with the copy, as in
//! log compaction sized to the snapshot (LogCabin's rule, in rows rather than
//! bytes): the next build waits for the group's `snapshot_every` entries, and
//! for one entry per [`COPIED_ROWS_PER_ENTRY`] rows that the last build
//! copied. What a build costs per entry it lets the log purge is then
//! bounded, whatever the backlog; the log kept grows with the state it
//! stands for. Rows are counted without the ones a build leaves out (a
//! queue's bodies), so a backlog of small messages under a stream of large
//! ones would let the log grow far beyond the state: a build is also due
//! once [`LOG_BYTES`] of commands were applied since the last one.
//!
//! openraft's own policy counts entries only, so these groups run with
//! `SnapshotPolicy::Never` and apply asks for a build through
//! [`SnapshotSchedule::applied`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Rows a build may copy per entry it lets the log purge.
const COPIED_ROWS_PER_ENTRY: u64 = 2;

/// Bytes of commands applied after which a build is due (once there were
/// `every` entries), however many rows the last one copied.
const LOG_BYTES: u64 = 256 << 20;

/// Entries between two builds: `every`, or more after a build that copied
/// many rows.
fn entries_between(every: u64, copied_rows: u64) -> u64 {
    every.max(copied_rows / COPIED_ROWS_PER_ENTRY)
}

/// One replica's schedule; clones share it (the snapshot builder is a clone
/// of the state machine store).
#[derive(Clone)]
pub(crate) struct SnapshotSchedule {
    every: u64,
    /// Asks openraft for a build (which it ignores while one runs).
    request: Arc<dyn Fn() + Send + Sync>,
    /// Index of the newest snapshot built or installed here.
    last_index: Arc<AtomicU64>,
    /// Rows the newest build here copied; 0 until this replica built one
    /// since it started, so the first build comes after `every` entries.
    last_rows: Arc<AtomicU64>,
    /// Bytes of commands applied since the newest build or install here
    /// (or since the start); those applied while a build ran count for
    /// the next one only if applied after it was saved.
    bytes: Arc<AtomicU64>,
    /// Applied index when a build was last asked for.
    asked_at: Arc<AtomicU64>,
}

impl SnapshotSchedule {
    pub(crate) fn new(every: u64, last_index: u64, request: Arc<dyn Fn() + Send + Sync>) -> Self {
        SnapshotSchedule {
            every,
            request,
            last_index: Arc::new(AtomicU64::new(last_index)),
            last_rows: Arc::default(),
            bytes: Arc::default(),
            asked_at: Arc::default(),
        }
    }

    /// Called after entries up to `applied`, holding `bytes` of commands,
    /// were applied: asks for a build when one is due. A request openraft
    /// dropped (a build was running, or the group was still starting) is
    /// repeated after another eighth of `every` entries.
    pub(crate) fn applied(&self, applied: u64, bytes: u64) {
        let since = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let last = self.last_index.load(Ordering::Relaxed);
        let rows = self.last_rows.load(Ordering::Relaxed);
        let between = if since >= LOG_BYTES {
            self.every
        } else {
            entries_between(self.every, rows)
        };
        if applied < last.saturating_add(between) {
            return;
        }
        let asked = self.asked_at.load(Ordering::Relaxed);
        if asked > last && applied < asked.saturating_add((self.every / 8).max(1)) {
            return;
        }
        self.asked_at.store(applied, Ordering::Relaxed);
        (self.request)();
    }

    /// A build saved a snapshot at `index`, having copied `rows` rows (None:
    /// it reused the copy of the snapshot saved at the same index).
    pub(crate) fn built(&self, index: u64, rows: Option<u64>) {
        self.last_index.fetch_max(index, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        if let Some(rows) = rows {
            self.last_rows.store(rows, Ordering::Relaxed);
        }
    }

    /// A snapshot at `index` was installed from the leader.
    pub(crate) fn installed(&self, index: u64) {
        self.last_index.fetch_max(index, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn counted(every: u64, last_index: u64) -> (SnapshotSchedule, Arc<AtomicUsize>) {
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let schedule = SnapshotSchedule::new(
            every,
            last_index,
            Arc::new(move || {
                counter.fetch_add(1, Ordering::Relaxed);
            }),
        );
        (schedule, asked)
    }

    #[test]
    fn a_build_waits_for_every_entries_or_half_the_rows_it_last_copied() {
        assert_eq!(entries_between(20_000, 0), 20_000);
        assert_eq!(entries_between(20_000, 39_999), 20_000);
        assert_eq!(entries_between(20_000, 200_000), 100_000);
    }

    #[test]
    fn apply_asks_when_due_and_again_only_after_an_eighth_of_every() {
        let (schedule, asked) = counted(800, 1_000);
        schedule.applied(1_799, 0);
        assert_eq!(asked.load(Ordering::Relaxed), 0);
        schedule.applied(1_800, 0);
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        // Not built yet: not asked again at once ...
        schedule.applied(1_899, 0);
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        // ... but after another 100 entries.
        schedule.applied(1_900, 0);
        assert_eq!(asked.load(Ordering::Relaxed), 2);

        // A build at 1,900 that copied 10,000 rows: the next after 5,000.
        schedule.built(1_900, Some(10_000));
        schedule.applied(6_899, 0);
        assert_eq!(asked.load(Ordering::Relaxed), 2);
        schedule.applied(6_900, 0);
        assert_eq!(asked.load(Ordering::Relaxed), 3);

        // An install moves the base; an older build does not move it back.
        schedule.installed(10_000);
        schedule.built(7_000, None);
        schedule.applied(14_999, 0);
        assert_eq!(asked.load(Ordering::Relaxed), 3);
        schedule.applied(15_000, 0);
        assert_eq!(asked.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn many_bytes_of_commands_make_a_build_due_after_every_entries() {
        let (schedule, asked) = counted(800, 1_000);
        schedule.built(1_000, Some(1_000_000));
        schedule.applied(1_799, LOG_BYTES);
        assert_eq!(asked.load(Ordering::Relaxed), 0);
        schedule.applied(1_800, 0);
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        // A build starts the count again.
        schedule.built(1_800, Some(1_000_000));
        schedule.applied(2_600, LOG_BYTES - 1);
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        schedule.applied(2_601, 1);
        assert_eq!(asked.load(Ordering::Relaxed), 2);
    }
}
