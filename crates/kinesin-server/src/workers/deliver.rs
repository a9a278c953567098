//! A delivery stream's leader delivers its records to S3, exactly once per
//! object: it seals the leading buffered records (a sequence range and the
//! object key) through Raft once the buffer is full or old enough, uploads
//! the object, then commits the batch through Raft, which drops its
//! records. A new leader that finds a sealed batch uploads the same
//! records to the same key again; objects are rendered deterministically,
//! so the retry replaces the object with identical bytes.
//!
//! A Kinesis source is read like any consumer of the stream, parents
//! before children: a shard is read once the shards it was split or
//! merged from are delivered to their end. The leader keeps only where
//! each shard's unsealed records are (sequence, arrival, size); a sealed
//! batch names shard ranges, which are read again to render the object.
//!
//! One task per led delivery stream; it ends when this node stops leading
//! the group, and the reconciler starts it again where it leads.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kinesin_firehose::{
    Batch, FirehoseCommand, FirehoseQuery, FirehoseReply, KinesisSource, Naming, Plan, ShardRange,
    Source, StreamInfo,
};
use kinesin_meta::Owner;
use kinesin_raft::RaftHost;
use kinesin_router::{now_ms, ReadRequest, Retry, Router};
use kinesin_shard::ReadStart;
use kinesin_types::{GroupId, SequenceNumber, ShardId};
use object_store::{ObjectStore, PutPayload};
use serde_bytes::ByteBuf;

use super::{JobState, Led};
use crate::reconcile::Context;

/// Longest wait between two looks at the buffer: a buffer's interval ends
/// at most this late.
const POLL: Duration = Duration::from_millis(200);
/// Longest pause after a failed upload.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Most records and bytes one read of a source shard asks for.
const READ_RECORDS: usize = 10_000;
const READ_BYTES: usize = 8 << 20;

/// A Kinesis source shard's records read and not sealed yet.
#[derive(Default)]
struct ShardBuffer {
    /// (sequence number, arrival ms, bytes) in order.
    records: Vec<(u128, u64, u64)>,
    /// The last sequence number read.
    last: Option<u128>,
    /// Sealed by a reshard and read to its end.
    drained: bool,
}

/// What the leader has read of a Kinesis source.
#[derive(Default)]
struct SourceBuffer {
    shards: BTreeMap<ShardId, ShardBuffer>,
}

impl SourceBuffer {
    fn bytes(&self) -> u64 {
        self.shards
            .values()
            .flat_map(|s| &s.records)
            .map(|r| r.2)
            .sum()
    }

