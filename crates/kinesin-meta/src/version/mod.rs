//! How the metadata value is encoded, and the upgrade steps from older
//! encodings.
//!
//! A value is `MAGIC | data version (u32, little endian) | postcard of the
//! state`. Version 1 (every release up to 2026-11-30) wrote the bare
//! postcard of the state: it starts with the length of the cluster id as a
//! varint, at most 127 bytes and so below 0x80, never the magic's 0xFF.
//!
//! Each older version has a file here holding that version's types, frozen,
//! and the step that turns them into the next version's; a step that only
//! appends a field needs no frozen types (versions 2 and 3 below). To change the
//! state's layout: copy the current types into `v<N>.rs` with a step to the
//! new layout, bump `kinesin_storage::data_version::DATA_VERSION`, add a
//! line to its history, and make `LATEST_LAYOUT` that version (and
//! `written_version` decide when a map needs it). Stored values and snapshots from any readable
//! version decode; they are written back in the current one.

mod v1;

use kinesin_storage::data_version::{self, VersionError};

use crate::state::MetaState;
use crate::token_key::TOKEN_KEY_VERSION;

const MAGIC: [u8; 4] = [0xFF, b'K', b'M', b'V'];
/// The data version of this value's current layout. Versions between
/// layouts changed other things (4: the metadata log's
/// `MetaCommand::Limited`, 5: its `MetaCommand::RemoveSealedShard`, 6: queue
/// snapshots, 8: `MetaCommand::LimitedReshard`, 9: the queues' `Expire`,
/// 10: their `MoveDead`), so it can be below `DATA_VERSION`.
const LATEST_LAYOUT: u32 = TOKEN_KEY_VERSION;
const HEADER: usize = MAGIC.len() + 4;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error("undecodable metadata value of data version {version}: {source}")]
    Corrupt {
        version: u32,
        source: postcard::Error,
    },
}

/// A decoded value and the data version it was written in.
pub struct Decoded {
    pub state: MetaState,
    pub version: u32,
}

/// The version a state is written in: the oldest that holds it, so that a
/// node of an older release can still read the snapshots a newer one builds
/// during a rolling upgrade, until the map uses what only the newer has.
pub fn written_version(state: &MetaState) -> u32 {
    // Version 3 added groups and stream keys qualified by their account
    // (`<account>:<name>`), which a version-2 node would show to everyone;
    // version 7 the token key.
    let needs_3 = !state.groups.is_empty() || state.streams.keys().any(|k| k.contains(':'));
    if state.token_key.bytes().is_some() {
        LATEST_LAYOUT
    } else if needs_3 {
        3
    } else {
        2
    }
}

pub fn encode(state: &MetaState) -> Vec<u8> {
    let version = written_version(state);
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    postcard::to_io(state, &mut out).expect("encoding to a Vec cannot fail");
    // Each older layout is the next without its last field, empty: one 0
    // byte (see `append_empty`).
    if version < TOKEN_KEY_VERSION {
        let no_key = out.pop();
        debug_assert_eq!(no_key, Some(0));
    }
    if version == 2 {
        let empty_groups = out.pop();
        debug_assert_eq!(empty_groups, Some(0));
    }
    out
}

pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let Some(body) = bytes.strip_prefix(&MAGIC) else {
        let old = postcard::from_bytes::<v1::MetaStateV1>(bytes)
            .map_err(|source| DecodeError::Corrupt { version: 1, source })?;
        return Ok(Decoded {
            state: old.upgrade(),
            version: 1,
        });
    };
    let version = body
        .get(..4)
        .map(|v| u32::from_le_bytes(v.try_into().expect("four bytes")))
        .ok_or(DecodeError::Corrupt {
            version: 0,
            source: postcard::Error::DeserializeUnexpectedEnd,
        })?;
    data_version::check_readable(version)?;
    let body = &bytes[HEADER..];
    let state = match version {
        2 => append_empty(body, 2),
        3..TOKEN_KEY_VERSION => append_empty(body, 1),
        _ => postcard::from_bytes(body),
    }
    .map_err(|source| DecodeError::Corrupt { version, source })?;
    Ok(Decoded { state, version })
}

