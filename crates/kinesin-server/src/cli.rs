//! Client subcommands over the native gRPC API (and the AWS API where only
//! it has the operation). Human output by default, `--json` for scripts;
//! exit status 1 on any error, 3 when `cluster health` finds a problem.

use std::io::BufRead;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use kinesin_meta::{MetaState, NodeState};
use kinesin_types::ShardState;

use crate::bench::AwsClient;
use crate::output::outln;
use crate::profile::{self, Profile};
use kinesin_proto::v1::node_client::NodeClient;
use kinesin_proto::v1::{self as pb};
use tonic::transport::Channel;

#[derive(Args, Debug, Clone)]
pub struct Endpoint {
    /// gRPC address of any node, `host:port` or `http://host:port`
    /// (default: the profile's, 127.0.0.1:7451).
    #[arg(long, env = "KINESIN_ENDPOINT", global = true, value_parser = profile::parse_address)]
    endpoint: Option<String>,
    /// Profile in profiles.toml (default: `default`); see `kinesin profile`.
    #[arg(long, env = "KINESIN_PROFILE", global = true)]
    profile: Option<String>,
}

impl Endpoint {
    fn resolve(&self) -> anyhow::Result<Profile> {
        let mut p = profile::load(self.profile.as_deref())?;
        if let Some(e) = &self.endpoint {
            p.endpoint = e.clone();
        }
        Ok(p)
    }
}

/// Said with every connection failure: what the address should name.
const ENDPOINT_HINT: &str =
    " (--endpoint takes a node's gRPC address, host:port or http://host:port; default 127.0.0.1:7451)";

