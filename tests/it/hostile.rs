//! Requests a hostile or broken peer could send to the internal port: each
//! must be refused with a clear error and leave the cluster working.

use kinesin_proto::v1::node_client::NodeClient;
use kinesin_proto::v1::{self as pb};
use kinesin_router::{AppendOutcome, RecordIn};
use kinesin_testkit::TestCluster;
use kinesin_types::{GroupId, NodeId, ShardState};
use tonic::Code;

async fn native_client(cluster: &TestCluster, node: u64) -> NodeClient<tonic::transport::Channel> {
    let addr = cluster.node(node).config.grpc_address();
    NodeClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(kinesin_proto::MAX_MESSAGE_BYTES)
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

/// The native CreateStream, and a stream created by a raw metadata
/// command, are checked on the metadata leader too: a shard count that
/// would make a metadata entry every replica must hold (and apply at every
/// restart) is refused, as is an impossible replication.
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
    // The same streams as raw metadata commands (the internal MetaWrite),
    // bare and wrapped in the limits: 50,000 placements fit the 1 MiB
    // bound on a command, so only the stream checks can refuse them.
    let create = |shards: u32, replication: u32| kinesin_meta::MetaCommand::CreateStream {
        name: "too-big".into(),
        shard_count: shards,
        retention_hours: 24,
        max_record_bytes: 1 << 20,
        replication_factor: replication,
        now_ms: 1,
        placements: vec![vec![NodeId(1)]; shards as usize],
    };
    let limited = kinesin_meta::MetaCommand::CreateStreamWithSettings {
        stream: kinesin_meta::NewStream {
            name: "too-big".into(),
            shard_count: 20_000,
            retention_hours: 24,
            max_record_bytes: 1 << 20,
            replication_factor: 1,
            now_ms: 1,
            placements: vec![vec![NodeId(1)]; 20_000],
        },
        mode: kinesin_types::StreamMode::Provisioned,
        tags: Default::default(),
    }
    .limited(kinesin_meta::Limits {
        open_shards: 100_000,
        on_demand_streams: 50,
        consumers_per_stream: 20,
        tags_per_stream: 50,
    });
    for command in [create(50_000, 1), create(1, 1000), limited] {
        let refused = c
            .meta_write(pb::MetaWriteRequest {
                command: command.encode().into(),
            })
            .await
            .expect_err("an invalid stream as a raw metadata command");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    }
    assert!(!cluster.node(1).meta.state().streams.contains_key("too-big"));
    cluster.shutdown().await;
}

/// Raw metadata commands that add or close shards are held to the
/// metadata leader's shard limit: a bare Reshard (no `Limited` around it
/// to count shards where it applies) could otherwise open thousands of
/// groups in one command, and a bare CreateStream likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raw_commands_that_add_shards_keep_the_leaders_shard_limit() {
    let options = kinesin_testkit::TestOptions {
        configure: |c| c.shard_limit = 4,
        ..kinesin_testkit::TestOptions::default()
    };
    let cluster = TestCluster::start_with(1, options).await.unwrap();
    cluster.create_stream("small", 1).await.unwrap();
    let mut c = native_client(&cluster, 1).await;
    let children = |count: u32| -> Vec<kinesin_meta::NewShard> {
        kinesin_types::HashKeyRange::split_evenly(count)
            .into_iter()
            .map(|range| kinesin_meta::NewShard {
                range,
                parent: kinesin_types::ShardId(0),
                adjacent_parent: None,
                replicas: vec![NodeId(1)],
            })
            .collect()
    };
    let reshard = |count: u32| kinesin_meta::MetaCommand::Reshard {
        stream: "small".into(),
        parents: vec![kinesin_types::ShardId(0)],
        children: children(count),
    };
    let lax = kinesin_meta::Limits {
        open_shards: 100_000,
        on_demand_streams: 50,
        consumers_per_stream: 20,
        tags_per_stream: 50,
    };
    let create = kinesin_meta::MetaCommand::CreateStream {
        name: "more".into(),
        shard_count: 4,
        retention_hours: 24,
        max_record_bytes: 1 << 20,
        replication_factor: 1,
        now_ms: 1,
        placements: vec![vec![NodeId(1)]; 4],
    };
    // 1 open shard: 5 children would make 5, and 4 more streams' shards 5.
    for command in [reshard(5), reshard(5).limited(lax), create] {
        let refused = c
            .meta_write(pb::MetaWriteRequest {
                command: command.encode().into(),
            })
            .await
            .expect_err("a raw command past the shard limit");
        assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    }
    let state = cluster.node(1).meta.state();
    assert_eq!(state.open_shard_count(), 1);
    assert!(!state.streams.contains_key("more"));
    c.meta_write(pb::MetaWriteRequest {
        command: reshard(4).encode().into(),
    })
    .await
    .expect("a reshard within the limit");
    cluster.shutdown().await;
}

/// Found from the package directory the test runner names, not the one
/// the binary was built in (clones share the target directory).
fn fixture(name: &str) -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(
            || env!("CARGO_MANIFEST_DIR").into(),
            std::path::PathBuf::from,
        )
        .join("fixtures/internal-tls")
        .join(name)
}

