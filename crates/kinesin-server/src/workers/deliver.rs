//! A delivery stream's leader delivers its records to S3, exactly once per
//! object: it seals the leading buffered records (a sequence range and the
//! object key) through Raft once the buffer is full or old enough, uploads
//! the object, then commits the batch through Raft, which drops its
//! records. A new leader that finds a sealed batch uploads the same
//! records to the same key again; objects are rendered deterministically,
//! so the retry replaces the object with identical bytes.
//!
//! One task per led delivery stream; it ends when this node stops leading
//! the group, and the reconciler starts it again where it leads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kinesin_firehose::{Batch, FirehoseCommand, FirehoseQuery, FirehoseReply, Plan, StreamInfo};
use kinesin_meta::Owner;
use kinesin_raft::RaftHost;
use kinesin_router::{now_ms, Retry, Router};
use kinesin_types::GroupId;
use object_store::{ObjectStore, PutPayload};
use serde_bytes::ByteBuf;

use super::{JobState, Led};
use crate::reconcile::Context;

/// Longest wait between two looks at the buffer: a buffer's interval ends
/// at most this late.
const POLL: Duration = Duration::from_millis(200);
/// Longest pause after a failed upload.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The object stores deliveries write to, one per bucket.
#[derive(Default)]
pub(crate) struct Stores {
    by_bucket: HashMap<String, Arc<dyn ObjectStore>>,
}

pub(super) fn run(ctx: &Context, jobs: &Arc<Mutex<JobState>>, led: &Led<'_>) {
    let Some(Owner::Group { spec, name }) = led.owner() else {
        return;
    };
    if spec.kind != kinesin_firehose::FIREHOSE_KIND {
        return;
    }
    let group = led.group;
    if !jobs.lock().expect("jobs lock").delivering.insert(group) {
        return;
    }
    let delivery = Delivery {
        host: ctx.host.clone(),
        router: ctx.router.clone(),
        endpoint: ctx.config.s3_endpoint.clone(),
        jobs: Arc::clone(jobs),
        group,
        label: name.strip_prefix("firehose/").unwrap_or(name).to_string(),
    };
    tokio::spawn(async move {
        delivery.run().await;
        delivery
            .jobs
            .lock()
            .expect("jobs lock")
            .delivering
            .remove(&group);
    });
}

struct Delivery {
    host: RaftHost,
    router: Arc<Router>,
    endpoint: Option<String>,
    jobs: Arc<Mutex<JobState>>,
    group: GroupId,
    /// `account/name`, the metrics' label.
    label: String,
}

