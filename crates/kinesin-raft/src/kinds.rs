//! The registry of group kinds: what a node can run when the map places a
//! group of that kind on it. A service with replicated state of its own (a
//! queue, a delivery stream) registers one kind; the reconciler opens each
//! assigned group's state machine through it.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use kinesin_storage::Storage;
use kinesin_types::GroupId;

use crate::state_machine::GroupStateMachine;

/// Opens this node's replica of a group of one kind.
pub trait GroupKind: Send + Sync + 'static {
    /// `config` is the group's configuration from the map, as its creator
    /// wrote it.
    fn open(
        &self,
        storage: Storage,
        group: GroupId,
        config: &[u8],
    ) -> io::Result<Arc<dyn GroupStateMachine>>;
}

/// Group kinds by name.
#[derive(Clone, Default)]
pub struct GroupKinds {
    kinds: BTreeMap<String, Arc<dyn GroupKind>>,
}

impl GroupKinds {
    pub fn register(&mut self, name: &str, kind: Arc<dyn GroupKind>) {
        self.kinds.insert(name.to_string(), kind);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn GroupKind>> {
        self.kinds.get(name)
    }
}
