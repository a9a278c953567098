//! The native gRPC API of a node (`kinesin.v1.Node`): what the router
//! forwards to leaders, what joining nodes call, and what the CLI uses.

use std::sync::Arc;
use std::time::Duration;

use kinesin_meta::{MetaCommand, NodeInfo, NodeState};
use kinesin_proto::v1::node_server::{Node, NodeServer};
use kinesin_proto::v1::{self as pb};
use kinesin_shard::NewRecord;
use kinesin_types::{
    validate_api_address, validate_node_address, GroupId, NodeId, ShardState, StreamMode,
};
use tonic::{Request, Response, Status};

use crate::error::RouterError;
use crate::groups::ForwardedProposals;
use crate::records::{decode_start, encode_read, stored_to_pb, ReadRequest, RecordIn};
use crate::router::{Router, Target};
use crate::streams::limits_from_proto;
use crate::{AppendOutcome, StreamOptions};

use kinesin_proto::MAX_MESSAGE_BYTES;
use kinesin_storage::data_version::DATA_VERSION;
/// Reads return at most this much unless asked for less (as Kinesis).
const MAX_READ_BYTES: usize = 10 << 20;
/// And at most this many records (GetRecords' Limit).
const MAX_READ_RECORDS: u32 = 10_000;

pub struct NodeService {
    router: Arc<Router>,
}

