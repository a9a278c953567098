use std::time::Duration;

use kinesin_testkit::{wait_until, TestCluster, TestOptions};
use kinesin_types::NodeId;

use crate::common::{assert_all_replicas_hold, replica_node_off_meta_leader, write_batches, Acked};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_of_a_node_gone_too_long_move_to_another_node() {
    let options = TestOptions {
        repair_after_secs: 2,
        ..TestOptions::default()
    };
    let mut cluster = TestCluster::start_with(4, options).await.unwrap();
    cluster.create_stream("repaired", 4).await.unwrap();
    let acked = Acked::default();
    assert_eq!(
        write_batches(&cluster, 1, "repaired", 1, 10, 20, &acked).await,
        0
    );

    let victim = replica_node_off_meta_leader(&cluster, 4);
    cluster.stop(victim).await;

    wait_until(
        "replicas to leave the stopped node",
        Duration::from_secs(60),
        || async {
            let state = cluster.any_node().meta.state();
            let moved = state
                .shards()
                .all(|(_, s)| s.replicas.len() == 3 && !s.replicas.contains(&NodeId(victim)));
            moved
        },
    )
    .await
    .unwrap();
    let writer = (1..=4).find(|n| *n != victim).unwrap();
    assert_eq!(
        write_batches(&cluster, writer, "repaired", 2, 5, 20, &acked).await,
        0
    );
    assert_all_replicas_hold(&cluster, "repaired", &acked).await;
    // Every shard's Raft membership follows the new assignment.
    wait_until(
        "memberships to match the assignment",
        Duration::from_secs(60),
        || async {
            let state = cluster.any_node().meta.state();
            let matching = state.shards().all(|(_, s)| {
                cluster.leader_of(s.group).is_some_and(|l| {
                    let st = cluster.node(l.0).host.status(s.group).unwrap();
                    st.voters == s.replicas.iter().copied().collect()
                })
            });
            matching
        },
    )
    .await
    .unwrap();
    cluster.shutdown().await;
}
