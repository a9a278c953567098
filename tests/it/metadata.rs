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
