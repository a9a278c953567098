//! Helpers shared by the system tests: writers that remember what was
//! acknowledged, and readers of each replica's local copy.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kinesin_router::{AppendOutcome, RecordIn};
use kinesin_shard::ReadStart;
use kinesin_testkit::{TestCluster, TestOptions};
use kinesin_types::{GroupId, SequenceNumber, ShardId};

/// Options whose groups snapshot every 20 entries and purge everything
/// below a snapshot, so that tests reach snapshots and purges quickly.
pub fn small_log_options() -> TestOptions {
    let mut options = TestOptions::default();
    options.shard.snapshot_every = 20;
    options.shard.keep_below_snapshot = 0;
    options
}

/// Acknowledged records: (shard, sequence number) → data.
pub type Acked = Arc<Mutex<BTreeMap<(ShardId, SequenceNumber), Vec<u8>>>>;

/// Puts `batches` batches of `per_batch` unique records through `node`,
/// recording every acknowledged one. Failed records are not acknowledged.
pub async fn write_batches(
    cluster: &TestCluster,
    node: u64,
    stream: &str,
    writer: usize,
    batches: usize,
    per_batch: usize,
    acked: &Acked,
) -> usize {
    let mut failures = 0;
    for b in 0..batches {
        if !cluster.is_running(node) {
            break;
        }
        let records: Vec<RecordIn> = (0..per_batch)
            .map(|i| RecordIn {
                partition_key: format!("w{writer}-k{}", (b * per_batch + i) % 97),
                data: format!("w{writer}-b{b}-r{i}").into_bytes(),
                explicit_hash_key: None,
            })
            .collect();
        let data: Vec<Vec<u8>> = records.iter().map(|r| r.data.clone()).collect();
        match cluster.node(node).router.put_records(stream, records).await {
            Ok(outcomes) => {
                let mut acked = acked.lock().unwrap();
                for (o, d) in outcomes.into_iter().zip(data) {
                    match o {
                        AppendOutcome::Stored { shard, sequence } => {
                            assert!(
                                acked.insert((shard, sequence), d).is_none(),
                                "sequence number {sequence} issued twice"
                            );
                        }
                        AppendOutcome::Failed { .. } => failures += 1,
                    }
                }
            }
            Err(_) => failures += per_batch,
        }
    }
    failures
}

/// Keeps writing in the background until stopped; returns the count of
/// failed records.
pub struct BackgroundWriter {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<usize>,
}

impl BackgroundWriter {
    pub fn start(
        router: Arc<kinesin_router::Router>,
        stream: &str,
        writer: usize,
        acked: Acked,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stream = stream.to_string();
        let flag = stop.clone();
        let handle = tokio::spawn(async move {
            let mut failures = 0;
            let mut b = 0usize;
            while !flag.load(Ordering::SeqCst) {
                let records: Vec<RecordIn> = (0..20)
                    .map(|i| RecordIn {
                        partition_key: format!("bg{writer}-{}", (b * 20 + i) % 53),
                        data: format!("bg{writer}-b{b}-r{i}").into_bytes(),
                        explicit_hash_key: None,
                    })
                    .collect();
                let data: Vec<Vec<u8>> = records.iter().map(|r| r.data.clone()).collect();
                match router.put_records(&stream, records).await {
                    Ok(outcomes) => {
                        let mut acked = acked.lock().unwrap();
                        for (o, d) in outcomes.into_iter().zip(data) {
                            match o {
                                AppendOutcome::Stored { shard, sequence } => {
                                    acked.insert((shard, sequence), d);
                                }
                                AppendOutcome::Failed { .. } => failures += 1,
                            }
                        }
                    }
                    Err(_) => failures += 20,
                }
                b += 1;
            }
            failures
        });
        BackgroundWriter { stop, handle }
    }

    pub async fn stop(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await.unwrap()
    }
}

/// Reads every record of one replica's local copy of a shard, in order.
pub fn read_replica(
    cluster: &TestCluster,
    node: u64,
    group: GroupId,
) -> Vec<(SequenceNumber, Vec<u8>)> {
    let sm = cluster
        .node(node)
        .shards
        .get(group)
        .expect("replica present");
    let mut at = sm.resolve(ReadStart::TrimHorizon).unwrap();
    let mut out = Vec::new();
    loop {
        let batch = sm.read(at, 10_000, 64 << 20, 0).unwrap();
        if batch.records.is_empty() {
            return out;
        }
        out.extend(batch.records.into_iter().map(|(s, r)| (s, r.data)));
        at = batch.next;
    }
}

