//! SQS through aws-sdk-rust (awsJson1_0, SigV4) against an in-process
//! 3-node cluster: the SDK's own serializers and error parsing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName};
use aws_sdk_sqs::Client;
use kinesin_testkit::TestCluster;

pub(crate) fn client(api_address: &str) -> Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("AKIDTEST", "secret", None, None, "test"))
        .endpoint_url(format!("http://{api_address}"))
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .build();
    Client::from_conf(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_sdk_rust_sends_long_polls_and_deletes_through_any_node() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3).await?;
    let [a, b, c] = [1, 2, 3].map(|n| client(&cluster.node(n).api_address()));

    let url = a
        .create_queue()
        .queue_name("sdk")
        .attributes(QueueAttributeName::VisibilityTimeout, "30")
        .send()
        .await?
        .queue_url
        .expect("a queue URL");

    let poll = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let out = c
                .receive_message()
                .queue_url(url)
                .wait_time_seconds(10)
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .send()
                .await;
            (out, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = b
        .send_message()
        .queue_url(&url)
        .message_body("from rust")
        .message_attributes(
            "n",
            MessageAttributeValue::builder()
                .data_type("Number")
                .string_value("7")
                .build()?,
        )
        .send()
        .await?;
    let (received, waited) = poll.await?;
    let received = received?;
    let messages = received.messages();
    assert_eq!(messages.len(), 1, "{received:?}");
    let m = &messages[0];
    assert_eq!(m.body(), Some("from rust"));
    assert_eq!(m.message_id(), sent.message_id());
    assert_eq!(
        m.md5_of_message_attributes(),
        sent.md5_of_message_attributes()
    );
    assert_eq!(
        m.message_attributes()
            .and_then(|attrs: &HashMap<String, MessageAttributeValue>| attrs.get("n"))
            .and_then(|v| v.string_value()),
        Some("7")
    );
    assert_eq!(
        m.attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .map(String::as_str),
        Some("1")
    );
    assert!(
        waited < Duration::from_secs(8),
        "the long poll woke late: {waited:?}"
    );

    a.delete_message()
        .queue_url(&url)
        .receipt_handle(m.receipt_handle().expect("a receipt"))
        .send()
        .await?;
    let attrs = b
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await?;
    let count = |name| {
        attrs
            .attributes()
            .and_then(|a| a.get(&name))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(count(QueueAttributeName::ApproximateNumberOfMessages), "0");
    assert_eq!(
        count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        "0"
    );

    // The SDK maps the error to its modeled type.
    let missing = c.get_queue_url().queue_name("nope").send().await;
    let err = missing.expect_err("no such queue").into_service_error();
    assert!(err.is_queue_does_not_exist(), "{err:?}");
    Ok(())
}
