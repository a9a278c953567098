//! Reads that wait at the leader: an empty read with a wait sleeps until
//! records are applied (woken by the state machine, not by polling) and
//! answers empty only when the wait ends. SubscribeToShard pushes with it.

use std::time::{Duration, Instant};

use kinesin_router::{AppendOutcome, ReadRequest, RecordIn};
use kinesin_shard::ReadStart;
use kinesin_testkit::{wait_until, TestCluster};

fn request(start: ReadStart, wait: Duration) -> ReadRequest {
    ReadRequest {
        start,
        limit: 100,
        max_bytes: 1 << 20,
        wait,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiting_read_returns_as_soon_as_a_record_is_applied() {
    let cluster = TestCluster::start(3).await.unwrap();
    cluster.create_stream("events", 1).await.unwrap();
    let info = cluster
        .any_node()
        .router
        .describe_stream("events")
        .await
        .unwrap();
    let shard = &info.shards[0];
    let leader = cluster.leader_of(shard.group).expect("a leader");
    // Through a node that does not lead the shard: the wait happens at the
    // leader, across the gRPC read.
    let reader = cluster
        .live()
        .find(|n| n.node_id() != leader)
        .expect("a follower")
        .router
        .clone();

    let started = Instant::now();
    let empty = reader
        .get_records(
            "events",
            shard.shard_id,
            request(ReadStart::TrimHorizon, Duration::from_millis(600)),
        )
        .await
        .unwrap();
    assert!(empty.records.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "an empty read with a wait answered after {:?}",
        started.elapsed()
    );

    let wait = Duration::from_secs(2);
    let read = {
        let reader = reader.clone();
        let shard_id = shard.shard_id;
        tokio::spawn(async move {
            let started = Instant::now();
            let batch = reader
                .get_records("events", shard_id, request(ReadStart::TrimHorizon, wait))
                .await
                .unwrap();
            (batch, started.elapsed())
        })
    };
    // The put must come while the read waits, not before it started.
    let sm = cluster
        .node(leader.0)
        .shards
        .get(shard.group)
        .expect("the leader's replica");
    wait_until(
        "the read to wait at the leader",
        Duration::from_secs(10),
        || {
            let watching = sm.watching_reads();
            async move { watching > 0 }
        },
    )
    .await
    .unwrap();
    let outcomes = cluster
        .any_node()
        .router
        .put_records(
            "events",
            vec![RecordIn {
                partition_key: "k".into(),
                data: b"woken".to_vec(),
                explicit_hash_key: None,
            }],
        )
        .await
        .unwrap();
    assert!(matches!(outcomes[0], AppendOutcome::Stored { .. }));
    let (batch, took) = read.await.unwrap();
    assert_eq!(batch.records.len(), 1);
    assert_eq!(batch.records[0].1.data, b"woken");
    assert!(
        took < wait - Duration::from_millis(500),
        "the read answered after {took:?}, not when the record was applied"
    );
}

/// A GetRecords scan of up to 10 MiB runs on a blocking thread, never on
/// one of the runtime's workers, where it would stall every task queued
/// behind it (issue 18, item 13). The runtime here has one thread, the
/// test's own, so what RocksDB counts on this thread is work the runtime
/// did; the scan's bytes must not be among it.
#[tokio::test]
async fn a_large_read_scans_rocksdb_off_the_runtimes_thread() {
    use kinesin_storage::perf::{set_perf_stats, PerfContext, PerfMetric, PerfStatsLevel};

    let cluster = TestCluster::start(1).await.unwrap();
    cluster.create_stream("scan", 1).await.unwrap();
    let node = cluster.any_node();
    let (batches, per_batch, size) = (4, 500, 4 << 10);
    for b in 0..batches {
        let records = (0..per_batch)
            .map(|i| RecordIn {
                partition_key: format!("k{b}-{i}"),
                data: vec![b as u8; size],
                explicit_hash_key: None,
            })
            .collect();
        let outcomes = node.router.put_records("scan", records).await.unwrap();
        assert!(outcomes
            .iter()
            .all(|o| matches!(o, AppendOutcome::Stored { .. })));
    }
    let shard = node.router.describe_stream("scan").await.unwrap().shards[0].shard_id;

    set_perf_stats(PerfStatsLevel::EnableCount);
    let mut on_this_thread = PerfContext::default();
    on_this_thread.reset();
    let batch = node
        .router
        .get_records(
            "scan",
            shard,
            ReadRequest {
                start: ReadStart::TrimHorizon,
                limit: 10_000,
                max_bytes: 10 << 20,
                wait: Duration::ZERO,
            },
        )
        .await
        .unwrap();
    // A scan steps through the memtable record by record and reads files
    // by blocks (from the cache or the disk): 2,000 steps or blocks here,
    // had it run on this thread.
    let scanned: u64 = [
        PerfMetric::NextOnMemtableCount,
        PerfMetric::BlockCacheHitCount,
        PerfMetric::BlockReadCount,
    ]
    .into_iter()
    .map(|m| on_this_thread.metric(m))
    .sum();
    assert_eq!(batch.records.len(), batches * per_batch);
    assert!(
        scanned < 100,
        "the runtime's thread scanned RocksDB itself: {}",
        on_this_thread.report(true)
    );
    cluster.shutdown().await;
}
