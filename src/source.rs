//! The Kafka source: one consumer in the group, one ordered worker task per assigned partition.
//!
//! The dispatcher owns the consumer. It forwards each record to its partition's worker and counts
//! the bytes each worker has queued. All workers share one queue budget
//! (`kafka.max_queued_bytes`). Past it the dispatcher stops reading until the workers have taken
//! some back; librdkafka then stops fetching once its own prefetch cap is reached, and drops
//! nothing. A partition whose worker holds at least its share and has taken nothing for
//! `STALL_AFTER` (a flush retrying through an outage) is paused instead, so the other partitions
//! keep flowing. What a paused partition holds still counts against the budget, but the flowing
//! partitions always keep an eighth of it (`budget::flowing_limit`). Pausing is kept for that
//! case because it is not free: librdkafka drops what it had prefetched for the partition and
//! fetches it again on resume. A paused partition's worker wakes the dispatcher when it is down
//! to an eighth of the budget, so the partition resumes before the worker runs dry.
//!
//! Rebalance callbacks become events the dispatcher applies between records:
//! assigned partitions get a worker, revoked ones have theirs stopped (a flush in flight either
//! completes or leaves an intent the next owner finishes; fencing makes both safe).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::budget;
use crate::commit::Committer;
use crate::config::Config;
use crate::metrics;
use crate::partition::{Admit, PartitionError, PartitionWriter, Sinks};
use crate::sinks::SinkError;

/// What a queued record counts as: its payload and the queue entry around it.
fn queued_cost(payload_len: usize) -> usize {
    payload_len + 96
}

/// How long a worker holding at least its share of the queue budget may take nothing before its
/// partition is paused. Longer than an ordinary flush, so a backlog drains without pauses.
const STALL_AFTER: Duration = Duration::from_secs(5);

/// While reading is blocked on the budget, how often the dispatcher looks again.
const BLOCKED_RECHECK: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("kafka consumer ({what}): {source}")]
    Kafka { what: &'static str, source: rdkafka::error::KafkaError },
}

#[derive(Debug)]
enum RebalanceEvent {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// Consumer context: turns rebalance callbacks into events for the dispatcher.
pub struct AuditContext {
    topic: String,
    events: mpsc::UnboundedSender<RebalanceEvent>,
}

impl ClientContext for AuditContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): consumer lag per partition,
    /// the last stable offset (read_committed) minus the committed offset.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else { return };
        for (&partition, p) in &topic.partitions {
            if partition >= 0 && p.consumer_lag >= 0 {
                metrics::consumer_lag(partition, p.consumer_lag);
            }
        }
    }
}

impl AuditContext {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect()
    }
}

impl ConsumerContext for AuditContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = ?self.partitions(tpl), "partitions revoked");
                let _ = self.events.send(RebalanceEvent::Revoked(self.partitions(tpl)));
            }
            Rebalance::Error(e) => tracing::error!(error = %e, "rebalance error"),
            Rebalance::Assign(_) => {}
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(partitions = ?self.partitions(tpl), "partitions assigned");
            let _ = self.events.send(RebalanceEvent::Assigned(self.partitions(tpl)));
        }
    }
}

/// One record handed to a worker. `generation` counts the dispatcher's seeks on the partition,
/// so a worker can ignore records fetched before the seek it asked for.
struct Inbound {
    offset: i64,
    timestamp_ms: Option<i64>,
    payload: Option<bytes::Bytes>,
    generation: u64,
}

enum Command {
    Seek {
        partition: i32,
        offset: i64,
    },
    /// The worker (known by its queue counter) lost the partition's fence and ended: if it is
    /// still this partition's worker, start a new one from the chain head.
    Restart {
        partition: i32,
        worker: Arc<AtomicUsize>,
    },
    /// The worker stopped for good (a fatal error, or a panic): counted while it is still this
    /// partition's worker (`/readyz`, `aegis_partitions_stopped`).
    Stopped {
        partition: i32,
        worker: Arc<AtomicUsize>,
    },
}

/// Copies payloads out of librdkafka's buffers into shared chunks, one partition's records in
/// order: one allocation per ~128 KiB of payloads instead of one per record, and a flush's
/// records are freed a chunk at a time. A chunk outlives the flush that took its first records
/// only as long as the next flush holds some of it, so this adds at most a chunk per partition.
#[derive(Default)]
pub struct PayloadArena {
    chunk: bytes::BytesMut,
}

impl PayloadArena {
    const CHUNK: usize = 128 * 1024;

    pub fn copy(&mut self, payload: &[u8]) -> bytes::Bytes {
        // A large payload would waste most of a chunk; it gets its own allocation.
        if payload.len() > Self::CHUNK / 8 {
            return bytes::Bytes::copy_from_slice(payload);
        }
        if self.chunk.capacity() < payload.len() {
            self.chunk = bytes::BytesMut::with_capacity(Self::CHUNK);
        }
        self.chunk.extend_from_slice(payload);
        // The copied bytes leave as their own `Bytes`; the rest of the chunk stays for the next.
        self.chunk.split().freeze()
    }
}

