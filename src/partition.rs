//! One topic-partition's ordered writer: decode → chain → buffer → flush protocol. It knows
//! nothing about Kafka; the source feeds it records and commits the offsets it returns.
//!
//! Flush protocol (the invariant: a Kafka offset is committed only when every record before it
//! is durable in S3 and the index, and a re-run never writes a row twice):
//! 1. `begin_flush`: record the intent `pending = (first, last, last_hash)` on the chain head,
//!    conditional on the head being the one this worker extended (fences zombies).
//! 2. Write the segment objects. Keys and bytes depend only on the records, so a re-run
//!    rewrites the same objects; an existing object with the same content is left alone.
//! 3. Upsert the index items (idempotent).
//! 4. `complete_flush`: advance the head to `(last, last_hash)`, conditional on the intent.
//! 5. The caller commits `last + 1` to Kafka (advisory: the head is authoritative).
//!
//! A worker that starts on a head with a pending intent re-cuts exactly that range and repeats
//! steps 2-4, so a crash at any point converges to the same objects, items and head.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;

use crate::budget::{self, BudgetShare, MemoryBudget};
use crate::chain::{Chain, ChainError, EntryStatus};
use crate::config::Config;
use crate::decode;
use crate::digest::{digest_key, DigestBody, DigestObject, DigestSigner, SegmentEntry};
use crate::index;
use crate::metrics;
use crate::retry::{retry, RetryError};
use crate::segment::{encode_flush, ChainedRecord, EncodedSegment, SegmentError};
use crate::sinks::dead_letter::{DeadLetter, DeadLetterSink};
use crate::sinks::{ChainHead, DigestPos, HeadPos, HeadStore, IndexStore, ObjectStore, PendingFlush, SinkError};

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The recorded intent cannot be reproduced from Kafka: the records changed or vanished.
    #[error("{topic}/{partition}: pending flush {first}..={last} cannot be reproduced ({detail}); refusing to fork the chain")]
    Irreproducible { topic: String, partition: i32, first: i64, last: i64, detail: String },
    /// A digest this writer would write does not follow the documented format: the chain
    /// table's list of undigested segments holds entries no writer made (edited by hand?).
    #[error(transparent)]
    Digest(#[from] crate::digest::DigestError),
    #[error("{0}: cancelled")]
    Cancelled(String),
    /// The chain table has no head for a partition whose trail already exists.
    #[error("{topic}/{partition}: the chain table has no head but the trail exists ({detail}); refusing to start a second chain from genesis. Restore the head (ops/RUNBOOK.md, \"Lost chain table\")")]
    HeadMissing { topic: String, partition: i32, detail: String },
    /// Kafka's log for the partition ends at or before the chain head: its records at offsets
    /// the chain already holds are not the ones chained.
    #[error("{topic}/{partition}: {detail}; stopping instead of skipping them")]
    LogBehindChain { topic: String, partition: i32, detail: String },
}

impl PartitionError {
    /// Whether the partition should stop (fence lost / fatal) rather than be retried by a restart.
    pub fn is_fence_lost(&self) -> bool {
        matches!(self, PartitionError::Sink(SinkError::FenceLost { .. }))
    }
}

impl From<RetryError> for PartitionError {
    fn from(e: RetryError) -> Self {
        match e {
            RetryError::Sink(s) => PartitionError::Sink(s),
            RetryError::Cancelled { last } => PartitionError::Cancelled(last.to_string()),
        }
    }
}

/// A chain head at or past the end of the partition: Kafka has fewer records than the chain
/// holds, so the topic was deleted and recreated (or truncated), and every new record up to the
/// head would be skipped as already chained.
pub fn head_past_end(head: Option<i64>, end: i64) -> Option<String> {
    let head = head.filter(|&h| h >= end)?;
    Some(format!(
        "the chain head ({head}) is at or past the partition's end ({end}): the topic was recreated or truncated; \
         records up to {head} would be skipped as already chained (ops/RUNBOOK.md, \"Scale out and in\")"
    ))
}

/// Seeks to the chain head before an offset gap at start-up is accepted as Kafka's own.
const MAX_SEEKS: u32 = 3;
/// Undigested segments that trigger a digest before the interval (keeps the chain-table item
/// far below DynamoDB's 400 KB limit).
const MAX_UNDIGESTED: usize = 256;
/// Objects (Hive placements) one flush may write. A flush lists each in the chain-table item
/// (digest entries), so without a cap a backfill whose events span hundreds of days would push
/// that item past DynamoDB's 400 KB, and a recovery would repeat the same too-large flush. With
/// it the list holds at most MAX_UNDIGESTED - 1 + MAX_FLUSH_PLACEMENTS entries (~150 KB).
pub const MAX_FLUSH_PLACEMENTS: usize = 32;
/// Records whose index items are built and written at a time. As DynamoDB attribute maps a
/// record's item takes several times its payload, and the memory budget counts payloads: a
/// whole flush's items at once (and their copy for a retry) would be the largest thing in memory.
const INDEX_CHUNK_RECORDS: usize = if cfg!(test) { 4 } else { 512 };

/// The stores a flush writes to.
#[derive(Clone)]
pub struct Sinks {
    pub objects: Arc<dyn ObjectStore>,
    /// The decision index; `None` when `dynamodb.write_index = false`.
    pub index: Option<Arc<dyn IndexStore>>,
    pub heads: Arc<dyn HeadStore>,
    /// The dead-letter topic, when `kafka.dead_letter_topic` is set.
    pub dead_letters: Option<Arc<dyn DeadLetterSink>>,
    /// Signs digests, when `digest.*` configures a key.
    pub signer: Option<Arc<DigestSigner>>,
    /// Shared by every partition writer of this instance.
    pub memory: Arc<MemoryBudget>,
}

/// What became of an offered record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Chained and buffered.
    Appended,
    /// At or below the durable head: already in the trail (replay, redelivery). Skipped.
    AlreadyChained,
    /// Above the next expected offset before any record was seen: seek back to this offset.
    SeekTo(i64),
}

/// Result of a completed flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flushed {
    /// The Kafka offset to commit: one past the last durable record.
    pub commit_offset: i64,
    pub records: usize,
    pub objects: Vec<String>,
}

pub struct PartitionWriter {
    topic: String,
    partition: i32,
    config: Arc<Config>,
    sinks: Sinks,
    chain: Chain,
    durable: Option<HeadPos>,
    /// Intent left by an interrupted flush: the next flush must be exactly this range.
    recovering: Option<PendingFlush>,
    /// Whether a record has been appended since open (a gap before the first one means: seek).
    appended_since_open: bool,
    /// Seeks requested since open; bounded so a gap Kafka itself has (transaction markers,
    /// compaction, retention) is accepted, loudly, instead of seeking forever.
    seeks: u32,
    buffer: Vec<ChainedRecord>,
    buffer_bytes: usize,
    /// The distinct placements (environment or quarantine, day) the buffer spans.
    placements: Vec<(Option<String>, i64)>,
    /// The buffer's part of the instance's memory budget.
    share: BudgetShare,
    oldest: Option<Instant>,
    /// The partition's last digest and the durable segments not in any digest yet.
    digest: Option<DigestPos>,
    undigested: Vec<SegmentEntry>,
    last_digest: Instant,
    counter: metrics::RecordCounter,
}

/// `<prefix>/_chains/<topic>/p<PPPP>.genesis`: written by a partition's first flush, so an
/// empty chain table can be told from an empty chain (Athena and the trail readers skip `_`).
pub fn genesis_key(prefix: &str, topic: &str, partition: i32) -> String {
    crate::segment::join_key(&[prefix, "_chains", topic, &format!("p{partition:04}.genesis")])
}

/// Puts the partition's genesis marker unless it exists. `first_offset`: the chain's first
/// offset (unknown, `null`, for a chain that began before markers existed).
async fn put_genesis(
    config: &Config,
    objects: &Arc<dyn crate::sinks::ObjectStore>,
    topic: &str,
    partition: i32,
    first_offset: Option<i64>,
    context: &str,
    cancel: &CancellationToken,
) -> Result<(), PartitionError> {
    let key = genesis_key(&config.s3.prefix, topic, partition);
    let body = serde_json::json!({
        "format": "aegis-genesis/v1",
        "topic": topic,
        "partition": partition,
        "first_offset": first_offset,
    });
    let body = Bytes::from(body.to_string() + "\n");
    let no_metadata = BTreeMap::new();
    retry(context, &config.retry, cancel, metrics::set_backend_up, || {
        objects.put_new(&key, body.clone(), &no_metadata)
    })
    .await?;
    Ok(())
}

