//! The node's wall clock: every timestamp of a node comes from it (arrival
//! times, retention cut-offs, iterator expiry, request signatures, when a
//! replica saw its shard sealed). It lives here, below every state machine,
//! so that all of them read the same clock and the chaos harness's
//! clock-skew fault moves all of them.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How far this process's wall clock is shifted from the system's, in ms.
static CLOCK_SKEW_MS: AtomicI64 = AtomicI64::new(0);

/// Shifts this process's wall clock ([`wall_clock`], [`now_ms`]) by `ms`:
/// the chaos harness's clock-skew fault. Zero is the system clock.
pub fn set_clock_skew_ms(ms: i64) {
    CLOCK_SKEW_MS.store(ms, Ordering::Relaxed);
}

/// The node's wall clock, moved by [`set_clock_skew_ms`].
pub fn wall_clock() -> SystemTime {
    let now = SystemTime::now();
    let skew = CLOCK_SKEW_MS.load(Ordering::Relaxed);
    let by = Duration::from_millis(skew.unsigned_abs());
    if skew >= 0 {
        now + by
    } else {
        now.checked_sub(by).unwrap_or(UNIX_EPOCH)
    }
}

/// Wall-clock milliseconds since the Unix epoch, as leaders stamp commands.
pub fn now_ms() -> u64 {
    wall_clock()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
