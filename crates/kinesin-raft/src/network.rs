//! Raft transport. Each node keeps one long-lived gRPC `Pipe` stream to every
//! peer it sends to; requests of all groups are queued on it and batched into
//! frames (as many as are waiting, up to a size bound), and answers come back
//! on the same stream matched by id. Snapshots use their own call so that a
//! large one never delays heartbeats.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kinesin_proto::tls::Dialer;
use kinesin_proto::v1::raft_transport_client::RaftTransportClient;
use kinesin_proto::v1::{RaftFrame, RaftMessage, RaftMessageKind, SnapshotChunk as WireChunk};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::state_machine::{GroupSnapshot, SnapshotChunk};
use crate::types::{decode, encode, Snapshot, SnapshotMeta, TypeConfig, Vote};

pub(crate) use kinesin_proto::MAX_MESSAGE_BYTES;
/// Frames are closed once they carry this much.
pub(crate) const FRAME_BYTES: usize = 4 << 20;
/// Shortest time an RPC is given, whatever openraft suggests.
const MIN_RPC_TIMEOUT: Duration = Duration::from_secs(3);
/// Appends larger than this are sent as several consecutive requests.
const SPLIT_APPEND_BYTES: usize = 32 << 20;
/// Most bytes of messages queued for one peer and not yet put in a frame
/// (the frames handed to the connection add at most 16 more, of 4 MiB or
/// one split append each). A connection that stops moving (a peer that
/// neither reads nor fails) would otherwise let every group's heartbeats
/// and appends pile up until it dies; past the bound a call fails at once,
/// as if the peer were unreachable.
const PEER_QUEUE_BYTES: usize = 64 << 20;
/// What a queued message counts for besides its payload.
const MESSAGE_COST: usize = 64;
/// Longest wait for a peer to accept the Pipe stream (it answers at once
/// when healthy); a peer that holds the connection without answering
/// would otherwise keep every queued message waiting.
const PIPE_OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// What the transport does with a message from one node to another. Tests
/// use it to partition, drop and delay traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterAction {
    Pass,
    Drop,
    Delay(Duration),
}

pub trait TransportFilter: Send + Sync + 'static {
    fn check(&self, from: u64, to: u64) -> FilterAction;
}

/// The default filter: everything passes.
pub struct NoFilter;

impl TransportFilter for NoFilter {
    fn check(&self, _from: u64, _to: u64) -> FilterAction {
        FilterAction::Pass
    }
}

#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotHeader {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
}

/// Why a message to a peer got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CallError {
    /// It never left this node.
    #[error("{0}")]
    NotSent(String),
    /// It may have reached the peer and taken effect there.
    #[error("{0}")]
    Lost(String),
}

/// Why a forwarded proposal ([`PeerPool::forward`]) got no outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// The peer answered with an error: it predates forwarding on the pipe.
    #[error("{0}")]
    NotUnderstood(String),
    /// It never left this node.
    #[error("{0}")]
    NotSent(String),
    /// It may have reached the peer and taken effect there.
    #[error("{0}")]
    Lost(String),
}

type Reply = oneshot::Sender<Result<RaftMessage, CallError>>;
type Pending = Arc<Mutex<HashMap<u64, Reply>>>;

struct Outgoing {
    message: RaftMessage,
    /// `None` for a message that gets no answer (a forward's cancel).
    reply: Option<Reply>,
    /// Its share of [`PEER_QUEUE_BYTES`], given back once it is put in a
    /// frame or dropped.
    _queued: OwnedSemaphorePermit,
}

/// The connection to one peer.
pub(crate) struct Peer {
    addr: String,
    queue: mpsc::UnboundedSender<Outgoing>,
    /// Bytes the queue may still take (see [`PEER_QUEUE_BYTES`]).
    room: Arc<Semaphore>,
    channel: Channel,
    next_id: AtomicU64,
    /// Messages sent on the open stream whose answers are awaited, by id
    /// (the pipe task's; here for tests to look at).
    #[cfg(test)]
    pending: Pending,
}

