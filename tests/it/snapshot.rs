use std::time::Duration;

use kinesin_router::RecordIn;
use kinesin_testkit::{wait_until, TestCluster, TestOptions};
use kinesin_types::GroupId;

use crate::common::{assert_all_replicas_hold, read_replica, write_batches, Acked};

fn small_log_options() -> TestOptions {
    let mut options = TestOptions::default();
    options.shard.snapshot_every = 20;
    options.shard.keep_below_snapshot = 0;
    options
}

/// Waits until the group's leader has purged its log beyond `index`.
async fn wait_for_purge(cluster: &TestCluster, group: GroupId, index: u64) {
    wait_until(
        "the leader to purge its log",
        Duration::from_secs(30),
        || async {
            cluster.leader_of(group).is_some_and(|l| {
                cluster
                    .node(l.0)
                    .host
                    .status(group)
                    .and_then(|s| s.purged_index)
                    .is_some_and(|p| p > index)
            })
        },
    )
    .await
    .unwrap();
}

fn follower_of(cluster: &TestCluster, group: GroupId) -> u64 {
    let leader = cluster.leader_of(group).unwrap().0;
    (1..=3)
        .find(|n| *n != leader && *n != 1)
        .unwrap_or_else(|| (1..=3).find(|n| *n != leader).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_whose_log_was_purged_catches_up_by_snapshot() {
    let mut cluster = TestCluster::start_with(3, small_log_options())
        .await
        .unwrap();
    cluster.create_stream("logs", 1).await.unwrap();
    let acked = Acked::default();
    assert_eq!(
        write_batches(&cluster, 1, "logs", 1, 5, 10, &acked).await,
        0
    );

    let group = cluster.any_node().meta.state().streams["logs"].shards[0].group;
    let down = follower_of(&cluster, group);
    let down_index = cluster
        .node(down)
        .host
        .status(group)
        .unwrap()
        .last_log_index;
    cluster.stop(down).await;
    let writer_node = (1..=3).find(|n| *n != down).unwrap();
    assert_eq!(
        write_batches(&cluster, writer_node, "logs", 2, 120, 5, &acked).await,
        0
    );

    wait_for_purge(&cluster, group, down_index).await;

    cluster.restart(down).await.unwrap();
    assert_all_replicas_hold(&cluster, "logs", &acked).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_records_replicate_snapshot_and_read_back() {
    let mut cluster = TestCluster::start_with(3, small_log_options())
        .await
        .unwrap();
    let max = 10 * 1024 * 1024;
    cluster
        .any_node()
        .router
        .create_stream("big", 1, 0, max)
        .await
        .unwrap();
    cluster.create_stream("small-sibling", 1).await.unwrap();
    let group = cluster.any_node().meta.state().streams["big"].shards[0].group;
    wait_until(
        "a leader of the big stream",
        Duration::from_secs(30),
        || async { cluster.leader_of(group).is_some() },
    )
    .await
    .unwrap();
    let down = follower_of(&cluster, group);
    cluster.stop(down).await;
    let writer_node = (1..=3).find(|n| *n != down).unwrap();

    // Five records of just under 10 MiB in one put: one 50 MiB log entry.
    let records: Vec<RecordIn> = (0..5u8)
        .map(|i| RecordIn {
            partition_key: format!("k{i}"),
            data: vec![i; max as usize - 16],
            explicit_hash_key: None,
        })
        .collect();
    let outcomes = cluster
        .node(writer_node)
        .router
        .put_records("big", records)
        .await
        .unwrap();
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, kinesin_router::AppendOutcome::Stored { .. })),
        "{outcomes:?}"
    );
    // Push the log past a snapshot so the stopped replica must take one.
    let acked = Acked::default();
    assert_eq!(
        write_batches(&cluster, writer_node, "big", 1, 40, 2, &acked).await,
        0
    );
    wait_for_purge(&cluster, group, 2).await;

    cluster.restart(down).await.unwrap();
    wait_until(
        "the restarted replica to hold the large records",
        Duration::from_secs(120),
        || async {
            cluster.node(down).shards.get(group).is_some()
                && read_replica(&cluster, down, group).len() >= 5 + 80
        },
    )
    .await
    .unwrap();
    for node in 1..=3 {
        let records = read_replica(&cluster, node, group);
        for (i, (_, data)) in records.iter().take(5).enumerate() {
            assert_eq!(data.len(), max as usize - 16, "node {node} record {i}");
            assert!(
                data.iter().all(|b| *b == i as u8),
                "node {node} record {i} corrupted"
            );
        }
    }
    assert_all_replicas_hold(&cluster, "big", &acked).await;
    cluster.shutdown().await;
}