impl PartitionWriter {
    /// Loads the chain head and prepares to continue it.
    pub async fn open(
        topic: &str,
        partition: i32,
        config: Arc<Config>,
        sinks: Sinks,
        cancel: &CancellationToken,
    ) -> Result<Self, PartitionError> {
        let context = format!("{topic}/{partition} load chain head");
        let head =
            retry(&context, &config.retry, cancel, metrics::set_backend_up, || sinks.heads.load(topic, partition))
                .await?;
        if head.committed.is_none() && head.pending.is_none() && !head.afresh {
            // No head must mean an empty chain. If this partition already has a genesis marker
            // or signed digests in S3, the chain table was lost, replaced or damaged: starting
            // from genesis would fork the trail (and Object Lock would keep the fork). Refuse.
            // (An item with its key alone is an operator's word that the chain starts afresh:
            // an unrecoverable first flush cleared, RUNBOOK.)
            let objects = &sinks.objects;
            let genesis = genesis_key(&config.s3.prefix, topic, partition);
            let marker =
                retry(&context, &config.retry, cancel, metrics::set_backend_up, || objects.head(&genesis)).await?;
            if marker.is_some() {
                return Err(PartitionError::HeadMissing {
                    topic: topic.to_string(),
                    partition,
                    detail: format!("its genesis marker {genesis} exists"),
                });
            }
            let dir = crate::digest::partition_dir(&config.s3.prefix, topic, partition);
            let digests =
                retry(&context, &config.retry, cancel, metrics::set_backend_up, || objects.list(&dir)).await?;
            if let Some(newest) = digests.last() {
                return Err(PartitionError::HeadMissing {
                    topic: topic.to_string(),
                    partition,
                    detail: format!("{} digest(s) exist, newest {}", digests.len(), newest.key),
                });
            }
        }
        if head.committed.is_some() {
            // A chain begun before genesis markers existed gets one now (a conditional put: no
            // new object, nor a new version, once it is there).
            put_genesis(&config, &sinks.objects, topic, partition, None, &context, cancel).await?;
        }
        let chain = match head.committed {
            Some(pos) => Chain::resume(topic, partition, pos.last_offset, pos.last_hash),
            None => Chain::new(topic, partition),
        };
        if let Some(p) = head.pending {
            tracing::warn!(
                topic,
                partition,
                first = p.first_offset,
                last = p.last_offset,
                "resuming an interrupted flush"
            );
        }
        let share = BudgetShare::new(sinks.memory.clone());
        Ok(Self {
            topic: topic.to_string(),
            partition,
            config,
            sinks,
            chain,
            durable: head.committed,
            recovering: head.pending,
            appended_since_open: false,
            seeks: 0,
            buffer: Vec::new(),
            buffer_bytes: 0,
            placements: Vec::new(),
            share,
            oldest: None,
            digest: head.digest,
            undigested: head.undigested,
            last_digest: Instant::now(),
            counter: metrics::RecordCounter::new(partition),
        })
    }

    /// First offset not yet chained (`None`: empty chain, any offset may start it).
    pub fn next_offset(&self) -> Option<i64> {
        self.chain.last_offset().map(|o| o + 1)
    }

    pub fn durable_head(&self) -> Option<HeadPos> {
        self.durable
    }

    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Offers one Kafka record. `payload` is the exact record value (`None` for a tombstone),
    /// owned so the buffer keeps it without another copy.
    pub fn admit(
        &mut self,
        offset: i64,
        kafka_timestamp_ms: Option<i64>,
        payload: Option<Bytes>,
    ) -> Result<Admit, PartitionError> {
        if let Some(next) = self.next_offset() {
            if offset < next {
                return Ok(Admit::AlreadyChained);
            }
            // The consumer may start past the head (a committed offset ahead of it, a failed
            // seek): seek back rather than leave a hole. Only if repeated seeks still land past
            // `next` is the gap Kafka's own (transaction markers, compaction, retention).
            if offset > next && !self.appended_since_open {
                if self.seeks < MAX_SEEKS {
                    self.seeks += 1;
                    return Ok(Admit::SeekTo(next));
                }
                tracing::warn!(
                    topic = %self.topic, partition = self.partition, missing_first = next, missing_last = offset - 1,
                    "offsets not present in Kafka after {MAX_SEEKS} seeks (transaction markers, compaction or retention); continuing the chain at {offset}"
                );
                metrics::offsets_missing(self.partition, (offset - next) as u64);
            } else if offset > next {
                // Mid-run: Kafka itself skipped (transaction markers, compaction, retention
                // overtaking a stalled consumer). The chain links across it; say so loudly.
                tracing::warn!(
                    topic = %self.topic, partition = self.partition, missing_first = next, missing_last = offset - 1,
                    "offsets not delivered by Kafka (transaction markers, compaction or retention); the chain links across them"
                );
                metrics::offsets_missing(self.partition, (offset - next) as u64);
            }
        }
        self.appended_since_open = true;
        if let Some(p) = self.recovering {
            if offset > p.last_offset {
                return Err(
                    self.irreproducible(p, format!("offset {} was never seen; next record is {offset}", p.last_offset))
                );
            }
        }
        let outcome = decode::decode(payload.as_ref(), kafka_timestamp_ms, &self.config.validation);
        let status = if outcome.is_ok() { EntryStatus::Accepted } else { EntryStatus::Rejected };
        let bytes = payload.unwrap_or_default();
        let link = self.chain.append(offset, status, &bytes)?;
        if let Err(reason) = &outcome {
            tracing::warn!(topic = %self.topic, partition = self.partition, offset, code = reason.code(), %reason, "record rejected");
        }
        self.counter.record_consumed(&outcome);
        self.buffer_bytes += bytes.len();
        self.share.add(budget::record_cost(bytes.len()));
        self.oldest.get_or_insert_with(Instant::now);
        let record = ChainedRecord { offset, kafka_timestamp_ms, payload: bytes, link, outcome };
        let placement = crate::segment::PlacementKey::of(&record);
        // A flush spans a few placements, so a linear search: day first, it differs more often.
        let known = |(environment, day): &(Option<String>, i64)| {
            *day == placement.day && environment.as_deref() == placement.environment
        };
        if !self.placements.iter().any(known) {
            self.placements.push((placement.environment.map(str::to_owned), placement.day));
        }
        self.buffer.push(record);
        Ok(Admit::Appended)
    }

    /// Whether the buffer must be flushed now (size, age, or an interrupted range completed).
    pub fn should_flush(&self, now: Instant) -> bool {
        if self.buffer.is_empty() {
            return false;
        }
        if let Some(p) = self.recovering {
            // Recovery cuts exactly the recorded range, whatever the thresholds say.
            return self.chain.last_offset() >= Some(p.last_offset);
        }
        let seg = &self.config.segment;
        self.buffer.len() >= seg.max_records
            || self.buffer_bytes >= seg.max_bytes
            || self.placements.len() >= MAX_FLUSH_PLACEMENTS
            || self.share.over_fair_share()
            || self.oldest.is_some_and(|t| now.duration_since(t) >= self.config.max_age())
    }

    /// When the age threshold will fire for the current buffer.
    pub fn flush_deadline(&self) -> Option<Instant> {
        if self.recovering.is_some() {
            return None;
        }
        self.oldest.map(|t| t + self.config.max_age())
    }