impl Peer {
    /// Fails (rather than panics) on an address that is not a valid
    /// authority: one could only have come from before addresses were
    /// checked at Join, and the node is then simply unreachable.
    fn start(addr: String, dialer: &Dialer) -> Result<Arc<Peer>, String> {
        let endpoint = dialer
            .endpoint(&addr)?
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(4))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        let (queue, rx) = mpsc::unbounded_channel();
        let pending = Pending::default();
        tokio::spawn(run_pipe(channel.clone(), rx, Arc::clone(&pending)));
        Ok(Arc::new(Peer {
            addr,
            queue,
            room: Arc::new(Semaphore::new(PEER_QUEUE_BYTES)),
            channel,
            next_id: AtomicU64::new(1),
            #[cfg(test)]
            pending,
        }))
    }

    async fn call(
        &self,
        group: u64,
        kind: RaftMessageKind,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        let answer = self
            .exchange(group, kind, payload.into(), timeout)
            .await
            .map_err(|e| e.to_string())?;
        if answer.kind == RaftMessageKind::Error as i32 {
            return Err(String::from_utf8_lossy(&answer.payload).into_owned());
        }
        Ok(answer.payload.to_vec())
    }

    /// Sends one message and waits for the peer's answer to it.
    async fn exchange(
        &self,
        group: u64,
        kind: RaftMessageKind,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<RaftMessage, CallError> {
        let cost = (payload.len() + MESSAGE_COST).min(PEER_QUEUE_BYTES);
        let queued = self
            .room
            .clone()
            .try_acquire_many_owned(cost as u32)
            .map_err(|_| {
                CallError::NotSent(format!(
                    "{} MiB of messages already wait for {}: it is not keeping up",
                    PEER_QUEUE_BYTES >> 20,
                    self.addr
                ))
            })?;
        let (reply, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let message = RaftMessage {
            group,
            id,
            kind: kind as i32,
            payload,
        };
        self.queue
            .send(Outgoing {
                message,
                reply: Some(reply),
                _queued: queued,
            })
            .map_err(|_| CallError::NotSent("transport closed".to_string()))?;
        // A forward whose caller stops waiting (a timeout here, or the
        // caller's own) is cancelled at the peer.
        let mut cancel = CancelOnDrop {
            peer: self,
            group,
            id,
            armed: kind == RaftMessageKind::Forward,
        };
        let answer = tokio::time::timeout(timeout, rx)
            .await
            .map_err(|_| {
                CallError::Lost(format!("no answer from {} within {timeout:?}", self.addr))
            })?
            .map_err(|_| CallError::Lost(format!("connection to {} lost", self.addr)))??;
        cancel.armed = false;
        Ok(answer)
    }

    /// Tells the peer to drop the forward `id` if it still runs; best
    /// effort (skipped when the queue to the peer is full).
    fn cancel_forward(&self, group: u64, id: u64) {
        let Ok(queued) = self
            .room
            .clone()
            .try_acquire_many_owned(MESSAGE_COST as u32)
        else {
            return;
        };
        let _ = self.queue.send(Outgoing {
            message: RaftMessage {
                group,
                id,
                kind: RaftMessageKind::ForwardCancel as i32,
                payload: Bytes::new(),
            },
            reply: None,
            _queued: queued,
        });
    }
}

/// Cancels a forward at the peer when dropped armed.
struct CancelOnDrop<'a> {
    peer: &'a Peer,
    group: u64,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.peer.cancel_forward(self.group, self.id);
        }
    }
}

