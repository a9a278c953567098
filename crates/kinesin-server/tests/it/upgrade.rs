//! A data directory written by the release before data versions opens with
//! this binary, is upgraded in place, and serves its streams and records
//! before and after a restart.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kinesin_proto::v1::{self as pb};

use crate::common::{client, eventually, read_all, Proc};

fn unpack_fixture(into: &Path) {
    // The package directory the test runner names, not the one the binary
    // was built in (clones share the target directory).
    let package = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || env!("CARGO_MANIFEST_DIR").into(),
        std::path::PathBuf::from,
    );
    let fixture = package.join("tests/fixtures/data-v1.tar.gz");
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(into)
        .status()
        .expect("tar runs");
    assert!(status.success(), "cannot unpack {}", fixture.display());
}

/// Every record of a stream, by data, read through the native API.
async fn stream_records(grpc: &str, stream: &str) -> Option<Vec<String>> {
    let mut c = client(grpc).await?;
    let described = c
        .describe_stream(pb::DescribeStreamRequest {
            stream: stream.into(),
        })
        .await
        .ok()?
        .into_inner();
    if described.status != "ACTIVE" {
        return None;
    }
    let mut data = Vec::new();
    for shard in &described.shards {
        let records: BTreeMap<String, Vec<u8>> = read_all(&mut c, stream, &shard.shard_id).await;
        data.extend(
            records
                .into_values()
                .map(|d| String::from_utf8(d).expect("utf-8 fixture data")),
        );
    }
    data.sort();
    Some(data)
}

/// Whether the node logged upgrading the metadata value and its identity
/// (each is checked: a value left in version 1 would be upgraded again at
/// every start).
fn upgrades_logged(dir: &Path) -> (bool, bool) {
    let log = std::fs::read_to_string(dir.join("node-1.log")).unwrap();
    (
        log.contains("upgraded the stored metadata map"),
        log.contains("upgraded the data directory"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_data_directory_opens_and_serves_its_streams() {
    let dir = tempfile::tempdir().unwrap();
    unpack_fixture(dir.path());
    let mut node = Proc::new(1, dir.path(), None);
    node.spawn(dir.path());

    let mut expected: Vec<String> = (0..20).map(|i| format!("record-{i}")).collect();
    expected.sort();
    let orders = eventually("the legacy stream", Duration::from_secs(60), || {
        stream_records(&node.grpc, "legacy-orders")
    })
    .await;
    assert_eq!(orders, expected);
    let events = eventually("the on-demand stream", Duration::from_secs(30), || {
        stream_records(&node.grpc, "legacy-events")
    })
    .await;
    assert_eq!(events, vec!["hello".to_string()]);
    let mut c = client(&node.grpc).await.unwrap();
    let described = c
        .describe_stream(pb::DescribeStreamRequest {
            stream: "legacy-orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.retention_hours, 48);
    assert_eq!(described.shards.len(), 2);
    assert_eq!(upgrades_logged(dir.path()), (true, true));

    // Writes land next to the old records, and everything survives a
    // restart from the upgraded (now version-2) directory.
    let put = c
        .put_records(pb::PutRecordsRequest {
            stream: "legacy-orders".into(),
            records: vec![pb::Record {
                partition_key: "after-upgrade".into(),
                data: b"record-new".to_vec().into(),
                explicit_hash_key: String::new(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.results[0].error_code, "");
    node.kill9();
    std::fs::remove_file(dir.path().join("node-1.log")).unwrap();
    node.spawn(dir.path());
    expected.push("record-new".into());
    expected.sort();
    let orders = eventually(
        "the stream after a restart",
        Duration::from_secs(60),
        || stream_records(&node.grpc, "legacy-orders"),
    )
    .await;
    assert_eq!(orders, expected);
    assert_eq!(
        upgrades_logged(dir.path()),
        (false, false),
        "an upgraded directory is not upgraded again"
    );
}
