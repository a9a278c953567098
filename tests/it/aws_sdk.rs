//! The Kinesis API through aws-sdk-rust (awsJson1_1, SigV4) against an
//! in-process 3-node cluster: the SDK's own serializers, retries and error
//! parsing, not ours.

use std::time::Duration;

use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kinesis::primitives::{Blob, DateTime};
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType, StreamStatus};
use aws_sdk_kinesis::Client;
use kinesin_testkit::{wait_until, TestCluster};

pub(crate) fn client(api_address: &str) -> Client {
    client_with(
        api_address,
        aws_sdk_kinesis::config::retry::RetryConfig::standard(),
    )
}

/// A client that retries as `retry` says.
pub(crate) fn client_with(
    api_address: &str,
    retry: aws_sdk_kinesis::config::retry::RetryConfig,
) -> Client {
    let config = aws_sdk_kinesis::Config::builder()
        .retry_config(retry)
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("AKIDTEST", "secret", None, None, "test"))
        .endpoint_url(format!("http://{api_address}"))
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .build();
    Client::from_conf(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_sdk_rust_puts_and_reads_through_any_node() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3).await?;
    let writer = client(&cluster.node(1).api_address());
    let reader = client(&cluster.node(3).api_address());

    writer
        .create_stream()
        .stream_name("sdk")
        .shard_count(2)
        .send()
        .await?;
    wait_until("the stream is ACTIVE", Duration::from_secs(30), || async {
        reader
            .describe_stream_summary()
            .stream_name("sdk")
            .send()
            .await
            .ok()
            .and_then(|d| d.stream_description_summary().cloned())
            .is_some_and(|s| s.stream_status() == &StreamStatus::Active)
    })
    .await?;

    let entries = (0..100)
        .map(|k| {
            PutRecordsRequestEntry::builder()
                .partition_key(format!("key-{}", k % 7))
                .data(Blob::new(format!("value-{k}")))
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let put = writer
        .put_records()
        .stream_name("sdk")
        .set_records(Some(entries))
        .send()
        .await?;
    assert_eq!(put.failed_record_count(), Some(0));
    let before = DateTime::from_millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64
            - 60_000,
    );

    let mut values = Vec::new();
    for shard in reader
        .list_shards()
        .stream_name("sdk")
        .send()
        .await?
        .shards()
    {
        let mut iterator = reader
            .get_shard_iterator()
            .stream_name("sdk")
            .shard_id(shard.shard_id())
            .shard_iterator_type(ShardIteratorType::AtTimestamp)
            .timestamp(before)
            .send()
            .await?
            .shard_iterator()
            .map(str::to_string);
        while let Some(it) = iterator {
            let out = reader.get_records().shard_iterator(it).send().await?;
            for r in out.records() {
                assert!(r
                    .approximate_arrival_timestamp()
                    .is_some_and(|t| *t > before));
                values.push(String::from_utf8(r.data().as_ref().to_vec())?);
            }
            iterator = if out.records().is_empty() && out.millis_behind_latest() == Some(0) {
                None
            } else {
                out.next_shard_iterator().map(str::to_string)
            };
        }
    }
    values.sort();
    let mut expected: Vec<String> = (0..100).map(|k| format!("value-{k}")).collect();
    expected.sort();
    assert_eq!(values, expected);

    let missing = reader
        .describe_stream()
        .stream_name("no-such-stream")
        .send()
        .await
        .expect_err("the stream does not exist");
    assert!(missing
        .as_service_error()
        .is_some_and(|e| e.is_resource_not_found_exception()));

    cluster.shutdown().await;
    Ok(())
}
