//! The admin HTTP port: Prometheus metrics, health checks and a JSON view of
//! the node's groups.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router as HttpRouter};
use kinesin_router::Router;
use kinesin_types::GroupId;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide metrics recorder (once) and returns its handle.
pub fn prometheus() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let latency = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]))
            .expect("bucket lists are non-empty")
            .install_recorder()
            .expect("the metrics recorder is installed once per process");
        metrics::gauge!("kinesin_build_info", "version" => env!("CARGO_PKG_VERSION"), "revision" => option_env!("KINESIN_REVISION").unwrap_or("unknown")).set(1.0);
        handle
    })
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
    let gauges = tokio::spawn(update_gauges(router));
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    gauges.abort();
}

/// Ready: joined, the metadata group has a leader, and every local shard
/// replica knows its leader.
async fn ready(State(s): State<AdminState>) -> Response {
    let host = s.router.host();
    if !s.joined.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not joined").into_response();
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
    let groups: Vec<_> = host
        .group_ids()
        .into_iter()
        .filter_map(|g| host.status(g))
        .map(|st| {
            json!({
                "group": st.group.0,
                "role": st.role,
                "leader": st.leader.map(|l| l.0),
                "term": st.term,
                "last_log_index": st.last_log_index,
                "applied_index": st.applied_index,
                "voters": st.voters.iter().map(|v| v.0).collect::<Vec<_>>(),
                "follower_matched": st.follower_matched.iter().map(|(k, v)| (k.0.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    Json(json!({
        "node_id": host.node_id().0,
        "cluster_id": state.cluster_id,
        "nodes": state.nodes.values().map(|n| json!({
            "id": n.id.0, "grpc": n.raft_addr, "api": n.api_addr, "zone": n.zone, "state": format!("{:?}", n.state),
        })).collect::<Vec<_>>(),
        "streams": state.streams.keys().collect::<Vec<_>>(),
        "groups": groups,
    }))
}

async fn update_gauges(router: Arc<Router>) {
    loop {
        let host = router.host();
        let (mut leaders, mut followers, mut leaderless) = (0.0, 0.0, 0.0);
        for g in host.group_ids() {
            if let Some(st) = host.status(g) {
                match st.role {
                    "leader" => leaders += 1.0,
                    _ => followers += 1.0,
                }
                if st.leader.is_none() {
                    leaderless += 1.0;
                }
            }
        }
        metrics::gauge!("kinesin_raft_groups", "role" => "leader").set(leaders);
        metrics::gauge!("kinesin_raft_groups", "role" => "follower").set(followers);
        metrics::gauge!("kinesin_raft_groups_without_leader").set(leaderless);
        let state = router.meta_state();
        metrics::gauge!("kinesin_cluster_nodes").set(state.nodes.len() as f64);
        metrics::gauge!("kinesin_streams").set(state.streams.len() as f64);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
