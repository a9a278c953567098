//! The admin HTTP port: Prometheus metrics, health checks and a JSON view of
//! the node's groups.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router as HttpRouter};
use kinesin_meta::NodeState;
use kinesin_raft::Role;
use kinesin_router::Router;
use kinesin_storage::data_version::DATA_VERSION;
use kinesin_types::{GroupId, NodeId, ShardState};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide metrics recorder (once) and returns its handle.
pub fn prometheus() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let latency = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
        let handle = PrometheusBuilder::new()
            // Gauges nobody refreshes (a deleted stream, a consumer that
            // stopped reading) disappear instead of freezing.
            .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(300)))
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
            // A large queue's snapshot copies its rows for seconds to
            // minutes (a Full matcher wins over a Suffix one).
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full("kinesin_raft_snapshot_build_seconds".into()), &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0]))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]))
            .expect("bucket lists are non-empty")
            .install_recorder()
            .expect("the metrics recorder is installed once per process");
        metrics::gauge!("kinesin_build_info", "version" => env!("CARGO_PKG_VERSION"), "revision" => option_env!("KINESIN_REVISION").unwrap_or("unknown")).set(1.0);
        register_families();
        handle
    })
}

/// How a family is exported before its first use.
enum AtStart {
    /// Exported at zero (histograms with their empty buckets), so that a new
    /// node's dashboards show zeros and `rate()` and `absent()` work.
    Zero,
    /// Exported at zero once per operation of every service (`outcome="ok"`).
    PerOperation,
    /// Labelled gauges that `update_gauges` sets on its first pass, with
    /// every label value (a zero series without labels would be wrong).
    Refreshed,
    /// Only described: its labels (a stream, an error code) are not known
    /// until something happens, and a zero series per guess would be noise.
    Described,
}

