//! A queue's leader, once a second: exports the queue's message counts and
//! moves its dead letters.
//!
//! Dead letters: a queue's leader moves the messages received more often
//! than its redrive policy allows to the dead-letter queue (keeping their
//! id, attributes and first send time), then drops them from the source.
//! A move whose drop did not happen is repeated at the next turn, so a
//! crash between the two can leave a message twice in the dead-letter
//! queue, never lose it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kinesin_meta::Owner;
use kinesin_queue::{DeadLetters, QueueCommand, QueueInfo, QueueQuery};
use kinesin_router::{now_ms, stamp, Retry};

use super::{take_turn, JobState, Led};
use crate::reconcile::Context;

/// How often a queue's leader looks for dead letters.
const EVERY: Duration = Duration::from_secs(1);
/// Most messages one move takes.
const BATCH: u32 = 100;

pub(super) fn run(ctx: &Context, jobs: &Arc<Mutex<JobState>>, led: &Led<'_>) {
    let Some(Owner::Group { spec, name }) = led.owner() else {
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
    let queue = name.strip_prefix("sqs/").unwrap_or(name).to_string();
    let source = name.to_string();
    tokio::spawn(async move {
        let result = async {
            let now = now_ms();
            let info: QueueInfo = kinesin_queue::decode(&host.local_query(
                group,
                &stamp(now, &kinesin_queue::encode(&QueueQuery::Info)),
            )?)
            .map_err(anyhow::Error::msg)?;
            export(&queue, &info, now);
            let query = stamp(
                now_ms(),
                &kinesin_queue::encode(&QueueQuery::DeadLetters(BATCH)),
            );
            let dead: DeadLetters = kinesin_queue::decode(&host.local_query(group, &query)?)
                .map_err(anyhow::Error::msg)?;
            if dead.messages.is_empty() {
                return anyhow::Ok(());
            }
            // Only a queue of the source's own account (the API checks
            // this when the policy is set; the target may have changed).
            let account_prefix = source.rsplit_once('/').map_or("", |(a, _)| a);
            let target = kinesin_queue::group_of_arn(&dead.target)
                .filter(|name| {
                    name.rsplit_once('/')
                        .is_some_and(|(a, _)| a == account_prefix)
                })
                .and_then(|name| {
                    router
                        .meta_state()
                        .groups
                        .get(&name)
                        .filter(|g| g.kind == kinesin_queue::QUEUE_KIND)
                        .map(|g| g.group)
                })
                .ok_or_else(|| {
                    anyhow::anyhow!("the dead-letter queue {} does not exist", dead.target)
                })?;
            let count = dead.messages.len();
            let seqs = dead.messages.iter().map(|m| m.seq).collect();
            let moved = kinesin_queue::encode(&QueueCommand::Move(dead.messages));
            router
                .propose_stamped(target, moved, Retry::BeforeProposing)
                .await?;
            let remove = kinesin_queue::encode(&QueueCommand::Remove(seqs));
            router.propose_stamped(group, remove, Retry::Always).await?;
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

/// The queue's counts as gauges, labelled `account/name`. A queue whose
/// leader moved keeps its last values on the former leader until that
/// node restarts; sum over `node` with `max`.
fn export(queue: &str, info: &QueueInfo, now_ms: u64) {
    let counts = [
        ("visible", info.visible),
        ("in_flight", info.in_flight),
        ("delayed", info.delayed),
    ];
    for (state, count) in counts {
        metrics::gauge!("kinesin_sqs_messages", "queue" => queue.to_string(), "state" => state)
            .set(count as f64);
    }
    let age_ms = info.oldest_sent_ms.map_or(0, |t| now_ms.saturating_sub(t));
    metrics::gauge!("kinesin_sqs_oldest_message_age_seconds", "queue" => queue.to_string())
        .set(age_ms as f64 / 1000.0);
}
