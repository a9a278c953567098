//! The cluster's token key: the secret with which every node signs (HMAC)
//! the shard iterators and paging tokens it hands out, so that any node
//! accepts another's and none accepts one a client forged or altered. It
//! lives in the map, so it survives restarts and leader changes and reaches
//! new nodes with the map. It is never shown: the JSON form of the map (the
//! CLI's view) says only whether there is one.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of a token key, in bytes.
pub const TOKEN_KEY_LEN: usize = 32;

/// The data version whose releases decode [`crate::MetaCommand::SetTokenKey`]
/// and read a map that holds a token key.
pub const TOKEN_KEY_VERSION: u32 = 7;

/// A token key, or none: a cluster made by a release before
/// [`TOKEN_KEY_VERSION`] has none until its upgrade is complete.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TokenKey(Vec<u8>);

impl TokenKey {
    pub fn new(bytes: [u8; TOKEN_KEY_LEN]) -> Self {
        TokenKey(bytes.to_vec())
    }

    /// The key's bytes; `None` while the cluster has no key.
    pub fn bytes(&self) -> Option<&[u8]> {
        (!self.0.is_empty()).then_some(self.0.as_slice())
    }

    pub(crate) fn has_valid_length(&self) -> bool {
        self.0.len() == TOKEN_KEY_LEN
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = if self.0.is_empty() { "none" } else { "set" };
        write!(f, "TokenKey({shown})")
    }
}

/// Stored and replicated as its bytes; in a human-readable form (JSON) as
/// whether there is a key, never the key.
impl Serialize for TokenKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_bool(!self.0.is_empty())
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for TokenKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            bool::deserialize(deserializer)?;
            Ok(TokenKey::default())
        } else {
            Vec::deserialize(deserializer).map(TokenKey)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_stored_whole_and_never_shown() {
        let key = TokenKey::new([7; TOKEN_KEY_LEN]);
        let stored = postcard::to_stdvec(&key).unwrap();
        assert_eq!(stored.len(), 1 + TOKEN_KEY_LEN);
        assert_eq!(postcard::from_bytes::<TokenKey>(&stored).unwrap(), key);
        assert_eq!(postcard::to_stdvec(&TokenKey::default()).unwrap(), [0]);
        assert_eq!(serde_json::to_string(&key).unwrap(), "true");
        assert_eq!(format!("{key:?}"), "TokenKey(set)");
        let shown: TokenKey = serde_json::from_str("true").unwrap();
        assert_eq!(shown.bytes(), None);
    }
}