/// A client of the internal port trusting the cluster CA and presenting
/// `identity` (certificate, key), if any.
async fn tls_client(
    addr: &str,
    identity: Option<(&str, &str)>,
) -> Result<NodeClient<tonic::transport::Channel>, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |name: &str| std::fs::read(fixture(name)).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt")))
        .domain_name(kinesin_proto::tls::SERVER_NAME);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert), read(key)));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(NodeClient::new(channel))
}

/// With internal TLS, nodes join, elect and replicate over mutual TLS, and
/// the internal port serves only callers holding a certificate of the
/// cluster's CA: plaintext, no client certificate and a certificate of
/// another CA are all refused before any request is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_internal_port_serves_only_certificates_of_the_cluster_ca() {
    let options = kinesin_testkit::TestOptions {
        internal_tls: Some([fixture("ca.crt"), fixture("node.crt"), fixture("node.key")]),
        ..Default::default()
    };
    let cluster = TestCluster::start_with(3, options).await.unwrap();
    cluster.create_stream("over-tls", 2).await.unwrap();
    let node = cluster.node(2);
    // One record for each node's shards at least: some are forwarded.
    let records = (0..16)
        .map(|i| RecordIn {
            partition_key: format!("k{i}"),
            data: b"hello".to_vec(),
            explicit_hash_key: None,
        })
        .collect();
    let outcomes = node.router.put_records("over-tls", records).await.unwrap();
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, AppendOutcome::Stored { .. })));
    let addr = node.config.grpc_address();

    let join = || pb::JoinRequest {
        node_id: 9,
        raft_addr: "127.0.0.1:1".into(),
        api_addr: "127.0.0.1:1".into(),
        zone: String::new(),
        cluster_id: String::new(),
    };
    let plaintext = NodeClient::connect(format!("http://{addr}")).await;
    if let Ok(mut c) = plaintext {
        let refused = c.join(join()).await.expect_err("a plaintext join");
        // The TLS side closes the connection: the client reports it as
        // unavailable, cancelled or an unknown or internal failure.
        assert!(
            matches!(
                refused.code(),
                Code::Unknown | Code::Unavailable | Code::Internal | Code::Cancelled
            ),
            "{refused:?}"
        );
    }
    for identity in [None, Some(("rogue.crt", "rogue.key"))] {
        if let Ok(mut c) = tls_client(&addr, identity).await {
            let refused = c
                .join(join())
                .await
                .expect_err("a join without a cluster certificate");
            // TLS 1.3 checks the client certificate after the handshake:
            // the first request meets the server's alert (or the closed
            // connection), never a handler's answer.
            assert!(
                matches!(
                    refused.code(),
                    Code::Unknown | Code::Unavailable | Code::Cancelled
                ),
                "{identity:?}: {refused:?}"
            );
        }
    }
    assert!(!cluster.node(1).meta.state().nodes.contains_key(&NodeId(9)));

    let mut member = tls_client(&addr, Some(("node.crt", "node.key")))
        .await
        .unwrap();
    let info = member
        .cluster_info(pb::ClusterInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!info.cluster_id.is_empty());
    cluster.shutdown().await;
}