/// Waits until every live replica of every shard of `stream` holds every
/// acknowledged record, then checks that all replicas of a shard agree on
/// one order and that nothing acknowledged is missing.
pub async fn assert_all_replicas_hold(cluster: &TestCluster, stream: &str, acked: &Acked) {
    // The metadata leader's map: a node that left the metadata group (a
    // drained one) keeps a stale copy that still names it as a replica.
    let meta_leader = cluster
        .leader_of(kinesin_types::GroupId::META)
        .expect("the metadata group has a leader");
    let state = cluster.node(meta_leader.0).meta.state();
    let info = state.streams.get(stream).expect("stream exists").clone();
    let acked = acked.lock().unwrap().clone();
    for shard in &info.shards {
        let expected: Vec<(SequenceNumber, Vec<u8>)> = acked
            .iter()
            .filter(|((s, _), _)| *s == shard.shard_id)
            .map(|((_, seq), d)| (*seq, d.clone()))
            .collect();
        let replicas: Vec<u64> = shard
            .replicas
            .iter()
            .map(|r| r.0)
            .filter(|r| cluster.is_running(*r))
            .collect();
        kinesin_testkit::wait_until("replicas to catch up", Duration::from_secs(60), || async {
            replicas.iter().all(|r| {
                cluster.node(*r).shards.get(shard.group).is_some() && {
                    let got = read_replica(cluster, *r, shard.group);
                    expected
                        .iter()
                        .all(|e| got.binary_search_by(|g| g.0.cmp(&e.0)).is_ok())
                }
            })
        })
        .await
        .unwrap_or_else(|e| {
            let report: Vec<String> = replicas
                .iter()
                .map(|r| {
                    let held = cluster
                        .node(*r)
                        .shards
                        .get(shard.group)
                        .map(|_| read_replica(cluster, *r, shard.group).len());
                    format!(
                        "node {r}: holds {held:?} of {} records; status {:?}",
                        expected.len(),
                        cluster.node(*r).host.status(shard.group)
                    )
                })
                .collect();
            panic!("shard {}: {e}\n{}", shard.shard_id, report.join("\n"))
        });
        let first = read_replica(cluster, replicas[0], shard.group);
        for r in &replicas[1..] {
            let other = read_replica(cluster, *r, shard.group);
            let common = first.len().min(other.len());
            assert_eq!(
                first[..common],
                other[..common],
                "replicas {} and {r} disagree on shard {}",
                replicas[0],
                shard.shard_id
            );
        }
        let by_seq: BTreeMap<SequenceNumber, Vec<u8>> = first.into_iter().collect();
        for (seq, data) in &expected {
            assert_eq!(
                by_seq.get(seq),
                Some(data),
                "acknowledged record {seq} lost or changed on shard {}",
                shard.shard_id
            );
        }
    }
}

/// Checks through the router (shard leaders) that every acknowledged record
/// of `stream` is readable with its data.
pub async fn assert_readable_through_router(
    cluster: &TestCluster,
    node: u64,
    stream: &str,
    acked: &Acked,
) {
    let router = cluster.node(node).router.clone();
    let acked = acked.lock().unwrap().clone();
    let info = router.describe_stream(stream).await.unwrap();
    for shard in &info.shards {
        let mut stored = BTreeMap::new();
        let mut start = ReadStart::TrimHorizon;
        loop {
            let request = kinesin_router::ReadRequest {
                start,
                limit: 10_000,
                max_bytes: 64 << 20,
                wait: Duration::ZERO,
            };
            let batch = router
                .get_records(stream, shard.shard_id, request)
                .await
                .unwrap();
            if batch.records.is_empty() {
                break;
            }
            stored.extend(batch.records.into_iter().map(|(s, r)| (s, r.data)));
            start = ReadStart::At(batch.next);
        }
        for ((s, seq), data) in acked.iter().filter(|((s, _), _)| *s == shard.shard_id) {
            assert_eq!(
                stored.get(seq),
                Some(data),
                "acknowledged record {s}/{seq} lost"
            );
        }
    }
}

/// A node that holds shard replicas but does not lead the metadata group, so
/// that taking it away exercises shard repair rather than a metadata election.
pub fn replica_node_off_meta_leader(cluster: &TestCluster, nodes: u64) -> u64 {
    let meta_leader = cluster.leader_of(GroupId::META).unwrap().0;
    let state = cluster.any_node().meta.state();
    (1..=nodes)
        .filter(|n| *n != meta_leader)
        .find(|n| {
            state
                .shards()
                .any(|(_, s)| s.replicas.contains(&kinesin_types::NodeId(*n)))
        })
        .expect("a node with replicas besides the metadata leader")
}
