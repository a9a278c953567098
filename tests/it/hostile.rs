//! Requests a hostile or broken peer could send to the internal port: each
//! must be refused with a clear error and leave the cluster working.

use kinesin_proto::v1::node_client::NodeClient;
use kinesin_proto::v1::{self as pb};
use kinesin_testkit::TestCluster;
use kinesin_types::{GroupId, NodeId};
use tonic::Code;

async fn native_client(cluster: &TestCluster, node: u64) -> NodeClient<tonic::transport::Channel> {
    let addr = cluster.node(node).config.grpc_address();
    NodeClient::connect(format!("http://{addr}")).await.unwrap()
}

/// A Join naming an address no one can dial is refused before it enters the
/// replicated membership, and a learner with such an address (as one added
/// before addresses were checked) makes no node panic: the metadata group
/// keeps committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undialable_join_address_is_refused_and_never_stops_the_metadata_group() {
    let cluster = TestCluster::start(3).await.unwrap();
    let leader = cluster.leader_of(GroupId::META).unwrap().0;
    let mut c = native_client(&cluster, leader).await;
    for (raft_addr, api_addr) in [("x y", "127.0.0.1:1"), ("127.0.0.1:1", "")] {
        let refused = c
            .join(pb::JoinRequest {
                node_id: 9,
                raft_addr: raft_addr.into(),
                api_addr: api_addr.into(),
                zone: String::new(),
                cluster_id: String::new(),
            })
            .await
            .expect_err("a join with an undialable address");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    }
    assert!(!cluster
        .node(leader)
        .meta
        .state()
        .nodes
        .contains_key(&NodeId(9)));

    cluster
        .node(leader)
        .host
        .add_learner(GroupId::META, NodeId(9), "x y".into(), false)
        .await
        .unwrap();
    cluster.create_stream("after-bad-learner", 1).await.unwrap();
    for node in cluster.live() {
        let state = node.meta.state();
        assert!(state.streams.contains_key("after-bad-learner"));
    }
    assert!(cluster.node(leader).host.is_leader(GroupId::META));
    cluster.shutdown().await;
}

/// The native CreateStream is checked on the metadata leader too: a shard
/// count that would make a metadata entry every replica must hold (and
/// apply at every restart) is refused, as is an impossible replication.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_native_create_stream_is_validated_on_the_metadata_leader() {
    let cluster = TestCluster::start(1).await.unwrap();
    let mut c = native_client(&cluster, 1).await;
    for (shards, replication) in [(50_000_000, 1), (0, 1), (1, 1000)] {
        let refused = c
            .create_stream(pb::CreateStreamRequest {
                stream: "too-big".into(),
                shard_count: shards,
                replication_factor: replication,
                ..Default::default()
            })
            .await
            .expect_err("an invalid CreateStream");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    }
    assert!(!cluster.node(1).meta.state().streams.contains_key("too-big"));
    cluster.shutdown().await;
}