/// How long a worker that lost its fence waits before the partition's worker is restarted from
/// the chain head: a revoked owner's last flush settles, and a zombie cannot make it spin.
const FENCE_RESTART_DELAY: Duration = Duration::from_secs(2);

/// Records a worker takes from its queue per wake-up, and the dispatcher from librdkafka.
const WORKER_BATCH: usize = 256;
const DISPATCH_BATCH: usize = 256;

struct WorkerHandle {
    tx: mpsc::UnboundedSender<Inbound>,
    /// Where this partition's payloads are copied out of librdkafka's buffers.
    payloads: PayloadArena,
    /// Bytes sent to the worker and not yet taken by it.
    queued: Arc<AtomicUsize>,
    revoke: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    paused: bool,
    generation: u64,
    /// Records the worker has taken so far, and when the dispatcher last saw that count change
    /// (or the queue empty): how a stalled worker is told from a busy one.
    taken: Arc<AtomicU64>,
    progress: (u64, Instant),
    /// `taken` when the partition was paused.
    taken_at_pause: u64,
    /// Set when the worker stopped for good (a fatal error or a panic; not a lost fence, after
    /// which a new worker continues).
    stopped: Arc<AtomicBool>,
}

impl WorkerHandle {
    /// Bytes queued to the worker. A stopped worker dropped its queue (nobody counts it down any
    /// more), so it holds nothing, whatever its count says.
    fn queued(&self) -> usize {
        if self.tx.is_closed() {
            0
        } else {
            self.queued.load(Ordering::Relaxed)
        }
    }
}

/// Bytes queued to the workers whose partitions are flowing.
fn queued_flowing(workers: &BTreeMap<i32, WorkerHandle>) -> usize {
    workers.values().filter(|w| !w.paused).map(WorkerHandle::queued).sum()
}

/// Bytes queued to the workers whose partitions are paused.
fn queued_paused(workers: &BTreeMap<i32, WorkerHandle>) -> usize {
    workers.values().filter(|w| w.paused).map(WorkerHandle::queued).sum()
}

/// What the flowing partitions' queues may hold together: the budget less what paused
/// partitions hold, down to a floor (`budget::flowing_limit`).
fn flowing_limit(workers: &BTreeMap<i32, WorkerHandle>, queue_limit: usize) -> usize {
    budget::flowing_limit(queue_limit, queued_paused(workers))
}

/// librdkafka settings: the brokers, then `defaults`, then `kafka.properties` last so an
/// operator can override any default (security, timeouts, ...) but those the guarantees rest on,
/// which config validation refuses.
pub fn client_config<'a>(config: &Config, defaults: impl IntoIterator<Item = (&'a str, String)>) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.kafka.brokers);
    for (k, v) in defaults {
        cc.set(k, v);
    }
    for (k, v) in &config.kafka.properties {
        cc.set(k, v);
    }
    cc
}

pub fn consumer_config(config: &Config) -> ClientConfig {
    client_config(
        config,
        [
            ("group.id", config.kafka.group_id.clone()),
            ("client.id", "aegis-audit".into()),
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            ("auto.offset.reset", "earliest".into()),
            ("partition.assignment.strategy", "cooperative-sticky".into()),
            ("isolation.level", "read_committed".into()),
            ("session.timeout.ms", config.kafka.session_timeout_ms.to_string()),
            ("enable.partition.eof", "false".into()),
            ("statistics.interval.ms", "5000".into()),
            // Prefetched records are memory too: 16 MiB keeps every partition fed (librdkafka's
            // 64 MiB default would be a fifth of the instance's footprint; README, Performance).
            ("queued.max.messages.kbytes", "16384".into()),
            // Once that cap is reached librdkafka postpones the partition's next fetch by this
            // much; its 1 s default left a backlog drain at a third of the broker's rate
            // (35k vs 116k records/s measured with 16 MiB, README, Performance).
            ("fetch.queue.backoff.ms", "10".into()),
            ("fetch.max.bytes", (16 * 1024 * 1024).to_string()),
        ],
    )
}

/// A durable producer: every write acknowledged by all in-sync replicas, no duplicates from
/// producer retries. zstd, because the local broker cannot serve snappy (README).
pub fn producer_config(config: &Config, message_timeout_ms: u32) -> ClientConfig {
    client_config(
        config,
        [
            ("acks", "all".into()),
            ("enable.idempotence", "true".into()),
            ("compression.type", "zstd".into()),
            ("linger.ms", "5".into()),
            ("message.timeout.ms", message_timeout_ms.to_string()),
        ],
    )
}

/// Options of one `run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop gracefully once no record has arrived for this long (demos, tests, backfills).
    pub exit_when_idle: Option<Duration>,
}

