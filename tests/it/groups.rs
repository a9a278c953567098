//! A group kind other than stream shards (the testkit's key-value kind)
//! end to end: created from the map, written and read through the router
//! from a node without a replica, snapshotted, installed on a replica added
//! after the log was purged, and removed with the map entry.

use std::time::Duration;

use kinesin_router::{Retry, RouterError};
use kinesin_testkit::kv::{decode_reply, encode, KvCommand, KvQuery, KV_KIND};
use kinesin_testkit::{wait_until, TestCluster};
use kinesin_types::{GroupId, NodeId};

use crate::common::small_log_options;

fn put(key: &str, value: &str) -> Vec<u8> {
    encode(&KvCommand::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
    })
}

fn get(key: &str) -> Vec<u8> {
    encode(&KvQuery::Get { key: key.into() })
}

async fn len_at(cluster: &TestCluster, node: u64, group: GroupId) -> u64 {
    let reply = cluster
        .node(node)
        .router
        .read(group, encode(&KvQuery::Len))
        .await
        .unwrap();
    let bytes = decode_reply(&reply).expect("Len answers");
    u64::from_le_bytes(bytes.try_into().expect("eight bytes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_value_group_runs_end_to_end_and_installs_on_a_new_replica() {
    let cluster = TestCluster::start_with(3, small_log_options())
        .await
        .unwrap();

    let group = cluster
        .node(1)
        .router
        .create_group("kv/one", KV_KIND, Vec::new(), 2)
        .await
        .unwrap();
    let spec = cluster.node(1).meta.state().groups["kv/one"].clone();
    assert_eq!(spec.group, group);
    assert_eq!(spec.replicas.len(), 2);
    let outsider = (1..=3u64)
        .find(|n| !spec.replicas.contains(&NodeId(*n)))
        .unwrap();
    wait_until("the group to be ready", Duration::from_secs(30), || async {
        cluster.node(outsider).meta.state().groups["kv/one"].ready
    })
    .await
    .unwrap();
    assert!(!cluster.node(outsider).host.has_group(group));

    // Writes and reads from the node without a replica go to the leader.
    let router = &cluster.node(outsider).router;
    for i in 0..60 {
        router
            .propose(
                group,
                put(&format!("k{i}"), &format!("v{i}")),
                Retry::BeforeProposing,
            )
            .await
            .unwrap();
    }
    assert_eq!(len_at(&cluster, outsider, group).await, 60);
    // Rows change in place after earlier snapshots were built.
    router
        .propose(group, put("k0", "again"), Retry::Always)
        .await
        .unwrap();
    let delete = encode(&KvCommand::Delete { key: "k59".into() });
    router.propose(group, delete, Retry::Always).await.unwrap();
    for i in 0..30 {
        router
            .propose(group, put("k1", &format!("v1.{i}")), Retry::Always)
            .await
            .unwrap();
    }
    assert_eq!(len_at(&cluster, outsider, group).await, 59);

    // Errors keep their meaning across the forward.
    let garbage = router.read(group, vec![0xFF, 0xFF]).await.unwrap_err();
    assert!(
        matches!(garbage, RouterError::InvalidArgument(_)),
        "{garbage:?}"
    );
    // The metadata group and shards take no raw proposals.
    let meta = router
        .propose(GroupId::META, vec![0xFF], Retry::BeforeProposing)
        .await
        .unwrap_err();
    assert!(matches!(meta, RouterError::InvalidArgument(_)), "{meta:?}");
    let missing = router.read(GroupId(9_999), get("k1")).await.unwrap_err();
    assert!(
        matches!(missing, RouterError::ResourceNotFound(_)),
        "{missing:?}"
    );

    // The log no longer starts at the group's first entry: a new replica
    // can only catch up by snapshot.
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
                    .is_some_and(|p| p > 1)
            })
        },
    )
    .await
    .unwrap();

    let mut replicas = vec![NodeId(outsider)];
    replicas.extend(spec.replicas.iter().copied());
    cluster
        .node(1)
        .router
        .set_group_replicas("kv/one", replicas)
        .await
        .unwrap();
    // First in the list, the new replica becomes the preferred leader: once
    // it leads, reads are answered from the state it installed.
    wait_until(
        "the new replica to lead",
        Duration::from_secs(60),
        || async { cluster.leader_of(group) == Some(NodeId(outsider)) },
    )
    .await
    .unwrap();
    let status = cluster.node(outsider).host.status(group).unwrap();
    assert!(
        status.purged_index.is_some_and(|p| p > 1),
        "the new replica started from a snapshot: {status:?}"
    );
    assert_eq!(len_at(&cluster, outsider, group).await, 59);
    for i in 2..59 {
        let reply = router.read(group, get(&format!("k{i}"))).await.unwrap();
        assert_eq!(decode_reply(&reply), Some(format!("v{i}").into_bytes()));
    }
    for (key, value) in [("k0", Some("again")), ("k1", Some("v1.29")), ("k59", None)] {
        let reply = router.read(group, get(key)).await.unwrap();
        assert_eq!(
            decode_reply(&reply),
            value.map(|v| v.as_bytes().to_vec()),
            "{key}"
        );
    }

    cluster.node(1).router.delete_group("kv/one").await.unwrap();
    wait_until(
        "every replica to be removed",
        Duration::from_secs(60),
        || async { cluster.live().all(|n| !n.host.has_group(group)) },
    )
    .await
    .unwrap();
    cluster.shutdown().await;
}

/// A kind whose snapshots copy its rows builds them further apart as it
/// holds more rows: after a build that copied 300 rows the next one waits
/// for 150 entries, not for the configured 20 (a queue with a large
/// backlog would otherwise copy it whole every few seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_that_copy_many_rows_come_further_apart() {
    let cluster = TestCluster::start_with(1, small_log_options())
        .await
        .unwrap();
    let group = cluster
        .node(1)
        .router
        .create_group("kv/rows", KV_KIND, Vec::new(), 1)
        .await
        .unwrap();
    wait_until("the group to be ready", Duration::from_secs(30), || async {
        cluster.node(1).meta.state().groups["kv/rows"].ready
    })
    .await
    .unwrap();
    let router = &cluster.node(1).router;
    let status = || cluster.node(1).host.status(group).unwrap();
    for i in 0..300 {
        let put = put(&format!("k{i}"), "v");
        router
            .propose(group, put, Retry::BeforeProposing)
            .await
            .unwrap();
    }
    let all_rows_at = status().applied_index;

    // Overwrites add no rows. The snapshots seen after the 300th key each
    // copied all 300 rows.
    let mut seen: Vec<u64> = Vec::new();
    for i in 0..1_000 {
        if seen.len() == 2 {
            break;
        }
        let put = put("k0", &format!("v{i}"));
        router
            .propose(group, put, Retry::BeforeProposing)
            .await
            .unwrap();
        let at = status().snapshot_index.unwrap_or(0);
        if at >= all_rows_at && seen.last() != Some(&at) {
            seen.push(at);
        }
    }
    assert_eq!(seen.len(), 2, "two snapshots after the 300th key: {seen:?}");
    assert!(
        seen[1] - seen[0] >= 150,
        "a snapshot after a copy of 300 rows came {} entries later: {seen:?}",
        seen[1] - seen[0]
    );
    cluster.shutdown().await;
}