/// Every metric family the node exports, with its help text. The gauges that
/// describe state are also refreshed every second by `update_gauges`.
const FAMILIES: &[(&str, metrics_util::MetricKind, &str, AtStart)] = {
    use metrics_util::MetricKind::{Counter, Gauge, Histogram};
    use AtStart::{Described, PerOperation, Refreshed, Zero};
    &[
        ("kinesin_api_requests_in_flight", Gauge, "AWS API requests being served, with the retries inside the cluster each may make (a SubscribeToShard until its event stream starts).", Zero),
        ("kinesin_api_connections", Gauge, "Open connections to the AWS API port (at most api_max_connections).", Zero),
        ("kinesin_api_connections_refused_total", Counter, "AWS API connections closed on arrival because api_max_connections were open.", Zero),
        ("kinesin_api_request_duration_seconds", Histogram, "AWS API requests by service, operation and outcome (ok, client_error, server_error), in seconds.", PerOperation),
        ("kinesin_api_errors_total", Counter, "AWS API errors by service, operation and AWS error code.", Described),
        ("kinesin_raft_commit_duration_seconds", Histogram, "Time from proposing a shard write until the leader applied it (committed by a majority), in seconds.", Zero),
        ("kinesin_raft_snapshot_build_seconds", Histogram, "Time to build and save one snapshot of a Raft group on this node (the row copy, the flush that makes what it covers durable, the save), in seconds.", Zero),
        ("kinesin_storage_fsync_duration_seconds", Histogram, "Duration of one group commit's fsync of the RocksDB WAL, in seconds.", Zero),
        ("kinesin_storage_fsync_batch_size", Histogram, "Writes made durable by one fsync.", Zero),
        ("kinesin_storage_fsyncs_in_write_queue_total", Counter, "WAL fsyncs made as a synced write in RocksDB's write queue (near a full disk, or after a failed write) rather than beside it.", Zero),
        ("kinesin_raft_leader_changes_total", Counter, "Leader changes of the Raft groups this node now leads.", Zero),
        ("kinesin_raft_groups", Gauge, "Raft groups on this node by role.", Refreshed),
        ("kinesin_raft_groups_without_leader", Gauge, "Raft groups on this node that know no leader.", Zero),
        ("kinesin_raft_groups_under_replicated", Gauge, "Groups led here with a follower that has not acknowledged for 5 s.", Zero),
        ("kinesin_raft_max_follower_lag_entries", Gauge, "The largest follower lag, in log entries, of the groups led here.", Zero),
        ("kinesin_raft_log_tail_bytes", Gauge, "Bytes of their newest log entries that the Raft groups on this node keep decoded in memory together (at most 64 MiB).", Zero),
        ("kinesin_cluster_nodes", Gauge, "Nodes in the cluster map by state.", Refreshed),
        ("kinesin_streams", Gauge, "Streams in the cluster map.", Zero),
        ("kinesin_node_disk_free_bytes", Gauge, "Free bytes on the data directory's file system.", Zero),
        ("kinesin_node_disk_total_bytes", Gauge, "Size in bytes of the data directory's file system.", Zero),
        ("kinesin_build_info", Gauge, "Version and revision of this node's binary (value 1).", Described),
        ("kinesin_stream_shards", Gauge, "Shards of a stream by state (open, sealing, sealed).", Described),
        ("kinesin_stream_incoming_records_total", Counter, "Records acknowledged to producers, by stream.", Described),
        ("kinesin_stream_incoming_bytes_total", Counter, "Bytes (data and partition keys) acknowledged to producers, by stream.", Described),
        ("kinesin_stream_outgoing_records_total", Counter, "Records returned by GetRecords, by stream.", Described),
        ("kinesin_stream_outgoing_bytes_total", Counter, "Bytes returned by GetRecords, by stream.", Described),
        ("kinesin_stream_iterator_age_seconds", Gauge, "Age of the last record read by GetRecords, by stream, in seconds.", Described),
        ("kinesin_stream_throttled_total", Counter, "Refused for a shard's throughput limit, by stream and direction: records for writes, calls for reads.", Described),
        ("kinesin_sqs_messages", Gauge, "Messages of a queue (account/name) by state: visible, in_flight, delayed; exported by the queue partition's leader every second (0 on other nodes).", Described),
        ("kinesin_sqs_oldest_message_age_seconds", Gauge, "Age of a queue's oldest message, in seconds; exported by the queue partition's leader (0 on other nodes).", Described),
        ("kinesin_sqs_dead_letters_moved_total", Counter, "Messages moved to dead-letter queues by the source queues' leaders on this node.", Zero),
        ("kinesin_firehose_buffered_bytes", Gauge, "Bytes a delivery stream (account/name) holds for delivery; exported by its leader.", Described),
        ("kinesin_firehose_oldest_record_age_seconds", Gauge, "Age of the oldest record a delivery stream holds, in seconds; exported by its leader.", Described),
        ("kinesin_firehose_data_freshness_seconds", Gauge, "Age of the first record of a delivery stream's last written object when it was written, in seconds.", Described),
        ("kinesin_firehose_objects_written_total", Counter, "Objects written to S3 by the delivery streams led here, by delivery stream.", Described),
        ("kinesin_firehose_bytes_written_total", Counter, "Bytes (as stored, after compression) written to S3, by delivery stream.", Described),
        ("kinesin_firehose_delivery_failures_total", Counter, "Failed delivery steps (S3 writes, Raft proposals), by delivery stream; each is retried with backoff.", Described),
        ("kinesin_firehose_s3_request_duration_seconds", Histogram, "Duration of one object write to S3 by a delivery, in seconds.", Zero),
        ("kinesin_shard_incoming_records_total", Counter, "Records acknowledged, by stream and shard (only with per_shard_metrics).", Described),
        ("kinesin_shard_incoming_bytes_total", Counter, "Bytes acknowledged, by stream and shard (only with per_shard_metrics).", Described),
    ]
};