/// Consumes until `shutdown` fires (graceful: flush, commit, leave the group) or, with
/// `exit_when_idle`, until the topic has been quiet that long. `hard_stop` abandons buffers.
/// Returns the partitions whose workers had stopped for good (a fatal error) when it ended.
pub async fn run(
    config: Arc<Config>,
    sinks: Sinks,
    options: RunOptions,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) -> Result<Vec<i32>, SourceError> {
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let context = AuditContext { topic: config.kafka.topic.clone(), events: events_tx };
    let consumer: StreamConsumer<AuditContext> = consumer_config(&config)
        .create_with_context(context)
        .map_err(|source| SourceError::Kafka { what: "create", source })?;
    let consumer = Arc::new(consumer);
    consumer.subscribe(&[&config.kafka.topic]).map_err(|source| SourceError::Kafka { what: "subscribe", source })?;
    tracing::info!(topic = %config.kafka.topic, group = %config.kafka.group_id, "subscribed");

    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<Command>();
    let mut workers: BTreeMap<i32, WorkerHandle> = BTreeMap::new();
    // Workers ring `drained` when they are down to `resume_at`.
    let drained = Arc::new(Notify::new());
    let queue_limit = config.kafka.max_queued_bytes;
    // A paused partition resumes once its worker is down to this.
    let resume_at = queue_limit / 8;
    let env = WorkerEnv {
        config: config.clone(),
        sinks,
        committer: Committer::new(consumer.clone(), &config.kafka.topic),
        commands: cmd_tx,
        drained: drained.clone(),
        resume_at,
        shutdown: shutdown.clone(),
        hard_stop,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_record = Instant::now();
    let mut ever_assigned = false;
    let topic = config.kafka.topic.clone();

    loop {
        // Backpressure: over the budget, read nothing until the workers have taken some back.
        let limit = flowing_limit(&workers, queue_limit);
        let blocked = queued_flowing(&workers) > limit;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(event) = events_rx.recv() => {
                let revoked = matches!(event, RebalanceEvent::Revoked(_));
                match event {
                    RebalanceEvent::Assigned(parts) => {
                        // An empty assignment (e.g. a dead member still holds everything) is not a start.
                        ever_assigned |= !parts.is_empty();
                        // The idle clock starts when there is something to read.
                        last_record = Instant::now();
                        // A partition paused under an earlier owner-worker must flow for the new one.
                        let mut tpl = TopicPartitionList::new();
                        for &p in &parts {
                            tpl.add_partition(&topic, p);
                        }
                        if !parts.is_empty() {
                            let _ = consumer.resume(&tpl);
                        }
                        for p in parts {
                            metrics::partition_released(p);
                            let handle = env.spawn(p, false);
                            if let Some(old) = workers.insert(p, handle) {
                                old.revoke.cancel();
                                if old.paused {
                                    metrics::paused(-1.0);
                                }
                            }
                        }
                    }
                    RebalanceEvent::Revoked(parts) => {
                        for p in parts {
                            metrics::partition_released(p);
                            if let Some(w) = workers.remove(&p) {
                                w.revoke.cancel();
                                if w.paused { metrics::paused(-1.0); }
                            }
                        }
                    }
                }
                // Everything revoked (a rebalance under way, or the session lost): out of the
                // group until the next assignment, even an empty one, says otherwise.
                metrics::set_in_group(!(revoked && workers.is_empty()));
                metrics::assigned(workers.len());
            }
            Some(command) = cmd_rx.recv() => match command {
                Command::Seek { partition, offset } => {
                    if let Some(w) = workers.get_mut(&partition) {
                        tracing::info!(topic = %topic, partition, offset, "seeking to the chain head");
                        // Records already queued carry the old generation; the worker skips them.
                        w.generation += 1;
                        // Timeout zero: librdkafka seeks asynchronously and drops records fetched before it.
                        if let Err(e) = consumer.seek(&topic, partition, Offset::Offset(offset), Duration::ZERO) {
                            tracing::error!(partition, offset, error = %e, "seek failed; the worker will ask again when records arrive past the head");
                            metrics::kafka_error("seek");
                        }
                    }
                }
                Command::Stopped { partition, worker } => {
                    if workers.get(&partition).is_some_and(|w| Arc::ptr_eq(&w.queued, &worker)) {
                        metrics::mark_stopped(partition);
                    }
                }
                Command::Restart { partition, worker } => {
                    let current = workers.get(&partition).is_some_and(|w| Arc::ptr_eq(&w.queued, &worker));
                    if current && !shutdown.is_cancelled() {
                        tracing::warn!(topic = %topic, partition, "restarting the partition's worker from the chain head");
                        let old = workers.insert(partition, env.spawn(partition, true)).expect("checked above");
                        old.revoke.cancel();
                        if old.paused {
                            metrics::paused(-1.0);
                            let mut tpl = TopicPartitionList::new();
                            tpl.add_partition(&topic, partition);
                            let _ = consumer.resume(&tpl);
                        }
                    }
                }
            },
            // Before the records: with a busy topic `recv` is always ready, and a paused
            // partition must not wait for a lull to resume.
            _ = drained.notified() => resume_drained(&consumer, &topic, resume_at, &mut workers),
            _ = tokio::time::sleep(BLOCKED_RECHECK), if blocked => {
                pause_stalled(&consumer, &topic, queue_limit, &mut workers);
            }
            _ = tick.tick() => {
                // Also on the tick: a notification can race the pause it should undo.
                resume_drained(&consumer, &topic, resume_at, &mut workers);
                pause_stalled(&consumer, &topic, queue_limit, &mut workers);
                metrics::queues(queued_flowing(&workers), queued_paused(&workers), flowing_limit(&workers, queue_limit));
                if let Some(idle) = options.exit_when_idle {
                    // A stopped worker's leftovers are not waiting for anyone.
                    let drained = workers.values().all(|w| w.tx.is_closed() || w.queued() == 0);
                    if ever_assigned && drained && last_record.elapsed() >= idle {
                        tracing::info!(idle_secs = idle.as_secs_f64(), "no records for the idle period; stopping");
                        shutdown.cancel();
                    }
                }
            }
            mut message = consumer.recv(), if !blocked => {
                // A record means an assignment; an error (brokers gone, a refused join) does not.
                if message.is_ok() {
                    metrics::set_in_group(true);
                }
                let mut dispatched = false;
                // Records librdkafka holds already, without a trip round the select per record
                // (a timer and two registrations at every poll). The loop stops for anything
                // the select would have put first: a rebalance or command waiting, or the
                // budget exhausted.
                let mut left = DISPATCH_BATCH;
                // Summed over the workers once per batch, not per record (that is one atomic
                // load per partition); the batch adds what it sends, and the workers only take
                // away meanwhile, so this errs on the full side.
                let mut flowing = queued_flowing(&workers);
                loop {
                    match message {
                        Ok(m) => {
                            flowing += dispatch(&m, &consumer, &topic, &mut workers);
                            dispatched = true;
                        }
                        Err(e) => {
                            // Broker unavailable, etc.: librdkafka reconnects by itself; log and go on.
                            tracing::warn!(error = %e, "kafka consumer error");
                            metrics::kafka_error("consume");
                            break;
                        }
                    }
                    left -= 1;
                    if left == 0
                        || !events_rx.is_empty()
                        || !cmd_rx.is_empty()
                        || flowing > limit
                        || shutdown.is_cancelled()
                    {
                        break;
                    }
                    // Taken only when it will be dispatched: a record taken from librdkafka and
                    // dropped would be a gap the chain links across.
                    match consumer.recv().now_or_never() {
                        Some(next) => message = next,
                        None => break,
                    }
                }
                if dispatched {
                    last_record = Instant::now();
                }
            }
        }
    }

    // Graceful: workers see `shutdown`, flush what they hold, commit, and end.
    tracing::info!(workers = workers.len(), "shutting down: flushing and committing");
    let mut stopped = Vec::new();
    for (partition, w) in std::mem::take(&mut workers) {
        let _ = w.task.await;
        // Also a final flush that failed for good.
        if w.stopped.load(Ordering::Relaxed) {
            stopped.push(partition);
        }
    }
    // Dropping the consumer closes it and leaves the group; it blocks, so not on a runtime thread.
    drop(env); // its committer holds the consumer
    let _ = tokio::task::spawn_blocking(move || {
        consumer.unsubscribe();
        drop(consumer);
    })
    .await;
    metrics::set_in_group(false);
    tracing::info!("left the consumer group");
    Ok(stopped)
}