/// A shard read from the internal port returns what a GetRecords may (10
/// MiB) whatever size and count it asks for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_internal_shard_read_is_bounded_like_get_records() {
    let cluster = TestCluster::start(1).await.unwrap();
    cluster.create_stream("big-reads", 1).await.unwrap();
    let node = cluster.node(1);
    for batch in 0..4 {
        let records = (0..6)
            .map(|i| RecordIn {
                partition_key: format!("k{batch}-{i}"),
                data: vec![b'x'; 1_000_000],
                explicit_hash_key: None,
            })
            .collect();
        node.router.put_records("big-reads", records).await.unwrap();
    }
    let group = node.meta.state().streams["big-reads"].shards[0].group;
    let mut c = native_client(&cluster, 1).await;
    let read = c
        .shard_read(pb::ShardReadRequest {
            group: group.0,
            from: pb::IteratorType::TrimHorizon as i32,
            limit: u32::MAX,
            max_bytes: u64::MAX,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let bytes: usize = read.records.iter().map(|r| r.data.len()).sum();
    assert!(!read.records.is_empty());
    assert!(
        bytes <= (10 << 20) + 1_000_000,
        "{bytes} bytes in one internal read"
    );
    cluster.shutdown().await;
}

/// An append routed by the shard map from before a split (the sender's map
/// epoch is older) reaches the parent's group, which is sealed: it is
/// refused, and nothing is stored after the parent's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_routed_by_the_map_before_a_split_is_refused() {
    let cluster = TestCluster::start(1).await.unwrap();
    cluster.create_stream("resharded", 1).await.unwrap();
    let node = cluster.node(1);
    let before = node.meta.state().streams["resharded"].clone();
    let parent = split_first_shard(node, "resharded").await;

    let mut c = native_client(&cluster, 1).await;
    let refused = c
        .shard_append(pb::ShardAppendRequest {
            group: parent.group.0,
            epoch: before.epoch,
            records: vec![pb::Record {
                partition_key: "same-key".into(),
                data: b"late".to_vec().into(),
                explicit_hash_key: String::new(),
            }],
        })
        .await
        .expect_err("an append to the sealed parent");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let read = c
        .shard_read(pb::ShardReadRequest {
            group: parent.group.0,
            from: pb::IteratorType::TrimHorizon as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(read.records.iter().all(|r| &r.data[..] != b"late"));
    cluster.shutdown().await;
}

/// One acknowledged or failed put of the racing writers.
struct Put {
    data: String,
    sent: std::time::Instant,
    acked: Option<std::time::Instant>,
}

/// Every record of `shard` from its start, in order; a closed shard is read
/// to its end, an open one until it answers empty at its tip.
async fn read_whole_shard(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    shard: &str,
) -> Vec<String> {
    let mut iterator = client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shard)
        .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
        .send()
        .await
        .unwrap()
        .shard_iterator;
    let mut records = Vec::new();
    while let Some(it) = iterator {
        let page = client
            .get_records()
            .shard_iterator(it)
            .send()
            .await
            .unwrap();
        let at_tip = page.records().is_empty() && page.millis_behind_latest() == Some(0);
        records.extend(
            page.records()
                .iter()
                .map(|r| String::from_utf8(r.data().as_ref().to_vec()).unwrap()),
        );
        iterator = if at_tip {
            None
        } else {
            page.next_shard_iterator
        };
    }
    records
}

/// Item 14 with the race itself: a shard is split while its leader's map
/// lags 600 ms behind the metadata leader's, so for a while it still takes
/// appends routed by the map from before the split, from an old-map client
/// that writes the parent's group directly; meanwhile SDK clients on the
/// other nodes put to the same hash key and their nodes route them by the
/// new map to the child. Read back as the key's history (the parent to its
/// end, then the child that took the key over), every acknowledged write is
/// there once and in real-time order: one acknowledged before another was
/// sent comes first. A child that took writes before its parent was sealed
/// breaks that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_to_one_key_keep_their_order_across_a_split_that_an_old_map_races() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let cluster = TestCluster::start(3).await.unwrap();
    cluster.create_stream("raced", 1).await.unwrap();
    let before = cluster.node(1).meta.state().streams["raced"].clone();
    let group = before.shards[0].group;
    // The parent's leader must not lead the metadata group, whose log it
    // is to receive late.
    let meta = cluster.leader_of(GroupId::META).unwrap().0;
    let mut leader = cluster.leader_of(group).unwrap().0;
    if leader == meta {
        let to = (1..=3).find(|n| *n != meta).unwrap();
        cluster
            .node(leader)
            .host
            .transfer_leader(group, NodeId(to))
            .await
            .unwrap();
        kinesin_testkit::wait_until(
            "the parent's leader to move",
            Duration::from_secs(30),
            || async { cluster.leader_of(group) == Some(NodeId(to)) },
        )
        .await
        .unwrap();
        leader = to;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let record = {
        let acked = acked.clone();
        move |data: String, sent: Instant, ok: bool| {
            if ok {
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Put {
                data,
                sent,
                acked: ok.then(Instant::now),
            }
        }
    };
    // A writer puts `{name}-0`, `{name}-1`, … one at a time until told to
    // stop; after a refusal (the parent closed) it waits before the next.
    type Put1 = Box<dyn Fn(String) -> futures::future::BoxFuture<'static, bool> + Send>;
    let spawn_writer = |name: String, put: Put1| {
        let (stop, record) = (stop.clone(), record.clone());
        tokio::spawn(async move {
            let mut puts = Vec::new();
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (data, sent) = (format!("{name}-{i}"), Instant::now());
                let taken = put(data.clone()).await;
                puts.push(record(data, sent, taken));
                if !taken {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            puts
        })
    };
    let mut writers = Vec::new();
    // SDK clients through the other nodes, which route by their maps. No
    // retries: a put retried after an answer lost on its way would be
    // stored twice, which is Kinesis's rule but not what this checks.
    for n in (1..=3u64).filter(|n| *n != leader) {
        let client = crate::aws_sdk::client_with(
            &cluster.node(n).api_address(),
            aws_sdk_kinesis::config::retry::RetryConfig::disabled(),
        );
        writers.push(spawn_writer(
            format!("sdk{n}"),
            Box::new(move |data| {
                let put = client
                    .put_record()
                    .stream_name("raced")
                    .partition_key("same-key")
                    .explicit_hash_key("1")
                    .data(aws_sdk_kinesis::primitives::Blob::new(data));
                Box::pin(async move { put.send().await.is_ok() })
            }),
        ));
    }
    // Old-map clients: appends to the parent's group at the epoch before
    // the split, at its leader.
    for w in 0..3 {
        let c = native_client(&cluster, leader).await;
        let epoch = before.epoch;
        writers.push(spawn_writer(
            format!("old{w}"),
            Box::new(move |data| {
                let mut c = c.clone();
                Box::pin(async move {
                    c.shard_append(pb::ShardAppendRequest {
                        group: group.0,
                        epoch,
                        records: vec![pb::Record {
                            partition_key: "same-key".into(),
                            data: data.into_bytes().into(),
                            explicit_hash_key: "1".into(),
                        }],
                    })
                    .await
                    .is_ok()
                })
            }),
        ));
    }
    let wait_for_acks = |n: usize| {
        let acked = acked.clone();
        kinesin_testkit::wait_until("the writers' puts", Duration::from_secs(60), move || {
            let acked = acked.clone();
            async move { acked.load(Ordering::Relaxed) >= n }
        })
    };
    wait_for_acks(60).await.unwrap();
    cluster
        .filter
        .delay(meta, leader, Duration::from_millis(600));
    let split_asked = Instant::now();
    let parent = split_first_shard(cluster.node(meta), "raced").await;
    let after_split = acked.load(Ordering::Relaxed);
    wait_for_acks(after_split + 60).await.unwrap();
    cluster.filter.heal();
    stop.store(true, Ordering::Relaxed);
    let mut puts = Vec::new();
    for w in writers {
        puts.extend(w.await.unwrap());
    }

    let client = crate::aws_sdk::client(&cluster.node(meta).api_address());
    let shards = client
        .list_shards()
        .stream_name("raced")
        .send()
        .await
        .unwrap()
        .shards
        .unwrap_or_default();
    // The child whose range starts at 0 holds hash key 1.
    let child = shards
        .iter()
        .find(|s| {
            s.parent_shard_id() == Some(parent.shard_id.to_string().as_str())
                && s.hash_key_range().map(|r| r.starting_hash_key()) == Some("0")
        })
        .expect("the child of hash key 1");
    let mut history = read_whole_shard(&client, "raced", &parent.shard_id.to_string()).await;
    let in_parent = history.len();
    history.extend(read_whole_shard(&client, "raced", child.shard_id()).await);

    let mut position = std::collections::HashMap::new();
    for (at, data) in history.iter().enumerate() {
        assert!(
            position.insert(data.as_str(), at).is_none(),
            "{data} was stored twice"
        );
    }
    let sent: std::collections::HashSet<_> = puts.iter().map(|p| p.data.as_str()).collect();
    assert!(
        history.iter().all(|d| sent.contains(d.as_str())),
        "a record no one sent"
    );
    let acked: Vec<_> = puts.iter().filter(|p| p.acked.is_some()).collect();
    for p in &acked {
        assert!(
            position.contains_key(p.data.as_str()),
            "acknowledged write {} is lost",
            p.data
        );
    }
    // The race took place: the parent's leader, its map late, still took
    // old-map writes while the split was being applied.
    assert!(
        acked
            .iter()
            .any(|p| p.data.starts_with("old") && p.sent > split_asked),
        "no old-map write was acknowledged after the split was asked for"
    );
    assert!(
        acked.iter().any(|p| position[p.data.as_str()] < in_parent)
            && acked.iter().any(|p| position[p.data.as_str()] >= in_parent),
        "the writes did not span the split: {in_parent} of {} records in the parent",
        history.len()
    );
    for b in &acked {
        let at_b = position[b.data.as_str()];
        for a in acked.iter().filter(|a| a.acked.unwrap() < b.sent) {
            assert!(
                position[a.data.as_str()] < at_b,
                "{} was acknowledged before {} was sent, but is stored after it \
                 (the parent holds the first {in_parent} of {} records)",
                a.data,
                b.data,
                history.len()
            );
        }
    }
    cluster.shutdown().await;
}

/// Issue 18 item 10: a sealed parent leaves the map, and its group the
/// nodes, once a retention period has passed since it was sealed; within
/// that period it stays, and a restart of its leader does not restart the
/// count. (Before, every reshard left its parents' groups for good.) The
/// node's wall clock is moved forward instead of waiting a day, which is
/// safe because nextest runs each test in its own process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sealed_shard_is_removed_a_retention_period_after_its_seal() {
    use aws_sdk_kinesis::primitives::Blob;
    const HOUR_MS: i64 = 3_600_000;
    let mut cluster = TestCluster::start(1).await.unwrap();
    cluster.create_stream("retired", 1).await.unwrap();
    let client = crate::aws_sdk::client(&cluster.node(1).api_address());
    client
        .put_record()
        .stream_name("retired")
        .partition_key("k")
        .data(Blob::new("before the split"))
        .send()
        .await
        .unwrap();
    let parent = split_first_shard(cluster.node(1), "retired").await;
    let parent_state = |node: &kinesin_server::Node| {
        node.meta.state().streams["retired"]
            .shard(parent.shard_id)
            .map(|s| s.state)
    };
    // 23 hours later (retention is 24) the parent stays: several passes of
    // the reconciler (every 0.5 s) must not remove it. Nothing else can be
    // waited for here, since nothing is meant to happen.
    kinesin_router::set_clock_skew_ms(23 * HOUR_MS);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(parent_state(cluster.node(1)), Some(ShardState::Sealed));
    assert!(cluster.node(1).host.has_group(parent.group));
    // The leader restarts: it still knows when the seal was applied, so
    // 25 hours after the seal the parent goes, and so does its group.
    // (Counting from the restart, it would stay another 22 hours.)
    cluster.stop(1).await;
    cluster.restart(1).await.unwrap();
    kinesin_router::set_clock_skew_ms(25 * HOUR_MS);
    let node = cluster.node(1);
    kinesin_testkit::wait_until(
        "the parent to leave the map",
        std::time::Duration::from_secs(30),
        || async { parent_state(node).is_none() },
    )
    .await
    .unwrap();
    kinesin_testkit::wait_until(
        "the parent's group to be deleted",
        std::time::Duration::from_secs(30),
        || async { !node.host.has_group(parent.group) },
    )
    .await
    .unwrap();
    // Requests are signed with the real time.
    kinesin_router::set_clock_skew_ms(0);
    let shards = client
        .list_shards()
        .stream_name("retired")
        .send()
        .await
        .unwrap()
        .shards
        .unwrap_or_default();
    assert_eq!(shards.len(), 2, "{shards:?}");
    assert!(shards
        .iter()
        .all(|s| s.parent_shard_id() == Some(parent.shard_id.to_string().as_str())));
    let gone = client
        .get_shard_iterator()
        .stream_name("retired")
        .shard_id(parent.shard_id.to_string())
        .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
        .send()
        .await
        .expect_err("the removed parent");
    assert!(
        gone.as_service_error()
            .is_some_and(|e| e.is_resource_not_found_exception()),
        "{gone:?}"
    );
    cluster.shutdown().await;
}

/// Splits `stream`'s first shard in two halves through the Kinesis API
/// and waits until it is sealed; returns the parent as it was before.
async fn split_first_shard(node: &kinesin_server::Node, stream: &str) -> kinesin_types::ShardInfo {
    let parent = node.meta.state().streams[stream].shards[0].clone();
    crate::aws_sdk::client(&node.api_address())
        .split_shard()
        .stream_name(stream)
        .shard_to_split(parent.shard_id.to_string())
        .new_starting_hash_key((1u128 << 127).to_string())
        .send()
        .await
        .unwrap();
    kinesin_testkit::wait_until(
        "the parent to be sealed",
        std::time::Duration::from_secs(30),
        || async {
            node.meta.state().streams[stream]
                .shard(parent.shard_id)
                .is_some_and(|s| s.state == ShardState::Sealed)
        },
    )
    .await
    .unwrap();
    parent
}

/// Whether the server closed `socket` (reads end) within `within`.
async fn closed_within(socket: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_and_surplus_api_connections_are_closed_while_clients_keep_working() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let options = kinesin_testkit::TestOptions {
        configure: |c| {
            c.api_max_connections = 6;
            c.api_header_timeout_ms = 1000;
            c.api_body_timeout_ms = 1000;
        },
        ..Default::default()
    };
    let cluster = TestCluster::start_with(1, options).await.unwrap();
    let address = cluster.node(1).api_address();
    let client = crate::aws_sdk::client(&address);
    client
        .create_stream()
        .stream_name("hostile")
        .shard_count(1)
        .send()
        .await
        .unwrap();

    // Slow loris: headers that never end, and a socket that sends nothing.
    let mut loris = TcpStream::connect(&address).await.unwrap();
    loris
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: Kinesis_20131202.ListStreams\r\n")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(&address).await.unwrap();
    // Part of the HTTP/2 preface, then nothing.
    let mut half_preface = TcpStream::connect(&address).await.unwrap();
    half_preface.write_all(b"PRI * HTTP/2.0").await.unwrap();
    // The preface's first line, which ends like a request line.
    let mut preface_line = TcpStream::connect(&address).await.unwrap();
    preface_line.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // A body that stops halfway: answered 408 and not held.
    let mut slow_body = TcpStream::connect(&address).await.unwrap();
    slow_body
        .write_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.1\r\n\
              X-Amz-Target: Kinesis_20131202.ListStreams\r\nContent-Length: 100\r\n\r\n{\"Lim",
        )
        .await
        .unwrap();
    let within = Duration::from_secs(15);
    // Meanwhile a normal client is answered.
    client.list_streams().send().await.unwrap();
    assert!(
        closed_within(&mut loris, within).await,
        "unfinished headers hold the connection"
    );
    assert!(
        closed_within(&mut silent, within).await,
        "a silent connection is held"
    );
    assert!(
        closed_within(&mut half_preface, within).await,
        "a connection that stops inside the HTTP/2 preface is held"
    );
    assert!(
        closed_within(&mut preface_line, within).await,
        "a connection that stops after the HTTP/2 preface's first line is held"
    );
    let mut answer = Vec::new();
    {
        use tokio::io::AsyncReadExt;
        let _ = tokio::time::timeout(within, slow_body.read_to_end(&mut answer)).await;
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // At the connection limit, more connections are closed at once; the
    // held ones do not keep a client out once they go.
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut s = TcpStream::connect(&address).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(s);
    }
    let mut surplus = TcpStream::connect(&address).await.unwrap();
    assert!(
        closed_within(&mut surplus, Duration::from_secs(5)).await,
        "a connection beyond the limit is kept"
    );
    drop(held);
    kinesin_testkit::wait_until("a client is answered again", within, || async {
        client.list_streams().send().await.is_ok()
    })
    .await
    .unwrap();
}

/// A ListStreams request on an HTTP/2 connection whose body follows.
fn h2_list_streams(content_length: usize) -> http::Request<()> {
    http::Request::post("/")
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amz-target", "Kinesis_20131202.ListStreams")
        .header("content-length", content_length)
        .body(())
        .unwrap()
}

/// Item 4 over HTTP/2: the server lets one connection run at most 64
/// requests at once (the client queues the rest), a stream whose body
/// stalls is answered 408 after the body timeout and frees its place for a
/// queued one, and another client is answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http2_connection_gets_a_bounded_number_of_streams_and_stalled_bodies_end() {
    use std::time::Duration;
    let options = kinesin_testkit::TestOptions {
        configure: |c| c.api_body_timeout_ms = 1000,
        ..Default::default()
    };
    let cluster = TestCluster::start_with(1, options).await.unwrap();
    let address = cluster.node(1).api_address();
    let tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
    let (h2, mut connection) = h2::client::handshake(tcp).await.unwrap();
    // Drives the connection and tells the stream limit the server set.
    let (limit_tx, limit) = tokio::sync::watch::channel(0);
    tokio::spawn(futures::future::poll_fn(move |cx| {
        let polled = std::future::Future::poll(std::pin::Pin::new(&mut connection), cx);
        limit_tx.send_replace(connection.max_concurrent_send_streams());
        polled
    }));
    // A whole request first, so that the server's settings are in.
    let body = br#"{"Limit":1}"#;
    let (answer, mut send) = h2
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(h2_list_streams(body.len()), false)
        .unwrap();
    send.send_data(bytes::Bytes::from_static(body), true)
        .unwrap();
    assert_eq!(answer.await.unwrap().status(), 200);
    let mut limit = limit;
    let told = tokio::time::timeout(Duration::from_secs(5), limit.wait_for(|l| *l == 64))
        .await
        .is_ok();
    assert!(
        told,
        "the server's stream limit is {}, not 64",
        *limit.borrow()
    );

    // Streams whose bodies stop after a few bytes.
    let mut stalled = Vec::new();
    for _ in 0..200 {
        let (answer, mut send) = h2
            .clone()
            .ready()
            .await
            .unwrap()
            .send_request(h2_list_streams(1000), false)
            .unwrap();
        send.send_data(bytes::Bytes::from_static(b"{\"Lim"), false)
            .unwrap();
        stalled.push((answer, send));
    }
    crate::aws_sdk::client(&address)
        .list_streams()
        .send()
        .await
        .expect("another client is answered");
    // 64 run at a time, each answered after the 1 s body timeout; the
    // queued ones start as those end.
    for (answer, _send) in stalled {
        let status = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .expect("a stalled body is answered")
            .expect("a response, not a reset")
            .status();
        assert_eq!(status, 408);
    }
    let (answer, mut send) = h2
        .ready()
        .await
        .unwrap()
        .send_request(h2_list_streams(body.len()), false)
        .unwrap();
    send.send_data(bytes::Bytes::from_static(body), true)
        .unwrap();
    assert_eq!(answer.await.unwrap().status(), 200);
    cluster.shutdown().await;
}

/// A ListStreams request on an HTTP/2 connection announcing a 32 MiB body
/// (none of which is sent), signed as an SDK would with `key`, or not
/// signed at all.
fn h2_list_streams_signed(address: &str, key: Option<(&str, &str)>) -> http::Request<()> {
    let mut request = h2_list_streams(32 * 1024 * 1024);
    let Some(key) = key else {
        return request;
    };
    let uri: http::Uri = "/".parse().unwrap();
    let mut headers = request.headers().clone();
    headers.insert("host", address.parse().unwrap());
    let signature = kinesin_gateway::sign(
        key,
        "us-east-1",
        "kinesis",
        &kinesin_gateway::SignedRequest {
            method: &http::Method::POST,
            uri: &uri,
            headers: &headers,
            body: b"",
        },
        std::time::SystemTime::now(),
    );
    for (name, value) in signature {
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    request
}

/// Item 4 on a node with credentials: what can be checked without the
/// body is checked before it is read, and a body takes the node's body
/// budget only as it arrives. Each request below announces a 32 MiB body
/// and sends none of it; there are more of them than the node's 1 GiB
/// budget covers. Unsigned ones, and ones signed by a key the node does
/// not have, are refused at once. Ones signed with a known key ID and a
/// wrong secret must wait for their bodies before the signature can be
/// checked, but they hold no memory meanwhile: a signed client is
/// answered at once. Budget taken by what a body announces would make
/// that client wait out the 60 s body timeout behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn announced_bodies_that_never_come_keep_no_signed_client_waiting() {
    use std::time::Duration;
    let options = kinesin_testkit::TestOptions {
        configure: |c| {
            c.credentials = vec![kinesin_gateway::Credential {
                access_key_id: "AKIDTEST".into(),
                secret_access_key: "secret".into(),
                account_id: "123456789012".into(),
            }];
            c.api_body_timeout_ms = 60_000;
        },
        ..Default::default()
    };
    let cluster = TestCluster::start_with(1, options).await.unwrap();
    let address = cluster.node(1).api_address();
    let signed_client = crate::aws_sdk::client(&address);
    let answered_at_once = |what: &'static str| {
        let call = signed_client.list_streams().send();
        async move {
            let Ok(answer) = tokio::time::timeout(Duration::from_secs(10), call).await else {
                panic!("a signed client waits behind {what}");
            };
            answer.expect("a signed client is answered");
        }
    };
    // A connection, and its pings: a ping is answered once the server has
    // read the frames sent before it.
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
        let (h2, mut connection) = h2::client::handshake(tcp).await.unwrap();
        let pings = connection.ping_pong().expect("the connection's pings");
        tokio::spawn(connection);
        (h2, pings)
    };

    let (h2, _) = connect().await;
    let mut refused = Vec::new();
    for i in 0..40 {
        let key = (i % 2 == 1).then_some(("AKIDOTHER", "other"));
        let (answer, send) = h2
            .clone()
            .ready()
            .await
            .unwrap()
            .send_request(h2_list_streams_signed(&address, key), false)
            .unwrap();
        refused.push((key, answer, send));
    }
    answered_at_once("requests that will be refused").await;
    for (key, answer, _send) in refused {
        let response = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("a request failing the signature checks waits for its body")
            .expect("a response, not a reset");
        // MissingAuthenticationToken, UnrecognizedClient.
        let expected = if key.is_some() { 400 } else { 403 };
        assert_eq!(response.status(), expected, "signed by {key:?}");
    }

    let (h2, mut pings) = connect().await;
    let mut waiting = Vec::new();
    for _ in 0..40 {
        let request = h2_list_streams_signed(&address, Some(("AKIDTEST", "not the secret")));
        waiting.push(
            h2.clone()
                .ready()
                .await
                .unwrap()
                .send_request(request, false)
                .unwrap(),
        );
    }
    // The client may write the first ping before the queued headers; the
    // second goes out after them.
    for _ in 0..2 {
        pings.ping(h2::Ping::opaque()).await.unwrap();
    }
    answered_at_once("bodies announced by a known key ID").await;
    drop((waiting, h2));
    cluster.shutdown().await;
}

