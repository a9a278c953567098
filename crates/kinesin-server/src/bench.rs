//! `kinesin bench produce`: load through the native gRPC API or through the
//! AWS JSON API (`--protocol aws-json`, which drives any Kinesis-compatible
//! endpoint, so peers are measured with the same client). Closed loop
//! (each worker sends its next batch when the previous one is answered) or,
//! with `--rate`, open loop: batches are due on a fixed schedule and latency
//! is measured from when a batch was due, so a slow server cannot hide its
//! queueing (no coordinated omission).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use kinesin_proto::v1::node_client::NodeClient;
use kinesin_proto::v1::{self as pb};

use crate::output::outln;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// Kinesin's native gRPC API (`--endpoints` are gRPC addresses).
    Grpc,
    /// AWS Kinesis JSON over HTTP/1.1, SigV4-signed (`--endpoints` are
    /// host:port of any Kinesis-compatible API).
    AwsJson,
}

#[derive(Args, Debug)]
pub struct ProduceArgs {
    /// Addresses of the nodes to send to (round robin per worker).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7451", value_parser = crate::profile::parse_address)]
    endpoints: Vec<String>,
    #[arg(long, value_enum, default_value = "grpc")]
    protocol: Protocol,
    /// Credentials for `--protocol aws-json`.
    #[command(flatten)]
    credentials: AwsCredentials,
    #[arg(long, default_value = "bench")]
    stream: String,
    /// Create the stream with this many shards if it does not exist.
    #[arg(long, default_value_t = 4)]
    shards: u32,
    #[arg(long, default_value_t = 1024)]
    record_size: usize,
    /// Records per PutRecords call.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Target records per second (open loop); 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// SigV4 credentials of the bench clients that speak the AWS API.
#[derive(Args, Debug, Clone)]
pub(crate) struct AwsCredentials {
    #[arg(long, default_value = "bench")]
    access_key: String,
    #[arg(long, default_value = "bench")]
    secret_key: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
}

impl AwsCredentials {
    pub(crate) fn client(&self, address: &str) -> AwsClient {
        AwsClient::with_credentials(address, &self.access_key, &self.secret_key, &self.region)
    }
}

/// One worker's connection, in either protocol.
enum Sender {
    Grpc(NodeClient<tonic::transport::Channel>),
    Aws(AwsClient),
}

impl Sender {
    /// Puts one batch; returns (stored, failed).
    async fn put(
        &mut self,
        stream: &str,
        records: Vec<(String, Vec<u8>)>,
    ) -> anyhow::Result<(u64, u64)> {
        match self {
            Sender::Grpc(client) => {
                let req = pb::PutRecordsRequest {
                    stream: stream.to_string(),
                    records: records
                        .into_iter()
                        .map(|(key, data)| pb::Record {
                            partition_key: key,
                            data: data.into(),
                            explicit_hash_key: String::new(),
                        })
                        .collect(),
                };
                let r = client.put_records(req).await?.into_inner();
                let failed = u64::from(r.failed_count);
                Ok((r.results.len() as u64 - failed, failed))
            }
            Sender::Aws(client) => {
                let n = records.len() as u64;
                let body = serde_json::json!({
                    "StreamName": stream,
                    "Records": records.into_iter().map(|(key, data)| serde_json::json!({
                        "PartitionKey": key,
                        "Data": base64::engine::general_purpose::STANDARD.encode(data),
                    })).collect::<Vec<_>>(),
                });
                let out = client.call("PutRecords", &body).await?;
                let failed = out["FailedRecordCount"].as_u64().unwrap_or(0);
                Ok((n - failed, failed))
            }
        }
    }
}

/// A minimal AWS JSON client (Kinesis unless [`AwsClient::sqs`]): one
/// HTTP/1.1 keep-alive connection, SigV4-signed requests, reconnect on
/// failure.
pub(crate) struct AwsClient {
    address: String,
    credential: (String, String),
    region: String,
    api: JsonApi,
    connection: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

/// How one JSON service is called.
struct JsonApi {
    target_prefix: &'static str,
    content_type: &'static str,
    signing_name: &'static str,
}

const KINESIS_API: JsonApi = JsonApi {
    target_prefix: "Kinesis_20131202",
    content_type: "application/x-amz-json-1.1",
    signing_name: "kinesis",
};

const SQS_API: JsonApi = JsonApi {
    target_prefix: "AmazonSQS",
    content_type: "application/x-amz-json-1.0",
    signing_name: "sqs",
};

const FIREHOSE_API: JsonApi = JsonApi {
    target_prefix: "Firehose_20150804",
    content_type: "application/x-amz-json-1.1",
    signing_name: "firehose",
};

impl AwsClient {
    pub(crate) fn with_credentials(
        address: &str,
        access_key: &str,
        secret_key: &str,
        region: &str,
    ) -> Self {
        AwsClient {
            address: address.to_string(),
            credential: (access_key.to_string(), secret_key.to_string()),
            region: region.to_string(),
            api: KINESIS_API,
            connection: None,
        }
    }

