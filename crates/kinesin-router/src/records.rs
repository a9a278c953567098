//! Records: appends routed to each shard's leader (with the map-epoch
//! check), reads at the leader, and their form on the internal wire.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kinesin_meta::{MetaState, Owner};
use kinesin_proto::v1::{self as pb};
use kinesin_shard::{
    NewRecord, ReadBatch, ReadStart, ShardCommand, ShardError, ShardRejection, ShardReply,
    ShardStateMachine, StoredRecord,
};
use kinesin_types::{
    hash_key_for_partition_key, GroupId, HashKey, NodeId, SequenceNumber, ShardId, ShardInfo,
    ShardState, StreamInfo,
};

use crate::error::RouterError;
use crate::router::{Router, Target};
use kinesin_raft::clock::now_ms;

/// A record as a client submits it.
#[derive(Debug, Clone)]
pub struct RecordIn {
    pub partition_key: String,
    pub data: Vec<u8>,
    pub explicit_hash_key: Option<String>,
}

/// The fate of one record of a put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    Stored {
        shard: ShardId,
        sequence: SequenceNumber,
    },
    /// Not acknowledged; it may or may not have been stored.
    Failed(RouterError),
}

/// Where and how to read.
#[derive(Debug, Clone, Copy)]
pub struct ReadRequest {
    pub start: ReadStart,
    pub limit: usize,
    pub max_bytes: usize,
    /// With nothing to return, how long the leader may wait for records
    /// to be applied before answering empty (a long poll; zero: at once).
    pub wait: Duration,
}

/// The longest a read may wait at the leader for new records.
pub const MAX_READ_WAIT: Duration = Duration::from_secs(2);

/// How long a shard leader waits for its map to reach a sender's epoch, or
/// to show a new shard's parents sealed, before refusing (retryably). Well
/// under the shortest attempt (`ATTEMPT_MIN`): a refusal must reach the
/// sender before its attempt times out, or an append nobody proposed would
/// be reported as of unknown outcome.
pub(crate) const MAP_CATCH_UP: Duration = Duration::from_millis(250);

/// What the local map says about an append to a group routed at a map epoch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AppendRoute {
    Open,
    /// Closed by a reshard (or gone with its stream).
    Closed,
    /// The local map is older than the sender's, or does not know the group.
    MapBehind,
    /// Open, but a parent it took over from is not sealed yet: appends
    /// wait, so that every record the parent took for a key comes before
    /// every record the child takes.
    ParentsOpen,
}

pub(crate) fn append_route(state: &MetaState, group: GroupId, epoch: u64) -> AppendRoute {
    let found = state.placed().find_map(|p| match p.owner {
        Owner::Shard { stream, shard } if p.group == group => Some((stream, shard)),
        _ => None,
    });
    match found {
        // Known to the map once and no longer in it: its stream was deleted.
        None if group.0 < state.next_group => AppendRoute::Closed,
        None => AppendRoute::MapBehind,
        Some((stream, _)) if stream.epoch < epoch => AppendRoute::MapBehind,
        Some((_, shard)) if shard.state != ShardState::Open => AppendRoute::Closed,
        Some((stream, shard)) if !parents_sealed(stream, shard) => AppendRoute::ParentsOpen,
        Some(_) => AppendRoute::Open,
    }
}

/// Whether every shard `shard` was split or merged from is sealed (its last
/// record is known, and it takes no more).
fn parents_sealed(stream: &StreamInfo, shard: &ShardInfo) -> bool {
    [shard.parent, shard.adjacent_parent]
        .into_iter()
        .flatten()
        .all(|parent| {
            stream
                .shards
                .iter()
                .find(|s| s.shard_id == parent)
                .is_none_or(|s| s.state == ShardState::Sealed)
        })
}

/// The internal RPC for `request` at the leader of `group`.
pub(crate) fn shard_read_request(group: GroupId, request: ReadRequest) -> pb::ShardReadRequest {
    let (from, sequence_number, timestamp_ms) = encode_start(request.start);
    pb::ShardReadRequest {
        group: group.0,
        from: from as i32,
        sequence_number,
        timestamp_ms,
        limit: request.limit as u32,
        max_bytes: request.max_bytes as u64,
        wait_ms: request.wait.min(MAX_READ_WAIT).as_millis() as u32,
    }
}

