//! `kinesin dev`: one node in this process, or N node processes on
//! loopback (node k adds 10·k to each default port).

use std::path::PathBuf;
use std::process::Stdio;

use clap::Args;
use kinesin_server::{Config, FsyncSetting};

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Number of nodes (each its own process when more than one).
    #[arg(long, default_value_t = 1)]
    nodes: u16,
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    /// Where Firehose writes objects: an S3 endpoint URL (credentials from
    /// the standard AWS variables) or `file:///dir`. Default: the
    /// directory `s3` in the data directory, one subdirectory per bucket.
    #[arg(long, env = "KINESIN_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Glue table definitions (JSON, as `aws glue create-table` takes them)
    /// for Firehose's JSON → Parquet conversion.
    #[arg(long, env = "KINESIN_GLUE_TABLES_FILE")]
    glue_tables_file: Option<PathBuf>,
}

fn node_config(k: u16, n: u16, args: &DevArgs, s3_endpoint: &str) -> Config {
    let data_dir = &args.data_dir;
    let port = |base: u16| {
        format!("127.0.0.1:{}", base + 10 * k)
            .parse()
            .expect("valid address")
    };
    Config {
        node_id: u64::from(k) + 1,
        data_dir: if n == 1 {
            data_dir.to_path_buf()
        } else {
            data_dir.join(format!("node-{k}"))
        },
        listen_api: port(7450),
        listen_grpc: port(7451),
        listen_admin: port(7452),
        seeds: if k == 0 {
            Vec::new()
        } else {
            vec!["127.0.0.1:7451".into()]
        },
        replication_factor: usize::from(n.min(3)),
        fsync: FsyncSetting::Always,
        s3_endpoint: Some(s3_endpoint.to_string()),
        glue_tables_file: args.glue_tables_file.clone(),
        insecure_internal: true,
        ..Config::default()
    }
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > 9 {
        anyhow::bail!("--nodes must be 1 to 9");
    }
    let s3_endpoint = match &args.s3_endpoint {
        Some(endpoint) => endpoint.clone(),
        None => {
            let dir = std::path::absolute(args.data_dir.join("s3"))?;
            format!("file://{}", dir.display())
        }
    };
    if args.nodes == 1 {
        println!("kinesin dev: single node, embedded defaults, dev credentials (any)");
        println!("Firehose delivers to {s3_endpoint}");
        return crate::run_server(node_config(0, 1, &args, &s3_endpoint)).await;
    }
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for k in 0..args.nodes {
        let c = node_config(k, args.nodes, &args, &s3_endpoint);
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("server")
            .arg("--node-id")
            .arg(c.node_id.to_string())
            .arg("--data-dir")
            .arg(&c.data_dir)
            .arg("--listen-api")
            .arg(c.listen_api.to_string())
            .arg("--listen-grpc")
            .arg(c.listen_grpc.to_string())
            .arg("--listen-admin")
            .arg(c.listen_admin.to_string())
            .arg("--replication-factor")
            .arg(c.replication_factor.to_string())
            .arg("--seeds")
            .arg(c.seeds.join(","))
            .arg("--s3-endpoint")
            .arg(&s3_endpoint)
            .arg("--insecure-internal")
            .args(
                c.glue_tables_file
                    .iter()
                    .flat_map(|f| [std::ffi::OsStr::new("--glue-tables-file"), f.as_os_str()]),
            )
            .env_remove("KINESIN_INTERNAL_TLS_CA")
            .env_remove("KINESIN_INTERNAL_TLS_CERT")
            .env_remove("KINESIN_INTERNAL_TLS_KEY")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        children.push(cmd.spawn()?);
        println!(
            "node {}: AWS API http://{}  gRPC {}  admin http://{}",
            c.node_id, c.listen_api, c.listen_grpc, c.listen_admin
        );
    }
    println!(
        "kinesin dev: {} nodes running, Firehose delivers to {s3_endpoint}; Ctrl-C (or SIGTERM) stops them all",
        args.nodes
    );
    // SIGTERM too: `kill` or `pkill` of this process must not leave the
    // nodes running on their ports.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    for child in &mut children {
        if let Some(pid) = child.id() {
            // SIGTERM lets each node hand over leadership and stop cleanly.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
    for child in &mut children {
        let _ = child.wait().await;
    }
    Ok(())
}
