//! `kinesin firehose`: Firehose delivery streams over the AWS API (create,
//! list, describe, put, delete).

use std::io::BufRead;

use base64::Engine;
use clap::Subcommand;
use serde_json::json;

use super::{print_json, Api};
use crate::output::outln;

#[derive(Subcommand, Debug)]
pub enum FirehoseCommand {
    /// Create a delivery stream that writes to an S3 bucket.
    Create {
        name: String,
        /// The bucket (a name or `arn:aws:s3:::name`).
        #[arg(long)]
        bucket: String,
        /// Key prefix; may use `!{timestamp:yyyy}` and the like.
        #[arg(long)]
        prefix: Option<String>,
        /// Prefix of objects for records that failed (required with a
        /// prefix that has expressions).
        #[arg(long)]
        error_prefix: Option<String>,
        /// Buffer size in MiB before an object is written (1 to 128).
        #[arg(long, default_value_t = 5)]
        size_mib: u32,
        /// Longest buffering in seconds before an object is written (0 to 900).
        #[arg(long, default_value_t = 300)]
        interval_secs: u32,
        /// UNCOMPRESSED, GZIP, ZIP, Snappy or HADOOP_SNAPPY.
        #[arg(long, default_value = "UNCOMPRESSED")]
        compression: String,
        #[command(flatten)]
        api: Api,
    },
    /// List delivery stream names.
    List {
        #[command(flatten)]
        api: Api,
    },
    /// Print a delivery stream's description (JSON).
    Describe {
        name: String,
        #[command(flatten)]
        api: Api,
    },
    /// Put each line of standard input as a record (newline kept, so
    /// objects are line-delimited).
    Put {
        name: String,
        #[command(flatten)]
        api: Api,
    },
    /// Delete a delivery stream (records not delivered yet are dropped).
    Delete {
        name: String,
        #[command(flatten)]
        api: Api,
    },
}

/// Records per PutRecordBatch.
const BATCH: usize = 500;

pub async fn firehose(cmd: FirehoseCommand) -> anyhow::Result<()> {
    match cmd {
        FirehoseCommand::Create {
            name,
            bucket,
            prefix,
            error_prefix,
            size_mib,
            interval_secs,
            compression,
            api,
        } => {
            let bucket_arn = if bucket.starts_with("arn:") {
                bucket
            } else {
                format!("arn:aws:s3:::{bucket}")
            };
            let out = api
                .aws()?
                .firehose()
                .call(
                    "CreateDeliveryStream",
                    &json!({
                        "DeliveryStreamName": name,
                        "ExtendedS3DestinationConfiguration": {
                            "RoleARN": "arn:aws:iam::000000000000:role/kinesin",
                            "BucketARN": bucket_arn,
                            "Prefix": prefix,
                            "ErrorOutputPrefix": error_prefix,
                            "BufferingHints": {"SizeInMBs": size_mib, "IntervalInSeconds": interval_secs},
                            "CompressionFormat": compression,
                        },
                    }),
                )
                .await?;
            outln!("{}", out["DeliveryStreamARN"].as_str().unwrap_or_default());
        }
        FirehoseCommand::List { api } => {
            let out = api
                .aws()?
                .firehose()
                .call("ListDeliveryStreams", &json!({ "Limit": 10000 }))
                .await?;
            for name in out["DeliveryStreamNames"].as_array().into_iter().flatten() {
                outln!("{}", name.as_str().unwrap_or_default());
            }
        }
        FirehoseCommand::Describe { name, api } => {
            let out = api
                .aws()?
                .firehose()
                .call(
                    "DescribeDeliveryStream",
                    &json!({ "DeliveryStreamName": name }),
                )
                .await?;
            print_json(&out["DeliveryStreamDescription"])?;
        }
        FirehoseCommand::Put { name, api } => {
            let mut aws = api.aws()?.firehose();
            let mut lines = std::io::stdin().lock().lines();
            let mut sent = 0usize;
            loop {
                let mut records = Vec::with_capacity(BATCH);
                for line in lines.by_ref().take(BATCH) {
                    let data = format!("{}\n", line?);
                    records.push(json!({
                        "Data": base64::engine::general_purpose::STANDARD.encode(data)
                    }));
                }
                if records.is_empty() {
                    break;
                }
                let count = records.len();
                let out = aws
                    .call(
                        "PutRecordBatch",
                        &json!({ "DeliveryStreamName": name, "Records": records }),
                    )
                    .await?;
                anyhow::ensure!(
                    out["FailedPutCount"].as_u64() == Some(0),
                    "some records were refused: {out}"
                );
                sent += count;
            }
            eprintln!("put {sent} record(s) into {name}");
        }
        FirehoseCommand::Delete { name, api } => {
            api.aws()?
                .firehose()
                .call(
                    "DeleteDeliveryStream",
                    &json!({ "DeliveryStreamName": name }),
                )
                .await?;
            eprintln!("deleted {name}");
        }
    }
    Ok(())
}
