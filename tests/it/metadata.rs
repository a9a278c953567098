use std::time::Duration;

use kinesin_testkit::TestCluster;
use kinesin_types::GroupId;

/// A stream created through a node that is not the metadata leader is in
/// that node's metadata when the call returns, even when the node hears of
/// metadata commits late: boto3's `stream_exists` waiter, which describes
/// the stream right after CreateStream, must not see ResourceNotFound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_created_through_a_follower_is_visible_there_at_once() {
    let cluster = TestCluster::start(3).await.unwrap();
    cluster.wait_for_meta_voters(3).await.unwrap();
    let leader = cluster.leader_of(GroupId::META).unwrap().0;
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    cluster
        .filter
        .delay(leader, follower, Duration::from_millis(700));
    for i in 0..3 {
        let name = format!("read-your-writes-{i}");
        let node = cluster.node(follower);
        node.router.create_stream(&name, 1, 0, 0).await.unwrap();
        assert!(
            node.meta.state().streams.contains_key(&name),
            "{name} created through node {follower} is not in its metadata yet"
        );
    }
    cluster.filter.heal();
    cluster.shutdown().await;
}

/// A stream created through one node is found on every other node as soon
/// as CreateStream returned, even on a node whose metadata replica hears of
/// the commit late: a client behind a load balancer creates a stream through
/// one node and lists its shards through the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_created_through_one_node_is_found_on_every_node() {
    let cluster = TestCluster::start(3).await.unwrap();
    cluster.wait_for_meta_voters(3).await.unwrap();
    let leader = cluster.leader_of(GroupId::META).unwrap().0;
    let mut others = (1..=3).filter(|n| *n != leader);
    let (creator, lagging) = (others.next().unwrap(), others.next().unwrap());
    cluster
        .filter
        .delay(leader, lagging, Duration::from_millis(700));
    for i in 0..3 {
        let name = format!("seen-everywhere-{i}");
        cluster
            .node(creator)
            .router
            .create_stream(&name, 1, 0, 0)
            .await
            .unwrap();
        let info = cluster
            .node(lagging)
            .router
            .describe_stream(&name)
            .await
            .unwrap_or_else(|e| panic!("{name} is not found on node {lagging}: {e}"));
        assert_eq!(info.name.as_str(), name);
    }
    let missing = cluster
        .node(lagging)
        .router
        .describe_stream("never-created")
        .await;
    assert!(
        matches!(
            missing,
            Err(kinesin_router::RouterError::ResourceNotFound(_))
        ),
        "{missing:?}"
    );
    cluster.filter.heal();
    cluster.shutdown().await;
}