    /// The same client for SQS.
    pub(crate) fn sqs(self) -> Self {
        AwsClient {
            api: SQS_API,
            ..self
        }
    }

    /// The same client for Firehose.
    pub(crate) fn firehose(self) -> Self {
        AwsClient {
            api: FIREHOSE_API,
            ..self
        }
    }

    pub(crate) async fn call(
        &mut self,
        op: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let body = serde_json::to_vec(body)?;
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("host", self.address.parse()?);
        headers.insert("content-type", self.api.content_type.parse()?);
        headers.insert(
            "x-amz-target",
            format!("{}.{op}", self.api.target_prefix).parse()?,
        );
        let uri: axum::http::Uri = "/".parse()?;
        let signature = kinesin_gateway::sign(
            (&self.credential.0, &self.credential.1),
            &self.region,
            self.api.signing_name,
            &kinesin_gateway::SignedRequest {
                method: &axum::http::Method::POST,
                uri: &uri,
                headers: &headers,
                body: &body,
            },
            std::time::SystemTime::now(),
        );
        let mut request = axum::http::Request::post(uri).body(Full::new(Bytes::from(body)))?;
        *request.headers_mut() = headers;
        for (name, value) in signature {
            request.headers_mut().insert(name, value.parse()?);
        }
        if self.connection.as_ref().is_none_or(|c| c.is_closed()) {
            let tcp = tokio::net::TcpStream::connect(&self.address).await?;
            tcp.set_nodelay(true)?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
            tokio::spawn(connection);
            self.connection = Some(sender);
        }
        let connection = self.connection.as_mut().expect("connected above");
        let result = async {
            connection.ready().await?;
            let response = connection.send_request(request).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            if !status.is_success() {
                anyhow::bail!("{op}: HTTP {status}: {value}");
            }
            Ok(value)
        }
        .await;
        if result.is_err() {
            self.connection = None;
        }
        result
    }
}

/// Creates the stream if needed and waits until it is ACTIVE.
async fn ensure_stream(args: &ProduceArgs) -> anyhow::Result<()> {
    match args.protocol {
        Protocol::Grpc => {
            let channel = crate::cli::dialer()?
                .endpoint(&args.endpoints[0])
                .map_err(anyhow::Error::msg)?
                .connect_lazy();
            let created = NodeClient::new(channel)
                .create_stream(pb::CreateStreamRequest {
                    stream: args.stream.clone(),
                    shard_count: args.shards,
                    replication_factor: 0,
                    max_record_bytes: 0,
                    ..Default::default()
                })
                .await;
            if let Err(s) = created {
                if s.code() != tonic::Code::AlreadyExists {
                    anyhow::bail!("cannot create stream: {}", s.message());
                }
            }
        }
        Protocol::AwsJson => {
            let mut client = args.credentials.client(&args.endpoints[0]);
            if let Err(e) = client
                .call(
                    "CreateStream",
                    &serde_json::json!({"StreamName": args.stream, "ShardCount": args.shards}),
                )
                .await
            {
                if !e.to_string().contains("ResourceInUseException") {
                    return Err(e);
                }
            }
            // Any node answers for a stream created through another (it
            // catches up with the metadata group before saying "not found").
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let d = client
                    .call(
                        "DescribeStreamSummary",
                        &serde_json::json!({"StreamName": args.stream}),
                    )
                    .await?;
                if d["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE" {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "stream did not become ACTIVE");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(())
}

/// Puts small batches until one succeeds whole, so that the measurement
/// does not include the election of a new stream's shard leaders. The
/// warm-up records (keys `warmup-*`) stay in the stream.
async fn warm_up(sender: &mut Sender, stream: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let records = (0..64)
            .map(|i| (format!("warmup-{i}"), b"warm-up".to_vec()))
            .collect();
        match sender.put(stream, records).await {
            Ok((_, 0)) => return Ok(()),
            Ok(_) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok((_, failed)) => anyhow::bail!("warm-up: {failed} records failed for a minute"),
            Err(e) => return Err(e.context("warm-up")),
        }
    }
}

pub async fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    ensure_stream(&args).await?;
    let dialer = crate::cli::dialer()?;
    let channels = args
        .endpoints
        .iter()
        .map(|e| {
            Ok(dialer
                .endpoint(e)
                .map_err(anyhow::Error::msg)?
                .tcp_nodelay(true)
                .connect_lazy())
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let records = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_secs);
    // Per-worker interval between batches in open-loop mode.
    let interval = (args.rate > 0).then(|| {
        Duration::from_secs_f64(args.batch as f64 * args.concurrency as f64 / args.rate as f64)
    });
    let payload = vec![b'x'; args.record_size];
    let sender_for = |w: usize| match args.protocol {
        Protocol::Grpc => Sender::Grpc(
            NodeClient::new(channels[w % channels.len()].clone())
                .max_decoding_message_size(kinesin_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(kinesin_proto::MAX_MESSAGE_BYTES),
        ),
        Protocol::AwsJson => Sender::Aws(
            args.credentials
                .client(&args.endpoints[w % args.endpoints.len()]),
        ),
    };
    warm_up(&mut sender_for(0), &args.stream).await?;
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let mut sender = sender_for(w);
        let (histogram, records, errors) = (histogram.clone(), records.clone(), errors.clone());
        let (stream, payload, batch) = (args.stream.clone(), payload.clone(), args.batch);
        workers.push(tokio::spawn(async move {
            let mut seq = 0u64;
            let mut due =
                Instant::now() + interval.map_or(Duration::ZERO, |i| i.mul_f64(w as f64 / 32.0));
            while Instant::now() < deadline {
                if interval.is_some() {
                    tokio::time::sleep_until(due.into()).await;
                } else {
                    due = Instant::now();
                }
                let batch_records = (0..batch)
                    .map(|_| {
                        seq += 1;
                        (format!("w{w}-{seq}"), payload.clone())
                    })
                    .collect();
                match sender.put(&stream, batch_records).await {
                    Ok((stored, failed)) => {
                        records.fetch_add(stored, Ordering::Relaxed);
                        errors.fetch_add(failed, Ordering::Relaxed);
                        let micros = due.elapsed().as_micros().max(1) as u64;
                        histogram
                            .lock()
                            .expect("histogram lock")
                            .saturating_record(micros);
                    }
                    Err(_) => {
                        errors.fetch_add(batch as u64, Ordering::Relaxed);
                    }
                }
                if let Some(i) = interval {
                    due += i;
                }
            }
        }));
    }
    let progress = {
        let records = records.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = records.load(Ordering::Relaxed);
                eprint!("\r{:>8} records/s   ", now - last);
                last = now;
            }
        })
    };
    for w in workers {
        w.await?;
    }
    progress.abort();
    eprintln!();
    let elapsed = started.elapsed().as_secs_f64();
    let h = histogram.lock().expect("histogram lock");
    let n = records.load(Ordering::Relaxed);
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let result = serde_json::json!({
        "records": n,
        "errors": errors.load(Ordering::Relaxed),
        "seconds": elapsed,
        "records_per_sec": n as f64 / elapsed,
        "mib_per_sec": n as f64 * args.record_size as f64 / elapsed / 1048576.0,
        "batch_latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0},
        "record_size": args.record_size, "batch": args.batch, "concurrency": args.concurrency, "target_rate": args.rate,
        "protocol": format!("{:?}", args.protocol),
    });
    if args.json {
        outln!("{result}");
    } else {
        outln!(
            "{n} records in {elapsed:.1}s: {:.0} records/s, {:.1} MiB/s, {} errors; batch latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            result["records_per_sec"].as_f64().unwrap_or(0.0),
            result["mib_per_sec"].as_f64().unwrap_or(0.0),
            result["errors"],
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1000.0
        );
    }
    Ok(())
}
