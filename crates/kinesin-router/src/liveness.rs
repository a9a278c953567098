//! Node-level failure detection: one liveness signal per node pair instead
//! of one per Raft group. Every node pings every other node of the map every
//! [`PING_EVERY`]; a node is down once a ping fails to connect (a killed
//! process refuses connections at once) or nothing answered for
//! [`SILENT_FOR`] (a hung or partitioned one). The router stops routing to
//! down nodes, and the failover task ends the leader leases of their groups.
//!
//! Answers also carry each node's data version (`Router::cluster_data_version`).
//! The version a node last reported is kept, in memory and in this node's
//! storage, until the node reports another: neither an error that ends a
//! ping (a kill can) nor a restart of this node while the peer is down
//! makes a known peer count as not heard from. A node rolled back to an
//! older release reports the older version at its first answer. Answers
//! also carry the versions the answering node heard from the others: a
//! node that never heard a peer (it joined while the peer was down) takes
//! the peer's version from them, the lowest any of them reports, until the
//! peer answers itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// The key in [`Cf::Node`] of the peers' last reported data versions
/// (JSON: node id → version).
const VERSIONS_KEY: &[u8] = b"peer-data-versions";

/// How a ping ended.
#[derive(Debug, Clone, Copy)]
enum Ping {
    /// The node answered: with its data version if the answer says (0: a
    /// release without Ping, which reports none), or with an error that
    /// does not say.
    Answered { data_version: Option<u32> },
    /// Could not connect.
    Refused,
    /// No answer in time.
    Silent,
}

pub struct Liveness {
    peers: Mutex<HashMap<NodeId, Peer>>,
    /// The data version each node last reported (absent: none yet).
    versions: Mutex<Versions>,
    /// Where `versions` is kept.
    storage: Storage,
    /// `versions` changed since it was last stored (or storing failed).
    unsaved: AtomicBool,
    /// Held while storing `versions`, so that stores land in the order
    /// they read the map and the last one holds the latest versions.
    saving: Mutex<()>,
}

#[derive(Default)]
struct Versions {
    /// By node id.
    reported: BTreeMap<u64, u32>,
    /// The nodes whose version came from other nodes' answers, not their
    /// own (since this node started): another node's lower report wins.
    secondhand: HashSet<u64>,
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
        let versions = stored_versions(&storage).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the peers' stored data versions are unreadable; they count as not heard from until they answer");
            BTreeMap::new()
        });
        Liveness {
            peers: Mutex::default(),
            versions: Mutex::new(Versions {
                reported: versions,
                secondhand: HashSet::new(),
            }),
            storage,
            unsaved: AtomicBool::new(false),
            saving: Mutex::default(),
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

    /// Records a ping's outcome; true if the versions are to be stored
    /// ([`Liveness::save_versions`]).
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
        if let Ping::Answered {
            data_version: Some(version),
        } = outcome
        {
            let mut versions = self.versions.lock().expect("versions lock");
            versions.secondhand.remove(&node.0);
            if versions.reported.insert(node.0, version) != Some(version) {
                self.unsaved.store(true, Ordering::SeqCst);
            }
        }
        self.unsaved.load(Ordering::SeqCst)
    }

    /// The data version `node` last reported; 0 if none.
    pub fn data_version(&self, node: NodeId) -> u32 {
        let versions = self.versions.lock().expect("versions lock");
        versions.reported.get(&node.0).copied().unwrap_or(0)
    }

    /// The versions heard so far, by node id.
    pub fn heard_versions(&self) -> BTreeMap<u64, u32> {
        self.versions
            .lock()
            .expect("versions lock")
            .reported
            .clone()
    }

    /// Takes the versions another node heard for the nodes that this one
    /// never heard itself (its own answers are what counts for the others)
    /// except `me`, keeping the lowest any node reported; true if the
    /// versions are to be stored, as [`Liveness::end`].
    fn learn(&self, heard: impl IntoIterator<Item = (u64, u32)>, me: NodeId) -> bool {
        let mut guard = self.versions.lock().expect("versions lock");
        let Versions {
            reported,
            secondhand,
        } = &mut *guard;
        for (node, version) in heard {
            if node == me.0 {
                continue;
            }
            let lower = match reported.get(&node) {
                None => secondhand.insert(node),
                Some(known) => secondhand.contains(&node) && version < *known,
            };
            if lower {
                reported.insert(node, version);
                self.unsaved.store(true, Ordering::SeqCst);
            }
        }
        self.unsaved.load(Ordering::SeqCst)
    }

    /// Stores the known versions unless they are stored already (a
    /// blocking write). After a failure the next ping's end asks again.
    fn save_versions(&self) {
        let _saving = self.saving.lock().expect("saving lock");
        if !self.unsaved.swap(false, Ordering::SeqCst) {
            return;
        }
        let json = serde_json::to_vec(&self.versions.lock().expect("versions lock").reported)
            .expect("a map of numbers encodes");
        let mut batch = WriteBatch::default();
        batch.put_cf(self.storage.cf(Cf::Node), VERSIONS_KEY, json);
        if let Err(e) = self.storage.write(batch) {
            self.unsaved.store(true, Ordering::SeqCst);
            // A full disk is reported where it is noticed; retried quietly.
            if !e.is_no_space() {
                tracing::warn!(error = %e, "could not store the peers' data versions");
            }
        }
    }

    fn retain(&self, nodes: &HashSet<NodeId>) {
        self.peers
            .lock()
            .expect("liveness lock")
            .retain(|n, _| nodes.contains(n));
    }
}

