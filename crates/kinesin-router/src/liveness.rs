//! Node-level failure detection: one liveness signal per node pair instead
//! of one per Raft group. Every node pings every other node of the map every
//! [`PING_EVERY`]; a node is down once a ping fails to connect (a killed
//! process refuses connections at once) or nothing answered for
//! [`SILENT_FOR`] (a hung or partitioned one). The router stops routing to
//! down nodes, and the failover task ends the leader leases of their groups.
//!
//! Answers also carry each node's data version. The highest one a node
//! reported is kept, in memory and in this node's storage: a node's version
//! never goes down (a release refuses a directory of a newer version), so
//! a node that restarts while a peer is down still knows that the peer
//! decodes what its version introduced (`Router::cluster_data_version`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kinesin_proto::v1::{self as pb};
use kinesin_storage::{Cf, Storage, WriteBatch};
use kinesin_types::NodeId;
use tokio::sync::watch;

use crate::router::Router;

pub const PING_EVERY: Duration = Duration::from_millis(200);
/// A node that answered nothing for this long is down, even without a
/// connection error. Long enough that a busy node answering a tiny ping
/// late is not taken for dead on a loaded machine.
pub const SILENT_FOR: Duration = Duration::from_secs(3);

/// The key in [`Cf::Node`] of the peers' highest reported data versions
/// (JSON: node id → version).
const VERSIONS_KEY: &[u8] = b"peer-data-versions";

/// How a ping ended.
#[derive(Debug, Clone, Copy)]
enum Ping {
    Answered {
        data_version: u32,
    },
    /// Could not connect.
    Refused,
    /// No answer in time.
    Silent,
}

#[derive(Default)]
pub struct Liveness {
    peers: Mutex<HashMap<NodeId, Peer>>,
    /// The highest data version each node reported (absent: none yet, or a
    /// release that does not report one).
    versions: Mutex<BTreeMap<u64, u32>>,
    /// Where `versions` is kept; none in tests of the pings alone.
    storage: Option<Storage>,
    /// Held while storing `versions`, so that stores land in the order
    /// they read the map and the last one holds the highest versions.
    saving: Mutex<()>,
}

struct Peer {
    last_answer: Instant,
    /// The last ping could not reach the node at all.
    unreachable: bool,
    in_flight: bool,
}

impl Peer {
    fn is_down(&self) -> bool {
        self.unreachable || self.last_answer.elapsed() >= SILENT_FOR
    }
}

impl Liveness {
    /// Liveness that keeps the peers' versions in `storage`, starting from
    /// those stored there. Unreadable ones are dropped with a warning: the
    /// peers then count as not heard from until they answer.
    pub fn open(storage: Storage) -> Self {
        let stored = storage
            .get(Cf::Node, VERSIONS_KEY)
            .map_err(|e| e.to_string())
            .and_then(|v| {
                v.map_or(Ok(BTreeMap::new()), |v| {
                    serde_json::from_slice(&v).map_err(|e| e.to_string())
                })
            });
        let versions = stored.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the peers' stored data versions are unreadable; they count as not heard from until they answer");
            BTreeMap::new()
        });
        Liveness {
            versions: Mutex::new(versions),
            storage: Some(storage),
            ..Liveness::default()
        }
    }

    /// Is `node` known to be down? Unknown nodes are not.
    pub fn is_down(&self, node: NodeId) -> bool {
        let peers = self.peers.lock().expect("liveness lock");
        peers.get(&node).is_some_and(Peer::is_down)
    }

    /// The nodes known to be down now.
    pub fn down(&self) -> HashSet<NodeId> {
        let peers = self.peers.lock().expect("liveness lock");
        peers
            .iter()
            .filter(|(_, p)| p.is_down())
            .map(|(n, _)| *n)
            .collect()
    }

    /// Starts a ping to `node` unless one is under way; false if one is.
    fn begin(&self, node: NodeId) -> bool {
        let mut peers = self.peers.lock().expect("liveness lock");
        let p = peers.entry(node).or_insert_with(|| Peer {
            last_answer: Instant::now(),
            unreachable: false,
            in_flight: false,
        });
        !std::mem::replace(&mut p.in_flight, true)
    }

    /// Records a ping's outcome; true if it raised the node's known data
    /// version.
    fn end(&self, node: NodeId, outcome: Ping) -> bool {
        {
            let mut peers = self.peers.lock().expect("liveness lock");
            let Some(p) = peers.get_mut(&node) else {
                return false;
            };
            p.in_flight = false;
            match outcome {
                Ping::Answered { .. } => {
                    p.last_answer = Instant::now();
                    p.unreachable = false;
                }
                Ping::Refused => p.unreachable = true,
                Ping::Silent => {}
            }
        }
        let Ping::Answered { data_version } = outcome else {
            return false;
        };
        let mut versions = self.versions.lock().expect("versions lock");
        let known = versions.entry(node.0).or_default();
        let raised = data_version > *known;
        *known = (*known).max(data_version);
        raised
    }

    /// The highest data version `node` reported; 0 if none.
    pub fn data_version(&self, node: NodeId) -> u32 {
        let versions = self.versions.lock().expect("versions lock");
        versions.get(&node.0).copied().unwrap_or(0)
    }

    /// Stores the known versions (a blocking write). A failure is only
    /// logged: the next raise stores them again.
    fn save_versions(&self) {
        let Some(storage) = &self.storage else {
            return;
        };
        let _saving = self.saving.lock().expect("saving lock");
        let json = serde_json::to_vec(&*self.versions.lock().expect("versions lock"))
            .expect("a map of numbers encodes");
        let mut batch = WriteBatch::default();
        batch.put_cf(storage.cf(Cf::Node), VERSIONS_KEY, json);
        if let Err(e) = storage.write(batch) {
            tracing::warn!(error = %e, "could not store the peers' data versions");
        }
    }

    fn retain(&self, nodes: &HashSet<NodeId>) {
        self.peers
            .lock()
            .expect("liveness lock")
            .retain(|n, _| nodes.contains(n));
    }
}

