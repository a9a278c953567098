//! A queue's leader, once a second: exports the queue's message counts,
//! drops messages past retention, moves its dead letters, and runs its
//! message move task.
//!
//! Dead letters: a queue's leader moves the messages received more often
//! than its redrive policy allows to the dead-letter queue (keeping their
//! id, attributes and first send time; a FIFO dead-letter queue counts
//! their retention from the move), then drops them from the source.
//! A move whose drop did not happen is repeated at the next turn, so a
//! crash between the two can leave a message twice in the dead-letter
//! queue, never lose it. The dead-letter queue must still allow the source
//! (its RedriveAllowPolicy); while it does not, dead letters wait.
//!
//! Move tasks (StartMessageMoveTask) take a dead-letter queue's visible
//! messages back to the queues they came from, or to the task's
//! destination, in the same two steps, at most the task's rate per turn.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kinesin_meta::Owner;
use kinesin_queue::{
    DeadLetters, MoveBatch, QueueCommand, QueueInfo, QueueQuery, QueueReply, StoredMessage,
    EXPIRE_VERSION, MOVE_DEAD_VERSION,
};
use kinesin_raft::RaftHost;
use kinesin_router::{now_ms, stamp, Retry, Router};
use kinesin_types::GroupId;

use super::{take_turn, JobState, Led};
use crate::reconcile::Context;

/// How often a queue's leader looks for dead letters and move work.
const EVERY: Duration = Duration::from_secs(1);
/// Most messages one move takes.
const BATCH: u32 = 100;
/// A move task's rate (messages per second) when it names none.
const DEFAULT_TASK_RATE: u32 = 500;

pub(super) fn run(ctx: &Context, jobs: &Arc<Mutex<JobState>>, led: &Led<'_>) {
    let Some(Owner::Group { spec, name }) = led.owner() else {
        return;
    };
    if spec.kind != kinesin_queue::QUEUE_KIND {
        return;
    }
    let Some((account, queue, partition)) = kinesin_queue::parse_group_name(name) else {
        return;
    };
    let queue = format!("{account}/{queue}");
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
        let turn = Turn {
            host: &host,
            router: &router,
            group,
            queue: &queue,
        };
        let now = now_ms();
        match turn.local::<QueueInfo>(&QueueQuery::Info) {
            Ok(info) => {
                export(&queue, partition, Counts::of(&info, now));
                jobs.lock()
                    .expect("jobs lock")
                    .exported
                    .insert(group, (queue.clone(), partition));
                if let Err(e) = turn.expire(&info, now).await {
                    tracing::warn!(%group, error = %e, "cannot drop expired messages yet");
                }
            }
            Err(e) => tracing::warn!(%group, error = %e, "cannot read the queue's counts"),
        }
        // Each step on its own: dead letters that cannot move (their queue
        // gone or refusing them) do not hold up this queue's move task.
        if let Err(e) = turn.move_dead_letters().await {
            tracing::warn!(%group, error = %e, "cannot move dead letters yet");
        }
        if let Err(e) = turn.move_task().await {
            tracing::warn!(%group, error = %e, "cannot run the message move task yet");
        }
        jobs.lock().expect("jobs lock").redriving.remove(&group);
    });
}

/// One turn of a queue's leader.
struct Turn<'a> {
    host: &'a RaftHost,
    router: &'a Router,
    group: GroupId,
    /// `account/name`.
    queue: &'a str,
}