/// The versions [`Liveness::save_versions`] stored (none: an empty map).
fn stored_versions(storage: &Storage) -> Result<BTreeMap<u64, u32>, String> {
    match storage
        .get(Cf::Node, VERSIONS_KEY)
        .map_err(|e| e.to_string())?
    {
        None => Ok(BTreeMap::new()),
        Some(json) => serde_json::from_slice(&json).map_err(|e| e.to_string()),
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
                let mut heard = HashMap::new();
                let outcome = match router.client_for(node) {
                    Err(_) => Ping::Refused,
                    Ok(mut c) => {
                        match tokio::time::timeout(SILENT_FOR, c.ping(pb::PingRequest {})).await {
                            Ok(Ok(r)) => {
                                let r = r.into_inner();
                                if r.node_id == node.0 {
                                    heard = r.peer_data_versions;
                                    Ping::Answered {
                                        data_version: Some(r.data_version),
                                    }
                                } else {
                                    // Another node at this node's address
                                    // (a reused one): this node is not there.
                                    tracing::debug!(
                                        node = node.0,
                                        answered = r.node_id,
                                        "another node answers at the node's address"
                                    );
                                    Ping::Refused
                                }
                            }
                            // A release before data version 3 has no Ping.
                            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                                Ping::Answered {
                                    data_version: Some(0),
                                }
                            }
                            // An answer, even an error, shows the node runs,
                            // but not which version (a kill during the ping
                            // can end it so).
                            Ok(Err(s)) if s.code() != tonic::Code::Unavailable => {
                                Ping::Answered { data_version: None }
                            }
                            Ok(Err(_)) => Ping::Refused,
                            Err(_) => Ping::Silent,
                        }
                    }
                };
                let was_down = router.liveness().is_down(node);
                // Both run (`|`, not `||`): the answer, then what it heard.
                let save = router.liveness().end(node, outcome)
                    | router.liveness().learn(heard, router.host().node_id());
                if !was_down && router.liveness().is_down(node) {
                    tracing::info!(node = node.0, "node is down");
                    router.forget_leader_node(node);
                } else if was_down && !router.liveness().is_down(node) {
                    tracing::info!(node = node.0, "node is up again");
                }
                if save {
                    tokio::task::spawn_blocking(move || router.liveness().save_versions());
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

    fn storage_in(dir: &tempfile::TempDir) -> Storage {
        Storage::open(dir.path(), kinesin_storage::FsyncPolicy::Always).unwrap()
    }

    #[test]
    fn a_refused_connection_is_down_at_once_and_an_answer_brings_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let l = Liveness::open(storage_in(&dir));
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
        l.end(
            n,
            Ping::Answered {
                data_version: Some(3),
            },
        );
        assert!(!l.is_down(n));
        assert_eq!(l.data_version(n), 3);
        l.retain(&HashSet::new());
        assert!(l.down().is_empty());
    }

    #[test]
    fn a_peers_last_version_outlives_an_error_and_a_restart_until_it_reports_another() {
        let dir = tempfile::tempdir().unwrap();
        let open = || storage_in(&dir);
        let n = NodeId(2);
        let answer = |l: &Liveness, data_version| {
            assert!(l.begin(n));
            l.end(n, Ping::Answered { data_version })
        };
        {
            let l = Liveness::open(open());
            assert_eq!(l.data_version(n), 0);
            assert!(answer(&l, Some(4)), "a new version is to be stored");
            l.save_versions();
            assert!(!answer(&l, Some(4)), "stored already");
            // A kill during a ping can end it with an error that says no
            // version.
            assert!(!answer(&l, None));
            assert_eq!(l.data_version(n), 4);
        }
        let restarted = Liveness::open(open());
        assert_eq!(restarted.data_version(n), 4, "known after a restart");
        assert_eq!(restarted.data_version(NodeId(3)), 0);
        // Rolled back to an older release, the node says so.
        assert!(answer(&restarted, Some(3)));
        assert_eq!(restarted.data_version(n), 3);
        restarted.save_versions();
        drop(restarted);
        assert_eq!(Liveness::open(open()).data_version(n), 3);
    }

    #[test]
    fn versions_another_node_heard_fill_only_the_peers_never_heard_lowest_first() {
        let dir = tempfile::tempdir().unwrap();
        let l = Liveness::open(storage_in(&dir));
        let (me, heard_before, never_heard) = (NodeId(4), NodeId(2), NodeId(3));
        assert!(l.begin(heard_before));
        l.end(
            heard_before,
            Ping::Answered {
                data_version: Some(3),
            },
        );
        assert!(l.learn([(2, 4), (3, 4), (4, 1)], me), "to be stored");
        assert_eq!(l.data_version(never_heard), 4, "taken from the others");
        assert_eq!(l.data_version(heard_before), 3, "its own answer counts");
        assert!(!l.heard_versions().contains_key(&me.0), "not about itself");
        l.save_versions();
        assert!(!l.learn([(3, 5)], me), "a higher report: nothing to store");
        assert_eq!(l.data_version(never_heard), 4);
        // Another node heard it at an older release (the peer was rolled
        // back): the lower version counts until the peer answers.
        assert!(l.learn([(3, 2)], me));
        assert_eq!(l.data_version(never_heard), 2);
        l.save_versions();
        drop(l);
        let restarted = Liveness::open(storage_in(&dir));
        assert_eq!(restarted.data_version(never_heard), 2, "stored");
        // Its own answer replaces what the others said, and they no longer
        // lower it.
        assert!(restarted.begin(never_heard));
        restarted.end(
            never_heard,
            Ping::Answered {
                data_version: Some(5),
            },
        );
        restarted.learn([(3, 1)], me);
        assert_eq!(restarted.data_version(never_heard), 5);
    }
}
