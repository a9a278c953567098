//! `kinesin cluster`: the map, health, nodes, leaders, drain.

use std::time::Duration;

use clap::Subcommand;
use kinesin_meta::{MetaState, NodeState, STREAM_KIND};
use kinesin_types::{NodeId, ShardState};

use super::{connect, connect_to, print_json, status, Endpoint, Unhealthy};
use crate::output::outln;
use kinesin_proto::v1::node_client::NodeClient;
use kinesin_proto::v1::{self as pb};
use tonic::transport::Channel;

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// The cluster map and this node's groups, as JSON.
    Info {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Is every node reachable and every Raft group led and fully
    /// replicated? Exit status 3 if not.
    Health {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Nodes, their state, and what each leads.
    Nodes {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Every Raft group (metadata, shards, queues, delivery streams) with
    /// its kind, leader and replicas.
    Leaders {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Move a group's leadership to another of its replicas.
    TransferLeader {
        /// Raft group id (see `cluster leaders`; 0 is the metadata group).
        #[arg(long)]
        group: u64,
        /// Node id of the new leader.
        #[arg(long)]
        to: u64,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Move every replica off a node, then remove it from the cluster.
    #[command(alias = "drain")]
    RemoveNode {
        /// Id of the node to remove.
        #[arg(long)]
        node: u64,
        /// Return once the drain has started instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

/// What every reachable node reports, with the map of the node asked first.
struct Survey {
    map: MetaState,
    reports: Vec<(u64, Result<pb::ClusterInfoResponse, String>)>,
}

async fn survey(endpoint: &Endpoint) -> anyhow::Result<Survey> {
    let mut c = connect(endpoint).await?;
    let info = c
        .cluster_info(pb::ClusterInfoRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let map: MetaState = serde_json::from_str(&info.state_json)?;
    let mut reports = Vec::new();
    for node in map.nodes.values().filter(|n| n.state != NodeState::Removed) {
        let report = async {
            let mut c = connect_to(&node.raft_addr)
                .await
                .map_err(|e| e.to_string())?;
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                c.cluster_info(pb::ClusterInfoRequest {}),
            )
            .await
            .map_err(|_| "no answer in 5 s".to_string())?
            .map_err(|e| e.message().to_string())?;
            Ok::<_, String>(r.into_inner())
        }
        .await;
        reports.push((node.id.0, report));
    }
    Ok(Survey { map, reports })
}

/// One row per Raft group: what it stores, who leads it, who replicates it.
#[derive(serde::Serialize)]
struct GroupRow {
    group: u64,
    /// "metadata", "stream" (a shard) or another group kind ("sqs-queue",
    /// "firehose").
    kind: String,
    /// The stream of a shard's group.
    stream: Option<String>,
    /// The map name of another kind's group (a queue, a delivery stream).
    name: Option<String>,
    shard: Option<String>,
    /// A shard's "open", "sealing" or "sealed"; another kind's group is
    /// "creating" until a leader first answered, then "ready".
    state: Option<String>,
    replicas: Vec<u64>,
    leader: Option<u64>,
    term: u64,
    /// Replicas that answered and host the group.
    reporting: Vec<u64>,
}

fn group_rows(s: &Survey) -> Vec<GroupRow> {
    let statuses = |group: u64| -> Vec<(u64, &pb::GroupStatus)> {
        s.reports
            .iter()
            .filter_map(|(n, r)| r.as_ref().ok().map(|r| (*n, r)))
            .flat_map(|(n, r)| {
                r.groups
                    .iter()
                    .filter(move |g| g.group == group)
                    .map(move |g| (n, g))
            })
            .collect()
    };
    // A row with what every group has; the caller fills in the rest.
    let row = |group: u64, kind: &str, replicas: Vec<u64>| {
        let st = statuses(group);
        let leader_status = st.iter().find(|(_, g)| g.role == "leader");
        let leader = leader_status
            .map(|(n, _)| *n)
            .or_else(|| st.iter().map(|(_, g)| g.leader).find(|l| *l != 0));
        GroupRow {
            group,
            kind: kind.to_string(),
            stream: None,
            name: None,
            shard: None,
            state: None,
            replicas,
            leader,
            term: st.iter().map(|(_, g)| g.term).max().unwrap_or(0),
            reporting: st.iter().map(|(n, _)| *n).collect(),
        }
    };
    let meta_voters: Vec<u64> = s
        .map
        .nodes
        .values()
        .filter(|n| n.state != NodeState::Removed)
        .map(|n| n.id.0)
        .collect();
    let mut rows = vec![row(0, "metadata", meta_voters)];
    for (name, stream) in &s.map.streams {
        for shard in &stream.shards {
            let state = match shard.state {
                ShardState::Open => "open",
                ShardState::Sealing => "sealing",
                ShardState::Sealed => "sealed",
            };
            rows.push(GroupRow {
                stream: Some(name.clone()),
                shard: Some(shard.shard_id.to_string()),
                state: Some(state.to_string()),
                ..row(
                    shard.group.0,
                    STREAM_KIND,
                    shard.replicas.iter().map(|r| r.0).collect(),
                )
            });
        }
    }
    for (name, spec) in &s.map.groups {
        rows.push(GroupRow {
            name: Some(name.clone()),
            state: Some(if spec.ready { "ready" } else { "creating" }.to_string()),
            ..row(
                spec.group.0,
                &spec.kind,
                spec.replicas.iter().map(|r| r.0).collect(),
            )
        });
    }
    rows
}

async fn health(endpoint: &Endpoint, json: bool) -> anyhow::Result<()> {
    let s = survey(endpoint).await?;
    let rows = group_rows(&s);
    let mut problems = Vec::new();
    for (n, r) in &s.reports {
        if let Err(e) = r {
            problems.push(format!("node {n} unreachable: {e}"));
        }
    }
    let leaderless: Vec<u64> = rows
        .iter()
        .filter(|r| r.leader.is_none())
        .map(|r| r.group)
        .collect();
    let under: Vec<u64> = rows
        .iter()
        .filter(|r| r.replicas.iter().any(|x| !r.reporting.contains(x)))
        .map(|r| r.group)
        .collect();
    if !leaderless.is_empty() {
        problems.push(format!(
            "{} group(s) without a leader: {leaderless:?}",
            leaderless.len()
        ));
    }
    if !under.is_empty() {
        problems.push(format!(
            "{} group(s) under-replicated: {under:?}",
            under.len()
        ));
    }
    let healthy = problems.is_empty();
    let reachable = s.reports.iter().filter(|(_, r)| r.is_ok()).count();
    if json {
        print_json(&serde_json::json!({
            "healthy": healthy, "cluster_id": s.map.cluster_id, "nodes": s.reports.len(),
            "reachable_nodes": reachable, "groups": rows.len(),
            "groups_without_leader": leaderless, "under_replicated_groups": under, "problems": problems,
        }))?;
    } else {
        outln!(
            "cluster {}: {}",
            s.map.cluster_id,
            if healthy { "healthy" } else { "UNHEALTHY" }
        );
        outln!("  nodes: {} of {} reachable", reachable, s.reports.len());
        outln!(
            "  groups: {}, without leader: {}, under-replicated: {}",
            rows.len(),
            leaderless.len(),
            under.len()
        );
        for p in &problems {
            outln!("  - {p}");
        }
    }
    if healthy {
        Ok(())
    } else {
        Err(Unhealthy.into())
    }
}

async fn nodes(endpoint: &Endpoint, json: bool) -> anyhow::Result<()> {
    let s = survey(endpoint).await?;
    let rows = group_rows(&s);
    let out: Vec<serde_json::Value> = s
        .map
        .nodes
        .values()
        .map(|n| {
            let report = s
                .reports
                .iter()
                .find(|(id, _)| *id == n.id.0)
                .map(|(_, r)| r);
            let groups = report.and_then(|r| r.as_ref().ok()).map(|r| r.groups.len());
            serde_json::json!({
                "id": n.id.0, "state": format!("{:?}", n.state).to_lowercase(), "grpc": n.raft_addr,
                "api": n.api_addr, "zone": n.zone,
                "reachable": report.is_some_and(|r| r.is_ok()),
                "groups": groups,
                "leads": rows.iter().filter(|r| r.leader == Some(n.id.0)).count(),
            })
        })
        .collect();
    if json {
        return print_json(&out);
    }
    outln!(
        "{:<4} {:<9} {:<22} {:<22} {:<10} {:<9} {:>6} {:>6}",
        "ID",
        "STATE",
        "GRPC",
        "API",
        "ZONE",
        "REACHABLE",
        "GROUPS",
        "LEADS"
    );
    for n in out {
        outln!(
            "{:<4} {:<9} {:<22} {:<22} {:<10} {:<9} {:>6} {:>6}",
            n["id"].as_u64().unwrap_or_default(),
            n["state"].as_str().unwrap_or_default(),
            n["grpc"].as_str().unwrap_or_default(),
            n["api"].as_str().unwrap_or_default(),
            n["zone"].as_str().unwrap_or_default(),
            if n["reachable"] == true { "yes" } else { "NO" },
            n["groups"]
                .as_u64()
                .map(|g| g.to_string())
                .unwrap_or("-".into()),
            n["leads"].as_u64().unwrap_or_default(),
        );
    }
    Ok(())
}

async fn leaders(endpoint: &Endpoint, json: bool) -> anyhow::Result<()> {
    let s = survey(endpoint).await?;
    let rows = group_rows(&s);
    if json {
        return print_json(&rows);
    }
    let name = |r: &GroupRow| -> String {
        r.stream
            .as_deref()
            .or(r.name.as_deref())
            .unwrap_or("(metadata)")
            .to_string()
    };
    // As wide as the longest name (stream and queue names reach 128 and 80
    // characters), so that the columns after it line up.
    let width = rows.iter().map(|r| name(r).len()).max().unwrap_or(0).max(4);
    outln!(
        "{:<6} {:<9} {:<width$} {:<20} {:<8} {:<7} {:<6} REPLICAS",
        "GROUP",
        "KIND",
        "NAME",
        "SHARD",
        "STATE",
        "LEADER",
        "TERM"
    );
    for r in &rows {
        let replicas: Vec<String> = r.replicas.iter().map(u64::to_string).collect();
        outln!(
            "{:<6} {:<9} {:<width$} {:<20} {:<8} {:<7} {:<6} {}",
            r.group,
            r.kind,
            name(r),
            r.shard.as_deref().unwrap_or("-"),
            r.state.as_deref().unwrap_or("-"),
            r.leader.map(|l| l.to_string()).unwrap_or("NONE".into()),
            r.term,
            replicas.join(",")
        );
    }
    Ok(())
}

/// Replicas the map still places on `node`, and the node's state.
async fn drain_progress(c: &mut NodeClient<Channel>, node: u64) -> anyhow::Result<(usize, String)> {
    let info = c
        .cluster_info(pb::ClusterInfoRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let map: MetaState = serde_json::from_str(&info.state_json)?;
    // Every placed group counts: a queue's or a delivery stream's replicas
    // move off a draining node as a shard's do.
    let replicas = map.replica_load().get(&NodeId(node)).copied().unwrap_or(0);
    let state = map
        .nodes
        .get(&NodeId(node))
        .map_or("unknown".to_string(), |n| format!("{:?}", n.state));
    Ok((replicas, state))
}

pub async fn cluster(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Info { endpoint } => {
            let mut c = connect(&endpoint).await?;
            let info = c
                .cluster_info(pb::ClusterInfoRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let state: serde_json::Value = serde_json::from_str(&info.state_json)?;
            let groups: Vec<_> = info
                .groups
                .iter()
                .map(|g| serde_json::json!({"group": g.group, "role": g.role, "leader": g.leader, "term": g.term,
                    "last_log_index": g.last_log_index, "applied_index": g.applied_index}))
                .collect();
            outln!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "cluster_id": info.cluster_id, "node_id": info.node_id, "groups": groups, "map": state,
                }))?
            );
        }
        ClusterCommand::Health { json, endpoint } => health(&endpoint, json).await?,
        ClusterCommand::Nodes { json, endpoint } => nodes(&endpoint, json).await?,
        ClusterCommand::Leaders { json, endpoint } => leaders(&endpoint, json).await?,
        ClusterCommand::TransferLeader {
            group,
            to,
            endpoint,
        } => {
            let mut c = connect(&endpoint).await?;
            let r = c
                .transfer_leader(pb::TransferLeaderRequest { group, to })
                .await
                .map_err(status)?
                .into_inner();
            outln!("group {group} is led by node {}", r.leader);
        }
        ClusterCommand::RemoveNode {
            node,
            no_wait,
            endpoint,
        } => {
            let mut c = connect(&endpoint).await?;
            c.drain_node(pb::DrainNodeRequest { node_id: node })
                .await
                .map_err(status)?;
            eprintln!("draining node {node}");
            if no_wait {
                return Ok(());
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
            loop {
                let (replicas, state) = drain_progress(&mut c, node).await?;
                eprint!("\rnode {node}: {state}, {replicas} replica(s) left      ");
                if state == "Removed" {
                    eprintln!();
                    outln!("node {node} drained and removed");
                    return Ok(());
                }
                if tokio::time::Instant::now() > deadline {
                    anyhow::bail!("node {node} still holds {replicas} replica(s) after 10 minutes");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Ok(())
}