    /// Runs the flush protocol for everything buffered. Transient errors are retried until
    /// `cancel`; on error the buffer is kept so the same range can be flushed again.
    pub async fn flush(&mut self, cancel: &CancellationToken) -> Result<Option<Flushed>, PartitionError> {
        let (Some(first), Some(last)) = (self.buffer.first(), self.buffer.last()) else {
            return Ok(None);
        };
        let pending =
            PendingFlush { first_offset: first.offset, last_offset: last.offset, last_hash: last.link.entry_hash };
        let started = Instant::now();
        let span_ctx =
            format!("{}/{} offsets {}..={}", self.topic, self.partition, pending.first_offset, pending.last_offset);

        if let Some(recorded) = self.recovering {
            if pending.last_offset < recorded.last_offset {
                // Stopping before the interrupted range is re-read in full: nothing to compare
                // yet. The range stays recorded for whoever owns the partition next.
                tracing::info!(
                    topic = %self.topic, partition = self.partition, reread_to = pending.last_offset,
                    recorded_last = recorded.last_offset, "interrupted flush not re-read in full; left for the next owner"
                );
                return Ok(None);
            }
            if recorded != pending {
                let detail = format!(
                    "re-read range {}..={} hash {}",
                    pending.first_offset,
                    pending.last_offset,
                    hex::encode(pending.last_hash)
                );
                return Err(self.irreproducible(recorded, detail));
            }
        }

        let config = self.config.clone();
        let memory = self.sinks.memory.clone();
        let mut segments = {
            let _encoding = memory.encode_permit().await;
            let (topic, partition, records) = (self.topic.clone(), self.partition, std::mem::take(&mut self.buffer));
            let encoded = tokio::task::spawn_blocking(move || {
                let result = encode_flush(&config.s3.prefix, &topic, partition, &records, &config.segment);
                (records, result)
            })
            .await
            .expect("encoder task does not panic");
            self.buffer = encoded.0;
            encoded.1?
        };
        let encode_time = started.elapsed();

        // 1. Intent (skipped when we are completing an interrupted flush's recorded intent).
        // Not once revoked: the encode took a while, and the partition may have a new owner.
        if cancel.is_cancelled() {
            return Err(PartitionError::Cancelled(span_ctx));
        }
        if self.recovering.is_none() {
            self.begin(pending, &span_ctx, cancel).await?;
        }
        // 1b. The chain's first flush leaves a mark that it began, before any segment: a lost
        // chain table then cannot start a second chain, digests or not (`open`).
        if self.durable.is_none() {
            // Already there: this is the same first flush, re-run after a crash.
            let (config, objects) = (&self.config, &self.sinks.objects);
            put_genesis(config, objects, &self.topic, self.partition, Some(pending.first_offset), &span_ctx, cancel)
                .await?;
        }
        // 2. Segments. A digest lists what S3 holds: an object an earlier attempt wrote is kept,
        // and its bytes may differ from this encoding (another build or Parquet setting).
        for segment in &mut segments {
            segment.sha256 = self.put_segment(segment, &span_ctx, cancel).await?;
        }
        // 2b. Dead letters for rejected records (their quarantine rows are already in S3).
        if let Some(dead_letters) = &self.sinks.dead_letters {
            let letters = self.dead_letters();
            if !letters.is_empty() {
                retry(&span_ctx, &self.config.retry, cancel, metrics::set_backend_up, || dead_letters.send(&letters))
                    .await?;
                metrics::dead_lettered(self.partition, letters.len());
            }
        }
        // 3. Index.
        let mut index = index::IndexReport::default();
        if let Some(store) = &self.sinks.index {
            let concurrency = self.config.dynamodb.write_concurrency;
            // In order, one chunk done before the next: a decision id's items still apply in
            // offset order, as the winner rule needs.
            for records in self.buffer.chunks(INDEX_CHUNK_RECORDS) {
                let items = index_items(&self.topic, self.partition, records, &segments);
                let written = retry(&span_ctx, &self.config.retry, cancel, metrics::set_backend_up, || {
                    index::write_items(store.as_ref(), items.clone(), concurrency)
                })
                .await?;
                index.items += written.items;
                index.conflicts += written.conflicts;
            }
        }
        if index.conflicts > 0 {
            tracing::warn!(
                topic = %self.topic,
                partition = self.partition,
                conflicts = index.conflicts,
                "decision_id seen again with different content; winner kept per the rule in schemas/dynamodb-layout.md"
            );
        }
        // 4. Head (plus the segments' digest entries, atomically).
        let entries: Vec<SegmentEntry> = match self.sinks.signer {
            Some(_) => segments.iter().map(EncodedSegment::digest_entry).collect(),
            None => Vec::new(),
        };
        self.complete(pending, &entries, &span_ctx, cancel).await?;
        self.undigested.extend(entries);

        let records = self.buffer.len();
        metrics::flushed(self.partition, records, &segments, index, started.elapsed());
        self.durable = Some(HeadPos { last_offset: pending.last_offset, last_hash: pending.last_hash });
        self.recovering = None;
        // A new buffer, not `clear()`: a drained backlog would otherwise leave every partition
        // holding its largest buffer's capacity (tens of MiB each) resident while it idles.
        // Reserved at this flush's size: untouched capacity is only address space (a large
        // allocation is a fresh mapping), and growing by doubling copied the buffer and faulted
        // in its pages over again, ~6% of a backlog drain's CPU.
        self.buffer = Vec::with_capacity(records);
        self.buffer_bytes = 0;
        self.placements.clear();
        self.share.release();
        budget::return_free_memory();
        self.oldest = None;
        tracing::info!(
            topic = %self.topic, partition = self.partition, first = pending.first_offset, last = pending.last_offset,
            records, objects = segments.len(), head = %hex::encode(pending.last_hash),
            encode_ms = encode_time.as_millis() as u64, elapsed_ms = started.elapsed().as_millis() as u64, "flushed"
        );
        Ok(Some(Flushed {
            commit_offset: pending.last_offset + 1,
            records,
            objects: segments.into_iter().map(|s| s.key).collect(),
        }))
    }

    /// When the next digest is due (`None`: nothing to digest, or digests are off).
    pub fn digest_deadline(&self) -> Option<Instant> {
        // While an interrupted flush is re-read no digest is written, so no deadline either: a
        // past one would wake the worker's timer at once, again and again.
        if self.sinks.signer.is_none() || self.undigested.is_empty() || self.recovering.is_some() {
            return None;
        }
        if self.undigested.len() >= MAX_UNDIGESTED {
            return Some(self.last_digest);
        }
        Some(self.last_digest + Duration::from_millis(self.config.digest.interval_ms))
    }

    /// The offset this writer needs next: after its durable head, or the start of the
    /// interrupted flush it must complete. `None` before a chain exists.
    pub fn resume_offset(&self) -> Option<i64> {
        match (self.recovering, self.durable) {
            (Some(pending), _) => Some(pending.first_offset),
            (None, Some(head)) => Some(head.last_offset + 1),
            (None, None) => None,
        }
    }

    pub fn digest_due(&self, now: Instant) -> bool {
        self.digest_deadline().is_some_and(|at| now >= at)
    }

    /// Writes the next signed digest over the undigested segments and records it on the chain
    /// head (fenced like a flush). Returns its sequence number, or `None` if there was nothing
    /// to digest.
    ///
    /// Crash-safe: the segment list lives in the chain table until the digest is recorded; if
    /// an earlier owner wrote digest `seq` but never recorded it, that object is adopted when
    /// it continues the same digest chain over a prefix of the same list.
    pub async fn write_digest(&mut self, cancel: &CancellationToken) -> Result<Option<u64>, PartitionError> {
        let (Some(signer), Some(head)) = (self.sinks.signer.clone(), self.durable) else {
            return Ok(None);
        };
        if self.undigested.is_empty() || self.recovering.is_some() {
            return Ok(None);
        }
        let seq = self.digest.map_or(0, |d| d.seq + 1);
        let key = digest_key(&self.config.s3.prefix, &self.topic, self.partition, seq);
        let ctx = format!("{}/{} digest {seq}", self.topic, self.partition);
        let retry_cfg = &self.config.retry;
        let objects = &self.sinks.objects;
        let body = DigestBody::next(
            &self.topic,
            self.partition,
            self.digest.map(|d| (d.seq, d.hash)),
            &signer.key_id,
            self.undigested.clone(),
        );
        let bytes = Bytes::from(signer.encode(&body));
        let hash = DigestObject::parse(&key, &bytes)?.body_sha256();
        let metadata = BTreeMap::from([
            ("aegis-format".to_string(), crate::digest::DIGEST_FORMAT.to_string()),
            ("aegis-key-id".to_string(), signer.key_id.clone()),
        ]);
        // Conditional: a zombie's late PUT must not replace a digest the owner recorded.
        let created =
            retry(&ctx, retry_cfg, cancel, metrics::set_backend_up, || objects.put_new(&key, bytes.clone(), &metadata))
                .await?;
        let (hash, consumed) = if created {
            (hash, self.undigested.len())
        } else {
            // Already there: an earlier owner's (or our own earlier attempt's) digest.
            let bytes = retry(&ctx, retry_cfg, cancel, metrics::set_backend_up, || objects.get(&key)).await?;
            match self.adopt_digest(&key, &bytes) {
                Ok(adopted) => adopted,
                Err(conflict) => return Err(self.conflict_or_fence_lost(&ctx, head, conflict, cancel).await?),
            }
        };
        let recorded = DigestPos { seq, hash };
        let remaining = self.undigested[consumed..].to_vec();
        let heads = &self.sinks.heads;
        self.fenced(
            &ctx,
            cancel,
            || heads.record_digest(&self.topic, self.partition, head, self.digest, recorded, &remaining),
            |stored| stored.digest == Some(recorded) && stored.committed == Some(head),
        )
        .await?;
        tracing::info!(topic = %self.topic, partition = self.partition, seq, segments = consumed, %key, "digest written");
        metrics::digest_written(self.partition, seq);
        self.digest = Some(recorded);
        self.undigested = remaining;
        self.last_digest = Instant::now();
        Ok(Some(seq))
    }

    /// A digest at our next key that is not ours is a newer owner's when the head has moved
    /// since we loaded it (it signed segments we never saw): that is a lost fence, and the
    /// worker restarts from the head. Only with the head where we left it is it a conflict.
    async fn conflict_or_fence_lost(
        &self,
        ctx: &str,
        head: HeadPos,
        conflict: PartitionError,
        cancel: &CancellationToken,
    ) -> Result<PartitionError, PartitionError> {
        let stored = self.stored_head(ctx, cancel).await?;
        if stored.committed == Some(head) && stored.digest == self.digest {
            return Ok(conflict);
        }
        Ok(PartitionError::Sink(SinkError::FenceLost {
            topic: self.topic.clone(),
            partition: self.partition,
            detail: format!("another owner wrote the next digest ({conflict})"),
        }))
    }