impl Delivery {
    async fn run(&self) {
        let mut backoff = Duration::from_millis(100);
        while self.host.is_leader(self.group) {
            match self.step().await {
                Ok(Some(wait)) => {
                    backoff = Duration::from_millis(100);
                    tokio::time::sleep(wait).await;
                }
                Ok(None) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(group = %self.group, error = %format!("{e:#}"), "delivery to S3 failed; retrying");
                    metrics::counter!("kinesin_firehose_delivery_failures_total", "delivery_stream" => self.label.clone())
                        .increment(1);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn query<T: for<'de> serde::Deserialize<'de>>(
        &self,
        query: &FirehoseQuery,
    ) -> anyhow::Result<T> {
        let bytes = self
            .host
            .local_query(self.group, &kinesin_firehose::encode(query))?;
        kinesin_firehose::decode(&bytes).map_err(anyhow::Error::msg)
    }

    async fn propose(&self, command: &FirehoseCommand) -> anyhow::Result<FirehoseReply> {
        let reply = self
            .router
            .propose_stamped(self.group, kinesin_firehose::encode(command), Retry::Always)
            .await?;
        kinesin_firehose::decode(&reply).map_err(anyhow::Error::msg)
    }

    /// One step: deliver the sealed batch, or seal one, or say how long to
    /// wait for either.
    async fn step(&self) -> anyhow::Result<Option<Duration>> {
        let info: StreamInfo = self.query(&FirehoseQuery::Describe)?;
        let now = now_ms();
        self.export(&info, now);
        if let Some(batch) = info.sealed {
            self.deliver(&batch).await?;
            self.propose(&FirehoseCommand::Commit { to: batch.to })
                .await?;
            return Ok(None);
        }
        let d = &info.destination;
        let max_bytes = u64::from(d.size_mib) << 20;
        let Some(oldest) = info.oldest_arrival_ms else {
            return Ok(Some(POLL));
        };
        let due = oldest + u64::from(d.interval_s) * 1000;
        if info.buffered_bytes < max_bytes && now < due {
            return Ok(Some(POLL.min(Duration::from_millis(due - now))));
        }
        let Some(plan) = self.query::<Option<Plan>>(&FirehoseQuery::Plan(max_bytes))? else {
            return Ok(Some(POLL));
        };
        let key = kinesin_firehose::object_key(
            &info.name,
            info.version,
            d.prefix.as_deref(),
            plan.first_arrival_ms,
            plan.from,
            d.compression,
        )
        .map_err(|e| anyhow::anyhow!("cannot name the object: {e}"))?;
        let batch = Batch {
            from: plan.from,
            to: plan.to,
            records: plan.records,
            bytes: plan.bytes,
            bucket: d.bucket().to_string(),
            key,
            compression: d.compression,
            append_delimiter: d.append_delimiter,
            first_arrival_ms: plan.first_arrival_ms,
        };
        // A refused seal (another was made meanwhile) shows at the next
        // step.
        self.propose(&FirehoseCommand::Seal(batch)).await?;
        Ok(None)
    }

    /// Uploads a sealed batch's object.
    async fn deliver(&self, batch: &Batch) -> anyhow::Result<()> {
        let records: Vec<ByteBuf> = self.query(&FirehoseQuery::Records {
            from: batch.from,
            to: batch.to,
        })?;
        anyhow::ensure!(
            records.len() as u64 == batch.records,
            "the sealed batch has {} records, storage {}",
            batch.records,
            records.len()
        );
        let (compression, append) = (batch.compression, batch.append_delimiter);
        let body = tokio::task::spawn_blocking(move || {
            let records: Vec<Vec<u8>> = records.into_iter().map(ByteBuf::into_vec).collect();
            kinesin_firehose::render(&records, compression, append)
        })
        .await??;
        let size = body.len();
        let store = self.store(&batch.bucket)?;
        let started = Instant::now();
        let result = store
            .put(
                &object_store::path::Path::from(batch.key.as_str()),
                PutPayload::from(body),
            )
            .await;
        metrics::histogram!("kinesin_firehose_s3_request_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        result.with_context(|| format!("cannot write s3://{}/{}", batch.bucket, batch.key))?;
        let label = self.label.clone();
        metrics::counter!("kinesin_firehose_objects_written_total", "delivery_stream" => label.clone())
            .increment(1);
        metrics::counter!("kinesin_firehose_bytes_written_total", "delivery_stream" => label.clone())
            .increment(size as u64);
        metrics::gauge!("kinesin_firehose_data_freshness_seconds", "delivery_stream" => label)
            .set(now_ms().saturating_sub(batch.first_arrival_ms) as f64 / 1000.0);
        Ok(())
    }

    /// The object store of a bucket: a directory under a `file://`
    /// endpoint, else S3 at the endpoint (AWS's when none is set), with
    /// credentials and region from the standard AWS variables.
    fn store(&self, bucket: &str) -> anyhow::Result<Arc<dyn ObjectStore>> {
        let mut jobs = self.jobs.lock().expect("jobs lock");
        if let Some(store) = jobs.stores.by_bucket.get(bucket) {
            return Ok(Arc::clone(store));
        }
        let store: Arc<dyn ObjectStore> = match self.endpoint.as_deref() {
            Some(endpoint) if endpoint.starts_with("file://") => {
                let dir = std::path::Path::new(&endpoint["file://".len()..]).join(bucket);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&dir)?)
            }
            endpoint => {
                let region = std::env::var("AWS_REGION")
                    .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
                    .unwrap_or_else(|_| "us-east-1".to_string());
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(region);
                if let Some(endpoint) = endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                Arc::new(builder.build()?)
            }
        };
        jobs.stores
            .by_bucket
            .insert(bucket.to_string(), Arc::clone(&store));
        Ok(store)
    }

    /// The buffer as gauges. A stream whose leader moved keeps its last
    /// values on the former leader until that node restarts.
    fn export(&self, info: &StreamInfo, now: u64) {
        let label = self.label.clone();
        metrics::gauge!("kinesin_firehose_buffered_bytes", "delivery_stream" => label.clone())
            .set(info.buffered_bytes as f64);
        let age = info.oldest_arrival_ms.map_or(0, |t| now.saturating_sub(t));
        metrics::gauge!("kinesin_firehose_oldest_record_age_seconds", "delivery_stream" => label)
            .set(age as f64 / 1000.0);
    }
}
