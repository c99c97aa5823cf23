//! Every metric name in one place, helpers that record them, and the HTTP endpoint serving
//! `/metrics` (Prometheus text), `/healthz` (process alive) and `/readyz` (in the group and every
//! backend reachable).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::decode::{DecisionEvent, EventType, RejectReason};
use crate::index::IndexReport;
use crate::segment::EncodedSegment;
use crate::sinks::SinkError;

/// Defines each metric's name constant and lists it, with its kind and help text, in
/// [`CATALOGUE`]: one entry per metric, so a new one cannot be left out of `# HELP` or the docs test.
macro_rules! metric_catalogue {
    ($($constant:ident = $kind:ident $name:literal: $help:literal;)*) => {
        $(pub const $constant: &str = $name;)*
        /// Every metric the service exports: name, kind, help.
        pub const CATALOGUE: &[(&str, Kind, &str)] = &[$(($name, Kind::$kind, $help)),*];
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

metric_catalogue! {
    RECORDS_CONSUMED = Counter "aegis_records_consumed_total": "Records read from Kafka (accepted or rejected), per partition.";
    RECORDS_REJECTED = Counter "aegis_records_rejected_total": "Records that failed decoding or validation, by partition and reason code.";
    RECORDS_DEAD_LETTERED = Counter "aegis_records_dead_lettered_total": "Rejected records written to the dead-letter topic and quarantine, per partition.";
    CONSUMER_LAG = Gauge "aegis_consumer_lag": "Last stable offset minus the committed offset, per partition (librdkafka statistics).";
    RECORDS_SKIPPED = Counter "aegis_records_already_chained_total": "Records re-read at or below the chain head and skipped, per partition.";
    RECORDS_WRITTEN = Counter "aegis_records_written_total": "Records durable in S3 and the index, per partition.";
    SAFETY_FLAGS = Counter "aegis_safety_flags_total": "Safety-flag events consumed, by environment and severity.";
    SEGMENTS_WRITTEN = Counter "aegis_segments_written_total": "Parquet segments written to S3.";
    SEGMENT_BYTES = Counter "aegis_segment_bytes_total": "Bytes of Parquet segments written to S3.";
    INDEX_ITEMS = Counter "aegis_index_items_written_total": "DynamoDB index items written.";
    DECISION_CONFLICTS = Counter "aegis_decision_conflicts_total": "Decision ids met again with other content by the index.";
    DIGESTS_WRITTEN = Counter "aegis_digests_written_total": "Signed chain digests written.";
    DIGEST_SEQ = Gauge "aegis_digest_seq": "Sequence number of the newest digest, per partition.";
    DIGEST_INTERVAL = Gauge "aegis_digest_interval_seconds": "Configured digest interval in seconds (0: digests off).";
    FLUSH_SECONDS = Histogram "aegis_flush_duration_seconds": "Time to make a flush durable: encode, S3, index and chain head.";
    COMMIT_SECONDS = Histogram "aegis_commit_duration_seconds": "Time to commit offsets to Kafka.";
    COMMITS = Counter "aegis_offset_commits_total": "Offset commits to Kafka.";
    COMMIT_FAILURES = Counter "aegis_offset_commit_failures_total": "Offset commits Kafka refused or failed (the trail is unaffected).";
    BACKEND_ERRORS = Counter "aegis_backend_errors_total": "Backend operation failures, by backend and kind.";
    BACKEND_UP = Gauge "aegis_backend_up": "1 when no backend operation is failing, 0 during a failure streak.";
    CHAIN_HEAD_OFFSET = Gauge "aegis_chain_head_offset": "Offset of the newest durable chain entry, per partition.";
    COMMITTED_OFFSET = Gauge "aegis_committed_offset": "Offset last committed to Kafka (the next one to read), per partition.";
    PARTITIONS_ASSIGNED = Gauge "aegis_partitions_assigned": "Partitions assigned to this instance.";
    PARTITIONS_PAUSED = Gauge "aegis_partitions_paused": "Partitions paused because their worker is stalled (a flush retrying a backend).";
    PARTITIONS_STOPPED = Gauge "aegis_partitions_stopped": "Partitions whose worker stopped; operator action needed.";
    FENCE_LOST = Counter "aegis_fence_lost_total": "Workers stopped because another owner holds their chain head.";
    KAFKA_ERRORS = Counter "aegis_kafka_errors_total": "Consumer-side Kafka errors, by kind.";
    OFFSETS_MISSING = Counter "aegis_offsets_missing_in_kafka_total": "Offsets Kafka did not deliver, per partition and gap size (one: a transaction marker; several: deletion, compaction, aborted transactions).";
    REBALANCES = Counter "aegis_rebalances_total": "Rebalance events received (assignments and revocations).";
    QUEUED_BYTES = Gauge "aegis_queued_bytes": "Bytes of records queued for the workers, by state (flowing, paused).";
    QUEUE_LIMIT_BYTES = Gauge "aegis_queue_limit_bytes": "Bytes the flowing queues may hold now.";
}

/// Process-wide readiness inputs.
struct Health {
    /// The start-up check `run` is waiting on (a backend that does not answer), if any.
    start_up_wait: std::sync::Mutex<Option<String>>,
    in_group: AtomicBool,
    failing_backends: AtomicI64,
    /// Partitions this process owns whose worker stopped: a set, so a partition that moves to
    /// another instance, or gets a new worker here, stops counting.
    stopped_partitions: std::sync::Mutex<std::collections::BTreeSet<i32>>,
}

static HEALTH: Health = Health {
    start_up_wait: std::sync::Mutex::new(None),
    in_group: AtomicBool::new(false),
    failing_backends: AtomicI64::new(0),
    stopped_partitions: std::sync::Mutex::new(std::collections::BTreeSet::new()),
};

fn stopped_partitions() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<i32>> {
    HEALTH.stopped_partitions.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn set_start_up_wait(waiting_on: Option<String>) {
    *HEALTH.start_up_wait.lock().unwrap_or_else(|e| e.into_inner()) = waiting_on;
}

pub fn set_in_group(joined: bool) {
    HEALTH.in_group.store(joined, Ordering::SeqCst);
}

/// Called by the retry loop: `false` when a failure streak starts, `true` when it recovers.
pub fn set_backend_up(up: bool) {
    let failing = if up {
        HEALTH.failing_backends.fetch_sub(1, Ordering::SeqCst) - 1
    } else {
        HEALTH.failing_backends.fetch_add(1, Ordering::SeqCst) + 1
    };
    gauge!(BACKEND_UP).set(if failing <= 0 { 1.0 } else { 0.0 });
}

/// A partition's worker stopped (fatal error, or a panic): logged by the worker at once, counted
/// by the dispatcher with [`mark_stopped`] while the partition is still that worker's.
pub fn partition_stopped(partition: i32, reason: &str) {
    tracing::error!(partition, reason, "partition stopped; operator action needed (see ops/RUNBOOK.md)");
}

pub fn mark_stopped(partition: i32) {
    let mut stopped = stopped_partitions();
    stopped.insert(partition);
    gauge!(PARTITIONS_STOPPED).set(stopped.len() as f64);
}

/// The partition was revoked, or got a new worker: whatever stopped it is no longer this
/// process's to report.
pub fn partition_released(partition: i32) {
    let mut stopped = stopped_partitions();
    if stopped.remove(&partition) {
        gauge!(PARTITIONS_STOPPED).set(stopped.len() as f64);
    }
}

pub fn is_ready() -> Result<(), String> {
    if let Some(waiting_on) = HEALTH.start_up_wait.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return Err(format!("start-up check waiting for a backend: {waiting_on}"));
    }
    if !HEALTH.in_group.load(Ordering::SeqCst) {
        return Err("not (yet) a member of the consumer group".into());
    }
    let failing = HEALTH.failing_backends.load(Ordering::SeqCst);
    if failing > 0 {
        return Err(format!("{failing} backend operation(s) failing and being retried"));
    }
    let stopped = stopped_partitions().len();
    if stopped > 0 {
        return Err(format!("{stopped} partition(s) stopped"));
    }
    Ok(())
}

/// One partition's per-record counter, looked up once: a registry lookup per record (label
/// strings built, hashed, found under a lock) is a measurable share of the hot path.
#[derive(Clone)]
pub struct RecordCounter {
    partition: i32,
    consumed: metrics::Counter,
}

impl RecordCounter {
    pub fn new(partition: i32) -> Self {
        // From 0, so the first gap shows as an increase (a series born at its first increment
        // hides it from `increase()`, and AegisOffsetsSkipped would miss it).
        counter!(OFFSETS_MISSING, "partition" => partition.to_string(), "gap" => "several").increment(0);
        Self { partition, consumed: counter!(RECORDS_CONSUMED, "partition" => partition.to_string()) }
    }

    pub fn record_consumed(&self, outcome: &Result<DecisionEvent, RejectReason>) {
        self.consumed.increment(1);
        match outcome {
            Ok(event) if event.event_type == EventType::SafetyFlag => {
                let severity = event.severity().unwrap_or_default().to_string();
                counter!(SAFETY_FLAGS, "environment" => event.environment().to_string(), "severity" => severity)
                    .increment(1);
            }
            Ok(_) => {}
            Err(reason) => {
                counter!(RECORDS_REJECTED, "partition" => self.partition.to_string(), "reason" => reason.code())
                    .increment(1)
            }
        }
    }
}

pub fn dead_lettered(partition: i32, records: usize) {
    counter!(RECORDS_DEAD_LETTERED, "partition" => partition.to_string()).increment(records as u64);
}

pub fn consumer_lag(partition: i32, lag: i64) {
    gauge!(CONSUMER_LAG, "partition" => partition.to_string()).set(lag as f64);
}

pub fn already_chained(partition: i32) {
    counter!(RECORDS_SKIPPED, "partition" => partition.to_string()).increment(1);
}

pub fn flushed(partition: i32, records: usize, segments: &[EncodedSegment], index: IndexReport, elapsed: Duration) {
    let p = partition.to_string();
    counter!(RECORDS_WRITTEN, "partition" => p.clone()).increment(records as u64);
    counter!(SEGMENTS_WRITTEN).increment(segments.len() as u64);
    counter!(SEGMENT_BYTES).increment(segments.iter().map(|s| s.body.len() as u64).sum());
    counter!(INDEX_ITEMS).increment(index.items as u64);
    counter!(DECISION_CONFLICTS).increment(index.conflicts as u64);
    histogram!(FLUSH_SECONDS).record(elapsed.as_secs_f64());
    if let Some(last) = segments.iter().map(|s| s.last_offset).max() {
        gauge!(CHAIN_HEAD_OFFSET, "partition" => p).set(last as f64);
    }
}

pub fn digest_written(partition: i32, seq: u64) {
    counter!(DIGESTS_WRITTEN).increment(1);
    gauge!(DIGEST_SEQ, "partition" => partition.to_string()).set(seq as f64);
}

pub fn committed(partition: i32, offset: i64, elapsed: Duration) {
    counter!(COMMITS).increment(1);
    histogram!(COMMIT_SECONDS).record(elapsed.as_secs_f64());
    gauge!(COMMITTED_OFFSET, "partition" => partition.to_string()).set(offset as f64);
}

pub fn commit_failed() {
    counter!(COMMIT_FAILURES).increment(1);
}

pub fn backend_error(err: &SinkError) {
    let backend = match err {
        SinkError::Transient { backend, .. } | SinkError::Fatal { backend, .. } => *backend,
        SinkError::FenceLost { .. } => "dynamodb",
        SinkError::Conflict { .. } => "s3",
    };
    counter!(BACKEND_ERRORS, "backend" => backend, "kind" => err.kind()).increment(1);
}

/// A worker stopped because another owner holds its partition's chain head.
pub fn fence_lost() {
    counter!(FENCE_LOST).increment(1);
    counter!(BACKEND_ERRORS, "backend" => "dynamodb", "kind" => "fence_lost").increment(1);
}

/// A consumer-side Kafka error (broker down, transport); librdkafka reconnects by itself.
pub fn kafka_error(kind: &'static str) {
    counter!(KAFKA_ERRORS, "kind" => kind).increment(1);
}

/// Offsets the chain skipped because Kafka does not have them (markers, compaction, retention).
pub fn offsets_missing(partition: i32, count: u64) {
    // A gap of one offset is what a transaction's commit marker leaves; more is records gone.
    let gap = if count == 1 { "one" } else { "several" };
    counter!(OFFSETS_MISSING, "partition" => partition.to_string(), "gap" => gap).increment(count);
}

pub fn assigned(count: usize) {
    gauge!(PARTITIONS_ASSIGNED).set(count as f64);
    counter!(REBALANCES).increment(1);
}

/// The records queued for the workers (`state` flowing or paused) and what the flowing ones may
/// hold now (`kafka.max_queued_bytes` less what paused partitions hold, down to an eighth).
pub fn queues(flowing: usize, paused: usize, flowing_limit: usize) {
    gauge!(QUEUED_BYTES, "state" => "flowing").set(flowing as f64);
    gauge!(QUEUED_BYTES, "state" => "paused").set(paused as f64);
    gauge!(QUEUE_LIMIT_BYTES).set(flowing_limit as f64);
}

pub fn paused(delta: f64) {
    gauge!(PARTITIONS_PAUSED).increment(delta);
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Series alerts compare against, present from start-up (a counter that first appears at its
/// first increment hides that increment from `increase()`).
pub fn describe_run(digest_interval_secs: Option<f64>) {
    gauge!(DIGEST_INTERVAL).set(digest_interval_secs.unwrap_or(0.0));
    counter!(FENCE_LOST).absolute(0);
    counter!(COMMIT_FAILURES).absolute(0);
}

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may exist in tests; ours still renders what it was given.
            let _ = metrics::set_global_recorder(recorder);
            for &(name, kind, help) in CATALOGUE {
                match kind {
                    Kind::Counter => metrics::describe_counter!(name, help),
                    Kind::Gauge => metrics::describe_gauge!(name, help),
                    Kind::Histogram => metrics::describe_histogram!(name, help),
                }
            }
            gauge!(BACKEND_UP).set(1.0);
            handle
        })
        .clone()
}

/// Serves `/metrics`, `/healthz`, `/readyz` until `shutdown` fires.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| std::future::ready("ok\n")))
        .route(
            "/readyz",
            get(|| {
                std::future::ready(match is_ready() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                })
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A renamed metric must not leave an alert that never fires, a panel that stays empty or a
    /// runbook step that points at nothing.
    #[test]
    fn alerts_dashboard_and_docs_name_only_exported_metrics() {
        let histogram_series = CATALOGUE
            .iter()
            .filter(|(_, kind, _)| *kind == Kind::Histogram)
            .flat_map(|(h, ..)| ["_bucket", "_count", "_sum"].map(|suffix| format!("{h}{suffix}")))
            .collect::<Vec<_>>();
        for (file, text) in [
            ("ops/prometheus/alerts.yml", include_str!("../ops/prometheus/alerts.yml")),
            ("ops/grafana/dashboard.json", include_str!("../ops/grafana/dashboard.json")),
            ("ops/RUNBOOK.md", include_str!("../ops/RUNBOOK.md")),
            ("README.md", include_str!("../README.md")),
            ("ops/k8s/README.md", include_str!("../ops/k8s/README.md")),
        ] {
            let mut named = 0;
            for (at, _) in text.match_indices("aegis_") {
                let name: String = text[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                // Part of a longer word, `aegis_*` in a comment, or the Athena database: not
                // metric names.
                if name == "aegis_"
                    || name == "aegis_audit"
                    || text[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    continue;
                }
                named += 1;
                assert!(
                    CATALOGUE.iter().any(|(exported, ..)| *exported == name) || histogram_series.contains(&name),
                    "{file} names {name}, which the service does not export"
                );
            }
            assert!(named > 0, "{file}: no metric names found");
        }
    }

    /// Operators read what a series means from the scrape itself.
    #[test]
    fn the_scrape_carries_help_for_what_it_exports() {
        let handle = install();
        consumer_lag(990_002, 0);
        let scrape = handle.render();
        for name in [BACKEND_UP, CONSUMER_LAG] {
            let (_, _, help) = CATALOGUE.iter().find(|(n, ..)| *n == name).unwrap();
            assert!(scrape.contains(&format!("# HELP {name} {help}\n")), "{name} has no help in:\n{scrape}");
        }
    }

    #[test]
    fn a_stopped_partition_counts_once_until_it_is_released() {
        let partition = 990_001; // a number no other test uses: the set is process-wide
        let count = || stopped_partitions().iter().filter(|&&p| p == partition).count();
        mark_stopped(partition);
        mark_stopped(partition);
        assert_eq!(count(), 1);
        partition_released(partition);
        assert_eq!(count(), 0);
    }
}