async fn connect_to(address: &str) -> anyhow::Result<NodeClient<Channel>> {
    let client = tokio::time::timeout(
        Duration::from_secs(5),
        NodeClient::connect(format!("http://{address}")),
    )
    .await
    .with_context(|| format!("connecting to {address} timed out after 5 s{ENDPOINT_HINT}"))?
    .with_context(|| format!("cannot connect to {address}{ENDPOINT_HINT}"))?;
    Ok(client
        .max_decoding_message_size(kinesin_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(kinesin_proto::MAX_MESSAGE_BYTES))
}

async fn connect(e: &Endpoint) -> anyhow::Result<NodeClient<Channel>> {
    connect_to(&e.resolve()?.endpoint).await
}

/// `cluster health` found the cluster unhealthy (exit status 3).
#[derive(Debug, thiserror::Error)]
#[error("the cluster is unhealthy")]
pub struct Unhealthy;

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

#[derive(Subcommand, Debug)]
pub enum StreamCommand {
    /// Create a stream.
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        shards: u32,
        /// Replicas per shard (default: the server's setting).
        #[arg(long, default_value_t = 0)]
        replication: u32,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// List streams.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Change the number of open shards (UpdateShardCount over the AWS API:
    /// at most double or halve), then wait until the stream is ACTIVE.
    Reshard {
        name: String,
        #[arg(long)]
        shards: u32,
        /// AWS API address of any node, `host:port` or `http://host:port`
        /// (default: the profile's).
        #[arg(long, value_parser = profile::parse_address)]
        api_endpoint: Option<String>,
        /// Return once the reshard has started.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Show a stream's shards and replicas.
    Describe {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Delete a stream and all its records.
    Delete {
        name: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

pub async fn stream(cmd: StreamCommand) -> anyhow::Result<()> {
    match cmd {
        StreamCommand::Create {
            name,
            shards,
            replication,
            endpoint,
        } => {
            let mut c = connect(&endpoint).await?;
            c.create_stream(pb::CreateStreamRequest {
                stream: name.clone(),
                shard_count: shards,
                replication_factor: replication,
                max_record_bytes: 0,
                ..Default::default()
            })
            .await
            .map_err(status)?;
            wait_for_active(&mut c, &name).await?;
            outln!("created stream {name} with {shards} shard(s)");
        }
        StreamCommand::List { json, endpoint } => {
            let mut c = connect(&endpoint).await?;
            let streams = c
                .list_streams(pb::ListStreamsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .streams;
            if json {
                outln!("{}", serde_json::json!({ "streams": streams }));
            } else {
                for s in streams {
                    outln!("{s}");
                }
            }
        }
        StreamCommand::Reshard {
            name,
            shards,
            api_endpoint,
            no_wait,
            endpoint,
        } => reshard(&endpoint.resolve()?, api_endpoint, &name, shards, no_wait).await?,
        StreamCommand::Describe {
            name,
            json,
            endpoint,
        } => {
            let mut c = connect(&endpoint).await?;
            let d = c
                .describe_stream(pb::DescribeStreamRequest { stream: name })
                .await
                .map_err(status)?
                .into_inner();
            if json {
                let shards: Vec<_> = d
                    .shards
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "shard_id": s.shard_id, "starting_hash_key": s.starting_hash_key,
                            "ending_hash_key": s.ending_hash_key, "open": s.open,
                            "group": s.group, "replicas": s.replicas,
                        })
                    })
                    .collect();
                outln!(
                    "{}",
                    serde_json::json!({"stream": d.stream, "status": d.status, "epoch": d.epoch,
                        "retention_hours": d.retention_hours, "shards": shards})
                );
            } else {
                outln!(
                    "{}  {}  retention {}h  epoch {}",
                    d.stream,
                    d.status,
                    d.retention_hours,
                    d.epoch
                );
                outln!(
                    "{:<22} {:<6} {:<10} {:<40}",
                    "SHARD",
                    "OPEN",
                    "REPLICAS",
                    "HASH RANGE START"
                );
                for s in d.shards {
                    let replicas: Vec<String> = s.replicas.iter().map(u64::to_string).collect();
                    outln!(
                        "{:<22} {:<6} {:<10} {}",
                        s.shard_id,
                        s.open,
                        replicas.join(","),
                        s.starting_hash_key
                    );
                }
            }
        }
        StreamCommand::Delete { name, endpoint } => {
            let mut c = connect(&endpoint).await?;
            c.delete_stream(pb::DeleteStreamRequest {
                stream: name.clone(),
            })
            .await
            .map_err(status)?;
            outln!("deleted stream {name}");
        }
    }
    Ok(())
}

/// Waits until a new stream's shards have leaders (it is ACTIVE).
async fn wait_for_active(c: &mut NodeClient<Channel>, name: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let d = c
            .describe_stream(pb::DescribeStreamRequest {
                stream: name.to_string(),
            })
            .await
            .map_err(status)?
            .into_inner();
        if d.status == "ACTIVE" {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("stream {name} is still {} after 2 minutes", d.status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Args, Debug)]
pub struct PutArgs {
    stream: String,
    /// Partition key of every record (default: the line itself, up to 256 characters).
    #[arg(long)]
    partition_key: Option<String>,
    #[command(flatten)]
    endpoint: Endpoint,
}

pub async fn put(args: PutArgs) -> anyhow::Result<()> {
    let c = connect(&args.endpoint).await?;
    let stdin = std::io::stdin();
    let mut batch = Vec::new();
    let mut stored = 0usize;
    let flush = |batch: Vec<pb::Record>| {
        let mut c = c.clone();
        let stream = args.stream.clone();
        async move {
            let r = c
                .put_records(pb::PutRecordsRequest {
                    stream,
                    records: batch,
                })
                .await
                .map_err(status)?
                .into_inner();
            if r.failed_count > 0 {
                let first = r.results.iter().find(|x| !x.error_code.is_empty());
                anyhow::bail!(
                    "{} record(s) failed: {}",
                    r.failed_count,
                    first.map(|f| f.error_message.as_str()).unwrap_or("")
                );
            }
            Ok(r.results.len())
        }
    };
    for line in stdin.lock().lines() {
        let line = line?;
        let key = args
            .partition_key
            .clone()
            .unwrap_or_else(|| line.chars().take(256).collect::<String>());
        let key = if key.is_empty() { "-".to_string() } else { key };
        batch.push(pb::Record {
            partition_key: key,
            data: line.into_bytes().into(),
            explicit_hash_key: String::new(),
        });
        if batch.len() == 500 {
            stored += flush(std::mem::take(&mut batch)).await?;
        }
    }
    if !batch.is_empty() {
        stored += flush(batch).await?;
    }
    eprintln!("put {stored} record(s)");
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum From {
    TrimHorizon,
    Latest,
    /// From the first record that arrived at or after `--timestamp`.
    Timestamp,
}

#[derive(Args, Debug)]
pub struct TailArgs {
    stream: String,
    #[arg(long, value_enum, default_value = "trim-horizon")]
    from: From,
    /// With `--from timestamp`: milliseconds since the Unix epoch.
    #[arg(long, required_if_eq("from", "timestamp"))]
    timestamp: Option<u64>,
    /// Keep polling for new records.
    #[arg(long)]
    follow: bool,
    /// One JSON object per record.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    endpoint: Endpoint,
}

pub async fn tail(args: TailArgs) -> anyhow::Result<()> {
    let mut c = connect(&args.endpoint).await?;
    let d = c
        .describe_stream(pb::DescribeStreamRequest {
            stream: args.stream.clone(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut cursors: Vec<(String, pb::IteratorType, String)> = d
        .shards
        .iter()
        .map(|s| {
            let from = match args.from {
                From::TrimHorizon => pb::IteratorType::TrimHorizon,
                From::Latest => pb::IteratorType::Latest,
                From::Timestamp => pb::IteratorType::AtTimestamp,
            };
            (s.shard_id.clone(), from, String::new())
        })
        .collect();
    loop {
        let mut got = 0;
        for (shard, from, seq) in &mut cursors {
            let r = c
                .get_records(pb::GetRecordsRequest {
                    stream: args.stream.clone(),
                    shard_id: shard.clone(),
                    from: *from as i32,
                    sequence_number: seq.clone(),
                    timestamp_ms: args.timestamp.unwrap_or(0),
                    limit: 1000,
                })
                .await
                .map_err(status)?
                .into_inner();
            got += r.records.len();
            for rec in &r.records {
                let data = String::from_utf8_lossy(&rec.data);
                if args.json {
                    outln!(
                        "{}",
                        serde_json::json!({"shard": shard, "sequence_number": rec.sequence_number,
                            "partition_key": rec.partition_key, "arrival_ms": rec.arrival_ms, "data": data})
                    );
                } else {
                    outln!("{data}");
                }
            }
            *from = pb::IteratorType::AtSequenceNumber;
            *seq = r.next_sequence_number;
        }
        if got == 0 {
            if !args.follow {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn reshard(
    profile: &Profile,
    api_endpoint: Option<String>,
    name: &str,
    shards: u32,
    no_wait: bool,
) -> anyhow::Result<()> {
    let address = api_endpoint.unwrap_or_else(|| profile.api_endpoint.clone());
    let mut aws = AwsClient::with_credentials(
        &address,
        &profile.access_key_id,
        &profile.secret_access_key,
        &profile.region,
    );
    aws.call(
        "UpdateShardCount",
        &serde_json::json!({"StreamName": name, "TargetShardCount": shards, "ScalingType": "UNIFORM_SCALING"}),
    )
    .await?;
    eprintln!("resharding {name} to {shards} open shard(s)");
    if no_wait {
        return Ok(());
    }
    let started = tokio::time::Instant::now();
    loop {
        let d = aws
            .call(
                "DescribeStreamSummary",
                &serde_json::json!({"StreamName": name}),
            )
            .await?;
        let summary = &d["StreamDescriptionSummary"];
        let state = summary["StreamStatus"].as_str().unwrap_or("?").to_string();
        eprint!("\r{name}: {state} ({} s)   ", started.elapsed().as_secs());
        if state == "ACTIVE" {
            eprintln!();
            outln!(
                "{name}: {} open shard(s)",
                summary["OpenShardCount"].as_u64().unwrap_or(0)
            );
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(300) {
            anyhow::bail!("{name} still {state} after 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

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
    /// Every Raft group (metadata and shards) with its leader and replicas.
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
    stream: Option<String>,
    shard: Option<String>,
    shard_state: Option<String>,
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
    let row = |group: u64,
               stream: Option<String>,
               shard: Option<String>,
               shard_state: Option<String>,
               replicas: Vec<u64>| {
        let st = statuses(group);
        let leader_status = st.iter().find(|(_, g)| g.role == "leader");
        let leader = leader_status
            .map(|(n, _)| *n)
            .or_else(|| st.iter().map(|(_, g)| g.leader).find(|l| *l != 0));
        GroupRow {
            group,
            stream,
            shard,
            shard_state,
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
    let mut rows = vec![row(0, None, None, None, meta_voters)];
    for (name, stream) in &s.map.streams {
        for shard in &stream.shards {
            let state = match shard.state {
                ShardState::Open => "open",
                ShardState::Sealing => "sealing",
                ShardState::Sealed => "sealed",
            };
            rows.push(row(
                shard.group.0,
                Some(name.clone()),
                Some(shard.shard_id.to_string()),
                Some(state.to_string()),
                shard.replicas.iter().map(|r| r.0).collect(),
            ));
        }
    }
    rows
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
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
    outln!(
        "{:<6} {:<20} {:<20} {:<8} {:<7} {:<6} REPLICAS",
        "GROUP",
        "STREAM",
        "SHARD",
        "STATE",
        "LEADER",
        "TERM"
    );
    for r in rows {
        let replicas: Vec<String> = r.replicas.iter().map(u64::to_string).collect();
        outln!(
            "{:<6} {:<20} {:<20} {:<8} {:<7} {:<6} {}",
            r.group,
            r.stream.as_deref().unwrap_or("(metadata)"),
            r.shard.as_deref().unwrap_or("-"),
            r.shard_state.as_deref().unwrap_or("-"),
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
    let map: serde_json::Value = serde_json::from_str(&info.state_json)?;
    let replicas = map["streams"]
        .as_object()
        .map(|streams| {
            streams
                .values()
                .flat_map(|s| s["shards"].as_array().cloned().unwrap_or_default())
                .filter(|sh| {
                    sh["replicas"]
                        .as_array()
                        .is_some_and(|r| r.iter().any(|x| x.as_u64() == Some(node)))
                })
                .count()
        })
        .unwrap_or(0);
    let state = map["nodes"][node.to_string()]["state"]
        .as_str()
        .unwrap_or("unknown")
        .to_string();
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