    /// Checks that an existing digest object at our next key continues our digest chain over a
    /// prefix of our undigested list; returns its hash and how many entries it covers.
    fn adopt_digest(&self, key: &str, bytes: &[u8]) -> Result<(crate::chain::Hash, usize), PartitionError> {
        let conflict = |detail: String| PartitionError::Sink(SinkError::Conflict { key: key.to_string(), detail });
        let found = DigestObject::parse(key, bytes).map_err(|e| conflict(e.to_string()))?;
        let prev = hex::encode(self.digest.map_or([0u8; 32], |d| d.hash));
        let listed = &found.body.segments;
        if found.body.prev_digest_sha256 != prev {
            return Err(conflict(format!("it follows digest {}, ours is {prev}", found.body.prev_digest_sha256)));
        }
        if listed.is_empty() || listed.len() > self.undigested.len() || listed[..] != self.undigested[..listed.len()] {
            return Err(conflict("it lists segments other than the undigested ones".into()));
        }
        // Every other field must be what we would have written over that list, so an object
        // planted at our next key cannot make the chain vouch for another range or head.
        let mut expected = DigestBody::next(
            &self.topic,
            self.partition,
            self.digest.map(|d| (d.seq, d.hash)),
            &found.key_id,
            listed.clone(),
        );
        expected.created_at.clone_from(&found.body.created_at);
        if found.body != expected || found.body.key_id != found.key_id {
            return Err(conflict("its fields are not the ones these segments make".into()));
        }
        // Signed with our key id, the signature must verify; another key id is an earlier
        // owner's key from before a rotation, which `verify` checks against the trusted keys.
        if let Some(signer) = self.sinks.signer.as_ref().filter(|s| s.key_id == found.key_id) {
            if !found.verify(&signer.verifying_key()) {
                return Err(conflict(format!("its signature does not verify with key {}", found.key_id)));
            }
        }
        tracing::warn!(key, segments = listed.len(), "adopting a digest an earlier owner wrote but did not record");
        Ok((found.body_sha256(), listed.len()))
    }

    /// A fenced write to the chain head, retried. A retried request whose first attempt landed
    /// comes back as a lost fence: then the head is read back, and `landed` says whether it is
    /// exactly what this write would have made it (ours after all) or another owner's.
    async fn fenced<F, Fut>(
        &self,
        ctx: &str,
        cancel: &CancellationToken,
        write: F,
        landed: impl Fn(&ChainHead) -> bool,
    ) -> Result<(), PartitionError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), SinkError>>,
    {
        let result = retry(ctx, &self.config.retry, cancel, metrics::set_backend_up, write).await;
        let Err(RetryError::Sink(SinkError::FenceLost { .. })) = &result else {
            return Ok(result?);
        };
        if landed(&self.stored_head(ctx, cancel).await?) {
            Ok(())
        } else {
            Ok(result?)
        }
    }

    /// The chain head as stored now, read again after a write was refused.
    async fn stored_head(&self, ctx: &str, cancel: &CancellationToken) -> Result<ChainHead, PartitionError> {
        let heads = &self.sinks.heads;
        Ok(retry(ctx, &self.config.retry, cancel, metrics::set_backend_up, || heads.load(&self.topic, self.partition))
            .await?)
    }

    async fn begin(&self, pending: PendingFlush, ctx: &str, cancel: &CancellationToken) -> Result<(), PartitionError> {
        let heads = &self.sinks.heads;
        self.fenced(
            ctx,
            cancel,
            || heads.begin_flush(&self.topic, self.partition, self.durable, pending),
            |head| head.committed == self.durable && head.pending == Some(pending),
        )
        .await
    }

    async fn complete(
        &self,
        pending: PendingFlush,
        entries: &[SegmentEntry],
        ctx: &str,
        cancel: &CancellationToken,
    ) -> Result<(), PartitionError> {
        let heads = &self.sinks.heads;
        let done = HeadPos { last_offset: pending.last_offset, last_hash: pending.last_hash };
        self.fenced(
            ctx,
            cancel,
            || heads.complete_flush(&self.topic, self.partition, pending, entries),
            // Already advanced to exactly this range (our lost response, or an identical re-run).
            |head| head.committed == Some(done) && head.pending.is_none(),
        )
        .await
    }

    /// Writes a segment object unless an earlier attempt already wrote these rows under its key;
    /// returns the SHA-256 (hex) of the bytes S3 holds for it.
    async fn put_segment(
        &self,
        segment: &EncodedSegment,
        ctx: &str,
        cancel: &CancellationToken,
    ) -> Result<String, PartitionError> {
        let metadata = BTreeMap::from([
            ("aegis-format".to_string(), crate::segment::SEGMENT_FORMAT.to_string()),
            ("aegis-first-offset".to_string(), segment.first_offset.to_string()),
            (crate::sinks::LAST_OFFSET_METADATA.to_string(), segment.last_offset.to_string()),
            (crate::sinks::ROWS_METADATA.to_string(), segment.rows.to_string()),
            (crate::sinks::LAST_ENTRY_HASH_METADATA.to_string(), segment.last_entry_hash.clone()),
            (crate::sinks::SHA256_METADATA.to_string(), segment.sha256.clone()),
        ]);
        let objects = &self.sinks.objects;
        // Conditional: a zombie's late PUT must not replace what the owner wrote (its bytes may
        // differ, say from another build), and ours must not replace a zombie's.
        let body = segment.body.clone();
        let created = retry(ctx, &self.config.retry, cancel, metrics::set_backend_up, || {
            objects.put_new(&segment.key, body.clone(), &metadata)
        })
        .await?;
        if created {
            return Ok(segment.sha256.clone());
        }
        // Written already: by an earlier attempt of this flush (ours, or a crashed owner's), or
        // by another writer.
        let info = retry(ctx, &self.config.retry, cancel, metrics::set_backend_up, || objects.head(&segment.key))
            .await?
            .ok_or_else(|| SinkError::Conflict {
                key: segment.key.clone(),
                detail: "a conditional PUT found an object that a HEAD then did not".into(),
            })?;
        let same = info.metadata.get(crate::sinks::LAST_ENTRY_HASH_METADATA) == Some(&segment.last_entry_hash)
            && info.metadata.get(crate::sinks::ROWS_METADATA) == Some(&segment.rows.to_string());
        if !same {
            return Err(SinkError::Conflict {
                key: segment.key.clone(),
                detail: format!("stored metadata {:?}", info.metadata),
            }
            .into());
        }
        tracing::info!(key = %segment.key, "segment already written by an earlier attempt; keeping it");
        if let Some(stored) = info.metadata.get(crate::sinks::SHA256_METADATA) {
            return Ok(stored.clone());
        }
        // Written before objects carried their hash: read it back.
        let body =
            retry(ctx, &self.config.retry, cancel, metrics::set_backend_up, || objects.get(&segment.key)).await?;
        Ok(hex::encode(sha2::Sha256::digest(&body)))
    }

    fn dead_letters(&self) -> Vec<DeadLetter> {
        self.buffer
            .iter()
            .filter_map(|r| {
                let reason = r.outcome.as_ref().err()?;
                Some(DeadLetter {
                    source_topic: self.topic.clone(),
                    source_partition: self.partition,
                    source_offset: r.offset,
                    kafka_timestamp_ms: r.kafka_timestamp_ms,
                    // A record without a value gets a letter without one, not an empty value.
                    payload: (*reason != decode::RejectReason::NullPayload).then(|| r.payload.clone()),
                    reason_code: reason.code(),
                    reason: reason.to_string(),
                })
            })
            .collect()
    }

    fn irreproducible(&self, p: PendingFlush, detail: String) -> PartitionError {
        PartitionError::Irreproducible {
            topic: self.topic.clone(),
            partition: self.partition,
            first: p.first_offset,
            last: p.last_offset,
            detail,
        }
    }
}

