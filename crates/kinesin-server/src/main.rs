//! The `kinesin` binary: a server node, a one-command dev cluster, and client
//! subcommands over the native gRPC API.

mod bench;
mod bench_read;
mod bench_sqs;
mod cli;
mod debug;
mod dev;
mod output;
mod profile;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kinesin_raft::{GroupKinds, NoFilter, TimingProfile};
use kinesin_server::{shard_timing, AuthSetting, Config, FsyncSetting, Node};

#[derive(Parser)]
#[command(
    name = "kinesin",
    version,
    about = "Kinesin: a Raft-replicated streaming platform that speaks AWS protocols"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a production node (config file, KINESIN_* environment, flags).
    Server(Box<ServerArgs>),
    /// Start a local cluster with embedded defaults (data under ./data).
    Dev(dev::DevArgs),
    /// Manage streams.
    #[command(subcommand)]
    Stream(cli::StreamCommand),
    /// Manage SQS queues and their messages.
    #[command(subcommand)]
    Queue(cli::QueueCommand),
    /// Manage Firehose delivery streams and put records into them.
    #[command(subcommand)]
    Firehose(cli::FirehoseCommand),
    /// Put records read from standard input, one per line.
    Put(cli::PutArgs),
    /// Read records of every shard of a stream.
    Tail(cli::TailArgs),
    /// Show the cluster as a node sees it.
    #[command(subcommand)]
    Cluster(cli::ClusterCommand),
    /// Measure throughput and latency.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Named endpoints and credentials for these commands.
    #[command(subcommand)]
    Profile(profile::ProfileCommand),
    /// Inspect a stopped node's data offline.
    #[command(subcommand)]
    Debug(DebugCommand),
}

#[derive(Subcommand)]
enum DebugCommand {
    /// Print every stored record as JSON lines (group, seq, key, data).
    Records(debug::RecordsArgs),
    /// Print each Raft group's vote, committed and applied ids and the terms
    /// of its log, as JSON lines.
    Raft(debug::RaftArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Put records as fast as possible, or at a fixed rate.
    Produce(bench::ProduceArgs),
    /// Read an existing stream from TRIM_HORIZON with N consumers.
    Consume(bench_read::ReadArgs),
    /// Put at a fixed rate and measure put → seen by N consumers.
    E2e(bench_read::ReadArgs),
    /// SQS: send, receive + delete, and send → receive latency with
    /// waiting long polls, over the AWS JSON API.
    Sqs(bench_sqs::SqsArgs),
}

/// Flags override the environment, which overrides the config file.
#[derive(Args, Debug, Default)]
pub struct ServerArgs {
    /// TOML config file.
    #[arg(long, env = "KINESIN_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "KINESIN_NODE_ID")]
    node_id: Option<u64>,
    #[arg(long, env = "KINESIN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, env = "KINESIN_LISTEN_API")]
    listen_api: Option<std::net::SocketAddr>,
    #[arg(long, env = "KINESIN_LISTEN_GRPC")]
    listen_grpc: Option<std::net::SocketAddr>,
    #[arg(long, env = "KINESIN_LISTEN_ADMIN")]
    listen_admin: Option<std::net::SocketAddr>,
    #[arg(long, env = "KINESIN_ADVERTISE_GRPC")]
    advertise_grpc: Option<String>,
    #[arg(long, env = "KINESIN_ADVERTISE_API")]
    advertise_api: Option<String>,
    /// Comma-separated gRPC addresses of nodes to join through.
    #[arg(long, env = "KINESIN_SEEDS", value_delimiter = ',')]
    seeds: Option<Vec<String>>,
    #[arg(long, env = "KINESIN_ZONE")]
    zone: Option<String>,
    #[arg(long, env = "KINESIN_REPLICATION_FACTOR")]
    replication_factor: Option<usize>,
    /// `always` or `never-unsafe`.
    #[arg(long, env = "KINESIN_FSYNC")]
    fsync: Option<FsyncSetting>,
    #[arg(long, env = "KINESIN_REPAIR_AFTER_SECS")]
    repair_after_secs: Option<u64>,
    /// Where Firehose writes objects: an S3 endpoint URL or `file:///dir`.
    #[arg(long, env = "KINESIN_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Glue table definitions (JSON) for Firehose's JSON → Parquet conversion.
    #[arg(long, env = "KINESIN_GLUE_TABLES_FILE")]
    glue_tables_file: Option<PathBuf>,
    /// Mutual TLS on the internal gRPC port: the cluster CA, this node's
    /// certificate and its key (PEM).
    #[arg(long, env = "KINESIN_INTERNAL_TLS_CA")]
    internal_tls_ca: Option<PathBuf>,
    #[arg(long, env = "KINESIN_INTERNAL_TLS_CERT")]
    internal_tls_cert: Option<PathBuf>,
    #[arg(long, env = "KINESIN_INTERNAL_TLS_KEY")]
    internal_tls_key: Option<PathBuf>,
    /// Plaintext internal gRPC without authentication (`insecure_internal =
    /// true`): anyone who reaches the port can change the cluster.
    #[arg(long, env = "KINESIN_INSECURE_INTERNAL")]
    insecure_internal: bool,
    /// Accept any request without credentials, on any address (`auth =
    /// "none"`): for a development machine only.
    #[arg(long, env = "KINESIN_INSECURE_DEV")]
    insecure_dev: bool,
    /// Only check the configuration (exit status 0 valid, 2 invalid).
    #[arg(long)]
    check_config: bool,
}

impl ServerArgs {
    fn into_config(self) -> Result<Config, String> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        set!(
            node_id,
            data_dir,
            listen_api,
            listen_grpc,
            listen_admin,
            zone,
            replication_factor,
            fsync,
            repair_after_secs
        );
        if let Some(seeds) = self.seeds {
            c.seeds = seeds
                .into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if self.advertise_grpc.is_some() {
            c.advertise_grpc = self.advertise_grpc;
        }
        if self.advertise_api.is_some() {
            c.advertise_api = self.advertise_api;
        }
        if self.s3_endpoint.is_some() {
            c.s3_endpoint = self.s3_endpoint;
        }
        if self.glue_tables_file.is_some() {
            c.glue_tables_file = self.glue_tables_file;
        }
        if self.insecure_dev {
            c.auth = AuthSetting::None;
        }
        if self.insecure_internal {
            c.insecure_internal = true;
        }
        if self.internal_tls_ca.is_some() {
            c.internal_tls_ca_file = self.internal_tls_ca;
        }
        if self.internal_tls_cert.is_some() {
            c.internal_tls_cert_file = self.internal_tls_cert;
        }
        if self.internal_tls_key.is_some() {
            c.internal_tls_key_file = self.internal_tls_key;
        }
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KINESIN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=warn,h2=warn,tower=warn,hyper=warn")
    });
    // Colours only for a terminal: a log file or a collector gets plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
}