/// Hands one record to its partition's worker: the one copy out of librdkafka's buffer, which the
/// segment buffer then keeps. Returns the bytes it queued.
fn dispatch(
    message: &BorrowedMessage<'_>,
    consumer: &StreamConsumer<AuditContext>,
    topic: &str,
    workers: &mut BTreeMap<i32, WorkerHandle>,
) -> usize {
    let partition = message.partition();
    // No worker: the partition was revoked after librdkafka fetched this record (a new
    // assignment is always seen before its records). Its next owner reads from the chain head.
    let Some(worker) = workers.get_mut(&partition) else { return 0 };
    // Count before sending; the worker subtracts as it takes records. Totals are summed over
    // the current workers, so a revoked worker's leftovers drop out.
    let cost = queued_cost(message.payload().map_or(0, <[u8]>::len));
    let inbound = Inbound {
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        payload: message.payload().map(|p| worker.payloads.copy(p)),
        generation: worker.generation,
    };
    worker.queued.fetch_add(cost, Ordering::Relaxed);
    if worker.tx.send(inbound).is_err() {
        // The worker stopped (fence lost or fatal error): hold the partition still.
        worker.queued.fetch_sub(cost, Ordering::Relaxed);
        pause(consumer, topic, partition, worker, "worker stopped");
        return 0;
    }
    cost
}

/// Whether a paused partition may resume: its worker is down to the resume mark and has taken
/// something since the pause (or holds nothing). Stalled workers of many partitions each hold
/// less than the mark when the budget runs out; resumed for that alone, they were paused again at
/// once, ten times a second for the whole outage.
fn may_resume(queued: usize, resume_at: usize, taken: u64, taken_at_pause: u64) -> bool {
    queued == 0 || (queued <= resume_at && taken != taken_at_pause)
}

