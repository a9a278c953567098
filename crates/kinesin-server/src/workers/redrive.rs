//! Dead letters: a queue's leader moves the messages received more often
//! than its redrive policy allows to the dead-letter queue (keeping their
//! id, attributes and first send time), then drops them from the source.
//! A move whose drop did not happen is repeated at the next turn, so a
//! crash between the two can leave a message twice in the dead-letter
//! queue, never lose it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kinesin_meta::Owner;
use kinesin_queue::{DeadLetters, QueueCommand, QueueQuery};
use kinesin_router::{now_ms, stamp, Retry};

use super::{take_turn, JobState, Led};
use crate::reconcile::Context;

/// How often a queue's leader looks for dead letters.
const EVERY: Duration = Duration::from_secs(1);
/// Most messages one move takes.
const BATCH: u32 = 100;

pub(super) fn run(ctx: &Context, jobs: &Arc<Mutex<JobState>>, led: &Led<'_>) {
    let Some(Owner::Group { spec, .. }) = led.owner() else {
        return;
    };
    if spec.kind != kinesin_queue::QUEUE_KIND {
        return;
    }
    let group = led.group;
    {
        let mut jobs = jobs.lock().expect("jobs lock");
        if jobs.redriving.contains(&group) || !take_turn(&mut jobs.last_redrive, group, EVERY) {
            return;
        }
        jobs.redriving.insert(group);
    }
    let (host, router) = (ctx.host.clone(), ctx.router.clone());
    let jobs = Arc::clone(jobs);
    tokio::spawn(async move {
        let result = async {
            let query = stamp(
                now_ms(),
                &kinesin_queue::encode(&QueueQuery::DeadLetters(BATCH)),
            );
            let dead: DeadLetters = kinesin_queue::decode(&host.local_query(group, &query)?)
                .map_err(anyhow::Error::msg)?;
            if dead.messages.is_empty() {
                return anyhow::Ok(());
            }
            let target = kinesin_queue::group_of_arn(&dead.target)
                .and_then(|name| router.meta_state().groups.get(&name).map(|g| g.group))
                .ok_or_else(|| {
                    anyhow::anyhow!("the dead-letter queue {} does not exist", dead.target)
                })?;
            let count = dead.messages.len();
            let seqs = dead.messages.iter().map(|m| m.seq).collect();
            let moved = kinesin_queue::encode(&QueueCommand::Move(dead.messages));
            router
                .propose_stamped(target, moved, Retry::BeforeProposing, None)
                .await?;
            let remove = kinesin_queue::encode(&QueueCommand::Remove(seqs));
            router
                .propose_stamped(group, remove, Retry::Always, None)
                .await?;
            metrics::counter!("kinesin_sqs_dead_letters_moved_total").increment(count as u64);
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(%group, error = %e, "cannot move dead letters yet");
        }
        jobs.lock().expect("jobs lock").redriving.remove(&group);
    });
}