/// Describes every family and exports the ones that have a value before
/// first use, so that a new node's `/metrics` already names them.
fn register_families() {
    use metrics_util::MetricKind;
    for (name, kind, help, at_start) in FAMILIES {
        let name = *name;
        match kind {
            MetricKind::Counter => metrics::describe_counter!(name, *help),
            MetricKind::Gauge => metrics::describe_gauge!(name, *help),
            MetricKind::Histogram => metrics::describe_histogram!(name, *help),
        }
        match (at_start, kind) {
            (AtStart::Described | AtStart::Refreshed, _) => {}
            (AtStart::Zero, MetricKind::Counter) => metrics::counter!(name).absolute(0),
            (AtStart::Zero, MetricKind::Gauge) => metrics::gauge!(name).set(0.0),
            (AtStart::Zero, MetricKind::Histogram) => drop(metrics::histogram!(name)),
            (AtStart::PerOperation, _) => {
                for service in kinesin_gateway::SERVICES {
                    for op in service.operations {
                        drop(
                            metrics::histogram!(name, "service" => service.name, "op" => *op, "outcome" => "ok"),
                        );
                    }
                }
            }
        }
    }
}

#[derive(Clone)]
struct AdminState {
    router: Arc<Router>,
    joined: Arc<AtomicBool>,
}

pub(crate) async fn serve(
    listener: TcpListener,
    router: Arc<Router>,
    joined: Arc<AtomicBool>,
    data_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    let handle = prometheus();
    let state = AdminState {
        router: router.clone(),
        joined,
    };
    let app = HttpRouter::new()
        .route("/metrics", get(move || async move { handle.render() }))
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route("/admin/cluster", get(cluster))
        .with_state(state);
    let gauges = tokio::spawn(update_gauges(router, data_dir));
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    gauges.abort();
}

/// Ready: joined, the disk takes writes, the metadata group has a leader,
/// and every local shard replica knows its leader.
async fn ready(State(s): State<AdminState>) -> Response {
    let host = s.router.host();
    if !s.joined.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not joined").into_response();
    }
    if host.disk_full() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the data directory's disk is full: writes are refused until space is freed",
        )
            .into_response();
    }
    if host
        .status(GroupId::META)
        .and_then(|st| st.leader)
        .is_none()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metadata group has no leader",
        )
            .into_response();
    }
    let leaderless = host
        .group_ids()
        .into_iter()
        .filter(|g| host.status(*g).is_some_and(|st| st.leader.is_none()))
        .count();
    if leaderless > 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{leaderless} groups without a leader"),
        )
            .into_response();
    }
    "ready".into_response()
}