/// Keeps one Pipe stream open to the peer, reconnecting with backoff.
async fn run_pipe(
    channel: Channel,
    mut queue: mpsc::UnboundedReceiver<Outgoing>,
    pending: Pending,
) {
    let mut backoff = Duration::from_millis(50);
    // A message taken from the queue while no stream was open.
    let mut carried: Option<Outgoing> = None;
    loop {
        if carried.is_none() {
            match queue.recv().await {
                Some(out) => carried = Some(out),
                None => return,
            }
        }
        let mut client = RaftTransportClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (frames, frames_rx) = mpsc::channel::<RaftFrame>(16);
        let opened = tokio::time::timeout(
            PIPE_OPEN_TIMEOUT,
            client.pipe(ReceiverStream::new(frames_rx)),
        )
        .await
        .unwrap_or_else(|_| Err(tonic::Status::unavailable("the peer did not answer")));
        let mut inbound = match opened {
            Ok(response) => response.into_inner(),
            Err(status) => {
                if let Some(reply) = carried.take().and_then(|out| out.reply) {
                    let _ = reply.send(Err(CallError::NotSent(format!(
                        "connect: {}",
                        status.message()
                    ))));
                }
                fail_all(&pending, "connection failed");
                // Drain what queued up meanwhile: those callers would time out anyway.
                while let Ok(out) = queue.try_recv() {
                    if let Some(reply) = out.reply {
                        let _ = reply.send(Err(CallError::NotSent("connection failed".into())));
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        loop {
            let first = match carried.take() {
                Some(out) => Some(out),
                None => tokio::select! {
                    out = queue.recv() => match out {
                        Some(out) => Some(out),
                        None => return,
                    },
                    frame = inbound.message() => {
                        match frame {
                            Ok(Some(frame)) => {
                                dispatch(&pending, frame);
                                None
                            }
                            _ => break,
                        }
                    }
                },
            };
            let Some(first) = first else { continue };
            let mut frame = RaftFrame::default();
            let mut size = 0;
            let mut next = Some(first);
            while let Some(out) = next.take() {
                match out.reply {
                    // A caller that gave up (timed out) gets nothing from a
                    // late send, and the peer gets stale work.
                    Some(reply) if reply.is_closed() => {}
                    Some(reply) => {
                        size += out.message.payload.len();
                        pending.lock().insert(out.message.id, reply);
                        frame.messages.push(out.message);
                    }
                    // A cancel: the peer will not answer the forward it
                    // names, so nothing waits for that answer any more.
                    None => {
                        pending.lock().remove(&out.message.id);
                        frame.messages.push(out.message);
                    }
                }
                if size < FRAME_BYTES {
                    next = queue.try_recv().ok();
                }
            }
            if frame.messages.is_empty() {
                continue;
            }
            if frames.send(frame).await.is_err() {
                break;
            }
        }
        fail_all(&pending, "connection lost");
    }
}

fn dispatch(pending: &Pending, frame: RaftFrame) {
    let mut pending = pending.lock();
    for message in frame.messages {
        if let Some(reply) = pending.remove(&message.id) {
            let _ = reply.send(Ok(message));
        }
    }
}

fn fail_all(pending: &Pending, why: &str) {
    for (_, reply) in pending.lock().drain() {
        let _ = reply.send(Err(CallError::Lost(why.to_string())));
    }
}

/// Connections to every peer of this node, shared by all its groups.
pub(crate) struct PeerPool {
    local: u64,
    peers: Mutex<HashMap<u64, Arc<Peer>>>,
    filter: Arc<dyn TransportFilter>,
    dialer: Dialer,
}

impl PeerPool {
    pub(crate) fn new(local: u64, filter: Arc<dyn TransportFilter>, dialer: Dialer) -> Self {
        PeerPool {
            local,
            peers: Mutex::default(),
            filter,
            dialer,
        }
    }

    pub(crate) fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    /// Sends `payload` (an encoded `GroupProposeRequest`) to node `target`
    /// at `addr` on the pipe to it, for [`crate::ForwardHandler`] there.
    /// Not subject to the transport filter: like the unary call it stands
    /// in for, it is a client's request, not Raft traffic.
    pub(crate) async fn forward(
        &self,
        target: u64,
        addr: &str,
        group: u64,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, ForwardError> {
        let peer = self.peer(target, addr).map_err(ForwardError::NotSent)?;
        let answer = peer
            .exchange(group, RaftMessageKind::Forward, payload, timeout)
            .await
            .map_err(|e| match e {
                CallError::NotSent(m) => ForwardError::NotSent(m),
                CallError::Lost(m) => ForwardError::Lost(m),
            })?;
        if answer.kind == RaftMessageKind::Error as i32 {
            return Err(ForwardError::NotUnderstood(
                String::from_utf8_lossy(&answer.payload).into_owned(),
            ));
        }
        Ok(answer.payload)
    }

    /// How many answers node `target`'s pipe still waits for.
    #[cfg(test)]
    pub(crate) fn awaited_answers(&self, target: u64) -> usize {
        self.peers
            .lock()
            .get(&target)
            .map_or(0, |p| p.pending.lock().len())
    }

    fn peer(&self, target: u64, addr: &str) -> Result<Arc<Peer>, String> {
        let mut peers = self.peers.lock();
        match peers.get(&target) {
            Some(p) if p.addr == addr => Ok(p.clone()),
            _ => {
                let p = Peer::start(addr.to_string(), &self.dialer)?;
                peers.insert(target, p.clone());
                Ok(p)
            }
        }
    }

    /// Applies the transport filter; an error means the message is dropped.
    async fn admit(&self, target: u64) -> Result<(), String> {
        match self.filter.check(self.local, target) {
            FilterAction::Pass => Ok(()),
            FilterAction::Drop => Err(format!("message to node {target} dropped by filter")),
            FilterAction::Delay(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
        }
    }
}

/// openraft's network factory for one group.
pub struct GroupNetwork {
    pub(crate) group: u64,
    pub(crate) pool: Arc<PeerPool>,
}

impl RaftNetworkFactory<TypeConfig> for GroupNetwork {
    type Network = GroupClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> GroupClient {
        GroupClient {
            group: self.group,
            target,
            peer: self.pool.peer(target, &node.addr),
            pool: self.pool.clone(),
        }
    }
}

/// openraft's client for one (group, target node) pair.
pub struct GroupClient {
    group: u64,
    target: u64,
    /// The connection, or why the target's address cannot be dialled.
    peer: Result<Arc<Peer>, String>,
    pool: Arc<PeerPool>,
}

fn unreachable(e: impl ToString) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string(e.to_string()))
}

impl GroupClient {
    async fn rpc<Req: Serialize, Resp: for<'a> Deserialize<'a>>(
        &self,
        kind: RaftMessageKind,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        self.pool.admit(self.target).await.map_err(unreachable)?;
        let payload = encode(req);
        // openraft suggests the heartbeat interval; a large append on a busy
        // disk needs longer, and openraft itself imposes no limit here.
        let timeout = option.soft_ttl().max(MIN_RPC_TIMEOUT)
            + Duration::from_millis(payload.len() as u64 / 32_768);
        let peer = self.peer.as_ref().map_err(unreachable)?;
        let answer = peer
            .call(self.group, kind, payload, timeout)
            .await
            .map_err(unreachable)?;
        decode("raft answer", &answer).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

impl RaftNetworkV2<TypeConfig> for GroupClient {
    type SnapshotData = GroupSnapshot;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let sizes: Vec<usize> = rpc.entries.iter().map(entry_size).collect();
        if sizes.iter().sum::<usize>() <= SPLIT_APPEND_BYTES || rpc.entries.len() < 2 {
            return self.rpc(RaftMessageKind::Append, &rpc, &option).await;
        }
        // Too large for one message: send consecutive pieces, each starting
        // where the previous one ended. Only the first can conflict.
        let AppendEntriesRequest {
            vote,
            prev_log_id,
            entries,
            leader_commit,
        } = rpc;
        let mut prev = prev_log_id;
        let mut piece = Vec::new();
        let mut piece_size = 0;
        let total = entries.len();
        for (i, (entry, size)) in entries.into_iter().zip(sizes).enumerate() {
            piece_size += size;
            piece.push(entry);
            if piece_size >= SPLIT_APPEND_BYTES || i + 1 == total {
                let last = piece.last().map(|e| e.log_id);
                let req = AppendEntriesRequest::<TypeConfig> {
                    vote,
                    prev_log_id: prev,
                    entries: std::mem::take(&mut piece),
                    leader_commit,
                };
                let resp: AppendEntriesResponse<TypeConfig> =
                    self.rpc(RaftMessageKind::Append, &req, &option).await?;
                if !resp.is_success() || i + 1 == total {
                    return Ok(resp);
                }
                prev = last;
                piece_size = 0;
            }
        }
        Ok(AppendEntriesResponse::Success)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(RaftMessageKind::Vote, &rpc, &option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(RaftMessageKind::PreVote, &rpc, &option).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(RaftMessageKind::TransferLeader, &req, &option)
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let stream_err = |e: String| StreamingError::Unreachable(Unreachable::from_string(e));
        self.pool.admit(self.target).await.map_err(stream_err)?;
        let channel = self
            .peer
            .as_ref()
            .map_err(|e| stream_err(e.clone()))?
            .channel
            .clone();
        let group = self.group;
        let Snapshot {
            meta,
            snapshot: data,
        } = snapshot;
        let header = encode(&SnapshotHeader {
            vote,
            meta,
            state: data.state.clone(),
        });
        let (tx, rx) = mpsc::channel::<WireChunk>(4);
        let first = WireChunk {
            group,
            header: header.into(),
            trailer_follows: true,
            ..Default::default()
        };
        tx.send(first)
            .await
            .map_err(|_| stream_err("snapshot stream closed".into()))?;
        // Bytes handed to the stream so far, and whether all were.
        let sent = Arc::new(AtomicU64::new(0));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Reading the records is blocking RocksDB work.
        let reader = {
            let (sent, done) = (sent.clone(), done.clone());
            tokio::task::spawn_blocking(move || {
                let mut rows = 0;
                data.for_each_chunk(|chunk| {
                    rows += chunk.len() as u64;
                    let wire = WireChunk {
                        group,
                        data: encode(&chunk).into(),
                        ..Default::default()
                    };
                    let len = wire.data.len() as u64;
                    tx.blocking_send(wire)
                        .map_err(|_| io::Error::other("snapshot receiver gone"))?;
                    sent.fetch_add(len, Ordering::Relaxed);
                    Ok(())
                })?;
                // Only a sender that read every row says so: a stream that
                // ends without this is refused, not installed.
                let trailer = WireChunk {
                    group,
                    data: encode(&SnapshotChunk::new()).into(),
                    trailer: true,
                    rows,
                    ..Default::default()
                };
                tx.blocking_send(trailer)
                    .map_err(|_| io::Error::other("snapshot receiver gone"))?;
                done.store(true, Ordering::Relaxed);
                Ok::<(), io::Error>(())
            })
        };
        let mut client = RaftTransportClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let send = client.install_snapshot(ReceiverStream::new(rx));
        // A shard of many GiB takes minutes to send and install, so there is
        // no bound on the whole transfer: it fails when no chunk was taken
        // for `idle`, or when the receiver's install (which moves every
        // byte once more) outlasts `idle` plus a second per
        // INSTALL_FLOOR_BYTES_PER_SEC sent.
        let idle = option.hard_ttl().max(Duration::from_secs(60));
        tokio::pin!(send);
        tokio::pin!(cancel);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let (mut last_sent, mut since) = (0, tokio::time::Instant::now());
        let reply = loop {
            tokio::select! {
                closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                r = &mut send => break r,
                _ = tick.tick() => {
                    let now_sent = sent.load(Ordering::Relaxed);
                    let allowed = if done.load(Ordering::Relaxed) {
                        idle + Duration::from_secs(now_sent / INSTALL_FLOOR_BYTES_PER_SEC)
                    } else {
                        idle
                    };
                    if now_sent != last_sent {
                        (last_sent, since) = (now_sent, tokio::time::Instant::now());
                    } else if since.elapsed() > allowed {
                        return Err(stream_err(format!(
                            "snapshot transfer stalled after {now_sent} bytes"
                        )));
                    }
                }
            }
        };
        let reply =
            reply.map_err(|s| stream_err(format!("snapshot transfer failed: {}", s.message())))?;
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(stream_err(format!("reading snapshot: {e}"))),
            Err(e) => return Err(stream_err(format!("snapshot reader panicked: {e}"))),
        }
        let vote: Vote = decode("snapshot reply", &reply.into_inner().vote)
            .map_err(|e| stream_err(e.to_string()))?;
        Ok(SnapshotResponse::new(vote))
    }
}

/// The slowest rate at which a receiver is expected to install snapshot
/// bytes it already holds (moving them out of staging).
const INSTALL_FLOOR_BYTES_PER_SEC: u64 = 8 << 20;

fn entry_size(entry: &crate::types::Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(c) => c.0.len() + 64,
        _ => 256,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that accepts connections and never answers: calls beyond the
    /// queue's bound fail at once instead of piling up, and the room comes
    /// back once the connection is given up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_to_a_peer_that_does_not_answer_are_bounded() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let peer = Peer::start(addr, &Dialer::plaintext()).unwrap();
        let payload = 1 << 20;
        // Polled from this task, in order: each call takes its room on its
        // first poll, before any of it can come back (the stream is given
        // up after PIPE_OPEN_TIMEOUT, the calls give up after 2 s).
        let calls = (0..100).map(|_| async {
            let started = tokio::time::Instant::now();
            let result = peer
                .call(
                    1,
                    RaftMessageKind::Append,
                    vec![0; payload],
                    Duration::from_secs(2),
                )
                .await;
            (result, started.elapsed())
        });
        let mut refused = 0;
        for (result, took) in futures::future::join_all(calls).await {
            let err = result.expect_err("the peer never answers");
            if err.contains("not keeping up") {
                refused += 1;
                assert!(took < Duration::from_secs(1), "refused after {took:?}");
            }
        }
        let admitted = PEER_QUEUE_BYTES / (payload + MESSAGE_COST);
        assert_eq!(refused, 100 - admitted);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while peer.room.available_permits() < PEER_QUEUE_BYTES {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} bytes still queued",
                PEER_QUEUE_BYTES - peer.room.available_permits()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        holder.abort();
    }
}