/// Sends a SubscribeToShard for `consumer` (shard 0, from the start) on a
/// new connection that takes in at most a few KiB until it is read.
async fn subscribe_raw(address: &str, consumer: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(address.parse().unwrap()).await.unwrap();
    let body = format!(
        r#"{{"ConsumerARN":"{consumer}","ShardId":"shardId-000000000000","StartingPosition":{{"Type":"TRIM_HORIZON"}}}}"#
    );
    s.write_all(
        format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.1\r\n\
             X-Amz-Target: Kinesis_20131202.SubscribeToShard\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s
}

/// The status code of the answer on `s` (reading no more than its first
/// line's worth).
async fn status_of(s: &mut tokio::net::TcpStream) -> u16 {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 12];
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .expect("an answer")
        .unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

/// Item 9: a subscriber that stops reading while records keep coming
/// blocks the server's pushes, and its subscription still ends at its
/// lifetime (here 2.5 s; AWS's five minutes is the default) and frees the
/// consumer's slot. Before, a send blocked on a stopped reader had no
/// limit: the slot stayed taken until another subscription took it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_whose_reader_stopped_reading_ends_at_its_lifetime() {
    use aws_sdk_kinesis::primitives::Blob;
    use std::time::{Duration, Instant};
    let options = kinesin_testkit::TestOptions {
        configure: |c| c.api_subscription_lifetime_ms = 2500,
        ..Default::default()
    };
    let cluster = TestCluster::start_with(1, options).await.unwrap();
    cluster.create_stream("stuck", 1).await.unwrap();
    let address = cluster.node(1).api_address();
    let client = crate::aws_sdk::client(&address);
    let stream_arn = client
        .describe_stream_summary()
        .stream_name("stuck")
        .send()
        .await
        .unwrap()
        .stream_description_summary
        .unwrap()
        .stream_arn;
    let consumer = client
        .register_stream_consumer()
        .stream_arn(stream_arn)
        .consumer_name("stops-reading")
        .send()
        .await
        .unwrap()
        .consumer
        .unwrap()
        .consumer_arn;

    let asked = Instant::now();
    let mut stuck = subscribe_raw(&address, &consumer).await;
    assert_eq!(status_of(&mut stuck).await, 200);
    // 16 MiB pushed to a reader that takes none: more than the socket
    // buffers and the server's queue of events hold.
    let writer = tokio::spawn(async move {
        for _ in 0..64 {
            client
                .put_record()
                .stream_name("stuck")
                .partition_key("k")
                .data(Blob::new(vec![7u8; 256 << 10]))
                .send()
                .await
                .unwrap();
        }
    });
    let mut early = subscribe_raw(&address, &consumer).await;
    assert_eq!(status_of(&mut early).await, 400, "the slot is taken");
    // A new subscription may take over a live one 5 s after it started
    // (after `asked`): one answered before that found the slot free.
    let freed = loop {
        let mut probe = subscribe_raw(&address, &consumer).await;
        let taken = status_of(&mut probe).await == 200;
        let at = asked.elapsed();
        assert!(
            at < Duration::from_secs(5),
            "the stopped reader's subscription kept the slot past its lifetime ({at:?})"
        );
        if taken {
            break at;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        freed >= Duration::from_millis(2500),
        "freed after {freed:?}"
    );
    writer.await.unwrap();
    // What reached the stopped reader: far from the 64 records (~22 MiB
    // as base64 JSON; 4.9 MB in one run), so the server's pushes did block.
    let mut received = 0;
    let mut buf = vec![0u8; 1 << 20];
    while let Ok(Ok(n @ 1..)) = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::io::AsyncReadExt::read(&mut stuck, &mut buf),
    )
    .await
    {
        received += n;
    }
    assert!(received < 16 << 20, "{received} bytes reached the reader");
    cluster.shutdown().await;
}

