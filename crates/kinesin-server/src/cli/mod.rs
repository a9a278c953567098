//! Client subcommands over the native gRPC API (and the AWS API where only
//! it has the operation, and for queues). Human output by default, `--json`
//! for scripts; exit status 1 on any error, 3 when `cluster health` finds a
//! problem.

use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::output::outln;
use crate::profile::{self, Profile};
use kinesin_proto::v1::node_client::NodeClient;
use tonic::transport::Channel;

mod cluster;
mod firehose;
mod queue;
mod records;
mod stream;

pub use cluster::{cluster, ClusterCommand};
pub use firehose::{firehose, FirehoseCommand};
pub use queue::{queue, QueueCommand};
pub use records::{put, tail, PutArgs, TailArgs};
pub use stream::{stream, StreamCommand};

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

/// Where the commands of services only the AWS API has (queues, delivery
/// streams) send their calls.
#[derive(Args, Debug, Clone)]
pub struct Api {
    /// AWS API address of any node, `host:port` or `http://host:port`
    /// (default: the profile's, 127.0.0.1:7450).
    #[arg(long, value_parser = profile::parse_address)]
    api_endpoint: Option<String>,
    #[command(flatten)]
    endpoint: Endpoint,
}

impl Api {
    /// A client of the profile's credentials (for Kinesis; `.sqs()` and
    /// `.firehose()` turn it to those services).
    fn aws(&self) -> anyhow::Result<crate::bench::AwsClient> {
        let p = self.endpoint.resolve()?;
        let address = self.api_endpoint.clone().unwrap_or(p.api_endpoint);
        Ok(crate::bench::AwsClient::with_credentials(
            &address,
            &p.access_key_id,
            &p.secret_access_key,
            &p.region,
        ))
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

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
