//! The router as a generic leader client: commands and queries of any group
//! kind, in the kind's own bytes, at the group's current leader, and the
//! life cycle of groups of registered kinds (created from the map, started
//! by every assigned node's reconciler).

use std::collections::BTreeSet;
use std::time::Duration;

use kinesin_meta::{place_replicas, MetaCommand, MetaState};
use kinesin_proto::v1 as pb;
use kinesin_storage::data_version::DATA_VERSION;
use kinesin_types::{GroupId, NodeId};

use crate::error::RouterError;
use crate::router::{Router, Target};

/// Whether a command may be sent again after an attempt whose outcome is
/// unknown (a timeout, a leader lost after accepting it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Only a refusal before proposing (not the leader, no leader yet) is
    /// retried; anything else reaches the caller as
    /// [`RouterError::Indeterminate`]. For commands that must not apply
    /// twice.
    BeforeProposing,
    /// Applying the command twice is harmless: retry on any failure.
    Always,
}

/// Longest [`Router::create_group`] waits for the new group's leader.
const CREATE_WAIT: Duration = Duration::from_secs(10);
/// Longest [`Router::create_group`] waits to hear every node's data version.
const VERSIONS_WAIT: Duration = Duration::from_secs(5);

impl Router {
    /// Proposes `command` to `group` at its leader; returns the state
    /// machine's reply once the command is committed and applied there.
    pub async fn propose(
        &self,
        group: GroupId,
        command: Vec<u8>,
        retry: Retry,
    ) -> Result<Vec<u8>, RouterError> {
        self.check_proposable(group)?;
        let candidates = self.group_replicas(group)?;
        self.at_leader(group, &candidates, retry == Retry::Always, |target| {
            let command = command.clone();
            async move {
                match target {
                    Target::Local => Ok(self.host().propose(group, command).await?),
                    Target::Remote(mut c) => Ok(c
                        .group_propose(pb::GroupProposeRequest {
                            group: group.0,
                            command: command.into(),
                        })
                        .await?
                        .into_inner()
                        .reply
                        .to_vec()),
                }
            }
        })
        .await
    }

    /// Refuses the metadata group and stream shards: their commands are
    /// encoded by this code only (metadata writes, shard appends), which is
    /// what lets a replica that cannot decode one stop rather than skip it.
    pub fn check_proposable(&self, group: GroupId) -> Result<(), RouterError> {
        let own_calls = group.is_meta()
            || matches!(
                self.meta_state().placed_group(group).map(|p| p.owner),
                Some(kinesin_meta::Owner::Shard { .. })
            );
        if own_calls {
            return Err(RouterError::InvalidArgument(format!(
                "group {group} takes commands through its own calls, not as proposals"
            )));
        }
        Ok(())
    }

    /// Answers `query` at the leader of `group`, linearizably: the answer
    /// reflects every command acknowledged before the call.
    pub async fn read(&self, group: GroupId, query: Vec<u8>) -> Result<Vec<u8>, RouterError> {
        let candidates = self.group_replicas(group)?;
        self.at_leader(group, &candidates, true, |target| {
            let query = query.clone();
            async move {
                match target {
                    Target::Local => Ok(self.host().read(group, &query).await?),
                    Target::Remote(mut c) => Ok(c
                        .group_read(pb::GroupReadRequest {
                            group: group.0,
                            query: query.into(),
                        })
                        .await?
                        .into_inner()
                        .reply
                        .to_vec()),
                }
            }
        })
        .await
    }

    /// Does the group have a leader that answers?
    pub async fn group_led(&self, group: GroupId) -> bool {
        self.read(group, Vec::new()).await.is_ok()
    }

    /// Creates a group of a registered kind on `replication` nodes (0: the
    /// default) and waits (bounded) until it has a leader. Returns its id.
    pub async fn create_group(
        &self,
        name: &str,
        kind: &str,
        config: Vec<u8>,
        replication: usize,
    ) -> Result<GroupId, RouterError> {
        // Right after a start the other nodes' versions are not known yet.
        let known = async {
            while self.cluster_data_version() < DATA_VERSION {
                tokio::time::sleep(crate::liveness::PING_EVERY).await;
            }
        };
        let _ = tokio::time::timeout(VERSIONS_WAIT, known).await;
        let state = self.meta_state();
        let wanted = if replication == 0 {
            self.config().default_replication_factor
        } else {
            replication
        };
        let down: BTreeSet<NodeId> = state
            .active_nodes()
            .map(|n| n.id)
            .filter(|n| self.liveness().is_down(*n))
            .collect();
        let mut load = state.replica_load();
        let replicas = place_replicas(&state, name, wanted, &down, &mut load);
        if replicas.is_empty() {
            return Err(RouterError::Unavailable(
                "no active node can hold replicas".into(),
            ));
        }
        self.meta_write(MetaCommand::CreateGroup {
            name: name.to_string(),
            kind: kind.to_string(),
            replicas,
            replication_factor: wanted as u32,
            config,
        })
        .await?;
        let group = self
            .meta_state()
            .groups
            .get(name)
            .map(|spec| spec.group)
            .ok_or_else(|| RouterError::Internal(format!("group {name} vanished")))?;
        let mut changes = self.meta_subscribe();
        let ready = |state: &MetaState| state.groups.get(name).is_none_or(|s| s.ready);
        let _ = tokio::time::timeout(CREATE_WAIT, changes.wait_for(|s| ready(s))).await;
        Ok(group)
    }

    pub async fn delete_group(&self, name: &str) -> Result<(), RouterError> {
        self.meta_write(MetaCommand::DeleteGroup {
            name: name.to_string(),
        })
        .await
    }

    /// Replaces the group's replicas; the reconcilers move the data.
    pub async fn set_group_replicas(
        &self,
        name: &str,
        replicas: Vec<NodeId>,
    ) -> Result<(), RouterError> {
        self.meta_write(MetaCommand::SetGroupReplicas {
            name: name.to_string(),
            replicas,
        })
        .await
    }
}