pub(crate) fn encode_start(start: ReadStart) -> (pb::IteratorType, String, u64) {
    match start {
        ReadStart::TrimHorizon => (pb::IteratorType::TrimHorizon, String::new(), 0),
        ReadStart::Latest => (pb::IteratorType::Latest, String::new(), 0),
        ReadStart::At(s) => (pb::IteratorType::AtSequenceNumber, s.to_string(), 0),
        ReadStart::After(s) => (pb::IteratorType::AfterSequenceNumber, s.to_string(), 0),
        ReadStart::AtTimestamp(t) => (pb::IteratorType::AtTimestamp, String::new(), t),
    }
}

pub(crate) fn decode_start(from: i32, seq: &str, ts: u64) -> Result<ReadStart, RouterError> {
    let parse = || {
        seq.parse::<SequenceNumber>()
            .map_err(|e| RouterError::InvalidArgument(e.0))
    };
    Ok(
        match pb::IteratorType::try_from(from)
            .map_err(|_| RouterError::InvalidArgument("unknown iterator type".into()))?
        {
            pb::IteratorType::TrimHorizon => ReadStart::TrimHorizon,
            pb::IteratorType::Latest => ReadStart::Latest,
            pb::IteratorType::AtSequenceNumber => ReadStart::At(parse()?),
            pb::IteratorType::AfterSequenceNumber => ReadStart::After(parse()?),
            pb::IteratorType::AtTimestamp => ReadStart::AtTimestamp(ts),
        },
    )
}

pub(crate) fn encode_read(batch: ReadBatch) -> pb::ShardReadResponse {
    pb::ShardReadResponse {
        records: batch
            .records
            .into_iter()
            .map(|(s, r)| stored_to_pb(s, r))
            .collect(),
        millis_behind_latest: batch.millis_behind_latest,
        sealed_and_drained: batch.sealed_and_drained,
        next_sequence_number: batch.next.to_string(),
    }
}

pub(crate) fn stored_to_pb(seq: SequenceNumber, r: StoredRecord) -> pb::StoredRecord {
    pb::StoredRecord {
        sequence_number: seq.to_string(),
        partition_key: r.partition_key,
        data: r.data.into(),
        arrival_ms: r.arrival_ms,
    }
}

pub(crate) fn decode_read(resp: pb::ShardReadResponse) -> Result<ReadBatch, RouterError> {
    let bad = |e: kinesin_types::InvalidValue| RouterError::Internal(e.0);
    let records = resp
        .records
        .into_iter()
        .map(|r| {
            Ok((
                r.sequence_number.parse::<SequenceNumber>().map_err(bad)?,
                StoredRecord {
                    partition_key: r.partition_key,
                    data: r.data.to_vec(),
                    arrival_ms: r.arrival_ms,
                },
            ))
        })
        .collect::<Result<Vec<_>, RouterError>>()?;
    Ok(ReadBatch {
        records,
        next: resp.next_sequence_number.parse().map_err(bad)?,
        millis_behind_latest: resp.millis_behind_latest,
        sealed_and_drained: resp.sealed_and_drained,
    })
}

