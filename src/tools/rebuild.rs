//! `rebuild-index`: restores the DynamoDB index from the segments in S3 (the trail is the
//! source of truth; the index is derived). Parallel, idempotent and resumable: the items are
//! the ones the consumer writes (`index::item_for`), decisions go through the same
//! order-independent winner rule, and finished segments are checkpointed to a local file.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use chrono::NaiveDate;
use futures::stream::{self, StreamExt};
use serde::Serialize;

use crate::chain::{parse_hash, Link};
use crate::config::Config;
use crate::index;
use crate::retry::{retry, RetryError};
use crate::segment::{read_segment, ChainedRecord};
use crate::sinks::{IndexStore, ObjectStore, SinkError};

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Store(#[from] SinkError),
    /// A non-retryable backend error (transient ones are retried with backoff).
    #[error(transparent)]
    Backend(#[from] RetryError),
    #[error("{key}: not a readable segment: {message}")]
    Segment { key: String, message: String },
    #[error("checkpoint {path}: {source}")]
    Checkpoint { path: String, source: std::io::Error },
    #[error(
        "checkpoint {path} belongs to another rebuild ({found}, this one is {expected}): delete it, or pass another --checkpoint"
    )]
    CheckpointOfAnotherRebuild { path: String, found: String, expected: String },
}