/// Resumes every paused partition whose (still running) worker may resume (`may_resume`).
fn resume_drained(
    consumer: &StreamConsumer<AuditContext>,
    topic: &str,
    resume_at: usize,
    workers: &mut BTreeMap<i32, WorkerHandle>,
) {
    for (&partition, worker) in workers.iter_mut() {
        let taken = worker.taken.load(Ordering::Relaxed);
        if worker.paused
            && !worker.tx.is_closed()
            && may_resume(worker.queued(), resume_at, taken, worker.taken_at_pause)
        {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(topic, partition);
            if consumer.resume(&tpl).is_ok() {
                worker.paused = false;
                metrics::paused(-1.0);
            }
        }
    }
}

/// Pauses the partitions whose workers hold at least their share of an exhausted budget and have
/// taken nothing for `STALL_AFTER`; notes progress for the others.
fn pause_stalled(
    consumer: &StreamConsumer<AuditContext>,
    topic: &str,
    queue_limit: usize,
    workers: &mut BTreeMap<i32, WorkerHandle>,
) {
    let now = Instant::now();
    let flowing = queued_flowing(workers);
    let limit = flowing_limit(workers, queue_limit);
    let holders = workers.values().filter(|w| !w.paused).count();
    for (&partition, worker) in workers.iter_mut() {
        let taken = worker.taken.load(Ordering::Relaxed);
        let own = worker.queued();
        if own == 0 || taken != worker.progress.0 {
            worker.progress = (taken, now);
        } else if !worker.paused
            && now.duration_since(worker.progress.1) >= STALL_AFTER
            && budget::over_fair_share(own, flowing, holders, limit)
        {
            pause(consumer, topic, partition, worker, "worker is stalled");
        }
    }
}

fn pause(
    consumer: &StreamConsumer<AuditContext>,
    topic: &str,
    partition: i32,
    worker: &mut WorkerHandle,
    why: &'static str,
) {
    if worker.paused {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    match consumer.pause(&tpl) {
        Ok(()) => {
            worker.paused = true;
            worker.taken_at_pause = worker.taken.load(Ordering::Relaxed);
            metrics::paused(1.0);
            tracing::info!(partition, queued_bytes = worker.queued(), "{why}; partition paused");
        }
        Err(e) => tracing::warn!(partition, error = %e, "pause failed"),
    }
}

/// What every partition worker of this consumer shares.
struct WorkerEnv {
    config: Arc<Config>,
    sinks: Sinks,
    committer: Committer,
    commands: mpsc::UnboundedSender<Command>,
    drained: Arc<Notify>,
    resume_at: usize,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
}

impl WorkerEnv {
    /// A worker for `partition`; `restarted` when it replaces one that lost the fence.
    fn spawn(&self, partition: i32, restarted: bool) -> WorkerHandle {
        // Unbounded, but the queue budget pauses the partition (what librdkafka had already
        // fetched by then is capped by queued.max.messages.kbytes).
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = Arc::new(AtomicU64::new(0));
        let revoke = self.hard_stop.child_token();
        let stopped = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            partition,
            topic: self.config.kafka.topic.clone(),
            config: self.config.clone(),
            sinks: self.sinks.clone(),
            committer: self.committer.clone(),
            commands: self.commands.clone(),
            queued: queued.clone(),
            taken: taken.clone(),
            drained: self.drained.clone(),
            resume_at: self.resume_at,
            revoke: revoke.clone(),
            shutdown: self.shutdown.clone(),
            restarted,
            stopped: stopped.clone(),
        };
        let span = tracing::info_span!("partition", topic = %self.config.kafka.topic, partition);
        // A panic (a bug) must stop the partition visibly, not leave it paused without a word.
        let (commands, worker_queued, panicked) = (self.commands.clone(), queued.clone(), stopped.clone());
        let task = tokio::spawn(
            async move {
                if let Err(panic) = std::panic::AssertUnwindSafe(worker.run(rx)).catch_unwind().await {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    panicked.store(true, Ordering::Relaxed);
                    metrics::partition_stopped(partition, &format!("the worker panicked: {what}"));
                    let _ = commands.send(Command::Stopped { partition, worker: worker_queued });
                }
            }
            .instrument(span),
        );
        WorkerHandle {
            tx,
            payloads: PayloadArena::default(),
            queued,
            revoke,
            task,
            paused: false,
            generation: 0,
            taken,
            progress: (0, Instant::now()),
            taken_at_pause: 0,
            stopped,
        }
    }
}

/// When a worker asks again where the partition's log ends ([`Worker::log_reaches_head`]): once
/// for each run of records that arrive below the chain head (a replay, a re-read after a crash,
/// or a log recreated under the worker), and, when the broker did not answer, again at most
/// every [`LOG_END_RETRY`] while such records keep coming. A run ends with a record past the
/// head or at it. (The check at the worker's start does not count for the first run: the log
/// may be recreated between the two.)
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum LogEndCheck {
    #[default]
    Due,
    Done,
    Unanswered(Instant),
}