impl Router {
    /// Puts records, each routed by its hash key; results mirror the order
    /// of `records`. A malformed record fails the whole call. Records that
    /// meet a shard closed by a reshard are routed again by the new map.
    pub async fn put_records(
        &self,
        stream: &str,
        records: Vec<RecordIn>,
    ) -> Result<Vec<AppendOutcome>, RouterError> {
        let mut info = self.describe_stream(stream).await?;
        let mut pending: Vec<(usize, HashKey, NewRecord)> = Vec::with_capacity(records.len());
        for (i, r) in records.into_iter().enumerate() {
            let chars = r.partition_key.chars().count();
            if chars == 0 || chars > 256 {
                return Err(RouterError::InvalidArgument(format!(
                    "record {i}: partition key must be 1 to 256 characters"
                )));
            }
            let key = match &r.explicit_hash_key {
                Some(h) => h
                    .parse::<HashKey>()
                    .map_err(|e| RouterError::InvalidArgument(format!("record {i}: {e}")))?,
                None => hash_key_for_partition_key(&r.partition_key),
            };
            let size = r.data.len() + r.partition_key.len();
            if size > info.max_record_bytes as usize {
                return Err(RouterError::InvalidArgument(format!(
                    "record {i}: {size} bytes of data and partition key exceed the stream's limit of {} bytes",
                    info.max_record_bytes
                )));
            }
            pending.push((
                i,
                key,
                NewRecord {
                    partition_key: r.partition_key,
                    data: r.data,
                },
            ));
        }
        let mut outcomes = vec![
            AppendOutcome::Failed(RouterError::Internal("not attempted".into()));
            pending.len()
        ];
        let deadline = Instant::now() + self.config.retry_budget;
        loop {
            let closed = self
                .put_routed(stream, &info, std::mem::take(&mut pending), &mut outcomes)
                .await?;
            if closed.is_empty() {
                return Ok(outcomes);
            }
            // A reshard closed a shard under these records: wait for the map
            // that routes them to its children.
            let closed_shards: BTreeSet<ShardId> = closed
                .iter()
                .filter_map(|(_, key, _)| info.shard_for(*key).map(|s| s.shard_id))
                .collect();
            pending = closed;
            loop {
                info = self.describe_stream(stream).await?;
                let moved = pending.iter().all(|(_, key, _)| {
                    info.shard_for(*key)
                        .is_some_and(|s| !closed_shards.contains(&s.shard_id))
                });
                if moved {
                    break;
                }
                if Instant::now() >= deadline {
                    for (pos, _, _) in pending {
                        outcomes[pos] = AppendOutcome::Failed(RouterError::Unavailable(
                            "the shard was closed by a reshard and no new shard took over in time"
                                .into(),
                        ));
                    }
                    return Ok(outcomes);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Appends `pending` to the shards `info` routes them to, filling in
    /// `outcomes`; returns the records whose shard turned out to be closed.
    pub(crate) async fn put_routed(
        &self,
        stream: &str,
        info: &StreamInfo,
        pending: Vec<(usize, HashKey, NewRecord)>,
        outcomes: &mut [AppendOutcome],
    ) -> Result<Vec<(usize, HashKey, NewRecord)>, RouterError> {
        let mut by_shard: BTreeMap<ShardId, Vec<(usize, HashKey, NewRecord)>> = BTreeMap::new();
        for (i, key, record) in pending {
            let shard = info.shard_for(key).ok_or_else(|| {
                RouterError::Internal(format!("no open shard holds hash key {key}"))
            })?;
            by_shard
                .entry(shard.shard_id)
                .or_default()
                .push((i, key, record));
        }
        let appends = by_shard.into_iter().map(|(shard_id, entries)| {
            let shard = info
                .shard(shard_id)
                .expect("shard from the same map")
                .clone();
            let epoch = info.epoch;
            async move {
                let records: Vec<NewRecord> = entries.iter().map(|(_, _, r)| r.clone()).collect();
                let result = self
                    .append(shard.group, &shard.replicas, epoch, records)
                    .await;
                (shard_id, entries, result)
            }
        });
        let mut closed = Vec::new();
        for (shard, entries, result) in futures::future::join_all(appends).await {
            match result {
                Ok(first) => {
                    let bytes: usize = entries
                        .iter()
                        .map(|(_, _, r)| r.data.len() + r.partition_key.len())
                        .sum();
                    metrics::counter!("kinesin_stream_incoming_records_total", "stream" => stream.to_string())
                        .increment(entries.len() as u64);
                    metrics::counter!("kinesin_stream_incoming_bytes_total", "stream" => stream.to_string())
                        .increment(bytes as u64);
                    if self.config.per_shard_metrics {
                        let labels = [("stream", stream.to_string()), ("shard", shard.to_string())];
                        metrics::counter!("kinesin_shard_incoming_records_total", &labels)
                            .increment(entries.len() as u64);
                        metrics::counter!("kinesin_shard_incoming_bytes_total", &labels)
                            .increment(bytes as u64);
                    }
                    for (k, (pos, _, _)) in entries.into_iter().enumerate() {
                        outcomes[pos] = AppendOutcome::Stored {
                            shard,
                            sequence: SequenceNumber(first.0 + k as u128),
                        };
                    }
                }
                Err(RouterError::ShardClosed(_)) => closed.extend(entries),
                Err(RouterError::Throttled(message)) => {
                    metrics::counter!("kinesin_stream_throttled_total", "stream" => stream.to_string(), "direction" => "write")
                        .increment(entries.len() as u64);
                    for (pos, _, _) in entries {
                        outcomes[pos] =
                            AppendOutcome::Failed(RouterError::Throttled(message.clone()));
                    }
                }
                Err(e) => {
                    for (pos, _, _) in entries {
                        outcomes[pos] = AppendOutcome::Failed(e.clone());
                    }
                }
            }
        }
        Ok(closed)
    }

    pub(crate) async fn append(
        &self,
        group: GroupId,
        replicas: &[NodeId],
        epoch: u64,
        records: Vec<NewRecord>,
    ) -> Result<SequenceNumber, RouterError> {
        self.at_leader(group, replicas, false, |target| {
            let records = records.clone();
            async move {
                match target {
                    Target::Local => self.append_local(group, epoch, records).await,
                    Target::Remote(mut c, ..) => {
                        let req = pb::ShardAppendRequest {
                            group: group.0,
                            epoch,
                            records: records
                                .into_iter()
                                .map(|r| pb::Record {
                                    partition_key: r.partition_key,
                                    data: r.data.into(),
                                    explicit_hash_key: String::new(),
                                })
                                .collect(),
                        };
                        let resp = c.shard_append(req).await?.into_inner();
                        resp.first_sequence_number
                            .parse::<SequenceNumber>()
                            .map_err(|e| RouterError::Internal(e.to_string()))
                    }
                }
            }
        })
        .await
    }

    /// At a shard's leader: refuses an append that the map (at the
    /// sender's epoch, or this node's if newer) no longer routes here. A
    /// reshard closes the parent in the map before its group seals itself;
    /// without this check a sender with the old map could still append to
    /// the parent after the children took writes for the same keys. When
    /// the sender's map is newer than this node's, this node catches up
    /// first (briefly), so that neither side decides on a stale map.
    pub(crate) async fn check_append_route(
        &self,
        group: GroupId,
        epoch: u64,
    ) -> Result<(), RouterError> {
        let mut changes = self.meta.subscribe();
        let caught_up = |state: &MetaState| {
            !matches!(
                append_route(state, group, epoch),
                AppendRoute::MapBehind | AppendRoute::ParentsOpen
            )
        };
        if !caught_up(&self.meta.state()) {
            let _ = tokio::time::timeout(MAP_CATCH_UP, changes.wait_for(|s| caught_up(s))).await;
        }
        match append_route(&self.meta.state(), group, epoch) {
            AppendRoute::Open => Ok(()),
            AppendRoute::Closed => Err(RouterError::ShardClosed(format!(
                "{group} was closed by a reshard; route by the new shard map"
            ))),
            AppendRoute::MapBehind => Err(RouterError::Unavailable(format!(
                "this node's map is behind the sender's for {group}"
            ))),
            AppendRoute::ParentsOpen => Err(RouterError::Unavailable(format!(
                "{group} takes appends once the shards it was resharded from are sealed"
            ))),
        }
    }

    /// Appends on this node, which must lead the group.
    pub async fn append_local(
        &self,
        group: GroupId,
        epoch: u64,
        records: Vec<NewRecord>,
    ) -> Result<SequenceNumber, RouterError> {
        if !self.host.has_group(group) {
            return Err(RouterError::NotLeader(None));
        }
        if !self.host.is_leader(group) {
            let leader = self.host.leader(group);
            return Err(RouterError::NotLeader(leader));
        }
        self.check_append_route(group, epoch).await?;
        let bytes = records
            .iter()
            .map(|r| r.data.len() + r.partition_key.len())
            .sum();
        if !self.throttle.write(group, records.len(), bytes) {
            return Err(RouterError::Throttled(format!(
                "Rate exceeded for the shard of {group}"
            )));
        }
        let started = Instant::now();
        let command = ShardCommand::Append {
            arrival_ms: now_ms(),
            records,
        };
        let proposal = self.host.propose(group, command.encode());
        let reply = match self.config.unsafe_ack_after {
            None => proposal.await?,
            Some(after) => match tokio::time::timeout(after, proposal).await {
                Ok(reply) => reply?,
                Err(_) => {
                    let sm = self.shards.get(group).ok_or(RouterError::NotLeader(None))?;
                    return Ok(sm.resolve(ReadStart::Latest)?);
                }
            },
        };
        metrics::histogram!("kinesin_raft_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match ShardReply::decode(&reply)? {
            ShardReply::Appended { first, .. } => Ok(SequenceNumber(first)),
            ShardReply::Rejected(ShardRejection::Sealed) => Err(RouterError::ShardClosed(format!(
                "{group} is sealed by a reshard"
            ))),
            ShardReply::Rejected(r) => Err(RouterError::Unavailable(format!(
                "shard refused the append: {r:?}"
            ))),
            other => Err(RouterError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Reads from a shard at its leader.
    pub async fn get_records(
        &self,
        stream: &str,
        shard_id: ShardId,
        request: ReadRequest,
    ) -> Result<ReadBatch, RouterError> {
        let info = self.describe_stream(stream).await?;
        let shard = info
            .shard(shard_id)
            .ok_or_else(|| {
                RouterError::ResourceNotFound(format!(
                    "Shard {shard_id} in stream {stream} not found"
                ))
            })?
            .clone();
        let group = shard.group;
        let result = self
            .at_leader(group, &shard.replicas, true, |target| async move {
                match target {
                    Target::Local => self.read_local(group, request).await,
                    Target::Remote(mut c, ..) => {
                        let resp = c
                            .shard_read(shard_read_request(group, request))
                            .await?
                            .into_inner();
                        decode_read(resp)
                    }
                }
            })
            .await;
        if let Err(RouterError::Throttled(_)) = &result {
            metrics::counter!("kinesin_stream_throttled_total", "stream" => stream.to_string(), "direction" => "read")
                .increment(1);
        }
        result
    }

    /// Reads on this node, which must lead the group (so that every
    /// acknowledged record is visible). With nothing to return and a
    /// `wait`, it sleeps until the state machine publishes new entries
    /// (woken by them, not polling) or the wait ends; one read call.
    pub async fn read_local(
        &self,
        group: GroupId,
        request: ReadRequest,
    ) -> Result<ReadBatch, RouterError> {
        let sm = self.shards.get(group).ok_or(RouterError::NotLeader(None))?;
        self.check_leader(group)?;
        if !self.throttle.read(group) {
            return Err(RouterError::Throttled(format!(
                "Rate exceeded for reads of the shard of {group}"
            )));
        }
        let mut published = sm.watch_published();
        let start = self
            .off_runtime(&sm, move |sm| sm.resolve(request.start))
            .await?;
        let until = tokio::time::Instant::now() + request.wait.min(MAX_READ_WAIT);
        let (limit, max_bytes) = (request.limit.max(1), request.max_bytes.max(1));
        loop {
            let batch = self
                .off_runtime(&sm, move |sm| sm.read(start, limit, max_bytes, now_ms()))
                .await?;
            if batch.records.is_empty() && !batch.sealed_and_drained {
                let woken = tokio::time::timeout_at(until, published.changed()).await;
                if matches!(woken, Ok(Ok(()))) {
                    // Still the leader, or what it applies next may be incomplete.
                    self.check_leader(group)?;
                    continue;
                }
            }
            self.throttle
                .read_bytes(group, batch.records.iter().map(|(_, r)| r.data.len()).sum());
            return Ok(batch);
        }
    }

    /// Runs `read` against the local replica on a blocking thread: a read
    /// scans RocksDB for up to 10 MiB (GetRecords' limit), which must not hold one of
    /// the runtime's few worker threads (and every task queued behind it). At
    /// most [`kinesin_raft::blocking_reads::MAX_BLOCKING_READS`] run at once.
    async fn off_runtime<T: Send + 'static>(
        &self,
        sm: &Arc<ShardStateMachine>,
        read: impl FnOnce(&ShardStateMachine) -> Result<T, ShardError> + Send + 'static,
    ) -> Result<T, RouterError> {
        let sm = sm.clone();
        self.host
            .blocking_reads()
            .run(move || read(&sm))
            .await
            .map_err(|e| RouterError::Internal(e.to_string()))?
            .map_err(RouterError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kinesin_types::{HashKeyRange, StreamName, StreamStatus};

    fn map_with_shard(epoch: u64, state: ShardState) -> MetaState {
        let shard = ShardInfo {
            shard_id: ShardId(0),
            group: GroupId(7),
            range: HashKeyRange::new(0, u128::MAX).unwrap(),
            state,
            parent: None,
            adjacent_parent: None,
            generation: 0,
            replicas: vec![NodeId(1)],
            ending_sequence: None,
        };
        let stream = StreamInfo {
            name: StreamName::new("s").unwrap(),
            status: StreamStatus::Active,
            created_at_ms: 0,
            retention_hours: 24,
            max_record_bytes: 1 << 20,
            replication_factor: 1,
            epoch,
            shards: vec![shard],
            settings: Default::default(),
        };
        MetaState {
            streams: BTreeMap::from([("s".to_string(), stream)]),
            ..Default::default()
        }
    }

    #[test]
    fn appends_are_refused_once_the_map_closed_the_shard() {
        let open = map_with_shard(3, ShardState::Open);
        assert_eq!(append_route(&open, GroupId(7), 3), AppendRoute::Open);
        // A sender with an older map is fine while the shard is open.
        assert_eq!(append_route(&open, GroupId(7), 1), AppendRoute::Open);
        // A sender whose map is newer: this node must catch up first.
        assert_eq!(append_route(&open, GroupId(7), 4), AppendRoute::MapBehind);
        assert_eq!(append_route(&open, GroupId(8), 3), AppendRoute::MapBehind);
        let mut deleted = map_with_shard(3, ShardState::Open);
        deleted.next_group = 8;
        deleted.streams.clear();
        assert_eq!(append_route(&deleted, GroupId(7), 3), AppendRoute::Closed);
        for closed in [ShardState::Sealing, ShardState::Sealed] {
            let map = map_with_shard(4, closed);
            assert_eq!(append_route(&map, GroupId(7), 3), AppendRoute::Closed);
            assert_eq!(append_route(&map, GroupId(7), 4), AppendRoute::Closed);
        }
    }

    #[test]
    fn a_child_takes_appends_once_its_parents_are_sealed() {
        let mut map = map_with_shard(4, ShardState::Sealing);
        let stream = map.streams.get_mut("s").unwrap();
        let (low, high) = stream.shards[0].range.split_at(HashKey(1 << 127)).unwrap();
        for (i, range) in [low, high].into_iter().enumerate() {
            stream.shards.push(ShardInfo {
                shard_id: ShardId(i as u32 + 1),
                group: GroupId(8 + i as u64),
                range,
                state: ShardState::Open,
                parent: Some(ShardId(0)),
                adjacent_parent: None,
                generation: 1,
                replicas: vec![NodeId(1)],
                ending_sequence: None,
            });
        }
        assert_eq!(append_route(&map, GroupId(8), 4), AppendRoute::ParentsOpen);
        assert_eq!(append_route(&map, GroupId(7), 4), AppendRoute::Closed);
        map.streams.get_mut("s").unwrap().shards[0].state = ShardState::Sealed;
        assert_eq!(append_route(&map, GroupId(8), 4), AppendRoute::Open);
        assert_eq!(append_route(&map, GroupId(9), 4), AppendRoute::Open);
    }
}
