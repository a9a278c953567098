use std::time::Duration;

use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::types::{ScalingType, StreamStatus};
use kinesin_meta::{CLOSED_LIMIT_VERSION, LIMITS_VERSION};
use kinesin_testkit::{wait_until, TestCluster, TestOptions};
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

/// Holds back the metadata leader's messages to the followers, so that no
/// command commits before requests sent at once all passed their gateway's
/// check.
fn hold_metadata_commits(cluster: &TestCluster) {
    let leader = cluster.leader_of(GroupId::META).unwrap().0;
    for n in (1..=3).filter(|n| *n != leader) {
        cluster.filter.delay(leader, n, Duration::from_millis(700));
    }
}

/// A client of each of the three nodes, once each has heard every node
/// report `version`: until then commands of that version are not proposed
/// (a node of an older release could not decode them), and the checks they
/// carry are not made where they apply.
async fn clients_once_every_node_reports(
    cluster: &TestCluster,
    version: u32,
) -> Vec<aws_sdk_kinesis::Client> {
    wait_until(
        "every node's data version",
        Duration::from_secs(30),
        || async { (1..=3).all(|n| cluster.node(n).router.cluster_data_version() >= version) },
    )
    .await
    .unwrap();
    (1..=3)
        .map(|n| crate::aws_sdk::client(&cluster.node(n).api_address()))
        .collect()
}

/// Each answer of racing requests against what the map holds afterwards
/// (`applied`): a success was applied; a refusal is LimitExceeded, or
/// ResourceInUse for an SDK retry of a request that did apply.
fn check_answers<T, E: ProvideErrorMetadata + std::fmt::Debug>(
    answers: Vec<(String, Result<T, E>)>,
    applied: impl Fn(&str) -> bool,
) {
    for (name, result) in answers {
        match result {
            Ok(_) => assert!(applied(&name), "{name} answered but absent"),
            Err(e) if applied(&name) => {
                assert!(e.code() == Some("ResourceInUseException"), "{name}: {e:?}")
            }
            Err(e) => assert!(e.code() == Some("LimitExceededException"), "{name}: {e:?}"),
        }
    }
}

/// Limits hold for requests that race. Each node's gateway checks a limit
/// against its own copy of the map, so requests sent at once through three
/// nodes all pass that check; the metadata group orders them and refuses,
/// where they apply, those that would pass the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_hold_for_requests_racing_through_every_node() {
    let options = TestOptions {
        configure: |c| c.shard_limit = 8,
        ..TestOptions::default()
    };
    let cluster = TestCluster::start_with(3, options).await.unwrap();
    let clients = clients_once_every_node_reports(&cluster, LIMITS_VERSION).await;

    // Six streams of two shards at once, for a limit of eight shards.
    hold_metadata_commits(&cluster);
    let creates = (0..6).map(|k| {
        let c = clients[k % 3].clone();
        async move {
            let name = format!("race-{k}");
            let created = c.create_stream().stream_name(&name).shard_count(2).send();
            (name, created.await)
        }
    });
    let answers = futures::future::join_all(creates).await;
    cluster.filter.heal();
    let created = |n: u64| -> Vec<String> {
        let state = cluster.node(n).meta.state();
        state
            .streams
            .keys()
            .filter(|k| k.starts_with("race-"))
            .cloned()
            .collect()
    };
    wait_until(
        "every node has the streams",
        Duration::from_secs(10),
        || async { (1..=3).all(|n| created(n).len() >= 4) },
    )
    .await
    .unwrap();
    let created = created(1);
    assert_eq!(created.len(), 4, "created: {created:?}");
    assert_eq!(cluster.node(1).meta.state().open_shard_count(), 8);
    check_answers(answers, |name| created.iter().any(|c| c == name));

    // 20 consumers a stream: 18 one by one, then six at once.
    let stream = clients[0]
        .describe_stream_summary()
        .stream_name(&created[0])
        .send()
        .await
        .unwrap();
    let arn = stream
        .stream_description_summary()
        .unwrap()
        .stream_arn()
        .to_string();
    for k in 0..18 {
        clients[k % 3]
            .register_stream_consumer()
            .stream_arn(&arn)
            .consumer_name(format!("early-{k}"))
            .send()
            .await
            .unwrap();
    }
    hold_metadata_commits(&cluster);
    let registers = (0..6).map(|k| {
        let c = clients[k % 3].clone();
        let arn = arn.clone();
        async move {
            let name = format!("late-{k}");
            let registered = c
                .register_stream_consumer()
                .stream_arn(arn)
                .consumer_name(&name)
                .send()
                .await;
            (name, registered)
        }
    });
    let answers = futures::future::join_all(registers).await;
    cluster.filter.heal();
    let key = created[0].as_str();
    let consumers = |n: u64| {
        cluster.node(n).meta.state().streams[key]
            .settings
            .consumers
            .clone()
    };
    wait_until(
        "every node has the consumers",
        Duration::from_secs(10),
        || async { (1..=3).all(|n| consumers(n).len() >= 20) },
    )
    .await
    .unwrap();
    let consumers = consumers(1);
    assert_eq!(consumers.len(), 20);
    check_answers(answers, |name| consumers.contains_key(name));
    cluster.shutdown().await;
}