impl Turn<'_> {
    fn local<T: for<'de> serde::Deserialize<'de>>(&self, query: &QueueQuery) -> anyhow::Result<T> {
        let bytes = self
            .host
            .local_query(self.group, &stamp(now_ms(), &kinesin_queue::encode(query)))?;
        kinesin_queue::decode(&bytes).map_err(anyhow::Error::msg)
    }

    /// The group of the queue an ARN names, if it exists and is of this
    /// queue's account (the API checks this when a policy or task is set;
    /// the queue may have changed since).
    fn own_queue(&self, arn: &str) -> Option<GroupId> {
        let account = self.queue.split_once('/').map_or("", |(a, _)| a);
        let (_, _, name) = kinesin_queue::parse_arn(arn).filter(|(_, a, _)| *a == account)?;
        self.router
            .meta_state()
            .groups
            .get(&kinesin_queue::group_name(account, name))
            .filter(|g| g.kind == kinesin_queue::QUEUE_KIND)
            .map(|g| g.group)
    }

    /// Proposes `copy` to `target`, then `drop` here.
    async fn copy_then_drop(
        &self,
        target: GroupId,
        copy: QueueCommand,
        drop: QueueCommand,
    ) -> anyhow::Result<()> {
        self.router
            .propose_stamped(target, kinesin_queue::encode(&copy), Retry::BeforeProposing)
            .await?;
        self.router
            .propose_stamped(self.group, kinesin_queue::encode(&drop), Retry::Always)
            .await?;
        Ok(())
    }

    /// Drops the messages past retention once one is (by its first send
    /// time, which a dead letter moved here keeps), on an idle queue too,
    /// once every node decodes [`QueueCommand::Expire`].
    async fn expire(&self, info: &QueueInfo, now_ms: u64) -> anyhow::Result<()> {
        if !info.expire_due(now_ms) || self.router.cluster_data_version() < EXPIRE_VERSION {
            return Ok(());
        }
        let command = kinesin_queue::encode(&QueueCommand::Expire);
        self.router
            .propose_stamped(self.group, command, Retry::Always)
            .await?;
        Ok(())
    }

    async fn move_dead_letters(&self) -> anyhow::Result<()> {
        let dead: DeadLetters = self.local(&QueueQuery::DeadLetters(BATCH))?;
        if dead.messages.is_empty() {
            return Ok(());
        }
        let target = self.own_queue(&dead.target).ok_or_else(|| {
            anyhow::anyhow!("the dead-letter queue {} does not exist", dead.target)
        })?;
        // The source's ARN is in the region of its dead-letter queue's.
        let region = dead.target.split(':').nth(3).unwrap_or_default();
        let (account, name) = self.queue.split_once('/').unwrap_or(("", self.queue));
        let source = format!("arn:aws:sqs:{region}:{account}:{name}");
        let settings: BTreeMap<String, String> = kinesin_queue::decode(
            &self
                .router
                .read(
                    target,
                    stamp(now_ms(), &kinesin_queue::encode(&QueueQuery::Settings)),
                )
                .await?,
        )
        .map_err(anyhow::Error::msg)?;
        let allow = settings.get("RedriveAllowPolicy").map(String::as_str);
        if !kinesin_queue::redrive_allowed(allow, &source) {
            anyhow::bail!(
                "the RedriveAllowPolicy of {} does not allow {source}",
                dead.target
            );
        }
        let count = dead.messages.len();
        let seqs = dead.messages.iter().map(|m| m.seq).collect();
        // Once every node decodes it, the move that restarts a FIFO dead
        // letter's retention at the dead-letter queue, as AWS does.
        let copy = if self.router.cluster_data_version() >= MOVE_DEAD_VERSION {
            QueueCommand::MoveDead {
                source,
                messages: dead.messages,
            }
        } else {
            QueueCommand::MoveFrom {
                source,
                messages: dead.messages,
            }
        };
        self.copy_then_drop(target, copy, QueueCommand::Remove(seqs))
            .await?;
        metrics::counter!("kinesin_sqs_dead_letters_moved_total").increment(count as u64);
        Ok(())
    }

    /// Moves up to the running task's rate of messages, or ends the task
    /// when nothing visible is left (or a message has nowhere to go).
    async fn move_task(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut moved = 0;
        loop {
            let batch: MoveBatch = self.local(&QueueQuery::MoveBatch(BATCH))?;
            let Some(task) = batch.task else {
                return Ok(());
            };
            let left = task.rate.unwrap_or(DEFAULT_TASK_RATE).saturating_sub(moved);
            if left == 0 || started.elapsed() >= EVERY {
                return Ok(());
            }
            if batch.messages.is_empty() {
                return self.end_task(task.id, None).await;
            }
            let mut by_target: BTreeMap<String, Vec<StoredMessage>> = BTreeMap::new();
            for (message, origin) in batch.messages.into_iter().take(left as usize) {
                let Some(target) = task.destination.clone().or(origin) else {
                    let why = format!(
                        "Message {} was not moved here as a dead letter, and the task names no DestinationArn.",
                        message.message.message_id
                    );
                    return self.end_task(task.id, Some(why)).await;
                };
                by_target.entry(target).or_default().push(message);
            }
            for (arn, messages) in by_target {
                let Some(target) = self.own_queue(&arn) else {
                    let why = format!("The destination queue {arn} does not exist.");
                    return self.end_task(task.id, Some(why)).await;
                };
                // Claimed messages are hidden from consumers, so none is
                // taken or deleted while it is copied; the drop takes only
                // what this claim holds.
                let claim = QueueCommand::ClaimForMove {
                    task: task.id,
                    seqs: messages.iter().map(|m| m.seq).collect(),
                };
                let reply = self
                    .router
                    .propose_stamped(self.group, kinesin_queue::encode(&claim), Retry::Always)
                    .await?;
                let handles = match kinesin_queue::decode(&reply).map_err(anyhow::Error::msg)? {
                    QueueReply::Claimed(handles) => handles,
                    other => anyhow::bail!("unexpected reply to a claim: {other:?}"),
                };
                let claimed: BTreeSet<u128> = handles.iter().map(|h| h.seq).collect();
                let messages: Vec<StoredMessage> = messages
                    .into_iter()
                    .filter(|m| claimed.contains(&m.seq))
                    .collect();
                if messages.is_empty() {
                    continue;
                }
                moved += messages.len() as u32;
                let drop = QueueCommand::MovedOut {
                    task: task.id,
                    handles,
                };
                self.copy_then_drop(target, QueueCommand::Move(messages), drop)
                    .await?;
            }
        }
    }

    async fn end_task(&self, task: u64, failure: Option<String>) -> anyhow::Result<()> {
        let end = kinesin_queue::encode(&QueueCommand::EndMoveTask { task, failure });
        self.router
            .propose_stamped(self.group, end, Retry::Always)
            .await?;
        Ok(())
    }
}