/// Well above the ask's own timeout (`commit::LOG_END_TIMEOUT`): while the broker does not
/// answer, each ask blocks the worker that long.
const LOG_END_RETRY: Duration = Duration::from_secs(30);

impl LogEndCheck {
    /// A record past the head or at it: the next one below it starts a new run.
    fn run_ended(&mut self) {
        *self = LogEndCheck::Due;
    }

    fn due(&self, now: Instant) -> bool {
        match *self {
            LogEndCheck::Due => true,
            LogEndCheck::Done => false,
            LogEndCheck::Unanswered(at) => now.duration_since(at) >= LOG_END_RETRY,
        }
    }

    fn checked(&mut self, answered: bool, now: Instant) {
        *self = if answered { LogEndCheck::Done } else { LogEndCheck::Unanswered(now) };
    }
}

struct Worker {
    partition: i32,
    topic: String,
    config: Arc<Config>,
    sinks: Sinks,
    committer: Committer,
    commands: mpsc::UnboundedSender<Command>,
    queued: Arc<AtomicUsize>,
    taken: Arc<AtomicU64>,
    drained: Arc<Notify>,
    resume_at: usize,
    /// Fires on revocation or hard stop: abandon the buffer (the chain head stays consistent).
    revoke: CancellationToken,
    /// Fires on graceful shutdown: flush what is buffered, commit, end.
    shutdown: CancellationToken,
    /// Replaces a worker that lost the fence: the records it held past the head are gone.
    restarted: bool,
    stopped: Arc<AtomicBool>,
}

impl Worker {
    /// Takes a record off the queue's counts; wakes the dispatcher when the partition may resume.
    fn took(&self, inbound: &Inbound) {
        let cost = queued_cost(inbound.payload.as_ref().map_or(0, |p| p.len()));
        self.taken.fetch_add(1, Ordering::Relaxed);
        let before = self.queued.fetch_sub(cost, Ordering::Relaxed);
        let mark = self.resume_at;
        if before > mark && before - cost <= mark {
            self.drained.notify_one();
        }
    }

    async fn run(self, mut rx: mpsc::UnboundedReceiver<Inbound>) {
        let mut writer = match PartitionWriter::open(
            &self.topic,
            self.partition,
            self.config.clone(),
            self.sinks.clone(),
            &self.revoke,
        )
        .await
        {
            Ok(w) => w,
            Err(PartitionError::Cancelled(_)) => return,
            Err(e) => return self.stop(&e),
        };
        if let Some(head) = writer.durable_head() {
            tracing::info!(topic = %self.topic, partition = self.partition, head_offset = head.last_offset, "continuing chain");
            if let Err(e) = self.log_reaches_head(&writer).await {
                return self.stop(&e);
            }
        }
        let mut log_end_check = LogEndCheck::default();
        let mut min_generation = 0u64;
        if let (true, Some(offset)) = (self.restarted, writer.resume_offset()) {
            // The records past the head (or the interrupted flush another writer left) went to
            // the worker that lost the fence, and the consumer has moved on: read them again
            // (records already on their way are skipped).
            let _ = self.commands.send(Command::Seek { partition: self.partition, offset });
            min_generation = 1;
        }
        loop {
            let deadline = match (writer.flush_deadline(), writer.digest_deadline()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let age_timer = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.revoke.cancelled() => {
                    tracing::info!(topic = %self.topic, partition = self.partition, buffered = writer.buffered(), "worker stopped (revoked)");
                    return;
                }
                _ = self.shutdown.cancelled() => {
                    // Flush what is buffered and leave what is still queued: it is not
                    // committed, so the next owner reads it again. Draining the queue (up to
                    // `kafka.max_queued_bytes`) made a stop take a flush per segment's worth of
                    // backlog, past the pod's grace period on a slow backend.
                    if self.flush_and_commit(&mut writer).await {
                        // Sign what this owner made durable, so the next one starts clean.
                        self.digest(&mut writer, true).await;
                    }
                    return;
                }
                inbound = rx.recv() => {
                    let Some(inbound) = inbound else { return };
                    let now = Instant::now();
                    if !self.admit(&mut writer, inbound, &mut min_generation, &mut log_end_check, now).await {
                        return;
                    }
                    // What is queued already, without a trip round the select per record (its
                    // cancellation futures register and deregister at every poll). A batch is
                    // a fraction of a millisecond of work, so a revocation or the age timer
                    // waits no longer than that.
                    for _ in 1..WORKER_BATCH {
                        // A revoked or stopping worker takes no more: the select's arms handle it.
                        if self.revoke.is_cancelled() || self.shutdown.is_cancelled() {
                            break;
                        }
                        let Ok(inbound) = rx.try_recv() else { break };
                        if !self.admit(&mut writer, inbound, &mut min_generation, &mut log_end_check, now).await {
                            return;
                        }
                    }
                }
                _ = age_timer => {
                    if writer.should_flush(Instant::now()) && !self.flush_and_commit(&mut writer).await {
                        return;
                    }
                    if !self.digest(&mut writer, false).await {
                        return;
                    }
                }
            }
        }
    }