/// Version 3 appended `groups` to the state, version 7 `token_key`.
/// Postcard writes a struct as its fields one after the other, and an empty
/// map or byte string as its length, a single 0 byte: a version 3 body
/// followed by 0 is the same map in version 7, a version 2 body followed by
/// two.
fn append_empty(body: &[u8], fields: usize) -> Result<MetaState, postcard::Error> {
    let mut upgraded = Vec::with_capacity(body.len() + fields);
    upgraded.extend_from_slice(body);
    upgraded.resize(body.len() + fields, 0);
    postcard::from_bytes(&upgraded)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kinesin_types::{NodeId, StreamMode};

    use kinesin_storage::data_version::DATA_VERSION;

    use super::*;
    use crate::command::{MetaCommand, StreamChange};
    use crate::state::{NodeInfo, NodeState};
    use crate::state_machine::MetaStateMachine;
    use crate::TokenKey;

    fn sample() -> MetaState {
        let mut state = MetaState {
            cluster_id: "kc-0123456789abcdef".into(),
            next_group: 1,
            ..Default::default()
        };
        state.nodes.insert(
            NodeId(1),
            NodeInfo {
                id: NodeId(1),
                raft_addr: "127.0.0.1:7451".into(),
                api_addr: "127.0.0.1:4567".into(),
                zone: "a".into(),
                state: NodeState::Active,
            },
        );
        MetaStateMachine::apply_command(
            &mut state,
            MetaCommand::CreateStream {
                name: "orders".into(),
                shard_count: 2,
                retention_hours: 48,
                max_record_bytes: 1 << 20,
                replication_factor: 1,
                now_ms: 1_764_000_000_000,
                placements: vec![vec![NodeId(1)]; 2],
            },
        )
        .unwrap();
        for change in [
            StreamChange::Mode(StreamMode::OnDemand),
            StreamChange::AddTags(BTreeMap::from([("team".into(), "payments".into())])),
            StreamChange::RegisterConsumer {
                name: "reader".into(),
                now_ms: 5,
            },
        ] {
            MetaStateMachine::apply_command(
                &mut state,
                MetaCommand::UpdateStream {
                    name: "orders".into(),
                    change,
                },
            )
            .unwrap();
        }
        state.applied_index = 42;
        state
    }

    #[test]
    fn a_map_is_written_in_the_oldest_version_that_holds_it() {
        // Without groups: byte for byte what version 2 wrote, so a node of
        // that release reads the snapshots of an upgraded one.
        let state = sample();
        let bytes = encode(&state);
        assert_eq!(hex::encode(&bytes), SAMPLE_V2_HEX);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.version, 2);
        assert_eq!(decoded.state, state);
        // A stream of another account than the home account needs 3.
        let mut qualified = state.clone();
        let orders = qualified.streams["orders"].clone();
        qualified
            .streams
            .insert("210987654321:orders".to_string(), orders);
        let decoded = decode(&encode(&qualified)).unwrap();
        assert_eq!(decoded.version, 3);
        assert_eq!(decoded.state, qualified);
        // A token key needs 7, and survives.
        let mut keyed = qualified.clone();
        keyed.token_key = TokenKey::new([5; crate::TOKEN_KEY_LEN]);
        let decoded = decode(&encode(&keyed)).unwrap();
        assert_eq!(decoded.version, LATEST_LAYOUT);
        assert_eq!(decoded.state, keyed);
    }

    /// `sample()` as the last release before versioning stored it (the bare
    /// postcard of the state, printed by that release's types). The frozen
    /// v1 types must keep reading these bytes.
    const SAMPLE_V1_HEX: &str = concat!(
        "136b632d303132333435363738396162636465660101010e3132372e302e302e",
        "313a373435310e3132372e302e302e313a3435363701610001066f7264657273",
        "066f72646572730080d0dfb4ab3330808040010102000100ffffffffffffffff",
        "ffffffffffffffffffff01000000000101000102808080808080808080808080",
        "80808080808002ffffffffffffffffffffffffffffffffffff03000000000101",
        "000101047465616d087061796d656e7473000000010672656164657205032a",
    );

    #[test]
    fn a_version_1_value_is_upgraded() {
        let legacy = hex::decode(SAMPLE_V1_HEX).unwrap();
        let decoded = decode(&legacy).unwrap();
        assert_eq!(decoded.version, 1);
        assert_eq!(decoded.state, sample());
    }

    /// `sample()` as data version 2 wrote it (envelope and postcard).
    const SAMPLE_V2_HEX: &str = concat!(
        "ff4b4d5602000000136b632d303132333435363738396162636465660101010e",
        "3132372e302e302e313a373435310e3132372e302e302e313a34353637016100",
        "01066f7264657273066f72646572730080d0dfb4ab3330808040010102000100",
        "ffffffffffffffffffffffffffffffffffff0100000000010100010280808080",
        "808080808080808080808080808002ffffffffffffffffffffffffffffffffff",
        "ff03000000000101000101047465616d087061796d656e747300000001067265",
        "616465720503",
        "2a",
    );

    #[test]
    fn a_version_2_value_is_upgraded() {
        let stored = hex::decode(SAMPLE_V2_HEX).unwrap();
        let decoded = decode(&stored).unwrap();
        assert_eq!(decoded.version, 2);
        assert_eq!(decoded.state, sample());
        let mut with_group = sample();
        MetaStateMachine::apply_command(
            &mut with_group,
            MetaCommand::CreateGroup {
                name: "kv/one".into(),
                kind: "kv".into(),
                replicas: vec![NodeId(1)],
                replication_factor: 1,
                config: vec![1, 2],
            },
        )
        .unwrap();
        let again = decode(&encode(&with_group)).unwrap();
        assert_eq!(again.version, 3);
        assert_eq!(again.state, with_group);
    }

    #[test]
    fn a_value_from_a_newer_release_is_refused() {
        let mut bytes = encode(&sample());
        bytes[4..8].copy_from_slice(&(DATA_VERSION + 1).to_le_bytes());
        let err = decode(&bytes).err().expect("refused");
        assert!(matches!(
            err,
            DecodeError::Version(VersionError::Newer { .. })
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&[][..], &[0xFF, b'K', b'M', b'V', 2][..], &[0x13, 1, 2][..]] {
            assert!(decode(bytes).is_err());
        }
    }
}