/// The index items of `records`, each naming the object its row went to.
fn index_items(
    topic: &str,
    partition: i32,
    records: &[ChainedRecord],
    segments: &[EncodedSegment],
) -> Vec<crate::sinks::IndexItem> {
    let key_of = |record: &ChainedRecord| {
        let placement = crate::segment::Placement::of(record);
        segments.iter().find(|s| s.placement == placement).map(|s| s.key.as_str()).unwrap_or_default()
    };
    records.iter().filter_map(|r| index::item_for(topic, partition, r, key_of(r))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::memory::{MemoryDeadLetters, MemoryHeads, MemoryIndex, MemoryObjectStore};
    use sha2::{Digest, Sha256};
    use std::sync::atomic::Ordering;

    struct Stack {
        objects: Arc<MemoryObjectStore>,
        index: Arc<MemoryIndex>,
        heads: Arc<MemoryHeads>,
        dead: Arc<MemoryDeadLetters>,
    }

    impl Stack {
        fn new() -> Self {
            Self { objects: Arc::default(), index: Arc::default(), heads: Arc::default(), dead: Arc::default() }
        }
        fn sinks(&self) -> Sinks {
            Sinks {
                objects: self.objects.clone(),
                index: Some(self.index.clone()),
                heads: self.heads.clone(),
                dead_letters: Some(self.dead.clone()),
                signer: None,
                memory: MemoryBudget::new(1 << 30),
            }
        }
    }

    fn config() -> Arc<Config> {
        let mut c = Config::from_toml_str(
            "[kafka]\nbrokers = \"x:1\"\ntopic = \"t\"\n[s3]\nbucket = \"bkt\"\n[dynamodb]\ntable = \"idx\"\nchain_table = \"chn\"\n[retry]\ninitial_backoff_ms = 1\nmax_backoff_ms = 2\n",
        )
        .unwrap();
        c.segment.max_records = 3;
        Arc::new(c)
    }

    /// `config()` with flushes cut at `max_records` instead of 3.
    fn config_flushing_at(max_records: usize) -> Arc<Config> {
        let mut c = (*config()).clone();
        c.segment.max_records = max_records;
        Arc::new(c)
    }

    fn event(i: i64) -> String {
        format!(
            r#"{{"decision_id":"d-{i}","event_type":"decision","occurred_at":"2026-11-20T08:00:00Z","environment":"prod","user_id":"u","session_id":"s","action":"a","confidence_score":0.5,"policy_version":"p","model_version":"m","request_id":"r-{i}"}}"#
        )
    }

    fn parquet_keys(s: &Stack) -> Vec<String> {
        s.objects.keys().into_iter().filter(|k| k.ends_with(".parquet")).collect()
    }

    async fn feed(w: &mut PartitionWriter, range: std::ops::Range<i64>) -> Vec<Flushed> {
        let mut out = Vec::new();
        for i in range {
            let payload = event(i);
            assert_eq!(w.admit(i, None, Some(Bytes::from(payload))).unwrap(), Admit::Appended);
            if w.should_flush(Instant::now()) {
                out.extend(w.flush(&CancellationToken::new()).await.unwrap());
            }
        }
        out
    }

    #[test]
    fn a_head_past_the_end_is_flagged() {
        assert_eq!(head_past_end(None, 0), None);
        assert_eq!(head_past_end(Some(99), 100), None, "head 99, next offset 100: caught up");
        assert!(head_past_end(Some(99), 99).unwrap().contains("recreated"));
        assert!(head_past_end(Some(5_000), 10).is_some());
    }

    #[tokio::test]
    async fn flush_writes_segments_index_and_head_then_reports_commit_offset() {
        let s = Stack::new();
        let mut w = PartitionWriter::open("t", 0, config(), s.sinks(), &CancellationToken::new()).await.unwrap();
        let flushed = feed(&mut w, 0..6).await;
        assert_eq!(flushed.iter().map(|f| f.commit_offset).collect::<Vec<_>>(), vec![3, 6]);
        assert_eq!(parquet_keys(&s).len(), 2);
        assert_eq!(s.index.items().len(), 6);
        let head = s.heads.get("t", 0);
        assert_eq!(head.committed.unwrap().last_offset, 5);
        assert_eq!(head.committed.unwrap().last_hash, w.chain.head());
        assert!(head.pending.is_none());
    }

    #[tokio::test]
    async fn a_flush_spans_at_most_max_flush_placements_objects() {
        let s = Stack::new();
        let mut w = PartitionWriter::open("t", 0, config_flushing_at(10_000), s.sinks(), &CancellationToken::new())
            .await
            .unwrap();
        // A backfill: each record on its own day, two environments, and one rejected record.
        let day = |i: i64| {
            (chrono::NaiveDate::from_ymd_opt(2025, 1, 1).unwrap() + chrono::Days::new(i as u64 / 2)).to_string()
        };
        let mut flushes = Vec::new();
        for i in 0..100 {
            let payload = match i {
                50 => "{not json".to_string(),
                _ => event(i)
                    .replace("2026-11-20", &day(i))
                    .replace("\"prod\"", if i % 2 == 0 { "\"prod\"" } else { "\"dev\"" }),
            };
            w.admit(i, None, Some(Bytes::from(payload))).unwrap();
            if w.should_flush(Instant::now()) {
                flushes.push(w.flush(&CancellationToken::new()).await.unwrap().unwrap());
            }
        }
        flushes.extend(w.flush(&CancellationToken::new()).await.unwrap());
        let objects: Vec<usize> = flushes.iter().map(|f| f.objects.len()).collect();
        assert_eq!(objects, vec![MAX_FLUSH_PLACEMENTS, MAX_FLUSH_PLACEMENTS, MAX_FLUSH_PLACEMENTS, 4]);
        assert_eq!(flushes.iter().map(|f| f.records).sum::<usize>(), 100);
        assert_eq!(parquet_keys(&s).len(), 100, "one object per record: each has its own (day, environment)");
    }

    #[tokio::test]
    async fn a_flush_larger_than_an_index_chunk_indexes_every_record_with_the_winner_rule() {
        let s = Stack::new();
        let mut w =
            PartitionWriter::open("t", 0, config_flushing_at(10), s.sinks(), &CancellationToken::new()).await.unwrap();
        // d-1 comes again at offset 6, two chunks later, with other content.
        for i in 0..10 {
            let payload = if i == 6 { event(1).replace("r-1", "r-other") } else { event(i) };
            assert_eq!(w.admit(i, None, Some(Bytes::from(payload))).unwrap(), Admit::Appended);
        }
        let flushed = w.flush(&CancellationToken::new()).await.unwrap().unwrap();
        assert_eq!((flushed.records, flushed.commit_offset), (10, 10));
        assert!(INDEX_CHUNK_RECORDS < flushed.records / 2, "the flush spans several chunks");
        let items = s.index.items();
        let attr = |item: &crate::sinks::IndexItem, name: &str| match &item.attrs[name] {
            crate::sinks::Attr::S(v) | crate::sinks::Attr::N(v) => v.clone(),
            other => panic!("{other:?}"),
        };
        // Nine decisions, plus the later d-1 kept as its duplicate: the earlier offset wins.
        assert_eq!(items.len(), 10);
        let d1: Vec<_> = items.iter().filter(|i| i.pk == "DECISION#d-1").collect();
        let winner = d1.iter().find(|i| i.sk == index::DECISION_SK).unwrap();
        let loser = d1.iter().find(|i| i.sk.starts_with("DUPLICATE#")).unwrap();
        assert_eq!((attr(winner, "kafka_offset"), attr(winner, "request_id")), ("1".into(), "r-1".into()));
        assert_eq!((attr(loser, "kafka_offset"), attr(loser, "request_id")), ("6".into(), "r-other".into()));
    }

    #[tokio::test]
    async fn without_the_index_a_flush_still_writes_segments_and_head() {
        let s = Stack::new();
        let sinks = Sinks { index: None, ..s.sinks() };
        let mut w = PartitionWriter::open("t", 0, config(), sinks, &CancellationToken::new()).await.unwrap();
        let flushed = feed(&mut w, 0..3).await;
        assert_eq!(flushed.iter().map(|f| f.commit_offset).collect::<Vec<_>>(), vec![3]);
        assert_eq!(parquet_keys(&s).len(), 1);
        assert!(s.index.items().is_empty());
        assert_eq!(s.heads.get("t", 0).committed.unwrap().last_offset, 2);
    }

    #[tokio::test]
    async fn over_the_memory_budget_the_fuller_partition_flushes_early() {
        let (a_stack, b_stack) = (Stack::new(), Stack::new());
        let config = config_flushing_at(1000);
        // Room for five buffered records across both partitions.
        let memory = MemoryBudget::new(5 * budget::record_cost(event(0).len()) + 10);
        let cancel = CancellationToken::new();
        let open = |s: &Stack, p| {
            let sinks = Sinks { memory: memory.clone(), ..s.sinks() };
            PartitionWriter::open("t", p, config.clone(), sinks, &cancel)
        };
        let (mut a, mut b) = (open(&a_stack, 0).await.unwrap(), open(&b_stack, 1).await.unwrap());
        for i in 0..4 {
            a.admit(i, None, Some(Bytes::from(event(i)))).unwrap();
        }
        b.admit(0, None, Some(Bytes::from(event(0)))).unwrap();
        assert!(!a.should_flush(Instant::now()) && !b.should_flush(Instant::now()), "at the budget, not over");
        b.admit(1, None, Some(Bytes::from(event(1)))).unwrap();
        assert!(a.should_flush(Instant::now()), "the fuller buffer flushes");
        assert!(!b.should_flush(Instant::now()), "the smaller one keeps filling");
        a.flush(&CancellationToken::new()).await.unwrap();
        assert_eq!(memory.used(), 2 * budget::record_cost(event(0).len()));
        drop(b);
        assert_eq!(memory.used(), 0, "a dropped writer gives its buffer's budget back");
    }

    fn signed(s: &Stack) -> Sinks {
        let signer = DigestSigner::from_text("digest.signing_key", &"11".repeat(32)).unwrap();
        Sinks { signer: Some(Arc::new(signer)), ..s.sinks() }
    }

    fn digest_at(s: &Stack, seq: u64) -> DigestObject {
        let key = digest_key("trail", "t", 0, seq);
        DigestObject::parse(&key, &s.objects.body(&key).expect("digest object")).unwrap()
    }

    #[tokio::test]
    async fn a_digest_is_due_early_once_max_undigested_segments_wait() {
        let s = Stack::new();
        let cancel = CancellationToken::new();
        let config = config_flushing_at(1);
        assert!(config.digest.interval_ms >= 60_000, "the interval alone would not make it due");
        let mut w = PartitionWriter::open("t", 0, config, signed(&s), &cancel).await.unwrap();
        let cap = MAX_UNDIGESTED as i64;
        feed(&mut w, 0..cap - 1).await;
        assert!(!w.digest_due(Instant::now()), "one segment short of the cap, the interval rules");
        feed(&mut w, cap - 1..cap).await;
        assert!(w.digest_due(Instant::now()));
        assert_eq!(w.write_digest(&cancel).await.unwrap(), Some(0));
        assert_eq!(digest_at(&s, 0).body.segments.len(), MAX_UNDIGESTED);
        assert!(s.heads.get("t", 0).undigested.is_empty());
    }

    #[tokio::test]
    async fn digests_list_durable_segments_and_chain_to_each_other() {
        let s = Stack::new();
        let cancel = CancellationToken::new();
        let mut w = PartitionWriter::open("t", 0, config(), signed(&s), &cancel).await.unwrap();
        feed(&mut w, 0..6).await;
        assert_eq!(s.heads.get("t", 0).undigested.len(), 2, "segments wait in the chain table");
        assert_eq!(w.write_digest(&cancel).await.unwrap(), Some(0));
        let first = digest_at(&s, 0);
        let key = w.sinks.signer.as_ref().unwrap().verifying_key();
        assert!(first.verify(&key));
        assert_eq!((first.body.first_offset, first.body.last_offset, first.body.segments.len()), (0, 5, 2));
        assert_eq!(first.body.first_prev_hash, hex::encode(crate::chain::genesis("t", 0)));
        assert_eq!(first.body.last_entry_hash, hex::encode(w.chain.head()));
        let listed = &first.body.segments[0];
        assert_eq!(listed.sha256, hex::encode(Sha256::digest(s.objects.body(&listed.key).unwrap())));
        assert!(s.heads.get("t", 0).undigested.is_empty());
        assert_eq!(w.write_digest(&cancel).await.unwrap(), None, "nothing new to sign");

        // A new owner continues the digest chain from the chain table.
        let mut w2 = PartitionWriter::open("t", 0, config(), signed(&s), &cancel).await.unwrap();
        feed(&mut w2, 6..9).await;
        assert_eq!(w2.write_digest(&cancel).await.unwrap(), Some(1));
        let second = digest_at(&s, 1);
        assert_eq!(second.body.prev_digest_sha256, hex::encode(first.body_sha256()));
        assert_eq!(second.body.first_prev_hash, first.body.last_entry_hash);
    }

    #[tokio::test]
    async fn a_digest_written_but_not_recorded_is_adopted_not_forked() {
        let s = Stack::new();
        let cancel = CancellationToken::new();
        let mut w = PartitionWriter::open("t", 0, config(), signed(&s), &cancel).await.unwrap();
        feed(&mut w, 0..3).await;
        // An earlier owner signed digest 0 over these segments, then died before recording it.
        let signer = w.sinks.signer.clone().unwrap();
        let body = DigestBody::next("t", 0, None, &signer.key_id, s.heads.get("t", 0).undigested);
        let orphan = signer.encode(&body);
        s.objects.put(&digest_key("trail", "t", 0, 0), Bytes::from(orphan.clone()), &BTreeMap::new()).await.unwrap();
        feed(&mut w, 3..6).await;
        assert_eq!(w.write_digest(&cancel).await.unwrap(), Some(0));
        assert_eq!(s.objects.body(&digest_key("trail", "t", 0, 0)).unwrap(), Bytes::from(orphan), "kept as written");
        assert_eq!(s.heads.get("t", 0).undigested.len(), 1, "the newer segment waits for digest 1");
        assert_eq!(w.write_digest(&cancel).await.unwrap(), Some(1));
        assert_eq!(digest_at(&s, 1).body.first_offset, 3);
    }

    #[tokio::test]
    async fn only_a_digest_this_chain_would_have_written_is_adopted() {
        /// Digest 0 planted over the right segments, changed by `edit`, signed by `signer`;
        /// then the writer's own attempt at digest 0.
        async fn planted(edit: fn(&mut DigestBody), signer: DigestSigner) -> Result<Option<u64>, PartitionError> {
            let s = Stack::new();
            let cancel = CancellationToken::new();
            let mut w = PartitionWriter::open("t", 0, config(), signed(&s), &cancel).await.unwrap();
            feed(&mut w, 0..3).await;
            let mut body = DigestBody::next("t", 0, None, &signer.key_id, s.heads.get("t", 0).undigested);
            edit(&mut body);
            let key = digest_key("trail", "t", 0, 0);
            s.objects.put(&key, Bytes::from(signer.encode(&body)), &BTreeMap::new()).await.unwrap();
            w.write_digest(&cancel).await
        }
        let own_key = || DigestSigner::from_text("digest.signing_key", &"11".repeat(32)).unwrap();
        let conflict = |result: Result<Option<u64>, PartitionError>| {
            matches!(result, Err(PartitionError::Sink(SinkError::Conflict { .. })))
        };
        assert_eq!(planted(|_| {}, own_key()).await.unwrap(), Some(0), "the writer's own digest is adopted");
        assert!(conflict(planted(|b| b.last_entry_hash = "00".repeat(32), own_key()).await));
        assert!(conflict(planted(|b| b.last_offset += 1, own_key()).await));
        // Our key id, another key's signature.
        let mut impostor = DigestSigner::from_text("x", &"33".repeat(32)).unwrap();
        impostor.key_id = own_key().key_id;
        assert!(conflict(planted(|_| {}, impostor).await));
        // An earlier owner's digest, signed with the key from before a rotation, is adopted.
        let before_rotation = DigestSigner::from_text("old", &"44".repeat(32)).unwrap();
        assert_eq!(planted(|_| {}, before_rotation).await.unwrap(), Some(0));
    }

    #[tokio::test]
    async fn a_stale_writers_digest_behind_a_newer_owners_is_a_lost_fence() {
        let s = Stack::new();
        let cancel = CancellationToken::new();
        let mut stale = PartitionWriter::open("t", 0, config(), signed(&s), &cancel).await.unwrap();
        feed(&mut stale, 0..3).await;
        // A new owner moves the head on and signs digest 0 over segments the stale one never saw.
        let mut owner = PartitionWriter::open("t", 0, config(), signed(&s), &cancel).await.unwrap();
        feed(&mut owner, 3..6).await;
        assert_eq!(owner.write_digest(&cancel).await.unwrap(), Some(0));
        let err = stale.write_digest(&cancel).await.unwrap_err();
        assert!(err.is_fence_lost(), "a restart from the head, not a stopped partition: {err}");

        // With the head where the writer left it, a digest it cannot adopt is a conflict.
        let s = Stack::new();
        let mut w = PartitionWriter::open("t", 0, config(), signed(&s), &cancel).await.unwrap();
        feed(&mut w, 0..3).await;
        s.objects
            .put(&digest_key("trail", "t", 0, 0), Bytes::from_static(b"not a digest\n"), &BTreeMap::new())
            .await
            .unwrap();
        let err = w.write_digest(&cancel).await.unwrap_err();
        assert!(matches!(err, PartitionError::Sink(SinkError::Conflict { .. })), "{err}");
    }

    #[tokio::test]
    async fn no_digest_is_due_while_an_interrupted_flush_is_re_read() {
        let s = Stack::new();
        let cancel = CancellationToken::new();
        let mut w = PartitionWriter::open("t", 0, config(), signed(&s), &cancel).await.unwrap();
        feed(&mut w, 0..3).await;
        interrupt_after_intent(&mut w, &s, 3..6).await;
        // The next owner holds a segment to sign but writes no digest until the range is re-read:
        // a deadline now would be one the worker's timer wakes for at once, again and again.
        let mut w2 = PartitionWriter::open("t", 0, config(), signed(&s), &cancel).await.unwrap();
        assert_eq!(s.heads.get("t", 0).undigested.len(), 1);
        assert_eq!(w2.digest_deadline(), None);
        assert_eq!(w2.write_digest(&cancel).await.unwrap(), None);
        feed_again(&mut w2, 3..6).await;
        assert!(w2.digest_deadline().is_some(), "due again once the range is durable");
        assert_eq!(w2.write_digest(&cancel).await.unwrap(), Some(0));
    }

    #[tokio::test]
    async fn an_empty_head_with_an_existing_trail_refuses_to_fork() {
        let s = Stack::new();
        let cancel = CancellationToken::new();
        let mut w = PartitionWriter::open("t", 0, config(), signed(&s), &cancel).await.unwrap();
        feed(&mut w, 0..3).await;
        w.write_digest(&cancel).await.unwrap();
        // The chain table is lost (an empty replacement table): the head reads as empty.
        let fresh_heads = Arc::new(MemoryHeads::default());
        let sinks = Sinks { heads: fresh_heads, ..signed(&s) };
        let err = PartitionWriter::open("t", 0, config(), sinks, &cancel).await.err().unwrap();
        assert!(matches!(err, PartitionError::HeadMissing { .. }), "{err}");
        assert!(err.to_string().contains("refusing to start a second chain"));
    }

    #[tokio::test]
    async fn an_empty_head_refuses_to_fork_a_chain_no_digest_signed_yet() {
        let s = Stack::new();
        let cancel = CancellationToken::new();
        let mut w = PartitionWriter::open("t", 0, config(), s.sinks(), &cancel).await.unwrap();
        feed(&mut w, 0..6).await;
        let genesis = genesis_key(&config().s3.prefix, "t", 0);
        assert_eq!(s.objects.keys().iter().filter(|k| !k.ends_with(".parquet")).collect::<Vec<_>>(), [&genesis]);
        // Unsigned (digests off, or before the first digest), then the chain table is lost.
        let sinks = Sinks { heads: Arc::new(MemoryHeads::default()), ..s.sinks() };
        let err = PartitionWriter::open("t", 0, config(), sinks, &cancel).await.err().unwrap();
        assert!(matches!(err, PartitionError::HeadMissing { .. }), "{err}");
        assert!(err.to_string().contains("genesis marker"), "{err}");
        // Another partition has no chain: it starts.
        PartitionWriter::open("t", 1, config(), s.sinks(), &cancel).await.unwrap();
        // A chain begun before markers existed (its marker absent) gets one when it is opened.
        s.objects.remove(&genesis);
        PartitionWriter::open("t", 0, config(), s.sinks(), &cancel).await.unwrap();
        assert!(s.objects.keys().contains(&genesis));
    }

    #[tokio::test]
    async fn a_first_flush_cleared_by_the_operator_starts_the_chain_afresh() {
        let s = Stack::new();
        // The first flush recorded its intent and its genesis marker, then stopped; Kafka lost
        // the range, and the operator clears the intent (RUNBOOK, Irreproducible flush),
        // keeping the item: an item without head or intent starts a chain.
        interrupted_after_intent(&s).await;
        assert!(s.objects.keys().iter().any(|k| k.ends_with(".genesis")));
        s.heads.clear_pending("t", 0);
        let mut w = PartitionWriter::open("t", 0, config(), s.sinks(), &CancellationToken::new()).await.unwrap();
        assert_eq!(w.next_offset(), None, "a chain from genesis");
        feed(&mut w, 0..3).await;
        assert_eq!(s.heads.get("t", 0).committed.map(|h| h.last_offset), Some(2));
    }

    #[tokio::test]
    async fn restart_skips_chained_offsets_and_continues_the_chain() {
        let s = Stack::new();
        let mut w = PartitionWriter::open("t", 0, config(), s.sinks(), &CancellationToken::new()).await.unwrap();
        feed(&mut w, 0..3).await;
        let mut uninterrupted = Chain::new("t", 0);
        for i in 0..6 {
            uninterrupted.append(i, EntryStatus::Accepted, event(i).as_bytes()).unwrap();
        }
        let mut w2 = PartitionWriter::open("t", 0, config(), s.sinks(), &CancellationToken::new()).await.unwrap();
        for i in 0..3 {
            assert_eq!(w2.admit(i, None, Some(Bytes::from(event(i)))).unwrap(), Admit::AlreadyChained);
        }
        feed(&mut w2, 3..6).await;
        assert_eq!(s.heads.get("t", 0).committed.unwrap().last_hash, uninterrupted.head());
    }

    #[tokio::test]
    async fn start_past_head_asks_for_a_seek() {
        let s = Stack::new();
        let mut w = PartitionWriter::open("t", 0, config(), s.sinks(), &CancellationToken::new()).await.unwrap();
        feed(&mut w, 0..3).await;
        let mut w2 = PartitionWriter::open("t", 0, config(), s.sinks(), &CancellationToken::new()).await.unwrap();
        // A seek that did not take (or landed past the head) is retried, never silently skipped.
        for _ in 0..MAX_SEEKS {
            assert_eq!(w2.admit(7, None, Some(Bytes::from_static(b"{}"))).unwrap(), Admit::SeekTo(3));
        }
        assert_eq!(w2.buffered(), 0);
        // Still past the head after repeated seeks: Kafka has no offsets 3..=6; continue at 7.
        assert_eq!(w2.admit(7, None, Some(Bytes::from(event(7)))).unwrap(), Admit::Appended);
        // Once records flow, a later offset gap (transaction markers) needs no seek.
        assert_eq!(w2.admit(9, None, Some(Bytes::from(event(9)))).unwrap(), Admit::Appended);
    }

    /// Crash after the intent and some objects: the next owner re-cuts the same range and the
    /// store ends with exactly the objects and head of an uninterrupted run.
    #[tokio::test]
    async fn interrupted_flush_is_completed_identically() {
        let clean = Stack::new();
        let mut w = PartitionWriter::open("t", 0, config(), clean.sinks(), &CancellationToken::new()).await.unwrap();
        feed(&mut w, 0..6).await;

        let s = Stack::new();
        let mut w = PartitionWriter::open("t", 0, config(), s.sinks(), &CancellationToken::new()).await.unwrap();
        feed(&mut w, 0..3).await;
        // Crash during step 3: the index is down, the intent and the segment are already written.
        interrupt_after_intent(&mut w, &s, 3..6).await;
        assert!(s.heads.get("t", 0).pending.is_some());
        drop(w);
        let written: Vec<String> =
            s.objects.keys().into_iter().filter(|k| k.contains("-00000000000000000003-")).collect();
        assert_eq!(written.len(), 1, "the crash came after the segment was written");

        // The new owner flushes at 100 records: it still cuts exactly the recorded 3..=5.
        let mut w2 =
            PartitionWriter::open("t", 0, config_flushing_at(100), s.sinks(), &CancellationToken::new()).await.unwrap();
        assert_eq!(w2.resume_offset(), Some(3), "where the interrupted flush starts");
        for i in 0..3 {
            assert_eq!(w2.admit(i, None, Some(Bytes::from(event(i)))).unwrap(), Admit::AlreadyChained);
        }
        let flushed = feed(&mut w2, 3..6).await;
        assert_eq!(flushed.len(), 1);
        assert_eq!(s.objects.keys(), clean.objects.keys());
        for key in s.objects.keys() {
            assert_eq!(s.objects.body(&key), clean.objects.body(&key), "{key}");
        }
        assert_eq!(s.heads.get("t", 0), clean.heads.get("t", 0));
        assert_eq!(s.index.items().len(), 6);
        assert_eq!(w2.resume_offset(), Some(6), "after the durable head");
    }

    /// Crash between the objects of one flush: it spans two Hive directories, and only one of
    /// its objects was written. The next owner writes the other, keeps the first, and the store
    /// ends as an uninterrupted run's.
    #[tokio::test]
    async fn a_flush_interrupted_between_its_objects_is_completed_identically() {
        let payload =
            |i: i64| Bytes::from(event(i).replace("\"prod\"", if i % 2 == 0 { "\"prod\"" } else { "\"dev\"" }));
        let admit = |w: &mut PartitionWriter, range: std::ops::Range<i64>| {
            for i in range {
                w.admit(i, None, Some(payload(i))).unwrap();
            }
        };
        let clean = Stack::new();
        let mut w = PartitionWriter::open("t", 0, config(), clean.sinks(), &CancellationToken::new()).await.unwrap();
        for range in [0..3, 3..6] {
            admit(&mut w, range);
            w.flush(&CancellationToken::new()).await.unwrap();
        }
        let second: Vec<String> =
            clean.objects.keys().into_iter().filter(|k| k.contains("-00000000000000000003-")).collect();
        assert_eq!(second.len(), 2, "the flush of 3..=5 spans prod and dev: {second:?}");

        let s = Stack::new();
        let mut w = PartitionWriter::open("t", 0, config(), s.sinks(), &CancellationToken::new()).await.unwrap();
        admit(&mut w, 0..3);
        w.flush(&CancellationToken::new()).await.unwrap();
        admit(&mut w, 3..6);
        s.objects.down.store(true, Ordering::SeqCst);
        crash_after_intent(&mut w, &s).await;
        s.objects.down.store(false, Ordering::SeqCst);
        drop(w);
        // What the crashed owner got out before it died: the first of the two objects.
        let info = clean.objects.head(&second[0]).await.unwrap().unwrap();
        s.objects.put(&second[0], clean.objects.body(&second[0]).unwrap(), &info.metadata).await.unwrap();

        let mut w2 =
            PartitionWriter::open("t", 0, config_flushing_at(100), s.sinks(), &CancellationToken::new()).await.unwrap();
        assert_eq!(w2.resume_offset(), Some(3));
        admit(&mut w2, 3..6);
        assert!(w2.should_flush(Instant::now()), "the recorded range is re-read in full");
        assert_eq!(w2.flush(&CancellationToken::new()).await.unwrap().unwrap().objects, second);
        assert_eq!(s.objects.keys(), clean.objects.keys());
        for key in s.objects.keys() {
            assert_eq!(s.objects.body(&key), clean.objects.body(&key), "{key}");
        }
        assert_eq!(s.heads.get("t", 0), clean.heads.get("t", 0));
        assert_eq!(s.index.items(), clean.index.items());
    }

    #[tokio::test]
    async fn a_resumed_flush_signs_the_bytes_s3_holds_not_its_own_encoding() {
        let s = Stack::new();
        let cancel = CancellationToken::new();
        let mut w = PartitionWriter::open("t", 0, config(), signed(&s), &cancel).await.unwrap();
        // The intent and the segment are written, then the worker dies (index down, cancelled).
        interrupt_after_intent(&mut w, &s, 0..3).await;
        drop(w);
        // The object as another build would have encoded it, written before objects carried
        // their hash in metadata: same rows, other bytes.
        let key = s.objects.keys().into_iter().find(|k| k.ends_with(".parquet")).expect("segment written");
        let mut info = s.objects.head(&key).await.unwrap().unwrap();
        info.metadata.remove("aegis-sha256");
        let other_build = Bytes::from(format!("{:?}", s.objects.body(&key).unwrap()));
        s.objects.put(&key, other_build.clone(), &info.metadata).await.unwrap();

        let mut w2 = PartitionWriter::open("t", 0, config(), signed(&s), &cancel).await.unwrap();
        feed_again(&mut w2, 0..3).await;
        assert_eq!(s.objects.body(&key).unwrap(), other_build, "the earlier attempt's object is kept");
        assert_eq!(w2.write_digest(&cancel).await.unwrap(), Some(0));
        let listed = &digest_at(&s, 0).body.segments[0];
        assert_eq!(listed.key, key);
        assert_eq!(listed.sha256, hex::encode(Sha256::digest(&other_build)), "the digest signs what S3 holds");
    }

    #[tokio::test]
    async fn a_revoked_worker_records_no_intent_after_its_encode() {
        let s = Stack::new();
        let mut w = PartitionWriter::open("t", 0, config(), s.sinks(), &CancellationToken::new()).await.unwrap();
        for i in 0..3 {
            w.admit(i, None, Some(Bytes::from(event(i)))).unwrap();
        }
        let revoked = CancellationToken::new();
        revoked.cancel();
        assert!(matches!(w.flush(&revoked).await, Err(PartitionError::Cancelled(_))));
        assert_eq!(s.heads.get("t", 0).pending, None, "the partition may have a new owner by now");
        assert!(s.objects.keys().is_empty());
        assert_eq!(w.buffered(), 3, "the buffer is kept");
    }

    /// Flushes until the intent is recorded, then stops the worker, as a crash would, wherever a
    /// sink the test took down is holding the flush in its retries.
    async fn crash_after_intent(w: &mut PartitionWriter, s: &Stack) {
        let stop = CancellationToken::new();
        let (heads, crash) = (s.heads.clone(), stop.clone());
        let watcher = tokio::spawn(async move {
            while heads.get("t", 0).pending.is_none() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            crash.cancel();
        });
        assert!(matches!(w.flush(&stop).await, Err(PartitionError::Cancelled(_))));
        watcher.await.unwrap();
    }

    /// Admits a range a resumed writer re-reads, flushing when it says so.
    async fn feed_again(w: &mut PartitionWriter, range: std::ops::Range<i64>) {
        for i in range {
            w.admit(i, None, Some(Bytes::from(event(i)))).unwrap();
            if w.should_flush(Instant::now()) {
                w.flush(&CancellationToken::new()).await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn zombie_cannot_extend_a_chain_it_lost() {
        let s = Stack::new();
        let mut zombie = PartitionWriter::open("t", 0, config(), s.sinks(), &CancellationToken::new()).await.unwrap();
        let mut owner = PartitionWriter::open("t", 0, config(), s.sinks(), &CancellationToken::new()).await.unwrap();
        feed(&mut owner, 0..3).await;
        for i in 0..3 {
            zombie.admit(i, None, Some(Bytes::from(format!("{{\"x\":{i}}}")))).unwrap();
        }
        let puts_before = s.objects.put_count();
        let err = zombie.flush(&CancellationToken::new()).await.unwrap_err();
        assert!(err.is_fence_lost(), "{err}");
        assert_eq!(s.objects.put_count(), puts_before, "a fenced worker writes no objects");
    }

    /// A chain whose flush of offsets 0..=2 stopped after its intent was recorded (the index
    /// was down), as a crashed owner leaves it.
    async fn interrupted_after_intent(s: &Stack) {
        let mut w = PartitionWriter::open("t", 0, config(), s.sinks(), &CancellationToken::new()).await.unwrap();
        interrupt_after_intent(&mut w, s, 0..3).await;
    }

    /// `w` admits `range` and flushes it, and dies once the intent is recorded and its segments
    /// written (the index is down meanwhile), as a crashed owner leaves it.
    async fn interrupt_after_intent(w: &mut PartitionWriter, s: &Stack, range: std::ops::Range<i64>) {
        for i in range {
            w.admit(i, None, Some(Bytes::from(event(i)))).unwrap();
        }
        s.index.down.store(true, Ordering::SeqCst);
        crash_after_intent(w, s).await;
        s.index.down.store(false, Ordering::SeqCst);
    }

    #[tokio::test]
    async fn changed_records_during_recovery_are_refused() {
        let s = Stack::new();
        interrupted_after_intent(&s).await;
        let mut w2 = PartitionWriter::open("t", 0, config(), s.sinks(), &CancellationToken::new()).await.unwrap();
        w2.admit(0, None, Some(Bytes::from(event(0)))).unwrap();
        w2.admit(1, None, Some(Bytes::from_static(b"tampered"))).unwrap();
        w2.admit(2, None, Some(Bytes::from(event(2)))).unwrap();
        assert!(w2.should_flush(Instant::now()));
        let err = w2.flush(&CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err, PartitionError::Irreproducible { .. }), "{err}");
    }

    #[tokio::test]
    async fn stopping_before_an_interrupted_range_is_re_read_leaves_it_recorded() {
        let s = Stack::new();
        interrupted_after_intent(&s).await;
        let recorded = s.heads.get("t", 0).pending;
        let mut w2 = PartitionWriter::open("t", 0, config(), s.sinks(), &CancellationToken::new()).await.unwrap();
        w2.admit(0, None, Some(Bytes::from(event(0)))).unwrap();
        w2.admit(1, None, Some(Bytes::from(event(1)))).unwrap();
        // A graceful stop flushes what it holds: two of the three recorded records is no error.
        assert!(w2.flush(&CancellationToken::new()).await.unwrap().is_none());
        assert_eq!((w2.buffered(), s.heads.get("t", 0).pending), (2, recorded), "the range is still recorded");
        w2.admit(2, None, Some(Bytes::from(event(2)))).unwrap();
        let flushed = w2.flush(&CancellationToken::new()).await.unwrap().unwrap();
        assert_eq!(flushed.commit_offset, 3);
        assert!(s.heads.get("t", 0).pending.is_none());
    }

    #[tokio::test]
    async fn rejected_records_are_chained_quarantined_and_dead_lettered_before_commit() {
        let s = Stack::new();
        let mut w = PartitionWriter::open("t", 0, config(), s.sinks(), &CancellationToken::new()).await.unwrap();
        w.admit(0, Some(1_795_000_000_000), Some(Bytes::from(event(0)))).unwrap();
        w.admit(1, Some(1_795_000_000_000), Some(Bytes::from_static(b"{not json"))).unwrap();
        w.admit(2, Some(1_795_000_000_000), None).unwrap();
        // The dead-letter topic is down: nothing may be committed, the head must not move.
        s.dead.down.store(true, Ordering::SeqCst);
        crash_after_intent(&mut w, &s).await;
        assert!(s.heads.get("t", 0).committed.is_none());
        assert!(s.dead.letters().is_empty());
        s.dead.down.store(false, Ordering::SeqCst);
        let flushed = w.flush(&CancellationToken::new()).await.unwrap().unwrap();
        assert_eq!(flushed.commit_offset, 3);
        let letters = s.dead.letters();
        assert_eq!(
            letters.iter().map(|l| (l.source_offset, l.reason_code)).collect::<Vec<_>>(),
            vec![(1, "not_json"), (2, "null_payload")]
        );
        assert_eq!(letters[0].payload.as_deref(), Some(&b"{not json"[..]));
        assert_eq!(letters[1].payload, None, "a record without a value, a letter without one");
        assert!(s.objects.keys().iter().any(|k| k.starts_with("trail/quarantine/year=2026/month=11/day=18/")));
        assert_eq!(s.index.items().len(), 1, "only the accepted record is indexed");
    }
}