/// Runs one node until SIGTERM or Ctrl-C, then hands leadership away and stops.
pub async fn run_server(config: Config) -> anyhow::Result<()> {
    kinesin_server::admin::prometheus();
    let node = Node::start(
        config.clone(),
        Arc::new(NoFilter),
        (TimingProfile::meta(), shard_timing(&config)),
        GroupKinds::default(),
    )
    .await?;
    println!(
        "kinesin node {} ready\n  AWS API   http://{}\n  gRPC      {}\n  admin     http://{}/metrics\n  data      {}",
        config.node_id,
        config.api_address(),
        config.grpc_address(),
        config.admin_address(),
        config.data_dir.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping: handing over leadership");
    node.hand_over_leadership(Duration::from_secs(5)).await;
    node.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// mimalloc instead of glibc's malloc: in a profile of SQS receive + delete
/// on a 3-node cluster glibc's allocator took about a sixth of the busy
/// CPU, and with mimalloc the rate was 16 % higher (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Transparent huge pages off for this process. mimalloc reserves 1 GiB
/// arenas and asks for huge pages on them, and openraft gives every group
/// queues that are large but mostly untouched; with huge pages each idle
/// shard group cost about 2.4 MiB of RSS per node, without them about
/// 0.2 MiB; throughput changed within the benchmarks' noise
/// (docs/benchmarks.md).
fn disable_transparent_huge_pages() {
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("kinesin: transparent huge pages stay on: {e}");
    }
}

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = match cli.command {
        Command::Server(args) => {
            let check = args.check_config;
            let config = match args.into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("kinesin: {e}");
                    return ExitCode::from(2);
                }
            };
            if check {
                if let Err(e) = config.internal_tls() {
                    eprintln!("kinesin: {e}");
                    return ExitCode::from(2);
                }
                println!(
                    "configuration valid: node {}, data in {}, {} access key(s)",
                    config.node_id,
                    config.data_dir.display(),
                    config.credentials.len()
                );
                return ExitCode::SUCCESS;
            }
            init_logging();
            runtime.block_on(run_server(config))
        }
        Command::Dev(args) => {
            init_logging();
            runtime.block_on(dev::run(args))
        }
        Command::Stream(cmd) => runtime.block_on(cli::stream(cmd)),
        Command::Queue(cmd) => runtime.block_on(cli::queue(cmd)),
        Command::Firehose(cmd) => runtime.block_on(cli::firehose(cmd)),
        Command::Put(args) => runtime.block_on(cli::put(args)),
        Command::Tail(args) => runtime.block_on(cli::tail(args)),
        Command::Cluster(cmd) => runtime.block_on(cli::cluster(cmd)),
        Command::Bench(BenchCommand::Produce(args)) => runtime.block_on(bench::produce(args)),
        Command::Bench(BenchCommand::Consume(args)) => runtime.block_on(bench_read::consume(args)),
        Command::Bench(BenchCommand::E2e(args)) => runtime.block_on(bench_read::e2e(args)),
        Command::Bench(BenchCommand::Sqs(args)) => runtime.block_on(bench_sqs::sqs(args)),
        Command::Debug(DebugCommand::Records(args)) => debug::records(args),
        Command::Debug(DebugCommand::Raft(args)) => debug::raft(args),
        Command::Profile(cmd) => profile::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<cli::Unhealthy>().is_some() => ExitCode::from(3),
        Err(e) if e.downcast_ref::<output::StdoutClosed>().is_some() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kinesin: {e:#}");
            ExitCode::from(1)
        }
    }
}
