//! Helpers shared by the process tests: a `kinesin server` child process,
//! a native-API client, and waiting for a condition.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kinesin_proto::v1::node_client::NodeClient;
use kinesin_proto::v1::{self as pb};
use tonic::transport::Channel;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Proc {
    pub id: u64,
    pub grpc: String,
    args: Vec<String>,
    child: Option<Child>,
}

impl Proc {
    pub fn new(id: u64, dir: &Path, seed: Option<&str>) -> Proc {
        let grpc = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "server".to_string(),
            "--node-id".into(),
            id.to_string(),
            "--data-dir".into(),
            dir.join(format!("node-{id}")).display().to_string(),
            "--listen-grpc".into(),
            grpc.clone(),
            "--listen-api".into(),
            format!("127.0.0.1:{}", free_port()),
            "--listen-admin".into(),
            format!("127.0.0.1:{}", free_port()),
            "--replication-factor".into(),
            "3".into(),
            "--insecure-internal".into(),
        ];
        if let Some(seed) = seed {
            args.push("--seeds".into());
            args.push(seed.to_string());
        }
        Proc {
            id,
            grpc,
            args,
            child: None,
        }
    }

    pub fn spawn(&mut self, dir: &Path) {
        let log = std::fs::File::create(dir.join(format!("node-{}.log", self.id))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kinesin"))
            .args(&self.args)
            .env("KINESIN_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Panics with the end of the node's log if its process has ended (a
    /// port taken by another test between `free_port` and the bind, say),
    /// so that a wait for the cluster says why it never came.
    pub fn assert_running(&mut self, dir: &Path) {
        let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        else {
            return;
        };
        let log =
            std::fs::read_to_string(dir.join(format!("node-{}.log", self.id))).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        panic!("node {} exited ({status}); its log ends:\n{tail}", self.id);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub async fn client(addr: &str) -> Option<NodeClient<Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1));
    let channel = endpoint.connect().await.ok()?;
    Some(NodeClient::new(channel))
}

pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every record of one shard: sequence number → data.
pub async fn read_all(
    c: &mut NodeClient<Channel>,
    stream: &str,
    shard: &str,
) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut from = pb::IteratorType::TrimHorizon;
    let mut seq = String::new();
    loop {
        let resp = c
            .get_records(pb::GetRecordsRequest {
                stream: stream.into(),
                shard_id: shard.into(),
                from: from as i32,
                sequence_number: seq.clone(),
                timestamp_ms: 0,
                limit: 10_000,
            })
            .await
            .unwrap()
            .into_inner();
        if resp.records.is_empty() {
            return out;
        }
        for r in resp.records {
            out.insert(r.sequence_number, r.data.to_vec());
        }
        from = pb::IteratorType::AtSequenceNumber;
        seq = resp.next_sequence_number;
    }
}
