//! The data-format version of a node's data directory.
//!
//! One number for a node's directory, written in the node's identity and in
//! the metadata value, the one layout with upgrade steps so far
//! (`kinesin-meta/src/version/`). Shard state, Raft log entries and
//! snapshot headers are still bare postcard without a version of their own:
//! changing one of them needs a version here, an upgrade step next to the
//! code that owns it, and (as they travel between nodes) a plan for mixed
//! versions during a rolling upgrade.
//! A binary opens directories of every version from [`OLDEST_READABLE`] up to
//! [`DATA_VERSION`], upgrades them in place, and refuses newer ones.

/// The version this binary writes.
pub const DATA_VERSION: u32 = 10;

/// The oldest version this binary can upgrade.
pub const OLDEST_READABLE: u32 = 1;

/// What each version changed, oldest first.
pub const HISTORY: [(u32, &str); 10] = [
    (
        1,
        "releases up to 2026-11-30: the metadata value is an unversioned postcard MetaState; the node identity has no data_version",
    ),
    (
        2,
        "the metadata value (stored and in snapshots) is wrapped in a versioned envelope; the node identity records data_version",
    ),
    (
        3,
        "the metadata state ends with `groups`: Raft groups of registered kinds other than stream shards; column families `rows` and `snapshot_copies` (an older release cannot open the directory at all); stream keys of accounts other than the home account are `<account>:<name>`",
    ),
    (
        4,
        "metadata log entries may be `Limited` commands (limits checked where they apply), which a version-3 release cannot decode; stored values and snapshots keep the version-3 layout",
    ),
    (
        5,
        "metadata log entries may be `RemoveSealedShard` commands (a sealed shard past retention leaves the map), which a version-4 release cannot decode; stored values and snapshots keep the version-3 layout",
    ),
    (
        6,
        "the row copies of a queue group's snapshots (`snapshot_copies`) leave the message bodies out, which a snapshot sends from the live rows; a version-5 release would send such a snapshot without bodies, so it must not open the directory. Nothing on the wire changes: versions 5 and 6 run side by side",
    ),
    (
        7,
        "the metadata state ends with `token_key`, the cluster's key for signing iterators and paging tokens, set by a `SetTokenKey` command (at bootstrap, or once every node runs version 7); a version-6 release can decode neither",
    ),
    (
        8,
        "metadata log entries may be `LimitedReshard` commands (a reshard whose closed shards are counted against the shard limit where it applies), which a version-7 release cannot decode; stored values and snapshots keep the version-7 layout",
    ),
    (
        9,
        "queue log entries may be `Expire` commands (a standard queue drops the messages past its retention by their first send time, a dead letter moved in behind younger messages included), which a version-8 release cannot decode; stored values and snapshots keep the version-7 layout",
    ),
    (
        10,
        "queue log entries may be `MoveDead` commands (dead letters moved into a dead-letter queue; a FIFO one counts their retention from the move), which a version-9 release cannot decode; stored values and snapshots keep the version-7 layout",
    ),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error(
        "the data was written by a newer Kinesin (data version {found}; this binary reads versions {OLDEST_READABLE} to {DATA_VERSION}): run the newer release"
    )]
    Newer { found: u32 },
    #[error(
        "the data has version {found}, older than this binary can upgrade ({OLDEST_READABLE} to {DATA_VERSION}): upgrade through an earlier release first"
    )]
    TooOld { found: u32 },
}

/// Whether this binary can read (and upgrade) data of version `found`.
pub fn check_readable(found: u32) -> Result<(), VersionError> {
    if found > DATA_VERSION {
        Err(VersionError::Newer { found })
    } else if found < OLDEST_READABLE {
        Err(VersionError::TooOld { found })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_ends_at_the_current_version() {
        let versions: Vec<u32> = HISTORY.iter().map(|(v, _)| *v).collect();
        let expected: Vec<u32> = (OLDEST_READABLE..=DATA_VERSION).collect();
        assert_eq!(versions, expected);
    }

    #[test]
    fn newer_and_older_versions_are_refused_with_a_reason() {
        assert!(check_readable(1).is_ok());
        assert!(check_readable(DATA_VERSION).is_ok());
        let newer = check_readable(DATA_VERSION + 1).unwrap_err();
        assert!(newer.to_string().contains("newer Kinesin"), "{newer}");
        assert!(matches!(
            check_readable(0),
            Err(VersionError::TooOld { .. })
        ));
    }
}