/// The peak resident memory of this process, in MiB.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib / 1024
}

/// A body of 30 MiB of tiny elements, in JSON and in CBOR, is refused with
/// a SerializationException before it is decoded into values (which took
/// gigabytes), and the node keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_of_millions_of_tiny_elements_is_refused_without_decoding_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = TestCluster::start(1).await.unwrap();
    let address = cluster.node(1).api_address();
    let size = 30 * 1024 * 1024;
    let mut json = b"{\"StreamName\":\"s\",\"Records\":[".to_vec();
    while json.len() < size {
        json.extend_from_slice(b"0,");
    }
    json.extend_from_slice(b"0]}");
    // A CBOR map whose array holds one-byte zeros.
    let mut cbor = vec![0xA1, 0x67];
    cbor.extend_from_slice(b"Records");
    let n = size as u32;
    cbor.push(0x9A);
    cbor.extend_from_slice(&n.to_be_bytes());
    cbor.resize(cbor.len() + size, 0);
    let before = peak_rss_mib();
    let mut answers = Vec::new();
    for (content_type, body) in [
        ("application/x-amz-json-1.1", &json),
        ("application/x-amz-cbor-1.1", &cbor),
    ] {
        let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
        let head = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n\
             X-Amz-Target: Kinesis_20131202.PutRecords\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        socket.write_all(body).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(60),
            socket.read_to_end(&mut answer),
        )
        .await
        .expect("an answer within 60 s")
        .unwrap();
        answers.push((content_type, String::from_utf8_lossy(&answer).into_owned()));
    }
    // The peak is the process's: it measures this test alone only when
    // the test has a process of its own, as under nextest (`make test`).
    let grown = peak_rss_mib().saturating_sub(before);
    if std::env::var_os("NEXTEST_RUN_ID").is_some() {
        assert!(
            grown < 200,
            "decoding the hostile bodies grew the peak memory by {grown} MiB"
        );
    }
    for (content_type, answer) in answers {
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{content_type}: {answer}"
        );
        assert!(
            answer.contains("more than 50000 elements"),
            "{content_type}: {answer}"
        );
    }
    let client = crate::aws_sdk::client(&address);
    client.list_streams().send().await.unwrap();
}