/// Repeated resharding cannot grow the live groups without bound: the
/// shards a reshard closes keep their groups until their records pass
/// retention, and the closed shards the map holds may number at most the
/// cluster's shard limit. A reshard that would keep more is refused with
/// LimitExceededException and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_stops_at_the_limit_of_closed_shards() {
    let options = TestOptions {
        configure: |c| c.shard_limit = 4,
        ..TestOptions::default()
    };
    let cluster = TestCluster::start_with(1, options).await.unwrap();
    let client = crate::aws_sdk::client(&cluster.node(1).api_address());
    let active = || async {
        client
            .describe_stream_summary()
            .stream_name("reshards")
            .send()
            .await
            .ok()
            .and_then(|d| d.stream_description_summary().cloned())
            .is_some_and(|s| s.stream_status() == &StreamStatus::Active)
    };
    let scale = |target: i32| {
        client
            .update_shard_count()
            .stream_name("reshards")
            .target_shard_count(target)
            .scaling_type(ScalingType::UniformScaling)
            .send()
    };
    client
        .create_stream()
        .stream_name("reshards")
        .shard_count(2)
        .send()
        .await
        .unwrap();
    wait_until("the stream is ACTIVE", Duration::from_secs(30), active)
        .await
        .unwrap();
    // 2 → 4 closes two shards; 4 → 2 would close four more, six > 4.
    scale(4).await.unwrap();
    wait_until(
        "the stream is ACTIVE again",
        Duration::from_secs(30),
        active,
    )
    .await
    .unwrap();
    let refused = scale(2).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some("LimitExceededException"),
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .unwrap_or_default()
            .contains("closed shards"),
        "{refused:?}"
    );
    let state = cluster.node(1).meta.state();
    assert_eq!(state.open_shard_count(), 4);
    assert_eq!(state.closed_shard_count(), 2);
    cluster.shutdown().await;
}

/// The closed shards a reshard keeps count against the shard limit where
/// the reshard applies, too: two merges sent at once through two nodes
/// each fit on the map before either applies, and together they would
/// keep six closed shards for a limit of five. One is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reshards_racing_through_two_nodes_keep_the_closed_shard_limit() {
    let options = TestOptions {
        configure: |c| c.shard_limit = 5,
        ..TestOptions::default()
    };
    let cluster = TestCluster::start_with(3, options).await.unwrap();
    let clients = clients_once_every_node_reports(&cluster, CLOSED_LIMIT_VERSION).await;
    async fn active(client: &aws_sdk_kinesis::Client, name: &str) {
        wait_until("the stream is ACTIVE", Duration::from_secs(30), || async {
            client
                .describe_stream_summary()
                .stream_name(name)
                .send()
                .await
                .ok()
                .and_then(|d| d.stream_description_summary().cloned())
                .is_some_and(|s| s.stream_status() == &StreamStatus::Active)
        })
        .await
        .unwrap()
    }
    async fn create(client: &aws_sdk_kinesis::Client, name: &str) {
        client
            .create_stream()
            .stream_name(name)
            .shard_count(2)
            .send()
            .await
            .unwrap();
        active(client, name).await;
    }
    let merge = |client: usize, name: &'static str| {
        clients[client]
            .merge_shards()
            .stream_name(name)
            .shard_to_merge("shardId-000000000000")
            .adjacent_shard_to_merge("shardId-000000000001")
            .send()
    };
    // Two closed shards kept and five open, the limit.
    create(&clients[0], "a").await;
    create(&clients[0], "b").await;
    merge(0, "a").await.unwrap();
    active(&clients[0], "a").await;
    create(&clients[0], "c").await;

    hold_metadata_commits(&cluster);
    let (b, c) = tokio::join!(merge(1, "b"), merge(2, "c"));
    cluster.filter.heal();
    let merged = |n: u64, name: &str| {
        cluster.node(n).meta.state().streams[name]
            .shards
            .iter()
            .any(|s| s.state != kinesin_types::ShardState::Open)
    };
    // Both were answered, so the leader has applied both commands; node
    // 1 catches up with it.
    cluster.wait_for_meta_voters(3).await.unwrap();
    assert!(
        !(merged(1, "b") && merged(1, "c")),
        "both merges applied: {} closed shards kept for a limit of 5",
        cluster.node(1).meta.state().closed_shard_count()
    );
    assert_eq!(cluster.node(1).meta.state().closed_shard_count(), 4);
    check_answers(vec![("b".to_string(), b), ("c".to_string(), c)], |name| {
        merged(1, name)
    });
    cluster.shutdown().await;
}