async fn cluster(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let host = s.router.host();
    let state = s.router.meta_state();
    let names: HashMap<_, _> = state.placed().map(|p| (p.group, p.owner.name())).collect();
    let groups: Vec<_> = host
        .group_ids()
        .into_iter()
        .filter_map(|g| host.status(g))
        .map(|st| {
            json!({
                "group": st.group.0,
                // The metadata group is in no map; a group being deleted
                // has left it (null).
                "name": if st.group == GroupId::META {
                    Some("metadata")
                } else {
                    names.get(&st.group).map(String::as_str)
                },
                "role": st.role.as_str(),
                "leader": st.leader.map(|l| l.0),
                "term": st.term,
                "last_log_index": st.last_log_index,
                "applied_index": st.applied_index,
                "snapshot_index": st.snapshot_index,
                "purged_index": st.purged_index,
                "voters": st.voters.iter().map(|v| v.0).collect::<Vec<_>>(),
                "joint_membership": st.joint,
                "follower_matched": st.follower_matched.iter().map(|(k, v)| (k.0.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    Json(json!({
        "node_id": host.node_id().0,
        "cluster_id": state.cluster_id,
        // The data version each node runs, as this node last heard it (0:
        // not heard from, or a release before version 3), and whether this
        // node counts it as down (its pings go unanswered).
        "nodes": state.nodes.values().map(|n| json!({
            "id": n.id.0, "grpc": n.raft_addr, "api": n.api_addr, "zone": n.zone, "state": format!("{:?}", n.state),
            "data_version": if n.id == host.node_id() { DATA_VERSION } else { s.router.liveness().data_version(n.id) },
            "down": s.router.liveness().is_down(n.id),
        })).collect::<Vec<_>>(),
        "streams": state.streams.keys().collect::<Vec<_>>(),
        "groups": groups,
    }))
}

/// A follower that has not acknowledged its leader for this long makes the
/// group under-replicated.
const FOLLOWER_STALE_MS: u64 = 5_000;

/// Refreshes the gauges that describe state rather than events, every
/// second: Raft groups by role, leader changes seen, under-replicated
/// groups, follower lag, nodes by state, shards by state, disk space.
async fn update_gauges(router: Arc<Router>, data_dir: PathBuf) {
    let mut leaders_seen: HashMap<GroupId, NodeId> = HashMap::new();
    loop {
        let host = router.host();
        let mut roles: BTreeMap<&'static str, f64> = ["leader", "follower", "candidate", "learner"]
            .into_iter()
            .map(|r| (r, 0.0))
            .collect();
        let (mut leaderless, mut under_replicated, mut max_lag) = (0.0, 0.0, 0u64);
        let groups = host.group_ids();
        for g in &groups {
            let Some(st) = host.status(*g) else {
                continue;
            };
            *roles.entry(st.role.as_str()).or_default() += 1.0;
            match st.leader {
                None => leaderless += 1.0,
                Some(l) => {
                    // Counted once per change cluster-wide: by the new leader.
                    if leaders_seen.insert(*g, l).is_some_and(|before| before != l)
                        && l == host.node_id()
                    {
                        metrics::counter!("kinesin_raft_leader_changes_total").increment(1);
                    }
                }
            }
            if st.role == Role::Leader {
                let me = host.node_id();
                let stale = st.voters.iter().filter(|v| **v != me).any(|v| {
                    st.follower_ack_age_ms
                        .get(v)
                        .copied()
                        .flatten()
                        .is_none_or(|age| age > FOLLOWER_STALE_MS)
                });
                if stale {
                    under_replicated += 1.0;
                }
                for v in st.voters.iter().filter(|v| **v != me) {
                    let matched = st.follower_matched.get(v).copied().unwrap_or(0);
                    max_lag = max_lag.max(st.last_log_index.saturating_sub(matched));
                }
            }
        }
        leaders_seen.retain(|g, _| groups.contains(g));
        for (role, n) in roles {
            metrics::gauge!("kinesin_raft_groups", "role" => role).set(n);
        }
        metrics::gauge!("kinesin_raft_groups_without_leader").set(leaderless);
        metrics::gauge!("kinesin_raft_groups_under_replicated").set(under_replicated);
        metrics::gauge!("kinesin_raft_max_follower_lag_entries").set(max_lag as f64);
        metrics::gauge!("kinesin_raft_log_tail_bytes").set(host.log_tail_bytes() as f64);
        let state = router.meta_state();
        for (name, wanted) in [
            ("active", NodeState::Active),
            ("draining", NodeState::Draining),
            ("removed", NodeState::Removed),
        ] {
            let n = state.nodes.values().filter(|n| n.state == wanted).count();
            metrics::gauge!("kinesin_cluster_nodes", "state" => name).set(n as f64);
        }
        metrics::gauge!("kinesin_streams").set(state.streams.len() as f64);
        for (name, stream) in &state.streams {
            for direction in ["write", "read"] {
                metrics::counter!("kinesin_stream_throttled_total", "stream" => name.clone(), "direction" => direction)
                    .increment(0);
            }
            for (label, wanted) in [
                ("open", ShardState::Open),
                ("sealing", ShardState::Sealing),
                ("sealed", ShardState::Sealed),
            ] {
                let n = stream.shards.iter().filter(|s| s.state == wanted).count();
                metrics::gauge!("kinesin_stream_shards", "stream" => name.clone(), "state" => label)
                    .set(n as f64);
            }
        }
        metrics::gauge!("kinesin_node_disk_full").set(if host.disk_full() { 1.0 } else { 0.0 });
        metrics::gauge!("kinesin_raft_groups_failed").set(host.failed_groups().len() as f64);
        if let Some(space) = kinesin_storage::disk_space(&data_dir) {
            metrics::gauge!("kinesin_node_disk_free_bytes").set(space.available as f64);
            metrics::gauge!("kinesin_node_disk_total_bytes").set(space.total as f64);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
