//! `kinesin queue`: SQS queues over the AWS API (create, list, send,
//! receive, purge, delete).

use std::io::BufRead;

use clap::Subcommand;
use serde_json::{json, Value};

use super::Api;
use crate::bench::AwsClient;
use crate::output::outln;

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Create a queue (a name ending in .fifo makes a FIFO queue).
    Create {
        name: String,
        /// Attributes as NAME=VALUE (VisibilityTimeout=60, ...).
        #[arg(long = "attribute", value_parser = parse_pair)]
        attributes: Vec<(String, String)>,
        /// Partitions (Raft groups) of a standard queue, 1 to 16: sends
        /// spread over them and receives take from all.
        #[arg(long)]
        partitions: Option<u32>,
        #[command(flatten)]
        api: Api,
    },
    /// List queue URLs.
    List {
        /// Only queues whose name starts with this.
        #[arg(long, default_value = "")]
        prefix: String,
        #[command(flatten)]
        api: Api,
    },
    /// Send each line of standard input as a message.
    Send {
        name: String,
        /// MessageGroupId (FIFO queues).
        #[arg(long)]
        group: Option<String>,
        #[command(flatten)]
        api: Api,
    },
    /// Receive messages, print their bodies and delete them.
    Receive {
        name: String,
        /// Stop after this many messages.
        #[arg(long, default_value_t = 10)]
        max: usize,
        /// Long-poll this many seconds for each batch (0 to 20).
        #[arg(long, default_value_t = 2)]
        wait: u32,
        /// Leave the messages in the queue (they return after the
        /// visibility timeout).
        #[arg(long)]
        keep: bool,
        #[command(flatten)]
        api: Api,
    },
    /// Delete every message of a queue.
    Purge {
        name: String,
        #[command(flatten)]
        api: Api,
    },
    /// Delete a queue and its messages.
    Delete {
        name: String,
        #[command(flatten)]
        api: Api,
    },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected NAME=VALUE, got '{s}'"))
}

async fn url_of(aws: &mut AwsClient, name: &str) -> anyhow::Result<String> {
    let out = aws
        .call("GetQueueUrl", &json!({ "QueueName": name }))
        .await?;
    out["QueueUrl"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("GetQueueUrl answered without a URL"))
}

pub async fn queue(cmd: QueueCommand) -> anyhow::Result<()> {
    match cmd {
        QueueCommand::Create {
            name,
            attributes,
            partitions,
            api,
        } => {
            let mut attrs: serde_json::Map<String, Value> = attributes
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            if name.ends_with(".fifo") {
                attrs.insert("FifoQueue".into(), Value::String("true".into()));
            }
            let mut request = json!({ "QueueName": name, "Attributes": attrs });
            if let Some(n) = partitions {
                request["tags"] = json!({ kinesin_queue::PARTITIONS_TAG: n.to_string() });
            }
            let out = api.aws()?.sqs().call("CreateQueue", &request).await?;
            outln!("{}", out["QueueUrl"].as_str().unwrap_or_default());
        }
        QueueCommand::List { prefix, api } => {
            let out = api
                .aws()?
                .sqs()
                .call("ListQueues", &json!({ "QueueNamePrefix": prefix }))
                .await?;
            for url in out["QueueUrls"].as_array().into_iter().flatten() {
                outln!("{}", url.as_str().unwrap_or_default());
            }
        }
        QueueCommand::Send { name, group, api } => {
            let mut aws = api.aws()?.sqs();
            let url = url_of(&mut aws, &name).await?;
            let mut sent = 0u64;
            for line in std::io::stdin().lock().lines() {
                let mut body = json!({ "QueueUrl": url, "MessageBody": line? });
                if let Some(g) = &group {
                    body["MessageGroupId"] = Value::String(g.clone());
                }
                aws.call("SendMessage", &body).await?;
                sent += 1;
            }
            eprintln!("sent {sent} message(s) to {name}");
        }
        QueueCommand::Receive {
            name,
            max,
            wait,
            keep,
            api,
        } => {
            let mut aws = api.aws()?.sqs();
            let url = url_of(&mut aws, &name).await?;
            let mut received = 0;
            while received < max {
                let out = aws
                    .call(
                        "ReceiveMessage",
                        &json!({
                            "QueueUrl": url,
                            "MaxNumberOfMessages": (max - received).min(10),
                            "WaitTimeSeconds": wait,
                        }),
                    )
                    .await?;
                let messages = out["Messages"].as_array().cloned().unwrap_or_default();
                if messages.is_empty() {
                    break;
                }
                for m in &messages {
                    outln!("{}", m["Body"].as_str().unwrap_or_default());
                    if !keep {
                        aws.call(
                            "DeleteMessage",
                            &json!({ "QueueUrl": url, "ReceiptHandle": m["ReceiptHandle"] }),
                        )
                        .await?;
                    }
                }
                received += messages.len();
            }
        }
        QueueCommand::Purge { name, api } => {
            let mut aws = api.aws()?.sqs();
            let url = url_of(&mut aws, &name).await?;
            aws.call("PurgeQueue", &json!({ "QueueUrl": url })).await?;
            eprintln!("purged {name}");
        }
        QueueCommand::Delete { name, api } => {
            let mut aws = api.aws()?.sqs();
            let url = url_of(&mut aws, &name).await?;
            aws.call("DeleteQueue", &json!({ "QueueUrl": url })).await?;
            eprintln!("deleted {name}");
        }
    }
    Ok(())
}
