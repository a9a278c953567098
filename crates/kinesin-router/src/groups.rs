//! The router as a generic leader client: commands and queries of any group
//! kind, in the kind's own bytes, at the group's current leader, and the
//! life cycle of groups of registered kinds (created from the map, started
//! by every assigned node's reconciler).

use std::collections::BTreeSet;
use std::sync::Weak;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use kinesin_meta::{place_replicas, MetaCommand, MetaState};
use kinesin_proto::v1 as pb;
use kinesin_proto::v1::node_client::NodeClient;
use kinesin_raft::{ForwardError, ForwardHandler};
use kinesin_types::{GroupId, NodeId};
use prost::Message as _;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::error::{RouterError, LEADER_HINT};
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

/// How often a leader waiting for a group to be ready asks again without a
/// change: readiness can also come with time (a message's delay ends).
const READY_RECHECK: Duration = Duration::from_millis(100);

/// Longest wait for a forwarded proposal's answer besides its ready wait;
/// the caller's attempt bound (at most 5 s) usually ends it first.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers proposals forwarded to this node on the Raft pipe, as the unary
/// `GroupPropose` call does. Holds the router weakly: the router owns the
/// Raft host that holds this.
pub(crate) struct ForwardedProposals(pub(crate) Weak<Router>);

impl ForwardHandler for ForwardedProposals {
    fn answer(&self, payload: Bytes) -> BoxFuture<'static, Bytes> {
        let router = self.0.clone();
        Box::pin(async move {
            let outcome = match (router.upgrade(), pb::GroupProposeRequest::decode(payload)) {
                (None, _) => Err(RouterError::Unavailable("the node is stopping".into())),
                (_, Err(e)) => Err(RouterError::InvalidArgument(format!(
                    "a forwarded proposal that does not decode: {e}"
                ))),
                (Some(router), Ok(request)) => router.propose_for_peer(request).await,
            };
            outcome_to_bytes(outcome)
        })
    }
}

fn outcome_to_bytes(outcome: Result<pb::GroupProposeResponse, RouterError>) -> Bytes {
    let outcome = match outcome {
        Ok(response) => pb::GroupProposeOutcome {
            response: Some(response),
            ..Default::default()
        },
        Err(e) => {
            let status = Status::from(e);
            pb::GroupProposeOutcome {
                response: None,
                code: status.code() as i32,
                message: status.message().to_string(),
                leader_hint: status
                    .metadata()
                    .get(LEADER_HINT)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
            }
        }
    };
    outcome.encode_to_vec().into()
}

fn outcome_from_bytes(bytes: &[u8]) -> Result<pb::GroupProposeResponse, RouterError> {
    let outcome = pb::GroupProposeOutcome::decode(bytes)
        .map_err(|e| RouterError::Indeterminate(format!("an answer that does not decode: {e}")))?;
    if let (Code::Ok, Some(response)) = (Code::from(outcome.code), outcome.response) {
        return Ok(response);
    }
    let mut status = Status::new(Code::from(outcome.code), outcome.message);
    if !outcome.leader_hint.is_empty() {
        if let Ok(hint) = outcome.leader_hint.parse() {
            status.metadata_mut().insert(LEADER_HINT, hint);
        }
    }
    Err(RouterError::from(status))
}

