//! `kinesin stream`: create, list, reshard, describe, delete.

use std::time::Duration;

use clap::Subcommand;

use super::{connect, status, Endpoint};
use crate::bench::AwsClient;
use crate::output::outln;
use crate::profile::{self, Profile};
use kinesin_proto::v1::node_client::NodeClient;
use kinesin_proto::v1::{self as pb};
use tonic::transport::Channel;

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
