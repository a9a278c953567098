//! Sealing a resharded parent: a reshard closed the shard in the map; its
//! group seals itself so that no write lands after the children opened,
//! and the ending sequence number goes into the map.

use std::sync::{Arc, Mutex};

use kinesin_meta::{MetaCommand, Owner};
use kinesin_shard::{ShardCommand, ShardReply};
use kinesin_types::{SequenceNumber, ShardState};

use super::{JobState, Led};
use crate::reconcile::Context;

pub(super) fn run(ctx: &Context, jobs: &Arc<Mutex<JobState>>, led: &Led<'_>) {
    let Some(Owner::Shard { stream, shard }) = led.owner() else {
        return;
    };
    if shard.state != ShardState::Sealing {
        return;
    }
    let group = led.group;
    if !jobs.lock().expect("jobs lock").sealing.insert(group) {
        return;
    }
    let (host, router) = (ctx.host.clone(), ctx.router.clone());
    let (stream, shard_id) = (stream.name.to_string(), shard.shard_id);
    let jobs = Arc::clone(jobs);
    tokio::spawn(async move {
        let result = async {
            let reply = host.propose(group, ShardCommand::Seal.encode()).await?;
            let ShardReply::Sealed { ending } = ShardReply::decode(&reply)? else {
                anyhow::bail!("unexpected reply to Seal");
            };
            router
                .meta_write(MetaCommand::ShardSealed {
                    stream,
                    shard: shard_id,
                    ending: ending.map(SequenceNumber),
                })
                .await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(%group, error = %e, "cannot seal a resharded shard yet");
        }
        jobs.lock().expect("jobs lock").sealing.remove(&group);
    });
}
