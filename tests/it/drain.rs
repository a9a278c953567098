use std::time::Duration;

use kinesin_meta::{MetaCommand, NodeState};
use kinesin_testkit::{wait_until, TestCluster};
use kinesin_types::{GroupId, NodeId};

use crate::common::{
    assert_all_replicas_hold, assert_readable_through_router, replica_node_off_meta_leader,
    write_batches, Acked,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_node_gives_up_its_replicas_and_leaves() {
    let cluster = TestCluster::start(4).await.unwrap();
    cluster.create_stream("drained", 4).await.unwrap();
    let acked = Acked::default();
    assert_eq!(
        write_batches(&cluster, 1, "drained", 1, 10, 20, &acked).await,
        0
    );

    let victim = replica_node_off_meta_leader(&cluster, 4);
    // The drained node leaves the metadata group, so its map goes stale:
    // watch and act through another node.
    let observer = (1..=4).find(|n| *n != victim).unwrap();
    cluster
        .node(observer)
        .router
        .meta_write(MetaCommand::SetNodeState {
            node: NodeId(victim),
            state: NodeState::Draining,
        })
        .await
        .unwrap();

    wait_until(
        "the drained node to be removed",
        Duration::from_secs(90),
        || async {
            let state = cluster.node(observer).meta.state();
            let holds = state
                .shards()
                .any(|(_, s)| s.replicas.contains(&NodeId(victim)));
            let removed = state.nodes[&NodeId(victim)].state == NodeState::Removed;
            let member = cluster
                .leader_of(GroupId::META)
                .and_then(|l| cluster.node(l.0).host.status(GroupId::META))
                .is_none_or(|s| s.addresses.contains_key(&NodeId(victim)));
            !holds && removed && !member
        },
    )
    .await
    .unwrap();
    wait_until(
        "the drained node to drop its replicas",
        Duration::from_secs(60),
        || async {
            cluster
                .node(victim)
                .host
                .group_ids()
                .iter()
                .all(|g| g.is_meta())
        },
    )
    .await
    .unwrap();
    assert_eq!(
        write_batches(&cluster, observer, "drained", 2, 5, 20, &acked).await,
        0
    );
    assert_readable_through_router(&cluster, observer, "drained", &acked).await;
    assert_all_replicas_hold(&cluster, "drained", &acked).await;
    cluster.shutdown().await;
}
