use std::time::Duration;

use kinesin_testkit::{wait_until, TestCluster};

use crate::common::{assert_all_replicas_hold, write_batches, Acked, BackgroundWriter};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_partitioned_away_loses_no_acknowledged_write_after_heal() {
    let cluster = TestCluster::start(3).await.unwrap();
    cluster.create_stream("events", 4).await.unwrap();
    let acked = Acked::default();
    assert_eq!(
        write_batches(&cluster, 1, "events", 1, 5, 20, &acked).await,
        0
    );

    let group = cluster.any_node().meta.state().streams["events"].shards[0].group;
    let old_leader = cluster.leader_of(group).unwrap().0;
    let others: Vec<u64> = (1..=3).filter(|n| *n != old_leader).collect();
    cluster.filter.partition(&[old_leader], &others);

    // Writers on both sides: the isolated leader cannot commit, so nothing
    // it is asked to write may be acknowledged unless it commits later.
    let majority_writer = BackgroundWriter::start(
        cluster.node(others[0]).router.clone(),
        "events",
        2,
        acked.clone(),
    );
    let minority_writer = BackgroundWriter::start(
        cluster.node(old_leader).router.clone(),
        "events",
        3,
        acked.clone(),
    );
    wait_until(
        "a leader on the majority side",
        Duration::from_secs(30),
        || async {
            others
                .iter()
                .any(|n| cluster.node(*n).host.is_leader(group))
        },
    )
    .await
    .unwrap();
    wait_until(
        "majority writes to succeed",
        Duration::from_secs(30),
        || async { write_batches(&cluster, others[1], "events", 4, 1, 20, &acked).await == 0 },
    )
    .await
    .unwrap();
    majority_writer.stop().await;
    cluster.filter.heal();
    minority_writer.stop().await;

    wait_until(
        "the old leader to follow the one leader of the majority side",
        Duration::from_secs(30),
        || async {
            let leaders: Vec<u64> = (1..=3)
                .filter(|n| cluster.node(*n).host.is_leader(group))
                .collect();
            leaders.len() == 1 && leaders[0] != old_leader
        },
    )
    .await
    .unwrap();
    assert_all_replicas_hold(&cluster, "events", &acked).await;
    cluster.shutdown().await;
}
