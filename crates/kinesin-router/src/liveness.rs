//! Node-level failure detection: one liveness signal per node pair instead
//! of one per Raft group. Every node pings every other node of the map every
//! [`PING_EVERY`]; a node is down once a ping fails to connect (a killed
//! process refuses connections at once) or nothing answered for
//! [`SILENT_FOR`] (a hung or partitioned one). The router stops routing to
//! down nodes, and the failover task ends the leader leases of their groups.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kinesin_proto::v1::{self as pb};
use kinesin_types::NodeId;
use tokio::sync::watch;

use crate::router::Router;

pub const PING_EVERY: Duration = Duration::from_millis(200);
/// A node that answered nothing for this long is down, even without a
/// connection error. Long enough that a busy node answering a tiny ping
/// late is not taken for dead on a loaded machine.
pub const SILENT_FOR: Duration = Duration::from_secs(3);

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
}

struct Peer {
    last_answer: Instant,
    /// The last ping could not reach the node at all.
    unreachable: bool,
    in_flight: bool,
    /// The data version its last answer reported (0: none yet, or a
    /// release that does not report one).
    data_version: u32,
}

impl Peer {
    fn is_down(&self) -> bool {
        self.unreachable || self.last_answer.elapsed() >= SILENT_FOR
    }
}

impl Liveness {
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
            data_version: 0,
        });
        !std::mem::replace(&mut p.in_flight, true)
    }

    /// Records a ping's outcome.
    fn end(&self, node: NodeId, outcome: Ping) {
        let mut peers = self.peers.lock().expect("liveness lock");
        if let Some(p) = peers.get_mut(&node) {
            p.in_flight = false;
            match outcome {
                Ping::Answered { data_version } => {
                    p.last_answer = Instant::now();
                    p.unreachable = false;
                    p.data_version = data_version;
                }
                Ping::Refused => p.unreachable = true,
                Ping::Silent => {}
            }
        }
    }

    /// The data version `node` last reported; 0 if none.
    pub fn data_version(&self, node: NodeId) -> u32 {
        let peers = self.peers.lock().expect("liveness lock");
        peers.get(&node).map_or(0, |p| p.data_version)
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
                router.liveness().end(node, outcome);
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
        l.end(n, Ping::Answered { data_version: 3 });
        assert!(!l.is_down(n));
        assert_eq!(l.data_version(n), 3);
        l.retain(&HashSet::new());
        assert!(l.down().is_empty());
    }
}