    fn oldest(&self) -> Option<u64> {
        self.shards
            .values()
            .filter_map(|s| s.records.first())
            .map(|r| r.1)
            .min()
    }
}

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
        let mut source = SourceBuffer::default();
        while self.host.is_leader(self.group) {
            match self.step(&mut source).await {
                Ok(Some(wait)) => {
                    backoff = Duration::from_millis(100);
                    tokio::time::sleep(wait).await;
                }
                Ok(None) => backoff = Duration::from_millis(100),
                Err(e) => {
                    // Read again from the checkpoints.
                    source = SourceBuffer::default();
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
    async fn step(&self, source: &mut SourceBuffer) -> anyhow::Result<Option<Duration>> {
        let info: StreamInfo = self.query(&FirehoseQuery::Describe)?;
        let now = now_ms();
        self.export(&info, source, now);
        if let Some(batch) = &info.sealed {
            let records = match &info.source {
                Source::DirectPut => self.query(&FirehoseQuery::Records {
                    from: batch.from,
                    to: batch.to,
                })?,
                Source::Kinesis(k) => self.read_ranges(k, &batch.ranges).await?,
            };
            self.deliver(batch, records).await?;
            let window = commit_delay();
            if !window.is_zero() {
                tokio::time::sleep(window).await;
            }
            self.propose(&FirehoseCommand::Commit { to: batch.to })
                .await?;
            *source = SourceBuffer::default();
            return Ok(None);
        }
        if let Source::Kinesis(k) = &info.source {
            return self.step_kinesis(&info, k, source, now).await;
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
        let batch = Batch {
            from: plan.from,
            to: plan.to,
            records: plan.records,
            bytes: plan.bytes,
            first_arrival_ms: plan.first_arrival_ms,
            ..unnamed(&info)
        };
        self.seal(&info, batch).await
    }

    /// Names a batch's objects as the destination says now and seals it.
    /// A refused seal (another was made meanwhile) shows at the next step.
    async fn seal(&self, info: &StreamInfo, mut batch: Batch) -> anyhow::Result<Option<Duration>> {
        let naming = Naming {
            stream: &info.name,
            version: info.version,
            first_arrival_ms: batch.first_arrival_ms,
            from: batch.from,
            extension: kinesin_firehose::extension(
                batch.compression,
                info.destination.converting().is_some(),
            ),
        };
        (batch.key, batch.partitioning, batch.conversion) =
            kinesin_firehose::batch_naming(&info.destination, naming)
                .map_err(|e| anyhow::anyhow!("cannot name the object: {e}"))?;
        self.propose(&FirehoseCommand::Seal(batch)).await?;
        Ok(None)
    }

    /// A step of a Kinesis source: read what is new, mark shards done that
    /// have nothing left, and seal a batch when the buffer is full or old.
    async fn step_kinesis(
        &self,
        info: &StreamInfo,
        k: &KinesisSource,
        source: &mut SourceBuffer,
        now: u64,
    ) -> anyhow::Result<Option<Duration>> {
        let d = &info.destination;
        let max_bytes = u64::from(d.size_mib) << 20;
        let stream = self
            .router
            .describe_stream(&k.stream_key)
            .await
            .with_context(|| format!("cannot read the source stream {}", k.stream_arn))?;
        let done = |shard: Option<ShardId>| {
            shard.is_none_or(|s| {
                info.checkpoints.get(&s).is_some_and(|c| c.done) || stream.shard(s).is_none()
            })
        };
        let mut finished = Vec::new();
        for shard in &stream.shards {
            let id = shard.shard_id;
            if info.checkpoints.get(&id).is_some_and(|c| c.done)
                || !done(shard.parent)
                || !done(shard.adjacent_parent)
            {
                continue;
            }
            let buffer = source.shards.entry(id).or_default();
            if buffer.drained {
                if buffer.records.is_empty() {
                    finished.push(id);
                }
                continue;
            }
            if source_bytes_full(buffer, max_bytes) {
                continue;
            }
            let start = match buffer
                .last
                .or(info.checkpoints.get(&id).and_then(|c| c.delivered))
            {
                Some(seq) => ReadStart::After(SequenceNumber(seq)),
                None => ReadStart::AtTimestamp(k.start_ms),
            };
            let read = self.read_shard(k, id, start).await?;
            for (seq, r) in &read.records {
                buffer
                    .records
                    .push((seq.0, r.arrival_ms, r.data.len() as u64));
                buffer.last = Some(seq.0);
            }
            if read.sealed_and_drained {
                buffer.drained = true;
                if buffer.records.is_empty() {
                    finished.push(id);
                }
            }
        }
        if !finished.is_empty() {
            self.propose(&FirehoseCommand::Finish(finished)).await?;
            *source = SourceBuffer::default();
            return Ok(None);
        }
        let Some(oldest) = source.oldest() else {
            return Ok(Some(POLL));
        };
        let due = oldest + u64::from(d.interval_s) * 1000;
        if source.bytes() < max_bytes && now < due {
            return Ok(Some(POLL.min(Duration::from_millis(due - now))));
        }
        // The leading records of each shard, in shard order, up to a full
        // buffer.
        let (mut ranges, mut finished) = (Vec::new(), Vec::new());
        let (mut records, mut bytes, mut first_arrival) = (0u64, 0u64, u64::MAX);
        for (id, buffer) in &source.shards {
            let mut taken = 0;
            for &(_, arrival, size) in &buffer.records {
                if records > 0 && bytes + size > max_bytes {
                    break;
                }
                taken += 1;
                records += 1;
                bytes += size;
                first_arrival = first_arrival.min(arrival);
            }
            if taken > 0 {
                ranges.push(ShardRange {
                    shard: *id,
                    from: buffer.records[0].0,
                    to: buffer.records[taken - 1].0,
                });
                if buffer.drained && taken == buffer.records.len() {
                    finished.push(*id);
                }
            }
        }
        let (from, to) = (ranges[0].from, ranges[ranges.len() - 1].to);
        let batch = Batch {
            from,
            to,
            records,
            bytes,
            first_arrival_ms: first_arrival,
            ranges,
            finished,
            ..unnamed(info)
        };
        self.seal(info, batch).await
    }

    /// One read of a source shard at its leader, without waiting.
    async fn read_shard(
        &self,
        k: &KinesisSource,
        shard: ShardId,
        start: ReadStart,
    ) -> anyhow::Result<kinesin_shard::ReadBatch> {
        let request = ReadRequest {
            start,
            limit: READ_RECORDS,
            max_bytes: READ_BYTES,
            wait: Duration::ZERO,
        };
        Ok(self
            .router
            .get_records(&k.stream_key, shard, request)
            .await?)
    }

    /// The data of a sealed batch's shard ranges, read from the source
    /// stream again, in the batch's order.
    async fn read_ranges(
        &self,
        k: &KinesisSource,
        ranges: &[ShardRange],
    ) -> anyhow::Result<Vec<ByteBuf>> {
        let mut out = Vec::new();
        for range in ranges {
            let mut start = ReadStart::At(SequenceNumber(range.from));
            'shard: loop {
                let read = self.read_shard(k, range.shard, start).await?;
                let Some((last, _)) = read.records.last() else {
                    break;
                };
                let last = last.0;
                for (seq, r) in read.records {
                    if seq.0 > range.to {
                        break 'shard;
                    }
                    out.push(ByteBuf::from(r.data));
                }
                if last >= range.to {
                    break;
                }
                start = ReadStart::After(SequenceNumber(last));
            }
        }
        Ok(out)
    }

    /// Uploads a sealed batch's objects, made of `records`.
    async fn deliver(&self, batch: &Batch, records: Vec<ByteBuf>) -> anyhow::Result<()> {
        anyhow::ensure!(
            records.len() as u64 == batch.records,
            "the sealed batch has {} records, storage {}",
            batch.records,
            records.len()
        );
        let sealed = batch.clone();
        let objects = tokio::task::spawn_blocking(move || {
            let records: Vec<Vec<u8>> = records.into_iter().map(ByteBuf::into_vec).collect();
            kinesin_firehose::objects(&sealed, records)
        })
        .await?
        .map_err(anyhow::Error::msg)?;
        let store = self.store(&batch.bucket)?;
        let label = self.label.clone();
        for (key, body) in objects {
            let size = body.len();
            let started = Instant::now();
            let result = store
                .put(
                    &object_store::path::Path::from(key.as_str()),
                    PutPayload::from(body),
                )
                .await;
            metrics::histogram!("kinesin_firehose_s3_request_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            result.with_context(|| format!("cannot write s3://{}/{key}", batch.bucket))?;
            metrics::counter!("kinesin_firehose_objects_written_total", "delivery_stream" => label.clone())
                .increment(1);
            metrics::counter!("kinesin_firehose_bytes_written_total", "delivery_stream" => label.clone())
                .increment(size as u64);
        }
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

    /// The buffer as gauges (a Kinesis source's: what the leader read and
    /// has not sealed). A stream whose leader moved keeps its last values
    /// on the former leader until that node restarts.
    fn export(&self, info: &StreamInfo, source: &SourceBuffer, now: u64) {
        let label = self.label.clone();
        let (bytes, oldest) = match info.source {
            Source::DirectPut => (info.buffered_bytes, info.oldest_arrival_ms),
            Source::Kinesis(_) => (source.bytes(), source.oldest()),
        };
        metrics::gauge!("kinesin_firehose_buffered_bytes", "delivery_stream" => label.clone())
            .set(bytes as f64);
        let age = oldest.map_or(0, |t| now.saturating_sub(t));
        metrics::gauge!("kinesin_firehose_oldest_record_age_seconds", "delivery_stream" => label)
            .set(age as f64 / 1000.0);
    }
}

/// The chaos window between writing a batch's objects and committing it:
/// `KINESIN_CHAOS_COMMIT_DELAY_MS`, so that a test can kill the leader
/// there. Zero (no wait) unless set.
fn commit_delay() -> Duration {
    static DELAY: OnceLock<Duration> = OnceLock::new();
    *DELAY.get_or_init(|| {
        let ms = std::env::var("KINESIN_CHAOS_COMMIT_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if ms > 0 {
            tracing::warn!(
                "KINESIN_CHAOS_COMMIT_DELAY_MS is set: deliveries wait {ms} ms between writing a batch and committing it"
            );
        }
        Duration::from_millis(ms)
    })
}

/// A batch of the destination's bucket and format, not named yet and
/// covering nothing.
fn unnamed(info: &StreamInfo) -> Batch {
    let d = &info.destination;
    Batch {
        from: 0,
        to: 0,
        records: 0,
        bytes: 0,
        bucket: d.bucket().to_string(),
        key: String::new(),
        compression: d.compression,
        append_delimiter: d.append_delimiter,
        first_arrival_ms: 0,
        ranges: Vec::new(),
        finished: Vec::new(),
        partitioning: None,
        conversion: None,
    }
}

/// Whether a shard's buffer already holds a full batch (no need to read
/// further ahead).
fn source_bytes_full(buffer: &ShardBuffer, max_bytes: u64) -> bool {
    buffer.records.iter().map(|r| r.2).sum::<u64>() >= max_bytes
}
