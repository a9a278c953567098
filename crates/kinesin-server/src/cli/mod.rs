//! Client subcommands over the native gRPC API (and the AWS API where only
//! it has the operation, and for queues). Human output by default, `--json`
//! for scripts; exit status 1 on any error, 3 when `cluster health` finds a
//! problem.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::output::outln;
use crate::profile::{self, Profile};
use kinesin_proto::tls::{Dialer, InternalTls};
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

/// How the CLI dials a node's internal port: with mutual TLS when
/// KINESIN_INTERNAL_TLS_CA, _CERT and _KEY name the cluster CA and a
/// certificate of it (the variables a node of a TLS cluster has, so the CLI
/// works inside its pod), else plaintext.
pub(crate) fn dialer() -> anyhow::Result<Dialer> {
    let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
    match (
        var("KINESIN_INTERNAL_TLS_CA"),
        var("KINESIN_INTERNAL_TLS_CERT"),
        var("KINESIN_INTERNAL_TLS_KEY"),
    ) {
        (None, None, None) => Ok(Dialer::plaintext()),
        (Some(ca), Some(cert), Some(key)) => InternalTls::load(&ca, &cert, &key)
            .map(Dialer::tls)
            .map_err(|e| anyhow::anyhow!(e)),
        _ => anyhow::bail!(
            "KINESIN_INTERNAL_TLS_CA, KINESIN_INTERNAL_TLS_CERT and KINESIN_INTERNAL_TLS_KEY must be set together"
        ),
    }
}

async fn connect_to(address: &str) -> anyhow::Result<NodeClient<Channel>> {
    let endpoint = dialer()?
        .endpoint(address)
        .map_err(|e| anyhow::anyhow!("{e}{ENDPOINT_HINT}"))?;
    let channel = tokio::time::timeout(Duration::from_secs(5), endpoint.connect())
        .await
        .with_context(|| format!("connecting to {address} timed out after 5 s{ENDPOINT_HINT}"))?
        .with_context(|| format!("cannot connect to {address}{ENDPOINT_HINT}"))?;
    Ok(NodeClient::new(channel)
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
    // A connection that failed below gRPC (TLS refused, reset): say what.
    let mut cause = String::new();
    let mut source = std::error::Error::source(&s);
    while let Some(e) = source {
        cause = format!(": {e}");
        source = e.source();
    }
    if cause.is_empty() {
        return anyhow::anyhow!("{}", s.message());
    }
    anyhow::anyhow!(
        "{}{cause} (a cluster with internal TLS needs KINESIN_INTERNAL_TLS_CA, _CERT and _KEY naming its CA and a certificate of it)",
        s.message()
    )
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
