//! Three `kinesin server` processes on loopback; one is killed with SIGKILL
//! under load and restarted. No acknowledged record may be lost and the
//! restarted node must catch up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kinesin_proto::v1::{self as pb};

use crate::common::{client, eventually, read_all, Proc};

type Acked = Arc<Mutex<BTreeMap<(String, String), Vec<u8>>>>;

fn spawn_writer(
    addr: String,
    writer: usize,
    acked: Acked,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut batch = 0usize;
        while !stop.load(Ordering::SeqCst) {
            let Some(mut c) = client(&addr).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            while !stop.load(Ordering::SeqCst) {
                let records: Vec<pb::Record> = (0..50)
                    .map(|i| pb::Record {
                        partition_key: format!("w{writer}-{}", (batch * 50 + i) % 101),
                        data: format!("w{writer}-b{batch}-r{i}").into_bytes().into(),
                        explicit_hash_key: String::new(),
                    })
                    .collect();
                let sent: Vec<Vec<u8>> = records.iter().map(|r| r.data.to_vec()).collect();
                batch += 1;
                let req = pb::PutRecordsRequest {
                    stream: "load".into(),
                    records,
                };
                match tokio::time::timeout(Duration::from_secs(15), c.put_records(req)).await {
                    Ok(Ok(resp)) => {
                        let mut acked = acked.lock().unwrap();
                        for (r, d) in resp.into_inner().results.into_iter().zip(sent) {
                            if r.error_code.is_empty() {
                                acked.insert((r.shard_id, r.sequence_number), d);
                            }
                        }
                    }
                    _ => break,
                }
            }
        }
    })
}

/// Reads every shard through `addr` and asserts each acknowledged record is
/// there; `missing` says what its absence means.
async fn assert_all_acked_readable(
    addr: &str,
    describe: &pb::DescribeStreamResponse,
    acked: &BTreeMap<(String, String), Vec<u8>>,
    missing: &str,
) {
    let mut c = eventually("a client", Duration::from_secs(10), || client(addr)).await;
    for shard in &describe.shards {
        let stored = read_all(&mut c, "load", &shard.shard_id).await;
        for ((s, seq), data) in acked.iter().filter(|((s, _), _)| s == &shard.shard_id) {
            assert_eq!(
                stored.get(seq),
                Some(data),
                "acknowledged record {s}/{seq} {missing}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_nine_under_load_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = vec![Proc::new(1, dir.path(), None)];
    let seed = procs[0].grpc.clone();
    procs.push(Proc::new(2, dir.path(), Some(&seed)));
    procs.push(Proc::new(3, dir.path(), Some(&seed)));
    for p in &mut procs {
        p.spawn(dir.path());
    }

    // A node that exited (its port taken by a process outside the tests, say)
    // is named at once instead of after the whole wait.
    eventually("the stream to be created", Duration::from_secs(90), || {
        for p in &mut procs {
            p.assert_running(dir.path());
        }
        async {
            let mut c = client(&seed).await?;
            let req = pb::CreateStreamRequest {
                stream: "load".into(),
                shard_count: 4,
                replication_factor: 3,
                max_record_bytes: 0,
                ..Default::default()
            };
            match c.create_stream(req).await {
                Ok(_) => Some(()),
                Err(s) if s.code() == tonic::Code::AlreadyExists => Some(()),
                Err(_) => None,
            }
        }
    })
    .await;
    let describe = eventually("three replicas per shard", Duration::from_secs(60), || {
        for p in &mut procs {
            p.assert_running(dir.path());
        }
        async {
            let mut c = client(&seed).await?;
            let d = c
                .describe_stream(pb::DescribeStreamRequest {
                    stream: "load".into(),
                })
                .await
                .ok()?
                .into_inner();
            d.shards.iter().all(|s| s.replicas.len() == 3).then_some(d)
        }
    })
    .await;

    let acked = Acked::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = [1usize, 3]
        .iter()
        .map(|&i| spawn_writer(procs[i - 1].grpc.clone(), i, acked.clone(), stop.clone()))
        .collect();
    eventually("writes to flow", Duration::from_secs(60), || async {
        (acked.lock().unwrap().len() > 500).then_some(())
    })
    .await;

    procs[1].kill9();
    let at_kill = acked.lock().unwrap().len();
    eventually(
        "writes to continue after the kill",
        Duration::from_secs(60),
        || async { (acked.lock().unwrap().len() > at_kill + 1000).then_some(()) },
    )
    .await;
    procs[1].spawn(dir.path());
    let at_restart = acked.lock().unwrap().len();
    eventually(
        "writes after the restart",
        Duration::from_secs(60),
        || async { (acked.lock().unwrap().len() > at_restart + 500).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    assert_all_acked_readable(&seed, &describe, &acked, "lost").await;

    // The restarted node catches up: its replicas reach the leaders' logs.
    let restarted = procs[1].grpc.clone();
    eventually(
        "the restarted node to catch up",
        Duration::from_secs(90),
        || async {
            let mut others = BTreeMap::new();
            for p in [&procs[0], &procs[2]] {
                let info = client(&p.grpc)
                    .await?
                    .cluster_info(pb::ClusterInfoRequest {})
                    .await
                    .ok()?
                    .into_inner();
                for g in info.groups.into_iter().filter(|g| g.role == "leader") {
                    others.insert(g.group, g.last_log_index);
                }
            }
            let info = client(&restarted)
                .await?
                .cluster_info(pb::ClusterInfoRequest {})
                .await
                .ok()?
                .into_inner();
            let mine: BTreeMap<u64, u64> = info
                .groups
                .into_iter()
                .map(|g| (g.group, g.applied_index))
                .collect();
            let caught_up =
                describe
                    .shards
                    .iter()
                    .all(|s| match (others.get(&s.group), mine.get(&s.group)) {
                        (Some(l), Some(m)) => m >= l,
                        (None, Some(_)) => true,
                        _ => false,
                    });
            caught_up.then_some(())
        },
    )
    .await;

    // Its data is whole: once it leads every shard, reads are served from
    // its replicas, and every acknowledged record is there.
    eventually(
        "the restarted node to lead every shard",
        Duration::from_secs(90),
        || async {
            let mut c = client(&restarted).await?;
            for shard in &describe.shards {
                let _ = c
                    .transfer_leader(pb::TransferLeaderRequest {
                        group: shard.group,
                        to: procs[1].id,
                    })
                    .await;
            }
            let info = c
                .cluster_info(pb::ClusterInfoRequest {})
                .await
                .ok()?
                .into_inner();
            let leads = |group: u64| {
                info.groups
                    .iter()
                    .any(|g| g.group == group && g.role == "leader")
            };
            describe.shards.iter().all(|s| leads(s.group)).then_some(())
        },
    )
    .await;
    assert_all_acked_readable(&restarted, &describe, &acked, "not on the restarted node").await;

    // A node logging to a file writes plain text, without terminal colours.
    let log = std::fs::read_to_string(dir.path().join("node-1.log")).unwrap();
    assert!(log.contains("INFO"), "node 1 logged nothing at info");
    assert!(
        !log.contains('\u{1b}'),
        "node 1's log file has terminal escape codes"
    );
}
