//! The multi-Raft host: every group replica on this node, the shared peer
//! connections, and the gRPC service that receives Raft traffic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use kinesin_proto::tls::Dialer;
use kinesin_proto::v1::raft_transport_server::{RaftTransport, RaftTransportServer};
use kinesin_proto::v1::{
    RaftFrame, RaftMessage, RaftMessageKind, SnapshotChunk as WireChunk, SnapshotReply,
};
use kinesin_storage::Storage;
use kinesin_types::{GroupId, NodeId};
use openraft::async_runtime::WatchReceiver;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use openraft::Instant as _;
use openraft::{BasicNode, ChangeMembers, Config, ReadPolicy, ServerState, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::blocking_reads::{BlockingReads, MAX_BLOCKING_READS};
use crate::log_store::{delete_group_log, LogStore, TailBudget, NODE_TAIL_BYTES};
use crate::network::{
    ForwardError, GroupNetwork, PeerPool, SnapshotHeader, TransportFilter, FRAME_BYTES,
    MAX_MESSAGE_BYTES,
};
use crate::state_machine::{
    clear_staging, delete_group_state, resume_install, stage_chunk, GroupSnapshot,
    GroupStateMachine, OnFullDisk, SnapshotChunk, SnapshotRows, SnapshotSource, StateMachineStore,
};
use crate::types::{decode, encode, Command, Raft, Snapshot, TypeConfig};

/// Timer settings of one kind of group.
#[derive(Debug, Clone)]
pub struct TimingProfile {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot (and let the log be purged) after this many entries.
    pub snapshot_every: u64,
    /// Entries kept in the log below the snapshot, for slow followers.
    pub keep_below_snapshot: u64,
}

impl TimingProfile {
    /// The metadata group: few of them, so quick failure detection is cheap.
    pub fn meta() -> Self {
        TimingProfile {
            heartbeat_ms: 150,
            election_min_ms: 1000,
            election_max_ms: 2000,
            snapshot_every: 1000,
            keep_below_snapshot: 200,
        }
    }

    /// Shard groups: thousands per node, so heartbeats are slower.
    pub fn shard() -> Self {
        TimingProfile {
            heartbeat_ms: 500,
            election_min_ms: 2500,
            election_max_ms: 5000,
            snapshot_every: 20_000,
            keep_below_snapshot: 2_000,
        }
    }

    /// `scheduled`: the group's state machine asks for its snapshots
    /// itself ([`crate::snapshot_schedule`]).
    fn config(&self, group: GroupId, scheduled: bool) -> io::Result<Config> {
        let config = Config {
            cluster_name: format!("kinesin-{group}"),
            heartbeat_interval: self.heartbeat_ms,
            // Successful appends under load stand in for heartbeats.
            heartbeat_min_interval: Some(self.heartbeat_ms / 2),
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            install_snapshot_timeout: 60_000,
            max_payload_entries: 256,
            snapshot_policy: if scheduled {
                SnapshotPolicy::Never
            } else {
                SnapshotPolicy::LogsSinceLast(self.snapshot_every)
            },
            max_in_snapshot_log_to_keep: self.keep_below_snapshot,
            purge_batch_size: self.snapshot_every.clamp(1, 256),
            enable_pre_vote: Some(true),
            // A restarted leader must not resume its term: it sends entries
            // to followers before its own fsync, so a crash can remove from
            // its log an entry a follower already holds, and in the same
            // term it would write another entry under that log id. Found by
            // the chaos power-fail run (replicas diverged).
            enable_leader_restore: Some(false),
            ..Default::default()
        };
        config.validate().map_err(io::Error::other)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RaftHostError {
    #[error("group {0} has no replica on this node")]
    NoSuchGroup(GroupId),
    #[error("this node is not the leader of {group}")]
    NotLeader {
        group: GroupId,
        leader: Option<NodeId>,
    },
    #[error("raft group {group}: {detail}")]
    Raft { group: GroupId, detail: String },
    /// The proposal may have been appended and may still be committed (its
    /// entry was discarded by a leader change, or the group failed while
    /// waiting for it).
    #[error("raft group {group}: the proposal's outcome is unknown")]
    OutcomeUnknown { group: GroupId },
    #[error("storage: {0}")]
    Io(#[from] io::Error),
    /// This node's disk is full: it takes no new writes until space is
    /// freed (its leaders hand their groups to other replicas meanwhile).
    #[error("node {node}: the disk of its data directory is full; writes are refused until space is freed")]
    DiskFull { node: NodeId },
    /// The state machine refused a command before it was proposed.
    #[error("group {group}: {detail}")]
    Refused { group: GroupId, detail: String },
    /// The state machine refused a read query.
    #[error("group {group}: {detail}")]
    Query { group: GroupId, detail: String },
}

/// Role and progress of one local replica.
#[derive(Debug, Clone)]
pub struct GroupStatus {
    pub group: GroupId,
    pub role: Role,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    /// Highest log index removed from the log (covered by a snapshot).
    pub purged_index: Option<u64>,
    /// Log index of this replica's newest snapshot.
    pub snapshot_index: Option<u64>,
    pub voters: BTreeSet<NodeId>,
    /// A membership change is under way (joint consensus): a quorum needs a
    /// majority of the old voters and of the new ones.
    pub joint: bool,
    pub learners: BTreeSet<NodeId>,
    /// Raft address of every member, as the group's membership records it.
    pub addresses: BTreeMap<NodeId, String>,
    /// On a leader: milliseconds since each follower last acknowledged it
    /// (`None`: never).
    pub follower_ack_age_ms: BTreeMap<NodeId, Option<u64>>,
    /// On a leader: highest log index known to be on each follower.
    pub follower_matched: BTreeMap<NodeId, u64>,
}

/// A replica's part in its group right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

impl Role {
    /// The name in admin output, metrics labels and the gRPC API.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        }
    }
}

#[derive(Clone)]
struct Group {
    raft: Raft,
    /// Held from the first staged chunk of a received snapshot until its
    /// install finished: a second transfer must not clear the staging rows
    /// an install is still moving.
    receiving: Arc<tokio::sync::Mutex<()>>,
    /// The state machine's install lock (`StateMachineStore::install_lock`).
    installing: Arc<tokio::sync::Mutex<()>>,
    /// For [`RaftHost::read`].
    state_machine: Arc<dyn GroupStateMachine>,
}

struct HostInner {
    node_id: NodeId,
    storage: Storage,
    pool: Arc<PeerPool>,
    groups: RwLock<HashMap<GroupId, Group>>,
    /// Set on shutdown: open Raft streams from peers end, releasing storage,
    /// and new ones are refused as unavailable (their forwards unsent).
    closed: tokio::sync::watch::Sender<bool>,
    reads: BlockingReads,
    /// What the groups' logs keep of their newest entries in memory.
    tail_budget: Arc<TailBudget>,
    /// Answers proposals other nodes forward on the pipe; set once.
    forwards: OnceLock<Arc<dyn ForwardHandler>>,
}

/// Answers a proposal another node forwarded to this one on the Raft pipe
/// ([`RaftHost::forward`]): the payload is the other node's, and so is the
/// answer's form. The router sets it; the pipe only carries the bytes.
pub trait ForwardHandler: Send + Sync + 'static {
    fn answer(&self, payload: Bytes) -> BoxFuture<'static, Bytes>;
}

/// How long a node's shutdown waits for its Raft groups to stop.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// All Raft groups of this node. Cheap to clone.
#[derive(Clone)]
pub struct RaftHost {
    inner: Arc<HostInner>,
}

impl RaftHost {
    /// `dialer` says how peers are reached (plaintext or mutual TLS); the
    /// router's clients reach other nodes the same way.
    pub fn new(
        node_id: NodeId,
        storage: Storage,
        filter: Arc<dyn TransportFilter>,
        dialer: Dialer,
    ) -> Self {
        RaftHost {
            inner: Arc::new(HostInner {
                node_id,
                storage,
                pool: Arc::new(PeerPool::new(node_id.0, filter, dialer)),
                groups: RwLock::default(),
                closed: tokio::sync::watch::channel(false).0,
                reads: BlockingReads::new(MAX_BLOCKING_READS),
                tail_budget: TailBudget::new(NODE_TAIL_BYTES),
                forwards: OnceLock::new(),
            }),
        }
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// Where this node's RocksDB reads for requests run (shard scans here
    /// and in the router), bounded together.
    pub fn blocking_reads(&self) -> &BlockingReads {
        &self.inner.reads
    }

    /// Bytes of newest log entries the groups keep in memory together
    /// (at most [`NODE_TAIL_BYTES`]).
    pub fn log_tail_bytes(&self) -> usize {
        self.inner.tail_budget.used()
    }

    /// Who answers proposals forwarded to this node; only the first call
    /// takes effect.
    pub fn set_forward_handler(&self, handler: Arc<dyn ForwardHandler>) {
        let _ = self.inner.forwards.set(handler);
    }

    /// Forwards `payload` for `group` to node `target` (reached at `addr`)
    /// on the Raft pipe to it, batched with the Raft traffic of every
    /// group, and waits up to `timeout` for its handler's answer.
    pub async fn forward(
        &self,
        target: NodeId,
        addr: &str,
        group: GroupId,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, ForwardError> {
        self.inner
            .pool
            .forward(target.0, addr, group.0, payload, timeout)
            .await
    }

    /// This node's storage, shared by all its groups.
    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    /// How this node dials other nodes' internal port.
    pub fn dialer(&self) -> &Dialer {
        self.inner.pool.dialer()
    }

    /// The gRPC service that receives Raft traffic for every local group.
    pub fn service(&self) -> RaftTransportServer<RaftService> {
        RaftTransportServer::new(RaftService { host: self.clone() })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn group(&self, group: GroupId) -> Result<Group, RaftHostError> {
        self.inner
            .groups
            .read()
            .expect("groups lock")
            .get(&group)
            .cloned()
            .ok_or(RaftHostError::NoSuchGroup(group))
    }

    pub fn has_group(&self, group: GroupId) -> bool {
        self.inner
            .groups
            .read()
            .expect("groups lock")
            .contains_key(&group)
    }

    pub fn group_ids(&self) -> Vec<GroupId> {
        let mut ids: Vec<_> = self
            .inner
            .groups
            .read()
            .expect("groups lock")
            .keys()
            .copied()
            .collect();
        ids.sort();
        ids
    }

    /// Starts (or restarts from storage) this node's replica of `group`.
    pub async fn start_group(
        &self,
        group: GroupId,
        state_machine: Arc<dyn GroupStateMachine>,
        timing: &TimingProfile,
    ) -> Result<(), RaftHostError> {
        if self.has_group(group) {
            return Ok(());
        }
        let storage = self.inner.storage.clone();
        let resumed = {
            let (storage, rows) = (storage.clone(), state_machine.snapshot_rows());
            tokio::task::spawn_blocking(move || resume_install(&storage, group.0, rows))
                .await
                .map_err(|e| raft_err(group, e))??
        };
        if resumed {
            tracing::info!(%group, "finished a snapshot install interrupted by a restart");
            state_machine.reload()?;
        }
        let log = LogStore::open(storage.clone(), group.0, self.inner.tail_budget.clone())?;
        let mut sm = StateMachineStore::new(storage, group.0, state_machine.clone());
        // Builds that copy rows come on a schedule of their own.
        let scheduled = matches!(state_machine.snapshot_rows(), SnapshotRows::Mutable { .. });
        if scheduled {
            sm = sm.scheduled(timing.snapshot_every, self.snapshot_request(group))?;
        }
        let installing = sm.install_lock();
        let network = GroupNetwork {
            group: group.0,
            pool: self.inner.pool.clone(),
        };
        let config = Arc::new(timing.config(group, scheduled)?);
        let raft = Raft::new(self.inner.node_id.0, config, network, log, sm)
            .await
            .map_err(|e| raft_err(group, e))?;
        // Another caller may have started the group meanwhile: keep theirs.
        let raced = {
            let mut groups = self.inner.groups.write().expect("groups lock");
            if let std::collections::hash_map::Entry::Vacant(e) = groups.entry(group) {
                e.insert(Group {
                    raft,
                    receiving: Arc::default(),
                    installing,
                    state_machine,
                });
                None
            } else {
                Some(raft)
            }
        };
        if let Some(raft) = raced {
            let _ = raft.shutdown().await;
        }
        Ok(())
    }

    /// Asks the group's replica here to build a snapshot. Holds the host
    /// weakly: the replica's state machine keeps it.
    fn snapshot_request(&self, group: GroupId) -> Arc<dyn Fn() + Send + Sync> {
        let host = Arc::downgrade(&self.inner);
        Arc::new(move || {
            let raft = host.upgrade().and_then(|h| {
                let groups = h.groups.read().expect("groups lock");
                groups.get(&group).map(|g| g.raft.clone())
            });
            if let Some(raft) = raft {
                tokio::spawn(async move {
                    // Fails only once the group has stopped.
                    let _ = raft.trigger().snapshot().await;
                });
            }
        })
    }

    /// Stops the local replica; with `delete_data` its log and state go too.
    pub async fn stop_group(&self, group: GroupId, delete_data: bool) -> Result<(), RaftHostError> {
        let removed = self
            .inner
            .groups
            .write()
            .expect("groups lock")
            .remove(&group);
        if let Some(g) = removed {
            let _ = g.raft.shutdown().await;
            // openraft does not wait for its state-machine task: an install
            // still moving rows would leave them behind a delete, or race a
            // new replica of the group.
            let _installed = g.installing.lock().await;
        }
        if delete_data {
            // Two synced range deletes: off the async workers.
            let storage = self.inner.storage.clone();
            tokio::task::spawn_blocking(move || {
                delete_group_log(&storage, group.0)?;
                delete_group_state(&storage, group.0)
            })
            .await
            .map_err(|e| raft_err(group, e))??;
        }
        Ok(())
    }

    /// Stops every group (node shutdown).
    pub async fn shutdown(&self) {
        self.inner.closed.send_replace(true);
        let groups: Vec<_> = self
            .inner
            .groups
            .write()
            .expect("groups lock")
            .drain()
            .collect();
        // A replica whose write waits for disk space does not stop until
        // there is some: a node stopping on a full disk leaves those behind
        // (what they were writing was never acknowledged).
        let stops = futures::future::join_all(groups.iter().map(|(_, g)| g.raft.shutdown()));
        if tokio::time::timeout(SHUTDOWN_WAIT, stops).await.is_err() {
            tracing::warn!(
                "some Raft groups did not stop within {SHUTDOWN_WAIT:?}: their writes wait for disk space"
            );
        }
    }

    /// Makes the group's first membership. Succeeds if it already has one.
    pub async fn initialize(
        &self,
        group: GroupId,
        members: BTreeMap<NodeId, String>,
    ) -> Result<(), RaftHostError> {
        let g = self.group(group)?;
        if g.raft
            .is_initialized()
            .await
            .map_err(|e| raft_err(group, e))?
        {
            return Ok(());
        }
        let members: BTreeMap<u64, BasicNode> = members
            .into_iter()
            .map(|(id, addr)| (id.0, BasicNode::new(addr)))
            .collect();
        match g.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(e) if e.api_error().is_some() => Ok(()),
            Err(e) => Err(raft_err(group, e)),
        }
    }

    /// Proposes a command and waits until it is committed and applied here.
    /// Refused at once while this node's disk is full: the entry could not
    /// be appended here, and waiting for the disk would hold the caller.
    pub async fn propose(
        &self,
        group: GroupId,
        command: Vec<u8>,
    ) -> Result<Vec<u8>, RaftHostError> {
        let g = self.group(group)?;
        if self.disk_full() {
            return Err(RaftHostError::DiskFull {
                node: self.inner.node_id,
            });
        }
        g.state_machine
            .check_command(&command)
            .map_err(|detail| RaftHostError::Refused { group, detail })?;
        match g.raft.client_write(Command(command)).await {
            Ok(resp) => g
                .state_machine
                .complete(resp.data.0)
                .map_err(|detail| RaftHostError::Query { group, detail }),
            // Only a proposal refused before it was appended is known not to
            // have happened; any other failure (entry discarded, the group
            // stopping while waiting, a fatal error) leaves it unknown.
            Err(openraft::error::RaftError::APIError(
                openraft::error::ClientWriteError::ForwardToLeader(f),
            )) => Err(RaftHostError::NotLeader {
                group,
                leader: f.leader_id.map(NodeId),
            }),
            Err(_) => Err(RaftHostError::OutcomeUnknown { group }),
        }
    }

    /// Answers `query` from the state machine once this replica is known to
    /// lead (a read index confirmed by a quorum) and has applied everything
    /// committed before the call: a linearizable read. An empty query only
    /// confirms leadership.
    pub async fn read(&self, group: GroupId, query: &[u8]) -> Result<Vec<u8>, RaftHostError> {
        let g = self.group(group)?;
        match g.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(_) => {}
            Err(e) => {
                return Err(match e.forward_to_leader() {
                    Some(f) => RaftHostError::NotLeader {
                        group,
                        leader: f.leader_id.map(NodeId),
                    },
                    None => raft_err(group, e),
                })
            }
        }
        if query.is_empty() {
            return Ok(Vec::new());
        }
        // A query may read rows from RocksDB (a dead-letter listing reads
        // message bodies): on a blocking thread, not a runtime worker.
        let state_machine = g.state_machine.clone();
        let query = query.to_vec();
        // A query that panicked or was cancelled is this node's failure,
        // not a refusal of the caller's request.
        self.inner
            .reads
            .run(move || state_machine.query(&query))
            .await
            .map_err(|e| io::Error::other(format!("group {group}: {e}")))?
            .map_err(|detail| RaftHostError::Query { group, detail })
    }

    /// Answers `query` from this replica's applied state without asking a
    /// quorum: possibly stale, for hints (is anything there to propose a
    /// command for?) that a linearizable step follows.
    pub fn local_query(&self, group: GroupId, query: &[u8]) -> Result<Vec<u8>, RaftHostError> {
        self.group(group)?
            .state_machine
            .query(query)
            .map_err(|detail| RaftHostError::Query { group, detail })
    }

    /// The group's change counter ([`GroupStateMachine::changes`]).
    pub fn changes(&self, group: GroupId) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.group(group).ok()?.state_machine.changes()
    }

    pub async fn add_learner(
        &self,
        group: GroupId,
        node: NodeId,
        addr: String,
        wait_caught_up: bool,
    ) -> Result<(), RaftHostError> {
        let g = self.group(group)?;
        g.raft
            .add_learner(node.0, BasicNode::new(addr), wait_caught_up)
            .await
            .map(|_| ())
            .map_err(|e| not_leader_or(group, e))
    }

    /// Replaces the voter set (joint consensus inside openraft). Removed
    /// voters stay as learners only if `keep_as_learners`.
    pub async fn change_voters(
        &self,
        group: GroupId,
        voters: BTreeSet<NodeId>,
        keep_as_learners: bool,
    ) -> Result<(), RaftHostError> {
        let g = self.group(group)?;
        let ids: BTreeSet<u64> = voters.into_iter().map(|n| n.0).collect();
        g.raft
            .change_membership(ChangeMembers::ReplaceAllVoters(ids), keep_as_learners)
            .await
            .map(|_| ())
            .map_err(|e| not_leader_or(group, e))
    }

    /// Removes learners that are no longer wanted.
    pub async fn remove_learners(
        &self,
        group: GroupId,
        nodes: BTreeSet<NodeId>,
    ) -> Result<(), RaftHostError> {
        let g = self.group(group)?;
        let ids: BTreeSet<u64> = nodes.into_iter().map(|n| n.0).collect();
        g.raft
            .change_membership(ChangeMembers::RemoveNodes(ids), false)
            .await
            .map(|_| ())
            .map_err(|e| not_leader_or(group, e))
    }

    /// Asks the current leader (this node) to hand leadership to `to`.
    pub async fn transfer_leader(&self, group: GroupId, to: NodeId) -> Result<(), RaftHostError> {
        let g = self.group(group)?;
        g.raft
            .trigger()
            .transfer_leader(to.0)
            .await
            .map_err(|e| raft_err(group, e))
    }

    /// `dead` led this group and its node is known to be down: stop waiting
    /// out its leader lease. A follower normally refuses to vote for
    /// `election_max_ms` after the last heartbeat and then waits its own
    /// election timeout (7.5–10 s with the default shard timing); this
    /// voids the lease at once, as a leadership transfer away from `dead`
    /// would, and returns whether it did (false when `dead` is no longer
    /// this replica's leader). The caller then calls [`RaftHost::elect`].
    pub async fn forget_dead_leader(
        &self,
        group: GroupId,
        dead: NodeId,
    ) -> Result<bool, RaftHostError> {
        let g = self.group(group)?;
        let m = g.raft.metrics().borrow_watched().clone();
        if m.current_leader != Some(dead.0) || m.state == ServerState::Leader {
            return Ok(false);
        }
        // Addressed to the dead node itself, so nobody here is asked to
        // take over: the request only ends the lease of `dead`'s vote.
        g.raft
            .handle_transfer_leader(TransferLeaderRequest::new(m.vote, dead.0, None))
            .await
            .map_err(|e| raft_err(group, e))?
            .map_err(|e| raft_err(group, e))?;
        Ok(true)
    }

    /// Starts a pre-vote, then an election if a majority would vote for this
    /// replica (its log is up to date and their leases ended). Harmless
    /// when it cannot win: pre-vote does not raise anyone's term.
    pub async fn elect(&self, group: GroupId) -> Result<(), RaftHostError> {
        let g = self.group(group)?;
        g.raft
            .trigger()
            .elect(true)
            .await
            .map_err(|e| raft_err(group, e))
    }

    pub fn status(&self, group: GroupId) -> Option<GroupStatus> {
        let g = self.group(group).ok()?;
        let m = g.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().map(NodeId).collect();
        let addresses: BTreeMap<NodeId, String> = membership
            .nodes()
            .map(|(id, n)| (NodeId(*id), n.addr.clone()))
            .collect();
        let learners = addresses
            .keys()
            .filter(|id| !voters.contains(id))
            .copied()
            .collect();
        Some(GroupStatus {
            group,
            role: match m.state {
                ServerState::Leader => Role::Leader,
                ServerState::Follower => Role::Follower,
                ServerState::Candidate => Role::Candidate,
                ServerState::Learner => Role::Learner,
                ServerState::Shutdown => Role::Shutdown,
            },
            leader: m.current_leader.map(NodeId),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.as_ref().map_or(0, |l| l.index),
            purged_index: m.purged.as_ref().map(|l| l.index),
            snapshot_index: m.snapshot.as_ref().map(|l| l.index),
            voters,
            joint: membership.get_joint_config().len() > 1,
            learners,
            addresses,
            follower_ack_age_ms: m
                .heartbeat
                .as_ref()
                .map(|h| {
                    h.iter()
                        .map(|(id, at)| {
                            (
                                NodeId(*id),
                                at.as_ref().map(|t| t.elapsed().as_millis() as u64),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            follower_matched: m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(id, l)| (NodeId(*id), l.as_ref().map_or(0, |l| l.index)))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// Whether this node's disk is full (RocksDB refuses writes until
    /// space is freed; see `kinesin_storage`). Meanwhile its replicas wait
    /// in their writes, it refuses proposals and Raft traffic from peers
    /// (so that they treat it as down and do not make it leader), and it
    /// is not ready.
    pub fn disk_full(&self) -> bool {
        self.inner.storage.disk_full()
    }

    /// Groups whose replica here has stopped for good (openraft hit an
    /// error it cannot go on from), with the error. Only a restart of the
    /// node brings them back.
    pub fn failed_groups(&self) -> Vec<(GroupId, String)> {
        let groups: Vec<(GroupId, Group)> = self
            .inner
            .groups
            .read()
            .expect("groups lock")
            .iter()
            .map(|(id, g)| (*id, g.clone()))
            .collect();
        groups
            .into_iter()
            .filter_map(|(id, g)| {
                let m = g.raft.metrics().borrow_watched().clone();
                m.running_state.err().map(|e| (id, e.to_string()))
            })
            .collect()
    }

    /// Is this replica the leader of `group`? Read from the Raft metrics
    /// without building a [`GroupStatus`] (which copies them and builds
    /// five maps): every routed request asks.
    pub fn is_leader(&self, group: GroupId) -> bool {
        self.group(group)
            .is_ok_and(|g| g.raft.metrics().borrow_watched().state == ServerState::Leader)
    }

    /// The leader of `group` as this replica knows it, read the same way.
    pub fn leader(&self, group: GroupId) -> Option<NodeId> {
        let g = self.group(group).ok()?;
        let leader = g.raft.metrics().borrow_watched().current_leader;
        leader.map(NodeId)
    }

    /// Waits up to `timeout` until this replica sees `to` as the leader.
    pub async fn wait_for_leader_change(
        &self,
        group: GroupId,
        to: NodeId,
        timeout: Duration,
    ) -> Option<NodeId> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.leader(group) == Some(to) {
                return Some(to);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Waits up to `timeout` for the group to know a leader.
    pub async fn wait_for_leader(&self, group: GroupId, timeout: Duration) -> Option<NodeId> {
        let g = self.group(group).ok()?;
        let mut rx = g.raft.metrics();
        let wait = async {
            loop {
                if let Some(l) = rx.borrow_watched().current_leader {
                    return Some(NodeId(l));
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }

    async fn handle(&self, message: &RaftMessage) -> Result<Vec<u8>, String> {
        let group = GroupId(message.group);
        let g = self.group(group).map_err(|e| e.to_string())?;
        if self.disk_full() {
            return Err(RaftHostError::DiskFull {
                node: self.inner.node_id,
            }
            .to_string());
        }
        let kind = RaftMessageKind::try_from(message.kind)
            .map_err(|_| "unknown message kind".to_string())?;
        let payload = &message.payload[..];
        let fail = |e: &dyn std::fmt::Display| e.to_string();
        match kind {
            RaftMessageKind::Append => {
                let req: AppendEntriesRequest<TypeConfig> =
                    decode("append", payload).map_err(|e| fail(&e))?;
                g.raft
                    .append_entries(req)
                    .await
                    .map(|r| encode(&r))
                    .map_err(|e| fail(&e))
            }
            RaftMessageKind::Vote => {
                let req: VoteRequest<TypeConfig> = decode("vote", payload).map_err(|e| fail(&e))?;
                g.raft
                    .vote(req)
                    .await
                    .map(|r| encode(&r))
                    .map_err(|e| fail(&e))
            }
            RaftMessageKind::PreVote => {
                let req: VoteRequest<TypeConfig> =
                    decode("pre-vote", payload).map_err(|e| fail(&e))?;
                g.raft
                    .pre_vote(req)
                    .await
                    .map(|r| encode(&r))
                    .map_err(|e| fail(&e))
            }
            RaftMessageKind::TransferLeader => {
                let req: TransferLeaderRequest<TypeConfig> =
                    decode("transfer", payload).map_err(|e| fail(&e))?;
                g.raft
                    .handle_transfer_leader(req)
                    .await
                    .map(|r| encode(&r))
                    .map_err(|e| fail(&e))
            }
            _ => Err(format!("unexpected message kind {kind:?}")),
        }
    }

    async fn receive_snapshot(&self, mut chunks: Streaming<WireChunk>) -> Result<Vec<u8>, Status> {
        let first = chunks
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let group = GroupId(first.group);
        let g = self
            .group(group)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if self.disk_full() {
            return Err(Status::unavailable(
                RaftHostError::DiskFull {
                    node: self.inner.node_id,
                }
                .to_string(),
            ));
        }
        let header: SnapshotHeader = decode("snapshot header", &first.header)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Shared with each staging write, which runs on even if this call
        // is dropped: the lock is free only once none is left.
        let receiving = Arc::new(g.receiving.clone().try_lock_owned().map_err(|_| {
            Status::unavailable(format!(
                "a snapshot of group {group} is being received or installed"
            ))
        })?);
        let storage = self.inner.storage.clone();
        clear_staging(&storage, group.0, OnFullDisk::Fail)
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut tally = SnapshotTally::new(first.trailer_follows);
        while let Some(chunk) = chunks.message().await? {
            if chunk.trailer {
                tally
                    .trailer(chunk.rows)
                    .map_err(Status::invalid_argument)?;
                continue;
            }
            let chunk: SnapshotChunk = decode("snapshot chunk", &chunk.data)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            tally.rows(chunk.len()).map_err(Status::invalid_argument)?;
            let (storage, held) = (storage.clone(), receiving.clone());
            tokio::task::spawn_blocking(move || {
                let _held = held;
                stage_chunk(&storage, group.0, chunk, OnFullDisk::Fail)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| match e.kind() {
                // A row the sender should never have sent: a bad tag or a
                // key outside the group.
                io::ErrorKind::InvalidData => Status::invalid_argument(e.to_string()),
                _ => Status::internal(e.to_string()),
            })?;
        }
        tally
            .complete()
            .map_err(|e| Status::aborted(format!("snapshot of group {group}: {e}")))?;
        let snapshot = Snapshot {
            meta: header.meta,
            snapshot: GroupSnapshot {
                state: header.state,
                source: SnapshotSource::Staged,
            },
        };
        // The install goes on (and keeps the staging rows to itself) even
        // if the sender gives up and this call is dropped.
        let (raft, vote) = (g.raft.clone(), header.vote);
        let install = tokio::spawn(async move {
            let _receiving = receiving;
            raft.install_full_snapshot(vote, snapshot).await
        });
        let resp = install
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(e.to_string()))?;
        tracing::info!(%group, rows = tally.rows, "received a whole snapshot from the leader");
        Ok(encode(&resp.vote))
    }
}

/// What a receiver checks before installing a snapshot: a sender that
/// announced a trailer must end with one counting every row it sent (a
/// sender whose read failed ends the stream early and cleanly, and the rows
/// that did arrive must not be installed as the whole group). Senders that
/// predate trailers announce none and are taken as before.
#[derive(Debug)]
struct SnapshotTally {
    trailer_expected: bool,
    rows: u64,
    trailer: Option<u64>,
}

impl SnapshotTally {
    fn new(trailer_expected: bool) -> Self {
        SnapshotTally {
            trailer_expected,
            rows: 0,
            trailer: None,
        }
    }

    fn rows(&mut self, n: usize) -> Result<(), String> {
        if self.trailer.is_some() {
            return Err("rows arrived after the snapshot trailer".into());
        }
        self.rows += n as u64;
        Ok(())
    }

    fn trailer(&mut self, rows: u64) -> Result<(), String> {
        if self.trailer.replace(rows).is_some() {
            return Err("a second snapshot trailer".into());
        }
        Ok(())
    }

    /// Whether the stream that just ended holds the whole snapshot.
    fn complete(&self) -> Result<(), String> {
        match (self.trailer_expected, self.trailer) {
            (_, Some(sent)) if sent != self.rows => Err(format!(
                "the sender counted {sent} rows, {} arrived",
                self.rows
            )),
            (true, None) => Err(format!(
                "the stream ended without its trailer after {} rows: the sender stopped early",
                self.rows
            )),
            _ => Ok(()),
        }
    }
}

fn raft_err(group: GroupId, e: impl std::fmt::Display) -> RaftHostError {
    RaftHostError::Raft {
        group,
        detail: e.to_string(),
    }
}

fn not_leader_or<E>(group: GroupId, e: openraft::error::RaftError<TypeConfig, E>) -> RaftHostError
where
    E: std::error::Error + openraft::TryAsRef<openraft::error::ForwardToLeader<TypeConfig>>,
{
    match e.forward_to_leader() {
        Some(f) => RaftHostError::NotLeader {
            group,
            leader: f.leader_id.map(NodeId),
        },
        None => raft_err(group, e),
    }
}

/// Receives Raft traffic for the host's groups.
pub struct RaftService {
    host: RaftHost,
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<RaftFrame, Status>> + Send>>;

#[tonic::async_trait]
impl RaftTransport for RaftService {
    type PipeStream = FrameStream;

    async fn pipe(
        &self,
        request: Request<Streaming<RaftFrame>>,
    ) -> Result<Response<Self::PipeStream>, Status> {
        // A stream accepted now would end at once with its messages
        // unread, which the sender could only count as lost; refused, they
        // were not sent, and a forward can be tried at another node.
        if *self.host.inner.closed.borrow() {
            return Err(Status::unavailable("this node is shutting down"));
        }
        let mut inbound = request.into_inner();
        let (answers, mut answers_rx) = mpsc::unbounded_channel::<RaftMessage>();
        let (frames, frames_rx) = mpsc::channel::<Result<RaftFrame, Status>>(16);
        let host = self.host.clone();
        let mut closed = self.host.inner.closed.subscribe();
        // This stream's forwards still running, by id. Dropping an entry's
        // sender (a cancel, or the stream's end) drops that work, as a
        // reset HTTP/2 stream drops a unary call's: a long poll whose
        // caller left must not take messages nobody will get.
        let running: Arc<parking_lot::Mutex<HashMap<u64, oneshot::Sender<()>>>> = Arc::default();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    _ = closed.wait_for(|c| *c) => break,
                    frame = inbound.message() => match frame {
                        Ok(Some(frame)) => frame,
                        _ => break,
                    },
                };
                for message in frame.messages {
                    let handler = host.inner.forwards.get().cloned();
                    let kind = message.kind;
                    if handler.is_some() && kind == RaftMessageKind::ForwardCancel as i32 {
                        running.lock().remove(&message.id);
                        continue;
                    }
                    let forward = handler
                        .filter(|_| kind == RaftMessageKind::Forward as i32)
                        .map(|f| {
                            let (stop, stopped) = oneshot::channel();
                            running.lock().insert(message.id, stop);
                            (f, stopped)
                        });
                    let host = host.clone();
                    let answers = answers.clone();
                    let running = running.clone();
                    // Each message runs on its own: a slow vote must not hold
                    // back another group's heartbeat.
                    tokio::spawn(async move {
                        let handled = match forward {
                            Some((f, stopped)) => {
                                let answer = tokio::select! {
                                    answer = f.answer(message.payload) => answer,
                                    _ = stopped => return,
                                };
                                running.lock().remove(&message.id);
                                Ok(answer)
                            }
                            None => host.handle(&message).await.map(Bytes::from),
                        };
                        let (kind, payload) = match handled {
                            Ok(p) => (RaftMessageKind::Response, p),
                            Err(e) => (RaftMessageKind::Error, Bytes::from(e)),
                        };
                        let _ = answers.send(RaftMessage {
                            group: message.group,
                            id: message.id,
                            kind: kind as i32,
                            payload,
                        });
                    });
                }
            }
            running.lock().clear();
        });
        tokio::spawn(async move {
            while let Some(first) = answers_rx.recv().await {
                let mut size = first.payload.len();
                let mut frame = RaftFrame {
                    messages: vec![first],
                };
                // Bounded as the sender's frames are: answers to forwards
                // carry message bodies.
                while size < FRAME_BYTES {
                    let Ok(more) = answers_rx.try_recv() else {
                        break;
                    };
                    size += more.payload.len();
                    frame.messages.push(more);
                }
                if frames.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(frames_rx).boxed()))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<WireChunk>>,
    ) -> Result<Response<SnapshotReply>, Status> {
        let vote = self.host.receive_snapshot(request.into_inner()).await?;
        Ok(Response::new(SnapshotReply { vote: vote.into() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kinesin_proto::v1::raft_transport_client::RaftTransportClient;
    use kinesin_storage::{Cf, FsyncPolicy};
    use openraft::impls::leader_id_adv::LeaderId;
    use openraft::Membership;

    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::conformance::Echo;
    use crate::types::{LogId, SnapshotMeta, StoredMembership, Vote};

    const GROUP: GroupId = GroupId(7);

    /// The first chunk of a snapshot of GROUP from node 2 at index 10.
    fn snapshot_header() -> WireChunk {
        let log_id = LogId::new(
            LeaderId {
                term: 1,
                node_id: 2,
            },
            10,
        );
        let nodes: BTreeMap<u64, BasicNode> = [1, 2]
            .into_iter()
            .map(|n| (n, BasicNode::new(format!("127.0.0.1:{n}"))))
            .collect();
        let membership = Membership::new(vec![nodes.keys().copied().collect()], nodes).unwrap();
        let header = SnapshotHeader {
            vote: Vote::new_committed(1, 2),
            meta: SnapshotMeta {
                last_log_id: Some(log_id),
                last_membership: StoredMembership::new(Some(log_id), membership),
            },
            state: Vec::new(),
        };
        WireChunk {
            group: GROUP.0,
            header: encode(&header).into(),
            trailer_follows: true,
            ..Default::default()
        }
    }

    fn rows(rows: SnapshotChunk) -> WireChunk {
        WireChunk {
            group: GROUP.0,
            data: encode(&rows).into(),
            ..Default::default()
        }
    }

    fn trailer(rows: u64) -> WireChunk {
        WireChunk {
            group: GROUP.0,
            data: encode(&SnapshotChunk::new()).into(),
            trailer: true,
            rows,
            ..Default::default()
        }
    }

    /// A row of GROUP's own keys in the records family.
    fn row(key: &[u8]) -> (u8, Vec<u8>, Vec<u8>) {
        let mut k = GROUP.0.to_be_bytes().to_vec();
        k.extend_from_slice(key);
        (Cf::Records.snapshot_tag().unwrap(), k, b"value".to_vec())
    }

    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Answers a forwarded payload with it reversed, the shorter it is the
    /// later, so that answers overtake each other on the pipe.
    struct Reverse;

    impl ForwardHandler for Reverse {
        fn answer(&self, payload: Bytes) -> BoxFuture<'static, Bytes> {
            Box::pin(async move {
                let delay = 40u64.saturating_sub(payload.len() as u64);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                payload.iter().rev().copied().collect::<Vec<u8>>().into()
            })
        }
    }

    /// `payload` forwarded from `sender` to node `node` at `addr`, in
    /// the tests' group.
    async fn forward_to(
        sender: &RaftHost,
        node: u64,
        addr: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Bytes, ForwardError> {
        let payload = Bytes::copy_from_slice(payload);
        sender
            .forward(NodeId(node), addr, GROUP, payload, timeout)
            .await
    }

    /// A host serving the transport on a free port, and that address.
    async fn served_host(id: u64, dir: &std::path::Path) -> (RaftHost, String) {
        let storage = Storage::open(dir, FsyncPolicy::NeverUnsafe).unwrap();
        let host = RaftHost::new(
            NodeId(id),
            storage,
            Arc::new(crate::NoFilter),
            Dialer::plaintext(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(host.service())
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (host, addr)
    }

    /// Forwarded payloads cross the pipe to the peer's handler, and each
    /// caller gets the answer to its own, also when answers come back in
    /// another order than the requests went. A peer without a handler (as
    /// one from before forwarding) answers an error the caller can tell
    /// from a lost message; an address nobody serves fails before sending.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarded_payloads_get_their_own_answers_from_the_peers_handler() {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let (sender, _) = served_host(1, dirs[0].path()).await;
        let (answering, answering_addr) = served_host(2, dirs[1].path()).await;
        answering.set_forward_handler(Arc::new(Reverse));
        let (_silent, silent_addr) = served_host(3, dirs[2].path()).await;

        let calls = (0..30u8).map(|n| {
            let sender = sender.clone();
            let addr = answering_addr.clone();
            async move {
                let payload: Vec<u8> = (0..=n).collect();
                let answer = forward_to(&sender, 2, &addr, &payload, Duration::from_secs(10))
                    .await
                    .unwrap();
                (payload, answer)
            }
        });
        for (payload, answer) in futures::future::join_all(calls).await {
            let reversed: Vec<u8> = payload.iter().rev().copied().collect();
            assert_eq!(answer, reversed);
        }

        let refused = forward_to(&sender, 3, &silent_addr, b"x", Duration::from_secs(10)).await;
        assert!(
            matches!(refused, Err(ForwardError::NotUnderstood(_))),
            "{refused:?}"
        );

        let nobody = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let unsent = forward_to(&sender, 4, &nobody, b"x", Duration::from_secs(10)).await;
        assert!(
            matches!(unsent, Err(ForwardError::NotSent(_))),
            "{unsent:?}"
        );
    }

    /// A node that is shutting down but still serves its port refuses new
    /// pipe streams: a forward to it was not sent (so it may be tried
    /// elsewhere), rather than taken and then lost unanswered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_shutting_down_refuses_forwards_as_not_sent() {
        let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
        let (sender, _) = served_host(1, dirs[0].path()).await;
        let (closing, addr) = served_host(2, dirs[1].path()).await;
        closing.set_forward_handler(Arc::new(Reverse));
        closing.shutdown().await;
        for _ in 0..3 {
            let refused = forward_to(&sender, 2, &addr, b"x", Duration::from_secs(10)).await;
            assert!(
                matches!(refused, Err(ForwardError::NotSent(_))),
                "{refused:?}"
            );
        }
    }

    /// Holds every forward until it is dropped; counts starts and drops.
    #[derive(Default)]
    struct Hold {
        started: AtomicUsize,
        dropped: Arc<AtomicUsize>,
    }

    struct CountDrop(Arc<AtomicUsize>);

    impl Drop for CountDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl ForwardHandler for Hold {
        fn answer(&self, _payload: Bytes) -> BoxFuture<'static, Bytes> {
            self.started.fetch_add(1, Ordering::SeqCst);
            let guard = CountDrop(self.dropped.clone());
            Box::pin(async move {
                let _guard = guard;
                std::future::pending::<Bytes>().await
            })
        }
    }

    /// A forward whose caller gives up, by its timeout or by dropping the
    /// call, is dropped at the peer too (as a reset stream drops a unary
    /// call): a long poll nobody waits for must not go on to take messages.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forward_its_caller_gave_up_on_is_dropped_at_the_peer() {
        let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
        let (sender, _) = served_host(1, dirs[0].path()).await;
        let (holding, addr) = served_host(2, dirs[1].path()).await;
        let hold = Arc::new(Hold::default());
        holding.set_forward_handler(hold.clone());

        let timed_out = forward_to(&sender, 2, &addr, b"a", Duration::from_millis(300)).await;
        assert!(
            matches!(timed_out, Err(ForwardError::Lost(_))),
            "{timed_out:?}"
        );
        wait_until("a forward that timed out still runs at the peer", || {
            hold.dropped.load(Ordering::SeqCst) == 1
        })
        .await;

        let call = tokio::spawn({
            let (sender, addr) = (sender.clone(), addr.clone());
            async move { forward_to(&sender, 2, &addr, b"b", Duration::from_secs(60)).await }
        });
        wait_until("the second forward never reached the peer", || {
            hold.started.load(Ordering::SeqCst) == 2
        })
        .await;
        assert_eq!(hold.dropped.load(Ordering::SeqCst), 1);
        call.abort();
        wait_until("a forward whose caller left still runs at the peer", || {
            hold.dropped.load(Ordering::SeqCst) == 2
        })
        .await;
        // The peer never answers a cancelled forward: nothing waits for it.
        wait_until("the sender still waits for cancelled forwards", || {
            sender.inner.pool.awaited_answers(2) == 0
        })
        .await;
    }

    /// A peer's snapshot stream over the real transport: while one is
    /// being received, a second one of the same group is refused (it
    /// would clear the staging rows the first is writing); a row keyed
    /// outside the group is refused as bad input; once the refused stream
    /// is gone a whole snapshot installs its rows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_snapshot_transfer_per_group_and_only_rows_of_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::Always).unwrap();
        let host = RaftHost::new(
            NodeId(1),
            storage.clone(),
            Arc::new(crate::NoFilter),
            Dialer::plaintext(),
        );
        host.start_group(GROUP, Arc::new(Echo), &TimingProfile::shard())
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(host.service())
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let client = RaftTransportClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let receiving = host.group(GROUP).unwrap().receiving;

        // The first transfer sends its header and holds the stream open.
        let (first_tx, first_rx) = mpsc::channel(4);
        first_tx.send(snapshot_header()).await.unwrap();
        let first = tokio::spawn({
            let mut c = client.clone();
            async move { c.install_snapshot(ReceiverStream::new(first_rx)).await }
        });
        // The probe takes the lock for an instant: a first transfer that
        // met it there is refused, and says so here rather than as a timeout.
        wait_until(
            "the first transfer never took the group's receive lock",
            || first.is_finished() || receiving.try_lock().is_err(),
        )
        .await;
        if first.is_finished() {
            panic!("the first transfer ended at once: {:?}", first.await);
        }

        let second = client
            .clone()
            .install_snapshot(futures::stream::iter([snapshot_header(), trailer(0)]))
            .await
            .expect_err("a second transfer of the same group at once");
        assert_eq!(second.code(), tonic::Code::Unavailable, "{second:?}");
        assert!(second.message().contains("is being received"), "{second:?}");

        // A row of another group (its key lacks GROUP's prefix) is refused.
        let mut stray = row(b"k");
        stray.1[0] ^= 0xff;
        first_tx.send(rows(vec![stray])).await.unwrap();
        let refused = tokio::time::timeout(Duration::from_secs(10), first)
            .await
            .expect("the stray row was taken")
            .unwrap()
            .expect_err("a row keyed outside the group");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().contains("outside the group"),
            "{refused:?}"
        );
        wait_until("the refused transfer kept the receive lock", || {
            receiving.try_lock().is_ok()
        })
        .await;

        let kept = row(b"kept");
        let key = kept.1.clone();
        client
            .clone()
            .install_snapshot(futures::stream::iter([
                snapshot_header(),
                rows(vec![kept]),
                trailer(1),
            ]))
            .await
            .expect("a whole snapshot once the group is free");
        assert_eq!(
            storage.get(Cf::Records, &key).unwrap().as_deref(),
            Some(&b"value"[..])
        );
        server.abort();
        host.shutdown().await;
    }

    #[test]
    fn a_snapshot_stream_is_whole_only_with_a_matching_trailer() {
        let mut whole = SnapshotTally::new(true);
        whole.rows(3).unwrap();
        whole.rows(2).unwrap();
        whole.trailer(5).unwrap();
        assert!(whole.complete().is_ok());

        // The sender's read failed: the stream ended without a trailer.
        let mut cut = SnapshotTally::new(true);
        cut.rows(3).unwrap();
        assert!(cut.complete().unwrap_err().contains("without its trailer"));

        let mut short = SnapshotTally::new(true);
        short.rows(3).unwrap();
        short.trailer(5).unwrap();
        assert!(short
            .complete()
            .unwrap_err()
            .contains("counted 5 rows, 3 arrived"));

        let mut late = SnapshotTally::new(true);
        late.trailer(0).unwrap();
        assert!(late.rows(1).is_err());
        assert!(late.trailer(0).is_err());

        // A sender from before trailers is taken as it was.
        let mut old = SnapshotTally::new(false);
        old.rows(3).unwrap();
        assert!(old.complete().is_ok());
    }
}