#[derive(Debug, Clone)]
pub struct RebuildOptions {
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    pub environment: Option<String>,
    pub concurrency: usize,
    /// Finished segment keys, one per line; present after an interrupted run.
    pub checkpoint: PathBuf,
    pub progress: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct RebuildReport {
    pub segments: usize,
    pub resumed_past: usize,
    pub records: usize,
    pub items: usize,
    pub conflicts: usize,
    /// Accepted rows that fail today's validation settings (not indexed; listed in the log).
    pub no_longer_valid: usize,
    pub seconds: f64,
}

/// `(date, environment)` of `topic`'s trail key `<prefix>/year=/month=/day=/environment=/<file>.parquet`.
/// Another topic's segments under the same prefix belong to another deployment's index.
fn placement(prefix: &str, topic: &str, key: &str) -> Option<(NaiveDate, String)> {
    let directory = crate::segment::trail_directory(prefix, key)?;
    let parts: Vec<&str> = directory.split('/').collect();
    let [y, m, d, e] = parts.as_slice() else { return None };
    crate::segment::parse_segment_key(key, topic)?;
    let num = |part: &str, name: &str| part.strip_prefix(name)?.parse::<u32>().ok();
    let date = NaiveDate::from_ymd_opt(num(y, "year=")? as i32, num(m, "month=")?, num(d, "day=")?)?;
    Some((date, e.strip_prefix("environment=")?.to_string()))
}

/// How a checkpoint's first line starts.
const CHECKPOINT_HEADER: &str = "# aegis-audit rebuild-index: ";

/// A checkpoint's first line: what its segment keys were indexed into. A rebuild into another
/// table (or from another bucket, prefix or topic) must not skip what this one finished.
fn checkpoint_header(config: &Config) -> String {
    format!(
        "{CHECKPOINT_HEADER}bucket={} prefix={} topic={} table={}",
        config.s3.bucket,
        crate::segment::join_key(&[&config.s3.prefix]),
        config.kafka.topic,
        config.dynamodb.table
    )
}

/// The segment keys a checkpoint lists as done; none for an absent or empty file.
fn read_checkpoint(path: &PathBuf, header: &str) -> Result<HashSet<String>, RebuildError> {
    let io = |source| RebuildError::Checkpoint { path: path.display().to_string(), source };
    let lines = match std::fs::File::open(path) {
        Ok(f) => std::io::BufReader::new(f).lines().collect::<Result<Vec<_>, _>>().map_err(io)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(io(source)),
    };
    match lines.split_first() {
        None => Ok(HashSet::new()),
        Some((first, done)) if first == header => Ok(done.iter().cloned().collect()),
        Some((first, _)) => Err(RebuildError::CheckpointOfAnotherRebuild {
            path: path.display().to_string(),
            found: first.strip_prefix(CHECKPOINT_HEADER).unwrap_or("no header").to_string(),
            expected: header.trim_start_matches(CHECKPOINT_HEADER).to_string(),
        }),
    }
}

pub async fn rebuild(
    config: &Config,
    objects: Arc<dyn ObjectStore>,
    index: Arc<dyn IndexStore>,
    options: &RebuildOptions,
) -> Result<RebuildReport, RebuildError> {
    let started = Instant::now();
    let prefix = config.s3.prefix.clone();
    let header = checkpoint_header(config);
    let done = read_checkpoint(&options.checkpoint, &header)?;
    let mut report = RebuildReport::default();
    let trail = crate::segment::dir_prefix(&[&prefix]) + "year=";
    let never = tokio_util::sync::CancellationToken::new();
    let keys: Vec<String> = retry(&trail, &config.retry, &never, |_| {}, || objects.list(&trail))
        .await?
        .into_iter()
        .filter_map(|o| {
            let (date, env) = placement(&prefix, &config.kafka.topic, &o.key)?;
            let wanted = options.from.is_none_or(|f| date >= f)
                && options.to.is_none_or(|t| date <= t)
                && options.environment.as_ref().is_none_or(|e| e == &env);
            wanted.then_some(o.key)
        })
        .collect();
    report.resumed_past = keys.iter().filter(|k| done.contains(*k)).count();
    let todo: Vec<String> = keys.into_iter().filter(|k| !done.contains(k)).collect();
    let bar = crate::verify::progress_bar(options.progress, todo.len() as u64, "rebuilding from");
    let mut checkpoint = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&options.checkpoint)
        .map_err(|source| RebuildError::Checkpoint { path: options.checkpoint.display().to_string(), source })?;
    if done.is_empty() && checkpoint.metadata().map(|m| m.len() == 0).unwrap_or(true) {
        writeln!(checkpoint, "{header}")
            .map_err(|source| RebuildError::Checkpoint { path: options.checkpoint.display().to_string(), source })?;
    }
    let write_concurrency = config.dynamodb.write_concurrency;
    let mut results = stream::iter(todo)
        .map(|key| {
            let (objects, index) = (objects.clone(), index.clone());
            async move {
                // Transient S3/DynamoDB errors are retried with backoff, as in the consumer.
                let never = tokio_util::sync::CancellationToken::new();
                let body = retry(&key, &config.retry, &never, |_| {}, || objects.get(&key)).await?;
                let segment = read_segment(body)
                    .map_err(|message| RebuildError::Segment { key: key.clone(), message })?;
                let mut items = Vec::new();
                let mut invalid = 0;
                let records = segment.rows.len();
                for row in segment.rows {
                    let (Some(prev_hash), Some(entry_hash)) = (parse_hash(&row.prev_hash), parse_hash(&row.entry_hash))
                    else {
                        return Err(RebuildError::Segment { key, message: format!("offset {}: bad hashes", row.offset) });
                    };
                    let outcome = crate::decode::decode(Some(&row.payload), row.kafka_timestamp_ms, &config.validation);
                    if let Err(reason) = &outcome {
                        tracing::warn!(%key, offset = row.offset, %reason, "accepted row fails today's validation; not indexed");
                        invalid += 1;
                    }
                    let record = ChainedRecord {
                        offset: row.offset,
                        kafka_timestamp_ms: row.kafka_timestamp_ms,
                        payload: row.payload,
                        link: Link { prev_hash, entry_hash },
                        outcome,
                    };
                    items.extend(index::item_for(&row.topic, row.partition, &record, &key));
                }
                let written = retry(&key, &config.retry, &never, |_| {}, || {
                    index::write_items(index.as_ref(), items.clone(), write_concurrency)
                })
                .await?;
                Ok::<_, RebuildError>((key, records, written, invalid))
            }
        })
        .buffer_unordered(options.concurrency.max(1));
    while let Some(result) = results.next().await {
        let (key, records, written, invalid) = result?;
        writeln!(checkpoint, "{key}")
            .map_err(|source| RebuildError::Checkpoint { path: options.checkpoint.display().to_string(), source })?;
        report.segments += 1;
        report.records += records;
        report.items += written.items;
        report.conflicts += written.conflicts;
        report.no_longer_valid += invalid;
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Complete: a later rebuild starts from scratch.
    let _ = std::fs::remove_file(&options.checkpoint);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_reads_trail_keys_only() {
        let key = "trail/year=2026/month=11/day=20/environment=prod/t-p0000-00000000000000000000-00000000000000000009.parquet";
        assert_eq!(placement("trail", "t", key), Some((NaiveDate::from_ymd_opt(2026, 11, 20).unwrap(), "prod".into())));
        assert_eq!(placement("trail", "other", key), None, "another topic's segment");
        let quarantined =
            "trail/quarantine/year=2026/month=11/day=20/t-p0000-00000000000000000000-00000000000000000009.parquet";
        assert_eq!(placement("trail", "t", quarantined), None);
        assert_eq!(placement("trail", "t", "trail/_digests/t/p0000/000000000000.digest"), None);
        assert_eq!(placement("trail", "t", &key.replace(".parquet", ".tmp")), None);
    }

    #[test]
    fn a_checkpoint_of_another_rebuild_is_refused() {
        let dir = std::env::temp_dir().join(format!("aegis-checkpoint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c");
        let ours = "# aegis-audit rebuild-index: bucket=b prefix=trail topic=t table=new";
        assert!(read_checkpoint(&path, ours).unwrap().is_empty(), "absent: nothing done");
        std::fs::write(&path, format!("{ours}\ntrail/k1\ntrail/k2\n")).unwrap();
        assert_eq!(read_checkpoint(&path, ours).unwrap().len(), 2);
        let other = ours.replace("table=new", "table=old");
        let err = read_checkpoint(&path, &other).unwrap_err().to_string();
        assert!(err.contains("table=new") && err.contains("table=old") && err.contains("another rebuild"), "{err}");
        // A file without the header (an older image's, or not a checkpoint) is not resumed either.
        std::fs::write(&path, "trail/k1\n").unwrap();
        assert!(read_checkpoint(&path, ours).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn placement_reads_a_trail_at_the_bucket_root() {
        let key =
            "year=2026/month=11/day=20/environment=prod/t-p0000-00000000000000000000-00000000000000000009.parquet";
        assert_eq!(placement("", "t", key), Some((NaiveDate::from_ymd_opt(2026, 11, 20).unwrap(), "prod".into())));
        assert_eq!(placement("trail/", "t", &format!("trail/{key}")), placement("", "t", key));
    }
}