/// Pings every other node of the map until `stop`.
pub async fn run_pings(router: Arc<Router>, mut stop: watch::Receiver<bool>) {
    loop {
        let me = router.host().node_id();
        let state = router.meta_state();
        let others: HashSet<NodeId> = state
            .nodes
            .values()
            .filter(|n| n.id != me && n.state != kinesin_meta::NodeState::Removed)
            .map(|n| n.id)
            .collect();
        router.liveness().retain(&others);
        for node in others {
            if !router.liveness().begin(node) {
                continue;
            }
            let router = router.clone();
            tokio::spawn(async move {
                let outcome = match router.client_for(node) {
                    Err(_) => Ping::Refused,
                    Ok(mut c) => {
                        match tokio::time::timeout(SILENT_FOR, c.ping(pb::PingRequest {})).await {
                            Ok(Ok(r)) => Ping::Answered {
                                data_version: r.into_inner().data_version,
                            },
                            // An answer, even an error, shows the node runs
                            // (an older node without Ping says Unimplemented).
                            Ok(Err(s)) if s.code() != tonic::Code::Unavailable => {
                                Ping::Answered { data_version: 0 }
                            }
                            Ok(Err(_)) => Ping::Refused,
                            Err(_) => Ping::Silent,
                        }
                    }
                };
                let was_down = router.liveness().is_down(node);
                if router.liveness().end(node, outcome) {
                    let router = router.clone();
                    let saved =
                        tokio::task::spawn_blocking(move || router.liveness().save_versions());
                    if let Err(e) = saved.await {
                        tracing::warn!(error = %e, "storing the peers' data versions failed");
                    }
                }
                if !was_down && router.liveness().is_down(node) {
                    tracing::info!(node = node.0, "node is down");
                    router.forget_leader_node(node);
                } else if was_down && !router.liveness().is_down(node) {
                    tracing::info!(node = node.0, "node is up again");
                }
            });
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(PING_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connection_is_down_at_once_and_an_answer_brings_it_back() {
        let l = Liveness::default();
        let n = NodeId(2);
        assert!(!l.is_down(n), "unknown nodes are not down");
        assert!(l.begin(n));
        assert!(!l.begin(n), "one ping at a time");
        l.end(n, Ping::Silent);
        assert!(!l.is_down(n), "one late answer is not a failure");
        assert!(l.begin(n));
        l.end(n, Ping::Refused);
        assert!(l.is_down(n));
        assert_eq!(l.down(), HashSet::from([n]));
        assert_eq!(l.data_version(n), 0);
        assert!(l.begin(n));
        assert!(l.end(n, Ping::Answered { data_version: 3 }));
        assert!(!l.is_down(n));
        assert_eq!(l.data_version(n), 3);
        l.retain(&HashSet::new());
        assert!(l.down().is_empty());
    }

    #[test]
    fn a_nodes_known_version_never_goes_down_and_outlives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let open = || Storage::open(dir.path(), kinesin_storage::FsyncPolicy::Always).unwrap();
        let n = NodeId(2);
        {
            let l = Liveness::open(open());
            assert_eq!(l.data_version(n), 0);
            assert!(l.begin(n));
            assert!(l.end(n, Ping::Answered { data_version: 4 }));
            l.save_versions();
            // A node killed during a ping can end it with an error that
            // counts as an answer without a version.
            assert!(l.begin(n));
            assert!(!l.end(n, Ping::Answered { data_version: 0 }));
            assert_eq!(l.data_version(n), 4);
        }
        let restarted = Liveness::open(open());
        assert_eq!(restarted.data_version(n), 4, "known after a restart");
        assert_eq!(restarted.data_version(NodeId(3)), 0);
    }
}