    /// Admits one record, flushing when a limit is reached; `false` when the worker must end.
    async fn admit(
        &self,
        writer: &mut PartitionWriter,
        inbound: Inbound,
        min_generation: &mut u64,
        log_end_check: &mut LogEndCheck,
        now: Instant,
    ) -> bool {
        self.took(&inbound);
        if inbound.generation < *min_generation {
            return true;
        }
        match writer.admit(inbound.offset, inbound.timestamp_ms, inbound.payload) {
            Ok(Admit::Appended) => {
                log_end_check.run_ended();
                !writer.should_flush(now) || (self.flush_and_commit(writer).await && self.digest(writer, false).await)
            }
            Ok(Admit::AlreadyChained) => {
                metrics::already_chained(self.partition);
                // Checked again when records arrive below the head: the log may have been
                // recreated since the worker started, and the skip must not be silent. (Without
                // a durable head there is nothing to check, and the check is not used up.)
                if writer.durable_head().is_some() && log_end_check.due(Instant::now()) {
                    match self.log_reaches_head(writer).await {
                        Ok(answered) => log_end_check.checked(answered, Instant::now()),
                        Err(e) => {
                            self.stop(&e);
                            return false;
                        }
                    }
                }
                // A replay reached the durable head: commit past it, so the group's position
                // (and lag) reflect the trail without waiting for new data.
                // Not once revoked: the partition's offsets are the new owner's to commit.
                let at_head = writer.durable_head().is_some_and(|h| h.last_offset == inbound.offset);
                if at_head {
                    log_end_check.run_ended();
                }
                if at_head && !self.revoke.is_cancelled() {
                    if let Err(e) = self.committer.commit(self.partition, inbound.offset + 1).await {
                        tracing::warn!(error = %e, "offset commit failed");
                    }
                }
                true
            }
            Ok(Admit::SeekTo(offset)) => {
                *min_generation = inbound.generation + 1;
                let _ = self.commands.send(Command::Seek { partition: self.partition, offset });
                true
            }
            Err(e) => {
                self.stop(&e);
                false
            }
        }
    }

    /// Kafka's log must reach past the chain head. A topic deleted and recreated under the same
    /// name (or truncated by an unclean leader election) has records again at offsets the chain
    /// already holds, and each would be skipped as already chained: stop instead. `Ok(false)`:
    /// the broker did not answer (a warning says so), or the worker is ending.
    async fn log_reaches_head(&self, writer: &PartitionWriter) -> Result<bool, PartitionError> {
        let Some(head) = writer.durable_head() else { return Ok(true) };
        if !self.config.kafka.check_log_end {
            return Ok(true);
        }
        let asked = tokio::select! {
            _ = self.revoke.cancelled() => return Ok(false),
            _ = self.shutdown.cancelled() => return Ok(false),
            asked = self.committer.log_end(self.partition) => asked,
        };
        let end = match asked {
            Ok(end) => end,
            Err(e) => {
                tracing::warn!(error = %e, "could not check that the partition's log reaches the chain head");
                return Ok(false);
            }
        };
        match crate::partition::head_past_end(Some(head.last_offset), end) {
            Some(detail) => {
                Err(PartitionError::LogBehindChain { topic: self.topic.clone(), partition: self.partition, detail })
            }
            None => Ok(true),
        }
    }

    /// Flushes and commits; `false` when the worker must end.
    async fn flush_and_commit(&self, writer: &mut PartitionWriter) -> bool {
        match writer.flush(&self.revoke).await {
            // Revoked while the flush finished: it is durable, and the partition's offsets are
            // the new owner's to commit now.
            Ok(Some(_)) if self.revoke.is_cancelled() => false,
            Ok(Some(flushed)) => {
                if let Err(e) = self.committer.commit(self.partition, flushed.commit_offset).await {
                    // Durable already; the next commit (or the chain head on restart) covers it.
                    tracing::warn!(error = %e, "offset commit failed");
                }
                true
            }
            Ok(None) => true,
            Err(PartitionError::Cancelled(_)) => false,
            Err(e) => {
                self.stop(&e);
                false
            }
        }
    }

    /// Writes a digest when one is due (or whenever there is something to sign, if `now`);
    /// `false` when the worker must end.
    async fn digest(&self, writer: &mut PartitionWriter, now: bool) -> bool {
        if !now && !writer.digest_due(Instant::now()) {
            return true;
        }
        match writer.write_digest(&self.revoke).await {
            Ok(_) => true,
            Err(PartitionError::Cancelled(_)) => false,
            Err(e) => {
                self.stop(&e);
                false
            }
        }
    }