/// `bytes` with the clock `now_ms` before them, as stamped commands and
/// queries arrive at a state machine.
pub fn stamp(now_ms: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + bytes.len());
    out.extend_from_slice(&now_ms.to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

/// Longest [`Router::create_group`] waits for the new group's leader.
const CREATE_WAIT: Duration = Duration::from_secs(10);
/// Longest [`Router::create_group`] waits to hear every node's data version.
const VERSIONS_WAIT: Duration = Duration::from_secs(5);
/// The data version that introduced groups (`MetaCommand::CreateGroup`).
const GROUPS_VERSION: u32 = 3;

/// The replicas of a new group, the preferred leader first: the node that
/// is already the preferred leader of the fewest groups, so that a queue's
/// partitions (created one after another) lead on different nodes.
fn place_group(
    state: &MetaState,
    name: &str,
    wanted: usize,
    down: &BTreeSet<NodeId>,
) -> Vec<NodeId> {
    let mut load = state.replica_load();
    let replicas = place_replicas(state, name, wanted, down, &mut load);
    if replicas.is_empty() {
        return replicas;
    }
    crate::streams::spread_preferred_leaders(vec![replicas], state.preferred_leads()).swap_remove(0)
}

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
                    Target::Remote(c, node, addr) => {
                        let request = pb::GroupProposeRequest {
                            group: group.0,
                            command: command.into(),
                            ..Default::default()
                        };
                        let r = self
                            .forward_propose(node, &addr, c, request, Duration::ZERO)
                            .await?;
                        Ok(r.reply.to_vec())
                    }
                }
            }
        })
        .await
    }

    /// Proposes `command` to `group` with the leader's clock before it (8
    /// bytes, big-endian ms: see [`stamp`]), so that a kind whose state
    /// follows time reads it from one clock.
    pub async fn propose_stamped(
        &self,
        group: GroupId,
        command: Vec<u8>,
        retry: Retry,
    ) -> Result<Vec<u8>, RouterError> {
        self.propose_at_leader(group, command, retry, None)
            .await?
            .ok_or_else(|| {
                RouterError::Internal(format!("{group}: a proposal without a wait was not made"))
            })
    }

    /// [`Router::propose_stamped`], made only once `ready` (stamped the same
    /// way) answers non-empty from the leader's applied state, woken by the
    /// group's change counter; `Ok(None)` if it did not within `wait`. The
    /// wait must stay under a few seconds (one attempt's bound); callers
    /// wait longer in rounds.
    pub async fn propose_when_ready(
        &self,
        group: GroupId,
        command: Vec<u8>,
        retry: Retry,
        ready: Vec<u8>,
        wait: Duration,
    ) -> Result<Option<Vec<u8>>, RouterError> {
        self.propose_at_leader(group, command, retry, Some((ready, wait)))
            .await
    }

    async fn propose_at_leader(
        &self,
        group: GroupId,
        command: Vec<u8>,
        retry: Retry,
        ready: Option<(Vec<u8>, Duration)>,
    ) -> Result<Option<Vec<u8>>, RouterError> {
        self.check_proposable(group)?;
        let candidates = self.group_replicas(group)?;
        let (command, ready) = (&command, &ready);
        self.at_leader(
            group,
            &candidates,
            retry == Retry::Always,
            |target| async move {
                let ready_ref = ready.as_ref().map(|(q, wait)| (&q[..], *wait));
                match target {
                    Target::Local => self.propose_here(group, command, true, ready_ref).await,
                    Target::Remote(c, node, addr) => {
                        let wait = ready.as_ref().map_or(Duration::ZERO, |(_, w)| *w);
                        let request = pb::GroupProposeRequest {
                            group: group.0,
                            command: command.clone().into(),
                            stamp: true,
                            ready_query: ready
                                .as_ref()
                                .map(|(q, _)| q.clone())
                                .unwrap_or_default()
                                .into(),
                            wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
                        };
                        let r = self.forward_propose(node, &addr, c, request, wait).await?;
                        Ok((!r.waited_out).then(|| r.reply.to_vec()))
                    }
                }
            },
        )
        .await
    }

    /// Sends a proposal to `node` on the Raft pipe to it, where frames
    /// carry the messages of many requests at once (a unary call costs a
    /// stream of its own, each way); the unary call `c` if `node` predates
    /// that. `wait` is the proposal's ready wait, on top of the attempt's
    /// own bound.
    async fn forward_propose(
        &self,
        node: NodeId,
        addr: &str,
        mut c: NodeClient<Channel>,
        request: pb::GroupProposeRequest,
        wait: Duration,
    ) -> Result<pb::GroupProposeResponse, RouterError> {
        let payload = request.encode_to_vec().into();
        let sent = self
            .host()
            .forward(
                node,
                addr,
                GroupId(request.group),
                payload,
                wait + FORWARD_TIMEOUT,
            )
            .await;
        match sent {
            Ok(answer) => outcome_from_bytes(&answer),
            Err(ForwardError::NotUnderstood(_)) => Ok(c.group_propose(request).await?.into_inner()),
            Err(ForwardError::NotSent(m)) => Err(RouterError::Unavailable(m)),
            Err(ForwardError::Lost(m)) => Err(RouterError::Indeterminate(m)),
        }
    }

    /// The leader's half of a proposal from another node, forwarded on the
    /// Raft pipe or made as a unary call.
    pub(crate) async fn propose_for_peer(
        &self,
        r: pb::GroupProposeRequest,
    ) -> Result<pb::GroupProposeResponse, RouterError> {
        let group = GroupId(r.group);
        self.check_proposable(group)?;
        let ready = (!r.ready_query.is_empty())
            .then(|| (&r.ready_query[..], Duration::from_millis(r.wait_ms.into())));
        let reply = self.propose_here(group, &r.command, r.stamp, ready).await?;
        Ok(pb::GroupProposeResponse {
            waited_out: reply.is_none(),
            reply: reply.unwrap_or_default().into(),
        })
    }

    /// The leader's half of [`Router::propose_stamped`] and
    /// [`Router::propose_when_ready`] (and of a plain proposal, unstamped
    /// and without `ready`).
    pub(crate) async fn propose_here(
        &self,
        group: GroupId,
        command: &[u8],
        stamp_it: bool,
        ready: Option<(&[u8], Duration)>,
    ) -> Result<Option<Vec<u8>>, RouterError> {
        let with_clock = |bytes: &[u8]| {
            if stamp_it {
                stamp(crate::now_ms(), bytes)
            } else {
                bytes.to_vec()
            }
        };
        if let Some((query, wait)) = ready {
            self.check_leader(group)?;
            let deadline = Instant::now() + wait;
            let mut changes = self.host().changes(group);
            loop {
                if !self
                    .host()
                    .local_query(group, &with_clock(query))?
                    .is_empty()
                {
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                let tick = tokio::time::sleep(left.min(READY_RECHECK));
                match changes.as_mut() {
                    Some(c) => {
                        tokio::select! {
                            _ = c.changed() => {}
                            _ = tick => {}
                        }
                    }
                    None => tick.await,
                }
                self.check_leader(group)?;
            }
        }
        Ok(Some(self.host().propose(group, with_clock(command)).await?))
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
                    Target::Remote(mut c, ..) => Ok(c
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
            while self.cluster_data_version() < GROUPS_VERSION {
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
        let replicas = place_group(&state, name, wanted, &down);
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
        // Written through another node's leader, the group shows here once
        // this replica applies the entry. `meta_write` waits 5 s for that;
        // once, with a node down, it was not enough (a compat degraded run
        // got "group … vanished", a 500 no client retries).
        let mut changes = self.meta_subscribe();
        let group = tokio::time::timeout(
            CREATE_WAIT,
            changes.wait_for(|s| s.groups.contains_key(name)),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|state| state.groups.get(name).map(|spec| spec.group))
        .ok_or_else(|| {
            RouterError::Unavailable(format!("group {name} is not known on this node yet"))
        })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use kinesin_meta::{GroupSpec, NodeInfo, NodeState};
    use std::collections::BTreeMap;

    /// A forwarded proposal's outcome reaches the forwarding node as the
    /// unary call's would: the response, or the same error with its leader
    /// hint (a follower's retry follows it).
    #[test]
    fn a_forwarded_outcome_decodes_to_what_the_unary_call_gives() {
        let response = pb::GroupProposeResponse {
            reply: Bytes::from_static(b"handles"),
            waited_out: false,
        };
        assert_eq!(
            outcome_from_bytes(&outcome_to_bytes(Ok(response.clone()))),
            Ok(response)
        );
        let waited_out = pb::GroupProposeResponse {
            reply: Bytes::new(),
            waited_out: true,
        };
        assert_eq!(
            outcome_from_bytes(&outcome_to_bytes(Ok(waited_out.clone()))),
            Ok(waited_out)
        );
        for e in [
            RouterError::NotLeader(Some(NodeId(3))),
            RouterError::NotLeader(None),
            RouterError::ResourceNotFound("no queue q".into()),
            RouterError::InvalidArgument("bad".into()),
            RouterError::Indeterminate("leader lost".into()),
            RouterError::Unavailable("no leader".into()),
            RouterError::Internal("oops".into()),
        ] {
            let unary = RouterError::from(Status::from(e.clone()));
            assert_eq!(outcome_from_bytes(&outcome_to_bytes(Err(e))), Err(unary));
        }
        assert!(matches!(
            outcome_from_bytes(b"\xff\xff"),
            Err(RouterError::Indeterminate(_))
        ));
    }

    #[test]
    fn groups_created_one_after_another_lead_on_every_node_in_turn() {
        let mut state = MetaState::default();
        for id in 1..=3 {
            state.nodes.insert(
                NodeId(id),
                NodeInfo {
                    id: NodeId(id),
                    raft_addr: String::new(),
                    api_addr: String::new(),
                    zone: String::new(),
                    state: NodeState::Active,
                },
            );
        }
        let mut firsts = Vec::new();
        for (k, name) in ["q", "q#1", "q#2", "r", "r#1", "r#2"]
            .into_iter()
            .enumerate()
        {
            let replicas = place_group(&state, name, 3, &BTreeSet::new());
            assert_eq!(replicas.iter().collect::<BTreeSet<_>>().len(), 3);
            firsts.push(replicas[0]);
            let spec = GroupSpec {
                group: GroupId(100 + k as u64),
                kind: "queue".into(),
                replicas,
                replication_factor: 3,
                config: Vec::new(),
                ready: true,
            };
            state.groups.insert(name.to_string(), spec);
        }
        for partitions in firsts.chunks(3) {
            let nodes: BTreeSet<_> = partitions.iter().collect();
            assert_eq!(
                nodes.len(),
                3,
                "two partitions lead on one node: {firsts:?}"
            );
        }
        let leads: BTreeMap<NodeId, usize> = state.preferred_leads();
        assert!(leads.values().all(|&n| n == 2), "{leads:?}");
    }
}