impl NodeService {
    /// The node's internal gRPC service; from then on the node also
    /// answers proposals forwarded on the Raft pipe.
    pub fn server(router: Arc<Router>) -> NodeServer<NodeService> {
        router
            .host()
            .set_forward_handler(Arc::new(ForwardedProposals(Arc::downgrade(&router))));
        NodeServer::new(NodeService { router })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    async fn join_on_leader(&self, req: &pb::JoinRequest) -> Result<String, RouterError> {
        let host = self.router.host();
        if !host.is_leader(GroupId::META) {
            return Err(RouterError::NotLeader(host.leader(GroupId::META)));
        }
        let state = self.router.meta_state();
        // The seed leads before its bootstrap's writes apply, and the
        // cluster id is the last of them: a node admitted earlier would save
        // an empty id and then refuse to restart. It asks again.
        if state.cluster_id.is_empty() {
            return Err(RouterError::Unavailable(
                "the cluster is still bootstrapping".into(),
            ));
        }
        if !req.cluster_id.is_empty() && req.cluster_id != state.cluster_id {
            return Err(RouterError::InvalidArgument(format!(
                "node belongs to cluster {}, this is cluster {}",
                req.cluster_id, state.cluster_id
            )));
        }
        let node = NodeId(req.node_id);
        if node.0 == 0 {
            return Err(RouterError::InvalidArgument("node id 0 is reserved".into()));
        }
        // An address enters the replicated membership here: one that cannot
        // be dialled would stay there for every future leader.
        validate_node_address(&req.raft_addr)
            .and_then(|()| validate_api_address(&req.api_addr))
            .map_err(|e| RouterError::InvalidArgument(e.0))?;
        if req.zone.len() > 64 {
            return Err(RouterError::InvalidArgument(
                "zone must be at most 64 characters".into(),
            ));
        }
        if let Some(existing) = state.nodes.get(&node) {
            if existing.state == NodeState::Removed {
                return Err(RouterError::InvalidArgument(format!(
                    "node {node} was removed and cannot rejoin under that id"
                )));
            }
            // A joining node has no data. If this id already votes in the
            // metadata group or holds replicas (of a shard, a queue, a
            // delivery stream), the node lost its data directory: admitting
            // it would count an empty log as a voter (it could help elect a
            // leader that lacks committed entries). A retry of a join that
            // registered but never got its answer has neither yet, and is
            // let through.
            let votes = host
                .status(GroupId::META)
                .is_some_and(|s| s.voters.contains(&node));
            if votes || state.holds_replicas(node) {
                return Err(RouterError::InvalidArgument(format!(
                    "node {node} is already a member with data; a node that lost its data directory must be \
                     removed (kinesin cluster remove-node --node {node}) and join under a new id"
                )));
            }
        }
        host.add_learner(GroupId::META, node, req.raft_addr.clone(), false)
            .await?;
        self.router
            .meta_write_local(
                MetaCommand::RegisterNode(NodeInfo {
                    id: node,
                    raft_addr: req.raft_addr.clone(),
                    api_addr: req.api_addr.clone(),
                    zone: req.zone.clone(),
                    state: NodeState::Active,
                })
                .encode(),
            )
            .await?;
        Ok(self.router.meta_state().cluster_id.clone())
    }
}

fn describe(info: &kinesin_types::StreamInfo) -> pb::DescribeStreamResponse {
    pb::DescribeStreamResponse {
        stream: info.name.to_string(),
        status: info.status.as_aws_str().to_string(),
        epoch: info.epoch,
        retention_hours: info.retention_hours,
        created_at_ms: info.created_at_ms,
        shards: info
            .shards
            .iter()
            .map(|s| pb::ShardDescription {
                shard_id: s.shard_id.to_string(),
                starting_hash_key: s.range.start.to_string(),
                ending_hash_key: s.range.end.to_string(),
                parent_shard_id: s.parent.map(|p| p.to_string()).unwrap_or_default(),
                adjacent_parent_shard_id: s
                    .adjacent_parent
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                starting_sequence_number: s.starting_sequence().to_string(),
                ending_sequence_number: s
                    .ending_sequence
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
                open: s.state == ShardState::Open,
                group: s.group.0,
                replicas: s.replicas.iter().map(|r| r.0).collect(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn meta_write(
        &self,
        request: Request<pb::MetaWriteRequest>,
    ) -> Result<Response<pb::MetaWriteResponse>, Status> {
        self.router
            .meta_write_local(request.into_inner().command.to_vec())
            .await?;
        Ok(Response::new(pb::MetaWriteResponse {
            applied_index: self.router.meta_applied_index(),
            ..Default::default()
        }))
    }

    async fn ping(
        &self,
        _request: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        Ok(Response::new(pb::PingResponse {
            node_id: self.router.host().node_id().0,
            data_version: DATA_VERSION,
            peer_data_versions: self
                .router
                .liveness()
                .heard_versions()
                .into_iter()
                .collect(),
        }))
    }

    async fn meta_index(
        &self,
        _request: Request<pb::MetaIndexRequest>,
    ) -> Result<Response<pb::MetaIndexResponse>, Status> {
        Ok(Response::new(pb::MetaIndexResponse {
            applied_index: self.router.meta_index_local()?,
        }))
    }

    async fn cluster_info(
        &self,
        _request: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoResponse>, Status> {
        let host = self.router.host();
        let state = self.router.meta_state();
        let groups = host
            .group_ids()
            .into_iter()
            .filter_map(|g| host.status(g))
            .map(|s| pb::GroupStatus {
                group: s.group.0,
                role: s.role.as_str().to_string(),
                leader: s.leader.map_or(0, |l| l.0),
                term: s.term,
                last_log_index: s.last_log_index,
                applied_index: s.applied_index,
            })
            .collect();
        Ok(Response::new(pb::ClusterInfoResponse {
            cluster_id: state.cluster_id.clone(),
            node_id: host.node_id().0,
            state_json: serde_json::to_string(&*state)
                .map_err(|e| Status::internal(e.to_string()))?,
            groups,
        }))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let req = request.into_inner();
        let candidates: Vec<NodeId> = self
            .router
            .host()
            .status(GroupId::META)
            .map(|s| s.voters.into_iter().collect())
            .unwrap_or_default();
        let cluster_id = self
            .router
            .at_leader(GroupId::META, &candidates, true, |target| {
                let req = req.clone();
                async move {
                    match target {
                        Target::Local => self.join_on_leader(&req).await,
                        Target::Remote(mut c, ..) => Ok(c.join(req).await?.into_inner().cluster_id),
                    }
                }
            })
            .await?;
        Ok(Response::new(pb::JoinResponse { cluster_id }))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let r = request.into_inner();
        let leader = self
            .router
            .transfer_leader(GroupId(r.group), NodeId(r.to))
            .await?;
        Ok(Response::new(pb::TransferLeaderResponse {
            leader: leader.0,
        }))
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        let node = NodeId(request.into_inner().node_id);
        let state = self.router.meta_state();
        match state.nodes.get(&node) {
            None => {
                return Err(
                    RouterError::ResourceNotFound(format!("node {node} is not a member")).into(),
                )
            }
            Some(n) if n.state == NodeState::Removed => {
                return Err(RouterError::InvalidArgument(format!(
                    "node {node} was already removed"
                ))
                .into())
            }
            Some(_) => {}
        }
        if state.active_nodes().filter(|n| n.id != node).count() == 0 {
            return Err(
                RouterError::InvalidArgument("cannot drain the last active node".into()).into(),
            );
        }
        self.router
            .meta_write(MetaCommand::SetNodeState {
                node,
                state: NodeState::Draining,
            })
            .await?;
        Ok(Response::new(pb::DrainNodeResponse {}))
    }

    async fn create_stream(
        &self,
        request: Request<pb::CreateStreamRequest>,
    ) -> Result<Response<pb::CreateStreamResponse>, Status> {
        let r = request.into_inner();
        let options = StreamOptions {
            mode: if r.on_demand {
                StreamMode::OnDemand
            } else {
                StreamMode::Provisioned
            },
            tags: r.tags.into_iter().collect(),
            limits: r.limits.map(limits_from_proto),
        };
        if self.router.host().is_leader(GroupId::META) {
            self.router
                .create_stream_on_leader(
                    &r.stream,
                    r.shard_count,
                    r.replication_factor as usize,
                    r.max_record_bytes,
                    &options,
                )
                .await?;
        } else {
            self.router
                .create_stream_with(
                    &r.stream,
                    r.shard_count,
                    r.replication_factor as usize,
                    r.max_record_bytes,
                    &options,
                )
                .await?;
        }
        Ok(Response::new(pb::CreateStreamResponse {
            applied_index: self.router.meta_applied_index(),
        }))
    }

    async fn delete_stream(
        &self,
        request: Request<pb::DeleteStreamRequest>,
    ) -> Result<Response<pb::DeleteStreamResponse>, Status> {
        self.router
            .delete_stream(&request.into_inner().stream)
            .await?;
        Ok(Response::new(pb::DeleteStreamResponse {}))
    }

    async fn describe_stream(
        &self,
        request: Request<pb::DescribeStreamRequest>,
    ) -> Result<Response<pb::DescribeStreamResponse>, Status> {
        let info = self
            .router
            .describe_stream(&request.into_inner().stream)
            .await?;
        Ok(Response::new(describe(&info)))
    }

    async fn list_streams(
        &self,
        _request: Request<pb::ListStreamsRequest>,
    ) -> Result<Response<pb::ListStreamsResponse>, Status> {
        Ok(Response::new(pb::ListStreamsResponse {
            streams: self.router.list_streams(),
        }))
    }

    async fn put_records(
        &self,
        request: Request<pb::PutRecordsRequest>,
    ) -> Result<Response<pb::PutRecordsResponse>, Status> {
        let r = request.into_inner();
        if r.records.is_empty() || r.records.len() > 500 {
            return Err(
                RouterError::InvalidArgument("a put carries 1 to 500 records".into()).into(),
            );
        }
        let records = r
            .records
            .into_iter()
            .map(|rec| RecordIn {
                partition_key: rec.partition_key,
                data: rec.data.to_vec(),
                explicit_hash_key: (!rec.explicit_hash_key.is_empty())
                    .then_some(rec.explicit_hash_key),
            })
            .collect();
        let outcomes = self.router.put_records(&r.stream, records).await?;
        let mut failed_count = 0;
        let results = outcomes
            .into_iter()
            .map(|o| match o {
                AppendOutcome::Stored { shard, sequence } => pb::RecordResult {
                    shard_id: shard.to_string(),
                    sequence_number: sequence.to_string(),
                    ..Default::default()
                },
                AppendOutcome::Failed(e) => {
                    failed_count += 1;
                    pb::RecordResult {
                        error_code: e.name().to_string(),
                        error_message: e.to_string(),
                        ..Default::default()
                    }
                }
            })
            .collect();
        Ok(Response::new(pb::PutRecordsResponse {
            results,
            failed_count,
        }))
    }

    async fn get_records(
        &self,
        request: Request<pb::GetRecordsRequest>,
    ) -> Result<Response<pb::GetRecordsResponse>, Status> {
        let r = request.into_inner();
        let shard = r
            .shard_id
            .parse()
            .map_err(|e: kinesin_types::InvalidValue| RouterError::InvalidArgument(e.0))?;
        let start = decode_start(r.from, &r.sequence_number, r.timestamp_ms)?;
        let limit = if r.limit == 0 {
            10_000
        } else {
            r.limit.min(MAX_READ_RECORDS) as usize
        };
        let batch = self
            .router
            .get_records(
                &r.stream,
                shard,
                ReadRequest {
                    start,
                    limit,
                    max_bytes: MAX_READ_BYTES,
                    wait: Duration::ZERO,
                },
            )
            .await?;
        Ok(Response::new(pb::GetRecordsResponse {
            next_sequence_number: batch.next.to_string(),
            millis_behind_latest: batch.millis_behind_latest,
            shard_closed_and_drained: batch.sealed_and_drained,
            records: batch
                .records
                .into_iter()
                .map(|(s, rec)| stored_to_pb(s, rec))
                .collect(),
        }))
    }

    async fn shard_append(
        &self,
        request: Request<pb::ShardAppendRequest>,
    ) -> Result<Response<pb::ShardAppendResponse>, Status> {
        let r = request.into_inner();
        let count = r.records.len() as u32;
        let records = r
            .records
            .into_iter()
            .map(|rec| NewRecord {
                partition_key: rec.partition_key,
                data: rec.data.to_vec(),
            })
            .collect();
        let first = self
            .router
            .append_local(GroupId(r.group), r.epoch, records)
            .await?;
        Ok(Response::new(pb::ShardAppendResponse {
            first_sequence_number: first.to_string(),
            count,
        }))
    }

    async fn group_propose(
        &self,
        request: Request<pb::GroupProposeRequest>,
    ) -> Result<Response<pb::GroupProposeResponse>, Status> {
        let response = self.router.propose_for_peer(request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn group_read(
        &self,
        request: Request<pb::GroupReadRequest>,
    ) -> Result<Response<pb::GroupReadResponse>, Status> {
        let r = request.into_inner();
        let reply = self
            .router
            .host()
            .read(GroupId(r.group), &r.query)
            .await
            .map_err(RouterError::from)?;
        Ok(Response::new(pb::GroupReadResponse {
            reply: reply.into(),
        }))
    }

    async fn shard_read(
        &self,
        request: Request<pb::ShardReadRequest>,
    ) -> Result<Response<pb::ShardReadResponse>, Status> {
        let r = request.into_inner();
        let start = decode_start(r.from, &r.sequence_number, r.timestamp_ms)?;
        // Bounded as the public reads are, whatever the wire asks for.
        let max_bytes = if r.max_bytes == 0 {
            MAX_READ_BYTES
        } else {
            (r.max_bytes as usize).min(MAX_READ_BYTES)
        };
        let batch = self
            .router
            .read_local(
                GroupId(r.group),
                ReadRequest {
                    start,
                    limit: r.limit.clamp(1, MAX_READ_RECORDS) as usize,
                    max_bytes,
                    wait: Duration::from_millis(u64::from(r.wait_ms)),
                },
            )
            .await?;
        Ok(Response::new(encode_read(batch)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kinesin_raft::TimingProfile;

    use super::*;
    use crate::router::tests::lone_router;

    /// A seed leads its metadata group before its bootstrap sets the
    /// cluster id: a join until then is asked to come back (a node admitted
    /// with an empty id would refuse to restart), and one after it is told
    /// the id.
    #[tokio::test]
    async fn a_join_waits_for_the_cluster_id() {
        let dir = tempfile::tempdir().unwrap();
        let router = Arc::new(lone_router(dir.path()));
        let host = router.host.clone();
        host.start_group(GroupId::META, router.meta.clone(), &TimingProfile::meta())
            .await
            .unwrap();
        host.initialize(
            GroupId::META,
            BTreeMap::from([(NodeId(1), "127.0.0.1:1".into())]),
        )
        .await
        .unwrap();
        host.wait_for_leader(GroupId::META, Duration::from_secs(30))
            .await
            .expect("a leader");
        let service = NodeService {
            router: router.clone(),
        };
        let join = pb::JoinRequest {
            node_id: 2,
            raft_addr: "127.0.0.1:2".into(),
            api_addr: "127.0.0.1:3".into(),
            zone: String::new(),
            cluster_id: String::new(),
        };

        let early = service.join_on_leader(&join).await.unwrap_err();
        assert!(matches!(early, RouterError::Unavailable(_)), "{early:?}");
        assert!(router.meta_state().nodes.is_empty(), "nothing registered");

        let bootstrap = MetaCommand::Bootstrap {
            cluster_id: "kc-test".into(),
        };
        router.meta_write(bootstrap).await.unwrap();
        assert_eq!(service.join_on_leader(&join).await.unwrap(), "kc-test");
        assert!(router.meta_state().nodes.contains_key(&NodeId(2)));
        host.shutdown().await;
    }
}