/// The queue partitions whose gauges this node set, with their labels
/// (`account/name`, partition).
pub(super) type Exported = HashMap<GroupId, (String, u32)>;

/// What the gauges of a partition show.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Counts {
    visible: u64,
    in_flight: u64,
    delayed: u64,
    oldest_age_secs: f64,
}

impl Counts {
    fn of(info: &QueueInfo, now_ms: u64) -> Counts {
        let age_ms = info.oldest_sent_ms.map_or(0, |t| now_ms.saturating_sub(t));
        Counts {
            visible: info.visible,
            in_flight: info.in_flight,
            delayed: info.delayed,
            oldest_age_secs: age_ms as f64 / 1000.0,
        }
    }
}

/// Zeroes the gauges of the partitions this node no longer leads (moved
/// away, or deleted): only a partition's leader keeps them current, so a
/// former leader's last values would otherwise stay, and win a `max` over
/// nodes, until the exporter drops idle gauges (5 minutes). Returns the
/// partitions zeroed.
pub(super) fn forget_unled(exported: &mut Exported, led: &HashSet<GroupId>) -> Vec<GroupId> {
    let mut zeroed = Vec::new();
    exported.retain(|group, (queue, partition)| {
        if led.contains(group) {
            return true;
        }
        export(queue, *partition, Counts::default());
        zeroed.push(*group);
        false
    });
    zeroed
}

/// A queue partition's counts as gauges, labelled `account/name` and the
/// partition. Only the partition's leader keeps them current (others show
/// 0, but during a hand-over both may show counts for a pass): take the
/// `max` over nodes, then sum the partitions.
fn export(queue: &str, partition: u32, counts: Counts) {
    let partition = partition.to_string();
    for (state, count) in [
        ("visible", counts.visible),
        ("in_flight", counts.in_flight),
        ("delayed", counts.delayed),
    ] {
        metrics::gauge!("kinesin_sqs_messages", "queue" => queue.to_string(), "partition" => partition.clone(), "state" => state)
            .set(count as f64);
    }
    metrics::gauge!("kinesin_sqs_oldest_message_age_seconds", "queue" => queue.to_string(), "partition" => partition)
        .set(counts.oldest_age_secs);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_of_partitions_no_longer_led_are_zeroed_once() {
        let mut exported = Exported::new();
        exported.insert(GroupId(1), ("a/q".into(), 0));
        exported.insert(GroupId(2), ("a/q".into(), 1));
        let led = HashSet::from([GroupId(1)]);
        assert_eq!(forget_unled(&mut exported, &led), vec![GroupId(2)]);
        assert_eq!(
            exported.keys().copied().collect::<Vec<_>>(),
            vec![GroupId(1)]
        );
        assert!(forget_unled(&mut exported, &led).is_empty());
        assert_eq!(
            forget_unled(&mut exported, &HashSet::new()),
            vec![GroupId(1)]
        );
        let info = QueueInfo {
            attributes: BTreeMap::new(),
            tags: BTreeMap::new(),
            created_ms: 0,
            modified_ms: 0,
            visible: 3,
            in_flight: 2,
            delayed: 1,
            oldest_sent_ms: Some(1_000),
        };
        let counts = Counts::of(&info, 3_500);
        assert_eq!(
            (counts.visible, counts.in_flight, counts.delayed),
            (3, 2, 1)
        );
        assert_eq!(counts.oldest_age_secs, 2.5);
    }
}
