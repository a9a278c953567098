//! `kinesin put` and `kinesin tail`: records from standard input, and every
//! shard of a stream read to standard output.

use std::io::BufRead;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::{connect, status, Endpoint};
use crate::output::outln;
use kinesin_proto::v1::{self as pb};

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