/// A raw proposal to a queue's group that its state machine cannot decode
/// (garbage, or too short to carry the leader's clock) is refused before it
/// enters the log: once committed, every replica would stop the group on
/// it at every replay, and the queue would take nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undecodable_proposal_to_a_queue_is_refused_and_the_queue_keeps_working() {
    let cluster = TestCluster::start(1).await.unwrap();
    let sqs = crate::sqs_sdk::client(&cluster.node(1).api_address());
    let url = sqs
        .create_queue()
        .queue_name("raw")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let group = cluster
        .node(1)
        .meta
        .state()
        .groups
        .values()
        .find(|g| g.kind == "sqs-queue")
        .expect("the queue's group")
        .group;
    let mut c = native_client(&cluster, 1).await;
    for (command, stamp) in [(vec![0xff; 64], true), (vec![1, 2, 3], false)] {
        let refused = c
            .group_propose(pb::GroupProposeRequest {
                group: group.0,
                command: command.into(),
                stamp,
                ..Default::default()
            })
            .await
            .expect_err("an undecodable queue command");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    }
    sqs.send_message()
        .queue_url(&url)
        .message_body("after")
        .send()
        .await
        .unwrap();
    let got = sqs
        .receive_message()
        .queue_url(&url)
        .wait_time_seconds(5)
        .send()
        .await
        .unwrap();
    assert_eq!(got.messages()[0].body(), Some("after"));
    cluster.shutdown().await;
}
