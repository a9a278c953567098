//! Client subcommands over the native gRPC API. Human output by default,
//! `--json` for scripts; exit status 1 on any error.

use std::io::BufRead;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use kinesin_proto::v1::node_client::NodeClient;
use kinesin_proto::v1::{self as pb};
use tonic::transport::Channel;

#[derive(Args, Debug, Clone)]
pub struct Endpoint {
    /// gRPC address of any node.
    #[arg(
        long,
        env = "KINESIN_ENDPOINT",
        default_value = "127.0.0.1:7451",
        global = true
    )]
    endpoint: String,
}

async fn connect(e: &Endpoint) -> anyhow::Result<NodeClient<Channel>> {
    let client = tokio::time::timeout(
        Duration::from_secs(5),
        NodeClient::connect(format!("http://{}", e.endpoint)),
    )
    .await
    .with_context(|| format!("connecting to {} timed out", e.endpoint))?
    .with_context(|| format!("cannot connect to {}", e.endpoint))?;
    Ok(client
        .max_decoding_message_size(kinesin_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(kinesin_proto::MAX_MESSAGE_BYTES))
}

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
            })
            .await
            .map_err(status)?;
            println!("created stream {name} with {shards} shard(s)");
        }
        StreamCommand::List { endpoint } => {
            let mut c = connect(&endpoint).await?;
            for s in c
                .list_streams(pb::ListStreamsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .streams
            {
                println!("{s}");
            }
        }
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
                println!(
                    "{}",
                    serde_json::json!({"stream": d.stream, "status": d.status, "epoch": d.epoch,
                        "retention_hours": d.retention_hours, "shards": shards})
                );
            } else {
                println!(
                    "{}  {}  retention {}h  epoch {}",
                    d.stream, d.status, d.retention_hours, d.epoch
                );
                println!(
                    "{:<22} {:<6} {:<10} {:<40}",
                    "SHARD", "OPEN", "REPLICAS", "HASH RANGE START"
                );
                for s in d.shards {
                    let replicas: Vec<String> = s.replicas.iter().map(u64::to_string).collect();
                    println!(
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
            println!("deleted stream {name}");
        }
    }
    Ok(())
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
}

#[derive(Args, Debug)]
pub struct TailArgs {
    stream: String,
    #[arg(long, value_enum, default_value = "trim-horizon")]
    from: From,
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
                    timestamp_ms: 0,
                    limit: 1000,
                })
                .await
                .map_err(status)?
                .into_inner();
            got += r.records.len();
            for rec in &r.records {
                let data = String::from_utf8_lossy(&rec.data);
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({"shard": shard, "sequence_number": rec.sequence_number,
                            "partition_key": rec.partition_key, "arrival_ms": rec.arrival_ms, "data": data})
                    );
                } else {
                    println!("{data}");
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

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// The cluster map and this node's groups, as JSON.
    Info {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Move every replica off a node, then remove it from the cluster.
    Drain {
        /// Id of the node to drain.
        #[arg(long)]
        node: u64,
        /// Return once the drain has started instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
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
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "cluster_id": info.cluster_id, "node_id": info.node_id, "groups": groups, "map": state,
                }))?
            );
        }
        ClusterCommand::Drain {
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
                    println!("node {node} drained and removed");
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
