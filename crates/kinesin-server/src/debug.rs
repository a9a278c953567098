//! Offline inspection of a stopped node's data directory.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use kinesin_shard::StoredRecord;
use kinesin_storage::{keys, Cf, FsyncPolicy, Storage};

use crate::output::stdout_error;

#[derive(Args, Debug)]
pub struct RecordsArgs {
    /// The node's data directory (the node must be stopped).
    #[arg(long)]
    data_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct RaftArgs {
    /// The node's data directory (the node must be stopped).
    #[arg(long)]
    data_dir: PathBuf,
    /// Also print the log entries at these indexes (repeatable).
    #[arg(long = "entry")]
    entries: Vec<u64>,
}

fn open(data_dir: &std::path::Path) -> anyhow::Result<Storage> {
    let path = data_dir.join("db");
    Storage::open(&path, FsyncPolicy::Always)
        .with_context(|| format!("cannot open storage in {}", path.display()))
}

/// Writes `value` as one JSON line to standard output.
fn json_line(out: &mut impl Write, value: &impl serde::Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, value).map_err(|e| stdout_error(e.into()))?;
    out.write_all(b"\n").map_err(stdout_error)
}

/// Prints one JSON line per Raft group: vote, committed, purged, last log
/// and applied ids, the log's terms, and the requested entries.
pub fn raft(args: RaftArgs) -> anyhow::Result<()> {
    let storage = open(&args.data_dir)?;
    let indexes = args.entries.into_iter().collect();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for group in kinesin_raft::inspect::dump(&storage, &indexes)? {
        json_line(&mut out, &group)?;
    }
    out.flush().map_err(stdout_error)?;
    Ok(())
}

/// Prints every stored record as one JSON object per line, in key order
/// (group, then sequence number): what the chaos harness compares across
/// replicas.
pub fn records(args: RecordsArgs) -> anyhow::Result<()> {
    let storage = open(&args.data_dir)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for item in storage.scan(Cf::Records, &[], &[0xff; 9]) {
        let (key, value) = item?;
        let group = u64::from_be_bytes(key[..8].try_into().context("short record key")?);
        let record: StoredRecord = postcard::from_bytes(&value)
            .with_context(|| format!("undecodable record in group {group}"))?;
        json_line(
            &mut out,
            &serde_json::json!({
                "group": group,
                "seq": keys::record_seq_of(&key).to_string(),
                "partition_key": record.partition_key,
                "data": String::from_utf8_lossy(&record.data),
            }),
        )?;
    }
    out.flush().map_err(stdout_error)?;
    Ok(())
}
