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

pub const RECORDS_CONSUMED: &str = "aegis_records_consumed_total";
pub const RECORDS_REJECTED: &str = "aegis_records_rejected_total";
pub const RECORDS_DEAD_LETTERED: &str = "aegis_records_dead_lettered_total";
pub const CONSUMER_LAG: &str = "aegis_consumer_lag";
pub const RECORDS_SKIPPED: &str = "aegis_records_already_chained_total";
pub const RECORDS_WRITTEN: &str = "aegis_records_written_total";
pub const SAFETY_FLAGS: &str = "aegis_safety_flags_total";
pub const SEGMENTS_WRITTEN: &str = "aegis_segments_written_total";
pub const SEGMENT_BYTES: &str = "aegis_segment_bytes_total";
pub const INDEX_ITEMS: &str = "aegis_index_items_written_total";
pub const DECISION_CONFLICTS: &str = "aegis_decision_conflicts_total";
pub const DIGESTS_WRITTEN: &str = "aegis_digests_written_total";
pub const DIGEST_SEQ: &str = "aegis_digest_seq";
pub const DIGEST_INTERVAL: &str = "aegis_digest_interval_seconds";
pub const FLUSH_SECONDS: &str = "aegis_flush_duration_seconds";
pub const COMMIT_SECONDS: &str = "aegis_commit_duration_seconds";
pub const COMMITS: &str = "aegis_offset_commits_total";
pub const COMMIT_FAILURES: &str = "aegis_offset_commit_failures_total";
pub const BACKEND_ERRORS: &str = "aegis_backend_errors_total";
pub const BACKEND_UP: &str = "aegis_backend_up";
pub const CHAIN_HEAD_OFFSET: &str = "aegis_chain_head_offset";
pub const COMMITTED_OFFSET: &str = "aegis_committed_offset";
pub const PARTITIONS_ASSIGNED: &str = "aegis_partitions_assigned";
pub const PARTITIONS_PAUSED: &str = "aegis_partitions_paused";
pub const PARTITIONS_STOPPED: &str = "aegis_partitions_stopped";
pub const FENCE_LOST: &str = "aegis_fence_lost_total";
pub const KAFKA_ERRORS: &str = "aegis_kafka_errors_total";
pub const OFFSETS_MISSING: &str = "aegis_offsets_missing_in_kafka_total";
pub const REBALANCES: &str = "aegis_rebalances_total";
pub const QUEUED_BYTES: &str = "aegis_queued_bytes";
pub const QUEUE_LIMIT_BYTES: &str = "aegis_queue_limit_bytes";

/// Process-wide readiness inputs.
struct Health {
    in_group: AtomicBool,
    failing_backends: AtomicI64,
    /// Partitions this process owns whose worker stopped: a set, so a partition that moves to
    /// another instance, or gets a new worker here, stops counting.
    stopped_partitions: std::sync::Mutex<std::collections::BTreeSet<i32>>,
}

static HEALTH: Health = Health {
    in_group: AtomicBool::new(false),
    failing_backends: AtomicI64::new(0),
    stopped_partitions: std::sync::Mutex::new(std::collections::BTreeSet::new()),
};

fn stopped_partitions() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<i32>> {
    HEALTH.stopped_partitions.lock().unwrap_or_else(|e| e.into_inner())
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
    counter!(OFFSETS_MISSING, "partition" => partition.to_string()).increment(count);
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

    /// Every metric the service exports (the constants above).
    const EXPORTED: &[&str] = &[
        RECORDS_CONSUMED,
        RECORDS_REJECTED,
        RECORDS_DEAD_LETTERED,
        CONSUMER_LAG,
        RECORDS_SKIPPED,
        RECORDS_WRITTEN,
        SAFETY_FLAGS,
        SEGMENTS_WRITTEN,
        SEGMENT_BYTES,
        INDEX_ITEMS,
        DECISION_CONFLICTS,
        DIGESTS_WRITTEN,
        DIGEST_SEQ,
        DIGEST_INTERVAL,
        FLUSH_SECONDS,
        COMMIT_SECONDS,
        COMMITS,
        COMMIT_FAILURES,
        BACKEND_ERRORS,
        BACKEND_UP,
        CHAIN_HEAD_OFFSET,
        COMMITTED_OFFSET,
        PARTITIONS_ASSIGNED,
        PARTITIONS_PAUSED,
        PARTITIONS_STOPPED,
        FENCE_LOST,
        KAFKA_ERRORS,
        OFFSETS_MISSING,
        REBALANCES,
        QUEUED_BYTES,
        QUEUE_LIMIT_BYTES,
    ];

    /// A renamed metric must not leave an alert that never fires, a panel that stays empty or a
    /// runbook step that points at nothing.
    #[test]
    fn alerts_dashboard_and_docs_name_only_exported_metrics() {
        let histogram_series = [FLUSH_SECONDS, COMMIT_SECONDS]
            .iter()
            .flat_map(|h| ["_bucket", "_count", "_sum"].map(|suffix| format!("{h}{suffix}")))
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
                    EXPORTED.contains(&name.as_str()) || histogram_series.contains(&name),
                    "{file} names {name}, which the service does not export"
                );
            }
            assert!(named > 0, "{file}: no metric names found");
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