    fn stop(&self, error: &PartitionError) {
        if error.is_fence_lost() {
            metrics::fence_lost();
            tracing::error!(topic = %self.topic, partition = self.partition, %error, "lost the partition's fence; this worker stops writing it");
            // Another writer extended the chain: a revoked owner's last flush landing after this
            // worker read the head, or a zombie. What it wrote is durable and linked; a new worker
            // continues from the head it left (fenced like any other), or is revoked meanwhile.
            let (commands, partition, worker) = (self.commands.clone(), self.partition, self.queued.clone());
            let (revoke, shutdown) = (self.revoke.clone(), self.shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = revoke.cancelled() => {}
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(FENCE_RESTART_DELAY) => {
                        let _ = commands.send(Command::Restart { partition, worker });
                    }
                }
            });
            return;
        }
        if let PartitionError::Sink(conflict @ SinkError::Conflict { .. }) = error {
            // Found by comparing what is stored, not by a backend call's retry loop, so counted
            // here (AegisBackendFatalErrors).
            metrics::backend_error(conflict);
        }
        self.stopped.store(true, Ordering::Relaxed);
        metrics::partition_stopped(self.partition, &error.to_string());
        let _ = self.commands.send(Command::Stopped { partition: self.partition, worker: self.queued.clone() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_end_is_checked_once_per_run_below_the_head_and_retried_when_unanswered() {
        let t0 = Instant::now();
        let mut check = LogEndCheck::default();
        assert!(check.due(t0), "the first record below the head is checked");
        check.checked(true, t0);
        assert!(!check.due(t0 + Duration::from_secs(60)), "not again within the same run");
        check.run_ended();
        assert!(check.due(t0), "a record past the head (or at it) ends the run: the next one below it is checked");
        check.checked(false, t0);
        assert!(!check.due(t0 + LOG_END_RETRY / 2), "an unanswered check waits before asking again");
        assert!(check.due(t0 + LOG_END_RETRY), "and is not given up");
    }

    #[test]
    fn operator_properties_override_defaults() {
        let mut config = Config::from_toml_str(
            "[kafka]\nbrokers = \"b:1\"\ntopic = \"t\"\n[kafka.properties]\n\"statistics.interval.ms\" = \"1000\"\n\"linger.ms\" = \"20\"\n[s3]\nbucket = \"bkt\"\n[dynamodb]\ntable = \"idx\"\nchain_table = \"chn\"\n",
        )
        .unwrap();
        config.kafka.group_id = "g".into();
        let consumer = consumer_config(&config);
        assert_eq!(consumer.get("statistics.interval.ms"), Some("1000"));
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        assert_eq!(consumer.get("group.id"), Some("g"));
        let producer = producer_config(&config, 30_000);
        assert_eq!(producer.get("linger.ms"), Some("20"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("bootstrap.servers"), Some("b:1"));
    }

    #[test]
    fn a_paused_partition_resumes_once_its_worker_moves_or_empties() {
        let resume_at = 1000;
        // Stalled (nothing taken since the pause) with little queued: stays paused.
        assert!(!may_resume(500, resume_at, 7, 7));
        // Taking again, down to the mark: resumes.
        assert!(may_resume(500, resume_at, 8, 7));
        assert!(may_resume(1000, resume_at, 8, 7));
        // Above the mark: not yet, however fast it takes.
        assert!(!may_resume(1001, resume_at, 9, 7));
        // Empty: nothing to wait for.
        assert!(may_resume(0, resume_at, 7, 7));
    }

    #[test]
    fn payloads_share_chunks_and_keep_their_bytes() {
        let mut arena = PayloadArena::default();
        let records: Vec<Vec<u8>> =
            (0..2_000u32).map(|i| format!("{{\"n\":{i}}}").repeat(1 + i as usize % 40).into_bytes()).collect();
        let copies: Vec<bytes::Bytes> = records.iter().map(|r| arena.copy(r)).collect();
        for (copy, record) in copies.iter().zip(&records) {
            assert_eq!(copy.as_ref(), record.as_slice());
        }
        // Consecutive small payloads sit back to back in one allocation, until a chunk fills.
        let adjacent = copies.windows(2).filter(|w| w[0].as_ptr() as usize + w[0].len() == w[1].as_ptr() as usize);
        let total: usize = records.iter().map(Vec::len).sum();
        assert!(adjacent.count() >= copies.len() - 1 - total / PayloadArena::CHUNK - 1);
        // Dropping the first copies frees nothing the later ones use.
        let kept = copies[1_000..].to_vec();
        drop(copies);
        assert!(kept.iter().zip(&records[1_000..]).all(|(c, r)| c.as_ref() == r.as_slice()));
        // A large payload is its own allocation and leaves the chunk alone.
        let big = vec![7u8; PayloadArena::CHUNK];
        let before = arena.copy(b"a");
        assert_eq!(arena.copy(&big).as_ref(), big.as_slice());
        let after = arena.copy(b"b");
        assert_eq!(before.as_ptr() as usize + 1, after.as_ptr() as usize);
    }
}
