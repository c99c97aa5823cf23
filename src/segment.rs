//! Segments: chained records grouped by Hive partition, encoded as ZSTD Parquet with a fixed
//! Arrow schema (`schemas/parquet-columns.md`), under deterministic keys.
//!
//! A flush of offsets `first..=last` of one topic-partition writes one object per Hive partition
//! it touches, all named `<topic>-p<partition>-<first>-<last>.parquet`. The name depends only on
//! the flushed range, and the bytes only on the records, so re-running an interrupted flush
//! rewrites the same objects: never a second copy of a row.
//!
//! Reading them back (`read_segment`, `parse_segment_key`) lives here too, beside the writer,
//! for `verify`, `prove`, `rebuild-index` and `prune`.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use arrow_array::builder::{
    BinaryBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
    TimestampMillisecondBuilder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type, TimestampMillisecondType};
use arrow_array::{Array, ArrayRef, RecordBatch, StringArray, UInt64Array};
use arrow_buffer::{Buffer, OffsetBuffer};
use arrow_ord::ord::make_comparator;
use arrow_schema::{DataType, Field, Schema, SchemaRef, SortOptions, TimeUnit};
use bytes::Bytes;
use chrono::{DateTime, Datelike, Utc};
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::{KeyValue, PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader};
use parquet::file::page_index::column_index::ColumnIndexMetaData;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use sha2::{Digest, Sha256};

use crate::chain::{EntryStatus, Link};
use crate::config::SegmentConfig;
use crate::decode::{DecisionEvent, RejectReason};

/// Format version written into every object's key-value metadata.
pub const SEGMENT_FORMAT: &str = "aegis-audit/segment/v1";

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// Encoding failures are bugs or resource exhaustion, not something a retry fixes.
    #[error("encoding segment {key}: {message}")]
    Encode { key: String, message: String },
}

/// One Kafka record after decode and chaining: everything a segment row and an index item need.
#[derive(Debug, Clone)]
pub struct ChainedRecord {
    pub offset: i64,
    pub kafka_timestamp_ms: Option<i64>,
    pub payload: Bytes,
    pub link: Link,
    pub outcome: Result<DecisionEvent, RejectReason>,
}

impl ChainedRecord {
    pub fn status(&self) -> EntryStatus {
        if self.outcome.is_ok() {
            EntryStatus::Accepted
        } else {
            EntryStatus::Rejected
        }
    }
}

/// Where a record's row lives: accepted events by their own date and environment, rejected ones
/// in quarantine by their Kafka timestamp (the payload may have no usable date).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Placement {
    Trail { year: i32, month: u32, day: u32, environment: bytestring::ByteString },
    Quarantine { year: i32, month: u32, day: u32 },
}

impl Placement {
    pub fn of(record: &ChainedRecord) -> Self {
        match &record.outcome {
            Ok(event) => {
                let (year, month, day) = event.date();
                Placement::Trail { year, month, day, environment: event.environment_shared() }
            }
            Err(_) => Placement::quarantine(record.kafka_timestamp_ms),
        }
    }

    /// Where a rejected record with this Kafka timestamp lies: its UTC date, 1970-01-01
    /// without a usable one (the payload may have no date at all).
    pub fn quarantine(kafka_timestamp_ms: Option<i64>) -> Self {
        let ts = quarantine_time(kafka_timestamp_ms);
        Placement::Quarantine { year: ts.year(), month: ts.month(), day: ts.day() }
    }

    /// Where an accepted event that occurred at `at` in `environment` lies.
    pub fn trail(at: DateTime<Utc>, environment: bytestring::ByteString) -> Self {
        Placement::Trail { year: at.year(), month: at.month(), day: at.day(), environment }
    }

    /// The Hive-style directory, relative to the trail prefix. `environment` here is always a
    /// token that passed `decode::is_partition_token`, so it cannot add or climb path segments.
    pub fn directory(&self) -> String {
        match self {
            Placement::Trail { year, month, day, environment } => {
                format!("year={year:04}/month={month:02}/day={day:02}/environment={environment}")
            }
            Placement::Quarantine { year, month, day } => {
                format!("quarantine/year={year:04}/month={month:02}/day={day:02}")
            }
        }
    }
}

/// A rejected record's date is its Kafka timestamp's: the payload may have no usable one.
fn quarantine_time(kafka_timestamp_ms: Option<i64>) -> DateTime<Utc> {
    kafka_timestamp_ms.and_then(DateTime::<Utc>::from_timestamp_millis).unwrap_or_default()
}

/// What decides a record's placement, in a form that compares in a few instructions: equal keys
/// exactly when `Placement::of` is equal, without a calendar conversion per record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PlacementKey<'a> {
    /// `None` for quarantine.
    pub(crate) environment: Option<&'a str>,
    /// Days since the Unix epoch, UTC.
    pub(crate) day: i64,
}

impl<'a> PlacementKey<'a> {
    pub(crate) fn of(record: &'a ChainedRecord) -> Self {
        let day = |time: DateTime<Utc>| time.timestamp().div_euclid(86_400);
        match &record.outcome {
            Ok(event) => PlacementKey { environment: Some(event.environment()), day: day(event.occurred_at) },
            Err(_) => PlacementKey { environment: None, day: day(quarantine_time(record.kafka_timestamp_ms)) },
        }
    }
}

/// `<prefix>/<directory>/<topic>-p<partition>-<first>-<last>.parquet`, offsets zero-padded to 20
/// digits so keys sort by offset.
pub fn object_key(prefix: &str, placement: &Placement, topic: &str, partition: i32, first: i64, last: i64) -> String {
    let file = format!("{topic}-p{partition:04}-{first:020}-{last:020}.parquet");
    join_key(&[prefix, &placement.directory(), &file])
}

/// A segment object's name, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentName {
    pub key: String,
    pub partition: i32,
    pub flush_first: i64,
    pub flush_last: i64,
}

/// The inverse of [`object_key`] for `topic`'s objects (any directory): `None` for any other name.
pub fn parse_segment_key(key: &str, topic: &str) -> Option<SegmentName> {
    let file = key.rsplit('/').next()?.strip_suffix(".parquet")?;
    let rest = file.strip_prefix(topic)?.strip_prefix("-p")?;
    let mut parts = rest.split('-');
    let (p, first, last) = (parts.next()?, parts.next()?, parts.next()?);
    let digits = |text: &str| text.bytes().all(|b| b.is_ascii_digit());
    if parts.next().is_some() || p.len() < 4 || first.len() != 20 || last.len() != 20 {
        return None;
    }
    if !(digits(p) && digits(first) && digits(last)) {
        return None;
    }
    Some(SegmentName {
        key: key.to_string(),
        partition: p.parse().ok()?,
        flush_first: first.parse().ok()?,
        flush_last: last.parse().ok()?,
    })
}

/// The topic of a well-formed segment name of any topic (`<topic>-p<PPPP>-<first>-<last>.parquet`,
/// numbers in range): another topic's segments may share the trail's directories.
pub fn segment_topic(key: &str) -> Option<&str> {
    let file = key.rsplit('/').next()?.strip_suffix(".parquet")?;
    let mut parts = file.rsplitn(4, '-');
    let (_last, _first, _partition, topic) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    parse_segment_key(key, topic).map(|_| topic).filter(|topic| !topic.is_empty())
}

pub fn join_key(parts: &[&str]) -> String {
    parts.iter().map(|p| p.trim_matches('/')).filter(|p| !p.is_empty()).collect::<Vec<_>>().join("/")
}

/// The directory of `key` relative to the trail's `prefix`, when it is one the writer makes
/// (`Placement::directory`) directly under that prefix: `year=/month=/day=/environment=` or
/// `quarantine/year=/month=/day=`. Keys of another trail under a longer prefix (`trail/staging/…`
/// under `trail`, or anything under an empty prefix) are not this trail's.
pub fn trail_directory<'k>(prefix: &str, key: &'k str) -> Option<&'k str> {
    let (directory, _file) = key.strip_prefix(&dir_prefix(&[prefix]))?.rsplit_once('/')?;
    let parts: Vec<&str> = directory.split('/').collect();
    let date = |y: &str, m: &str, d: &str| y.starts_with("year=") && m.starts_with("month=") && d.starts_with("day=");
    let made_by_the_writer = match parts.as_slice() {
        ["quarantine", y, m, d] => date(y, m, d),
        [y, m, d, e] => date(y, m, d) && e.starts_with("environment="),
        _ => false,
    };
    made_by_the_writer.then_some(directory)
}

/// The listing prefix of everything under `parts` (joined as by [`join_key`]): `a/b/`, or the
/// whole bucket when they are all empty (an empty `s3.prefix`), never `/`, which matches no key.
pub fn dir_prefix(parts: &[&str]) -> String {
    let joined = join_key(parts);
    if joined.is_empty() {
        joined
    } else {
        joined + "/"
    }
}

/// One encoded object of a flush.
#[derive(Debug, Clone)]
pub struct EncodedSegment {
    pub key: String,
    pub placement: Placement,
    pub body: Bytes,
    pub rows: usize,
    pub first_offset: i64,
    pub last_offset: i64,
    /// Entry hash of the object's last row: identifies its content in object metadata.
    pub last_entry_hash: String,
    /// `prev_hash` of the object's first row, hex.
    pub first_prev_hash: String,
    /// Merkle root over the rows' entry hashes (`merkle.rs`), hex; also in the Parquet footer.
    pub merkle_root: String,
    /// SHA-256 of `body`, hex.
    pub sha256: String,
}

impl EncodedSegment {
    /// How a digest lists this object.
    pub fn digest_entry(&self) -> crate::digest::SegmentEntry {
        crate::digest::SegmentEntry {
            key: self.key.clone(),
            sha256: self.sha256.clone(),
            rows: self.rows as u64,
            first_offset: self.first_offset,
            last_offset: self.last_offset,
            first_prev_hash: self.first_prev_hash.clone(),
            last_entry_hash: self.last_entry_hash.clone(),
            merkle_root: self.merkle_root.clone(),
        }
    }
}

pub fn arrow_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let utc: Arc<str> = Arc::from("UTC");
            let s = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
            Arc::new(Schema::new(vec![
                s("kafka_topic", false),
                Field::new("kafka_partition", DataType::Int32, false),
                Field::new("kafka_offset", DataType::Int64, false),
                Field::new("kafka_timestamp", DataType::Timestamp(TimeUnit::Millisecond, Some(utc.clone())), true),
                s("status", false),
                s("reject_code", true),
                s("reject_reason", true),
                s("decision_id", true),
                s("event_type", true),
                Field::new("occurred_at", DataType::Timestamp(TimeUnit::Microsecond, Some(utc)), true),
                s("user_id", true),
                s("session_id", true),
                s("action", true),
                Field::new("confidence_score", DataType::Float64, true),
                s("policy_version", true),
                s("model_version", true),
                s("request_id", true),
                s("reviewer_id", true),
                s("override_reason", true),
                s("original_action", true),
                s("safety_category", true),
                s("severity", true),
                s("metadata", true),
                Field::new("payload", DataType::Binary, false),
                s("prev_hash", false),
                s("entry_hash", false),
            ]))
        })
        .clone()
}

/// Groups `records` (one flush of one partition, ascending offsets) by placement and encodes
/// one Parquet object per group.
pub fn encode_flush(
    prefix: &str,
    topic: &str,
    partition: i32,
    records: &[ChainedRecord],
    config: &SegmentConfig,
) -> Result<Vec<EncodedSegment>, SegmentError> {
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Ok(Vec::new());
    };
    // A flush spans a handful of placements: a linear search on a key that compares in a few
    // instructions, starting with the previous record's group. The `Placement` (a calendar date
    // and a shared environment string) is built once per group.
    let mut groups: Vec<(PlacementKey, Placement, Vec<&ChainedRecord>)> = Vec::new();
    let mut current = 0;
    for record in records {
        let key = PlacementKey::of(record);
        if !groups.get(current).is_some_and(|group| group.0 == key) {
            current = match groups.iter().position(|group| group.0 == key) {
                Some(index) => index,
                None => {
                    groups.push((key, Placement::of(record), Vec::new()));
                    groups.len() - 1
                }
            };
        }
        groups[current].2.push(record);
    }
    groups.sort_by(|a, b| a.1.cmp(&b.1));
    groups
        .into_iter()
        .map(|(_, placement, rows)| {
            let key = object_key(prefix, &placement, topic, partition, first.offset, last.offset);
            let entries: Vec<crate::chain::Hash> = rows.iter().map(|r| r.link.entry_hash).collect();
            let merkle_root = hex::encode(crate::merkle::root(&entries).expect("groups are non-empty"));
            let props = writer_properties(topic, partition, first.offset, last.offset, &merkle_root, config);
            let body = encode_rows(topic, partition, &rows, props)
                .map_err(|message| SegmentError::Encode { key: key.clone(), message })?;
            let last_row = rows.last().expect("groups are non-empty");
            Ok(EncodedSegment {
                key,
                placement,
                sha256: hex::encode(Sha256::digest(&body)),
                body,
                rows: rows.len(),
                first_offset: rows[0].offset,
                last_offset: last_row.offset,
                last_entry_hash: hex::encode(last_row.link.entry_hash),
                first_prev_hash: hex::encode(rows[0].link.prev_hash),
                merkle_root,
            })
        })
        .collect()
}

/// Text and binary min/max statistics are cut to this many bytes (parquet-rs's default):
/// `verify` accepts such a bound only at this length.
const STATISTICS_TRUNCATE_BYTES: usize = 64;

fn writer_properties(
    topic: &str,
    partition: i32,
    first: i64,
    last: i64,
    merkle_root: &str,
    config: &SegmentConfig,
) -> WriterProperties {
    let kv = |k: &str, v: String| KeyValue::new(k.to_string(), v);
    let no_dict = [
        "payload",
        "prev_hash",
        "entry_hash",
        "decision_id",
        "request_id",
        "kafka_offset",
        "kafka_timestamp",
        "occurred_at",
        "metadata",
        "reject_reason",
        "confidence_score",
    ];
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(config.zstd_level).unwrap_or_default()))
        .set_max_row_group_row_count(Some(config.row_group_rows))
        // Row-group (chunk) min/max is what Athena and DuckDB prune on; page-level statistics
        // cost encode time for little gain on append-only audit data.
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_statistics_truncate_length(Some(STATISTICS_TRUNCATE_BYTES))
        .set_dictionary_enabled(true)
        .set_data_page_size_limit(DATA_PAGE_BYTES)
        .set_created_by(format!("aegis-audit {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(vec![
            kv("aegis.format", SEGMENT_FORMAT.to_string()),
            kv("aegis.topic", topic.to_string()),
            kv("aegis.partition", partition.to_string()),
            kv("aegis.flush_first_offset", first.to_string()),
            kv("aegis.flush_last_offset", last.to_string()),
            kv("aegis.merkle_root", merkle_root.to_string()),
        ]));
    // Unique or random-looking columns gain nothing from a dictionary; payload stats are noise.
    for column in no_dict {
        builder = builder.set_column_dictionary_enabled(ColumnPath::from(column), false);
    }
    // Min/max of hashes, free text and raw bytes prune nothing and cost a comparison per value.
    for column in ["payload", "prev_hash", "entry_hash", "metadata", "reject_reason"] {
        builder = builder.set_column_statistics_enabled(ColumnPath::from(column), EnabledStatistics::None);
    }
    for column in UNCOMPRESSED {
        builder = builder.set_column_compression(ColumnPath::from(column), Compression::UNCOMPRESSED);
    }
    builder.build()
}

/// Columns whose pages are a few bytes of dictionary indices: ZSTD saves nothing on them, and a
/// compressed column costs a ZSTD context per column chunk.
const UNCOMPRESSED: [&str; 5] = ["kafka_topic", "kafka_partition", "status", "reject_code", "event_type"];

/// Rows per Arrow batch handed to the Parquet writer. The writer keeps one row group's encoded
/// pages however it is fed, so batching only bounds the uncompressed Arrow copy. At 256 rows its
/// largest array (the payloads, ~130 KiB) stays under the allocator's mmap threshold
/// (`budget::MMAP_THRESHOLD_BYTES`) and reuses heap memory; 8,192-row batches were mapped and faulted in
/// afresh each time.
const BATCH_ROWS: usize = 256;

/// Parquet data pages of 64 KiB instead of the writer's 1 MiB, for the same reason: a page's
/// buffers (values, then the ZSTD output) are below the mmap threshold. Pages that size cost
/// ~1.5% in file size (ZSTD sees less of the column at once); with the 256-row batches they took
/// the hot path from ~3.0x to ~2.5x the reference bound (README, Performance).
const DATA_PAGE_BYTES: usize = 64 * 1024;
const _: () = assert!(DATA_PAGE_BYTES < crate::budget::MMAP_THRESHOLD_BYTES);

fn encode_rows(topic: &str, partition: i32, rows: &[&ChainedRecord], props: WriterProperties) -> Result<Bytes, String> {
    // Segments come to ~60% of the payload bytes; a generous capacity costs address space, not
    // memory (untouched pages are not resident), while a short one doubles and copies.
    let mut out = Vec::with_capacity(rows.iter().map(|r| r.payload.len()).sum::<usize>() + 4096);
    let mut writer = ArrowWriter::try_new(&mut out, arrow_schema(), Some(props)).map_err(|e| e.to_string())?;
    for chunk in rows.chunks(BATCH_ROWS) {
        let batch = record_batch(topic, partition, chunk).map_err(|e| e.to_string())?;
        writer.write(&batch).map_err(|e| e.to_string())?;
    }
    writer.close().map_err(|e| e.to_string())?;
    Ok(Bytes::from(out))
}

pub fn record_batch(
    topic: &str,
    partition: i32,
    rows: &[&ChainedRecord],
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = rows.len();
    // Every text builder sized to what it will hold, so none grows (and copies) on the way.
    let text = |bytes: usize| StringBuilder::with_capacity(n, bytes);
    let mut lengths = [0usize; 13];
    for event in rows.iter().filter_map(|r| r.outcome.as_ref().ok()) {
        lengths.iter_mut().zip(event.text_lengths()).for_each(|(sum, len)| *sum += len);
    }
    // In `DecisionEvent::text_lengths` order.
    let [mut decision_id, mut user_id, mut session_id, mut action, mut policy_version, mut model_version, mut request_id, mut reviewer_id, mut override_reason, mut original_action, mut safety_category, mut severity, mut metadata] =
        lengths.map(text);
    let mut kafka_topic = text(n * topic.len());
    let mut kafka_partition = Int32Builder::with_capacity(n);
    let mut kafka_offset = Int64Builder::with_capacity(n);
    let mut kafka_timestamp = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut status = text(n * 8);
    let mut reject_code = text(0);
    let mut reject_reason = text(0);
    let mut event_type = text(n * 11);
    let mut occurred_at = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut confidence = Float64Builder::with_capacity(n);
    let mut payload = BinaryBuilder::with_capacity(n, rows.iter().map(|r| r.payload.len()).sum());

    for r in rows {
        kafka_topic.append_value(topic);
        kafka_partition.append_value(partition);
        kafka_offset.append_value(r.offset);
        kafka_timestamp.append_option(r.kafka_timestamp_ms);
        status.append_value(r.status().as_str());
        payload.append_value(&r.payload);
        match &r.outcome {
            Ok(e) => {
                reject_code.append_null();
                reject_reason.append_null();
                decision_id.append_value(e.decision_id());
                event_type.append_value(e.event_type.as_str());
                occurred_at.append_value(e.occurred_at.timestamp_micros());
                user_id.append_value(e.user_id());
                session_id.append_value(e.session_id());
                action.append_value(e.action());
                confidence.append_option(e.confidence_score);
                policy_version.append_value(e.policy_version());
                model_version.append_value(e.model_version());
                request_id.append_value(e.request_id());
                reviewer_id.append_option(e.reviewer_id());
                override_reason.append_option(e.override_reason());
                original_action.append_option(e.original_action());
                safety_category.append_option(e.safety_category());
                severity.append_option(e.severity());
                metadata.append_option(e.metadata());
            }
            Err(reason) => {
                reject_code.append_value(reason.code());
                reject_reason.append_value(reason.to_string());
                for b in [
                    &mut decision_id,
                    &mut event_type,
                    &mut user_id,
                    &mut session_id,
                    &mut action,
                    &mut policy_version,
                    &mut model_version,
                    &mut request_id,
                    &mut reviewer_id,
                    &mut override_reason,
                    &mut original_action,
                    &mut safety_category,
                    &mut severity,
                    &mut metadata,
                ] {
                    b.append_null();
                }
                occurred_at.append_null();
                confidence.append_null();
            }
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(kafka_topic.finish()),
        Arc::new(kafka_partition.finish()),
        Arc::new(kafka_offset.finish()),
        Arc::new(kafka_timestamp.finish()),
        Arc::new(status.finish()),
        Arc::new(reject_code.finish()),
        Arc::new(reject_reason.finish()),
        Arc::new(decision_id.finish()),
        Arc::new(event_type.finish()),
        Arc::new(occurred_at.finish()),
        Arc::new(user_id.finish()),
        Arc::new(session_id.finish()),
        Arc::new(action.finish()),
        Arc::new(confidence.finish()),
        Arc::new(policy_version.finish()),
        Arc::new(model_version.finish()),
        Arc::new(request_id.finish()),
        Arc::new(reviewer_id.finish()),
        Arc::new(override_reason.finish()),
        Arc::new(original_action.finish()),
        Arc::new(safety_category.finish()),
        Arc::new(severity.finish()),
        Arc::new(metadata.finish()),
        Arc::new(payload.finish()),
        Arc::new(hex_column(rows.iter().map(|r| &r.link.prev_hash))),
        Arc::new(hex_column(rows.iter().map(|r| &r.link.entry_hash))),
    ];
    RecordBatch::try_new(arrow_schema(), columns)
}

/// A column of digests as lowercase hex, encoded straight into the array's one value buffer:
/// no per-row builder copy, and every value is 64 bytes so the offsets are a plain step.
fn hex_column<'a>(hashes: impl ExactSizeIterator<Item = &'a crate::chain::Hash>) -> StringArray {
    let n = hashes.len();
    let mut values = vec![0u8; n * 64];
    for (hash, out) in hashes.zip(values.chunks_exact_mut(64)) {
        hex::encode_to_slice(hash, out).expect("32 bytes are 64 hex digits");
    }
    let offsets = OffsetBuffer::from_lengths(std::iter::repeat_n(64, n));
    StringArray::try_new(offsets, Buffer::from_vec(values), None).expect("hex digits are UTF-8")
}

/// The rows of a segment that the chain covers.
#[derive(Debug, Clone)]
pub struct Row {
    pub offset: i64,
    pub kafka_timestamp_ms: Option<i64>,
    pub topic: String,
    pub partition: i32,
    pub status: EntryStatus,
    pub payload: Bytes,
    pub prev_hash: String,
    pub entry_hash: String,
}

/// A segment read back: rows in file order and its footer's key-value metadata.
#[derive(Debug, Clone)]
pub struct SegmentRead {
    pub rows: Vec<Row>,
    pub metadata: BTreeMap<String, String>,
}

/// The columns [`read_segment`] reads.
const CHAIN_COLUMNS: [&str; 8] = [
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "kafka_timestamp",
    "status",
    "payload",
    "prev_hash",
    "entry_hash",
];

/// A segment opened for reading: its footer key-value metadata, its whole footer, its Arrow
/// schema, and a reader of `columns`.
struct OpenSegment {
    metadata: BTreeMap<String, String>,
    footer: Arc<ParquetMetaData>,
    schema: SchemaRef,
    reader: ParquetRecordBatchReader,
}

fn open_segment<'c>(body: Bytes, columns: impl IntoIterator<Item = &'c str>) -> Result<OpenSegment, String> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(body).map_err(|e| e.to_string())?;
    let metadata = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| kv.iter().map(|k| (k.key.clone(), k.value.clone().unwrap_or_default())).collect())
        .unwrap_or_default();
    let (footer, schema) = (builder.metadata().clone(), builder.schema().clone());
    let mask = ProjectionMask::columns(builder.parquet_schema(), columns);
    let reader = builder.with_projection(mask).build().map_err(|e| e.to_string())?;
    Ok(OpenSegment { metadata, footer, schema, reader })
}

pub fn read_segment(body: Bytes) -> Result<SegmentRead, String> {
    let open = open_segment(body, CHAIN_COLUMNS)?;
    let mut rows = Vec::new();
    for batch in open.reader {
        chain_rows(&batch.map_err(|e| e.to_string())?, &mut rows)?;
    }
    Ok(SegmentRead { rows, metadata: open.metadata })
}

/// What `verify` reads of a segment, in one pass over the object.
pub struct SegmentCheckRead {
    pub segment: SegmentRead,
    /// The rows' derived columns, in row order.
    pub derived: Vec<DerivedColumns>,
    /// Where the footer's statistics or indexes do not hold for the values ([`FooterCheck`]).
    pub footer_problems: Vec<FooterProblem>,
}

/// [`read_segment`], the rows' [`DerivedColumns`], and the footer held against the values.
pub fn read_segment_for_verify(body: Bytes) -> Result<SegmentCheckRead, String> {
    let columns = CHAIN_COLUMNS.into_iter().chain(DERIVED_TEXT_COLUMNS).chain(DERIVED_OTHER_COLUMNS);
    // The rows are read without the page index: with one, parquet-rs reads the pages where the
    // offset index points, which need not be the pages other readers read (the whole chunk).
    let open = open_segment(body.clone(), columns)?;
    let mut footer_check = match footer_with_page_index(&body) {
        Ok(footer) => FooterCheck::new(&footer, &open.schema),
        Err(e) => {
            let mut check = FooterCheck::new(&open.footer, &open.schema);
            check.problems.push(FooterProblem { offset: None, detail: format!("the page index does not read: {e}") });
            check
        }
    };
    let (mut rows, mut derived) = (Vec::new(), Vec::new());
    for batch in open.reader {
        let batch = batch.map_err(|e| e.to_string())?;
        footer_check.check_batch(&batch);
        chain_rows(&batch, &mut rows)?;
        derived_rows(&batch, &mut derived)?;
    }
    let segment = SegmentRead { rows, metadata: open.metadata };
    Ok(SegmentCheckRead { segment, derived, footer_problems: footer_check.finish() })
}

/// The footer with the column and offset indexes, where the file has them.
fn footer_with_page_index(body: &Bytes) -> Result<ParquetMetaData, String> {
    ParquetMetaDataReader::new()
        .with_page_index_policy(PageIndexPolicy::Optional)
        .parse_and_finish(body)
        .map_err(|e| e.to_string())
}

/// A footer that does not hold for the segment's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FooterProblem {
    /// The first row whose value a statistic excludes, when there is one.
    pub offset: Option<i64>,
    pub detail: String,
}

/// One column's statistics at one level (its row groups, or the pages of its column index), and
/// what the values seen so far say of them. Group `g` is the `g`th row group or page.
struct ColumnStatistics {
    name: String,
    /// Where each group's rows start (in file order), then the row count.
    starts: Vec<u64>,
    /// (row group, page) of each group, for pages; `None` for row groups.
    pages: Option<Vec<(usize, usize)>>,
    /// Pages the column index marks as holding only nulls (readers skip them for any value).
    null_pages: Vec<bool>,
    mins: ArrayRef,
    maxes: ArrayRef,
    null_counts: Vec<Option<u64>>,
    nulls_seen: Vec<u64>,
    /// Whether a value of the group is its min (max), or the bound the writer's truncation of one.
    min_attained: Vec<bool>,
    max_attained: Vec<bool>,
    /// One exclusion per group is enough to name it.
    reported: Vec<bool>,
    /// Whether the reader reads the column at all (only then are its values checked).
    read: bool,
}

impl ColumnStatistics {
    fn new(
        name: &str,
        starts: Vec<u64>,
        pages: Option<Vec<(usize, usize)>>,
        bounds: [ArrayRef; 2],
        nulls: UInt64Array,
    ) -> Self {
        let groups = starts.len() - 1;
        let [mins, maxes] = bounds;
        ColumnStatistics {
            name: name.to_string(),
            starts,
            pages,
            mins,
            maxes,
            null_counts: nulls.iter().collect(),
            nulls_seen: vec![0; groups],
            min_attained: vec![false; groups],
            max_attained: vec![false; groups],
            reported: vec![false; groups],
            null_pages: vec![false; groups],
            read: false,
        }
    }

    fn gives_anything(&self) -> bool {
        let given = |a: &dyn Array| a.null_count() < a.len();
        given(&self.mins) || given(&self.maxes) || self.null_counts.iter().any(Option::is_some)
    }

    /// "row group 1" or "row group 1, page 3".
    fn group(&self, g: usize) -> String {
        match &self.pages {
            Some(pages) => format!("row group {}, page {}", pages[g].0, pages[g].1),
            None => format!("row group {g}"),
        }
    }
}

/// Holds a segment's footer and page index against its values, batch by batch (`verify`).
/// Readers trust the statistics: Athena and DuckDB skip a row group (Trino also a page, by the
/// column index) whose min/max excludes what a query asks for, and DuckDB answers
/// `max(kafka_offset)` from them. Neither the chain nor the Merkle root covers them, so
/// statistics edited to narrow them hide rows from analysts, and edited to widen them give
/// wrong aggregates, while every hash still verifies. So each min and max given must be the
/// group's smallest and largest value (a text or binary bound may be the writer's truncation:
/// the min a prefix of the smallest value, the max above the largest and equal to it but for
/// its last character), each null count given must be the values', every row-group bound must
/// read as a value of its column, and no column may carry a bloom filter, which the writer never
/// makes. (Images of 2026-11-23 before 192443e wrote page statistics, so a column index is
/// held like the row groups, page by page.)
pub struct FooterCheck {
    columns: Vec<ColumnStatistics>,
    /// The row groups' row counts, summed.
    footer_rows: u64,
    rows_seen: u64,
    problems: Vec<FooterProblem>,
}

impl FooterCheck {
    pub fn new(footer: &ParquetMetaData, schema: &Schema) -> Self {
        let mut problems = Vec::new();
        let row_groups = footer.row_groups();
        let mut row_group_starts = vec![0u64];
        let mut bloom_filters = Vec::new();
        for (g, row_group) in row_groups.iter().enumerate() {
            row_group_starts.push(row_group_starts[g] + row_group.num_rows().max(0) as u64);
            for chunk in row_group.columns() {
                let path = chunk.column_path().string();
                if chunk.bloom_filter_offset().is_some() && !bloom_filters.contains(&path) {
                    bloom_filters.push(path);
                }
            }
        }
        if !bloom_filters.is_empty() {
            let detail = format!("bloom filters, which the writer never writes, on {}", bloom_filters.join(", "));
            problems.push(FooterProblem { offset: None, detail });
        }
        let parquet_schema = footer.file_metadata().schema_descr();
        let all_row_groups: Vec<usize> = (0..row_groups.len()).collect();
        let mut columns = Vec::new();
        for field in schema.fields() {
            let name = field.name();
            let converter = match StatisticsConverter::try_new(name, schema, parquet_schema) {
                Ok(converter) => converter.with_missing_null_counts_as_zero(false),
                Err(e) => {
                    problems.push(FooterProblem { offset: None, detail: format!("{name}: {e}") });
                    continue;
                }
            };
            let Some(index) = converter.parquet_column_index() else { continue };
            let chunk_level = || -> parquet::errors::Result<ColumnStatistics> {
                let bounds = [converter.row_group_mins(row_groups)?, converter.row_group_maxes(row_groups)?];
                let nulls = converter.row_group_null_counts(row_groups)?;
                Ok(ColumnStatistics::new(name, row_group_starts.clone(), None, bounds, nulls))
            };
            match chunk_level() {
                Ok(column) => {
                    // A bound the converter cannot read as the column's type (text that is not
                    // UTF-8) comes back null, and a reader that compares bytes may still skip by it.
                    for (g, row_group) in row_groups.iter().enumerate() {
                        let Some(stats) = row_group.column(index).statistics() else { continue };
                        for (bound, given, read) in [
                            ("min", stats.min_bytes_opt(), &column.mins),
                            ("max", stats.max_bytes_opt(), &column.maxes),
                        ] {
                            if given.is_some() && read.is_null(g) {
                                let detail =
                                    format!("row group {g}: the footer's {bound} of {name} does not read as its type");
                                problems.push(FooterProblem { offset: None, detail });
                            }
                        }
                    }
                    if column.gives_anything() {
                        columns.push(column);
                    }
                }
                Err(e) => problems.push(FooterProblem { offset: None, detail: format!("{name}: {e}") }),
            }
            let Some(page_index) = footer.page_index() else { continue };
            if !(0..row_groups.len()).any(|g| page_index.column_index(g, index).is_some()) {
                continue;
            }
            let page_level = || -> Result<ColumnStatistics, String> {
                let page_index = page_index.as_ref();
                // The shape parquet's converter assumes (it panics on some others), checked first.
                let mut pages = Vec::new();
                let mut null_pages = Vec::new();
                let mut starts = vec![0u64];
                for (g, row_group) in row_groups.iter().enumerate() {
                    let at = |what: String| format!("row group {g}: {what}");
                    let column_index = page_index.column_index(g, index).ok_or_else(|| at("no column index".into()))?;
                    let locations = page_index
                        .offset_index(g, index)
                        .ok_or_else(|| at("no offset index to place its pages".into()))?
                        .page_locations();
                    let count = column_index.num_pages() as usize;
                    if count == 0 || count != locations.len() {
                        return Err(at(format!("{count} pages indexed, {} placed", locations.len())));
                    }
                    let firsts: Vec<i64> = locations.iter().map(|l| l.first_row_index).collect();
                    let rows = row_group.num_rows();
                    if firsts[0] != 0 || firsts.windows(2).any(|w| w[0] >= w[1]) || firsts[count - 1] >= rows {
                        return Err(at(format!("pages start at rows {firsts:?} of {rows}")));
                    }
                    let group_start = starts.last().copied().unwrap_or(0);
                    starts.extend(firsts[1..].iter().map(|&first| group_start + first as u64));
                    starts.push(group_start + rows as u64);
                    for p in 0..count {
                        pages.push((g, p));
                        null_pages.push(column_index.is_null_page(p));
                        // A page bound the converter cannot read as text comes back null.
                        if let ColumnIndexMetaData::BYTE_ARRAY(bytes) = column_index {
                            let given = [("min", bytes.min_value(p)), ("max", bytes.max_value(p))];
                            for (bound, raw) in given {
                                if field.data_type() == &DataType::Utf8
                                    && raw.is_some_and(|r| std::str::from_utf8(r).is_err())
                                {
                                    return Err(at(format!("page {p}'s {bound} does not read as its type")));
                                }
                            }
                        }
                    }
                }
                let bounds = [
                    converter.data_page_mins(page_index, &all_row_groups).map_err(|e| e.to_string())?,
                    converter.data_page_maxes(page_index, &all_row_groups).map_err(|e| e.to_string())?,
                ];
                let nulls = converter.data_page_null_counts(page_index, &all_row_groups).map_err(|e| e.to_string())?;
                if bounds[0].len() != pages.len() || nulls.len() != pages.len() {
                    return Err(format!("{} pages, {} bounds", pages.len(), bounds[0].len()));
                }
                let mut column = ColumnStatistics::new(name, starts, Some(pages), bounds, nulls);
                column.null_pages = null_pages;
                Ok(column)
            };
            match page_level() {
                Ok(column) if column.gives_anything() => columns.push(column),
                Ok(_) => {}
                Err(e) => problems.push(FooterProblem { offset: None, detail: format!("{name}'s column index: {e}") }),
            }
        }
        let footer_rows = row_group_starts.last().copied().unwrap_or(0);
        FooterCheck { columns, footer_rows, rows_seen: 0, problems }
    }

    /// Checks the next batch of rows, in file order.
    pub fn check_batch(&mut self, batch: &RecordBatch) {
        let offsets = batch.column_by_name("kafka_offset").and_then(|c| c.as_primitive_opt::<Int64Type>());
        let offset_of = |i: usize| offsets.filter(|o| o.is_valid(i)).map(|o| o.value(i));
        let first_row = self.rows_seen;
        self.rows_seen += batch.num_rows() as u64;
        for column in &mut self.columns {
            let Some(values) = batch.column_by_name(&column.name) else { continue };
            column.read = true;
            let compared = (
                bound_comparator(&column.mins, values, std::cmp::Ordering::Less),
                bound_comparator(&column.maxes, values, std::cmp::Ordering::Greater),
            );
            let (min_vs, max_vs) = match compared {
                (Ok(min), Ok(max)) => (min, max),
                (Err(e), _) | (_, Err(e)) => {
                    let detail = format!("{}: statistics not comparable with the values: {e}", column.name);
                    self.problems.push(FooterProblem { offset: None, detail });
                    column.reported.fill(true);
                    column.min_attained.fill(true);
                    column.max_attained.fill(true);
                    continue;
                }
            };
            let last_group = column.starts.len() - 2;
            let mut g = column.starts.partition_point(|&start| start <= first_row).saturating_sub(1).min(last_group);
            let floats = values.as_primitive_opt::<Float64Type>();
            for i in 0..batch.num_rows() {
                while g < last_group && column.starts[g + 1] <= first_row + i as u64 {
                    g += 1;
                }
                if values.is_null(i) {
                    column.nulls_seen[g] += 1;
                    continue;
                }
                // Writers leave NaN out of min/max (and no JSON number is one).
                if floats.is_some_and(|f| f.value(i).is_nan()) {
                    continue;
                }
                if column.null_pages[g] && !column.reported[g] {
                    column.reported[g] = true;
                    let detail = format!(
                        "{}: the column index says {} holds only nulls, this row has a value",
                        column.group(g),
                        column.name
                    );
                    self.problems.push(FooterProblem { offset: offset_of(i), detail });
                }
                let (has_min, has_max) = (column.mins.is_valid(g), column.maxes.is_valid(g));
                let (to_min, to_max) = (min_vs(g, i), max_vs(g, i));
                if has_min && !column.min_attained[g] {
                    // A truncated min is a prefix of the smallest value.
                    column.min_attained[g] = to_min.is_eq()
                        || byte_pair(values, &column.mins, i, g)
                            .is_some_and(|(value, bound, _)| truncated(bound) && value.starts_with(bound));
                }
                if has_max && !column.max_attained[g] {
                    // A truncated max is the largest value's prefix with its last character raised.
                    column.max_attained[g] = to_max.is_eq()
                        || (to_max.is_gt()
                            && byte_pair(values, &column.maxes, i, g).is_some_and(|(value, bound, kept)| {
                                truncated(bound) && value.len() > kept && value.starts_with(&bound[..kept])
                            }));
                }
                if column.reported[g] {
                    continue;
                }
                let bound = if has_min && to_min.is_gt() {
                    "min"
                } else if has_max && to_max.is_lt() {
                    "max"
                } else {
                    continue;
                };
                column.reported[g] = true;
                let detail =
                    format!("{}: the footer's {bound} of {} excludes this row's value", column.group(g), column.name);
                self.problems.push(FooterProblem { offset: offset_of(i), detail });
            }
        }
    }

    pub fn finish(mut self) -> Vec<FooterProblem> {
        // parquet-rs reads every page; readers that trust the footer's row counts stop short.
        if self.rows_seen != self.footer_rows {
            let detail = format!("the footer counts {} rows, the pages hold {}", self.footer_rows, self.rows_seen);
            self.problems.push(FooterProblem { offset: None, detail });
        }
        for column in self.columns.iter().filter(|column| column.read) {
            for (g, (given, seen)) in column.null_counts.iter().zip(&column.nulls_seen).enumerate() {
                if let Some(given) = given.filter(|given| given != seen) {
                    let detail = format!(
                        "{}: the footer counts {given} nulls in {}, the values {seen}",
                        column.group(g),
                        column.name
                    );
                    self.problems.push(FooterProblem { offset: None, detail });
                }
            }
            for g in 0..column.reported.len() {
                // An excluded value is reported already, and says more.
                let bounds =
                    [("min", &column.mins, column.min_attained[g]), ("max", &column.maxes, column.max_attained[g])];
                for (bound, given, attained) in bounds {
                    if given.is_valid(g) && !attained && !column.reported[g] {
                        let detail = format!(
                            "{}: the footer's {bound} of {} is not the values' {bound} (an aggregate read from the footer would be wrong)",
                            column.group(g),
                            column.name
                        );
                        self.problems.push(FooterProblem { offset: None, detail });
                    }
                }
            }
        }
        self.problems
    }
}

/// Whether `bound` is as long as the writer's truncation leaves one: it cuts at
/// [`STATISTICS_TRUNCATE_BYTES`], at a character boundary for text (up to 3 bytes less), and may
/// raise the last character by one (a byte more). A shorter bound than that is no truncation.
fn truncated(bound: &[u8]) -> bool {
    (STATISTICS_TRUNCATE_BYTES - 3..=STATISTICS_TRUNCATE_BYTES + 1).contains(&bound.len())
}

/// Value `i` and bound `g` as bytes, when the column is text or binary (whose bounds the
/// writer truncates), with the length of the bound the writer keeps when it raises a truncated
/// max: all but its last character (text) or byte (binary).
fn byte_pair<'a>(
    values: &'a ArrayRef,
    bounds: &'a ArrayRef,
    i: usize,
    g: usize,
) -> Option<(&'a [u8], &'a [u8], usize)> {
    if let (Some(v), Some(b)) = (values.as_string_opt::<i32>(), bounds.as_string_opt::<i32>()) {
        let bound = b.value(g);
        let kept = bound.char_indices().last().map_or(0, |(at, _)| at);
        return Some((v.value(i).as_bytes(), bound.as_bytes(), kept));
    }
    let (v, b) = (values.as_binary_opt::<i32>()?, bounds.as_binary_opt::<i32>()?);
    Some((v.value(i), b.value(g), b.value(g).len().saturating_sub(1)))
}

/// Compares bound `g` with value `i`. Doubles as IEEE 754 numbers (+0 equals -0), which every
/// reader's order agrees with, and a NaN bound as `nan` (below every value for a min, above for
/// a max: it excludes none and is none of them); other types as Parquet orders them.
fn bound_comparator(
    bounds: &ArrayRef,
    values: &ArrayRef,
    nan: std::cmp::Ordering,
) -> Result<arrow_ord::ord::DynComparator, arrow_schema::ArrowError> {
    if let (Some(b), Some(v)) = (bounds.as_primitive_opt::<Float64Type>(), values.as_primitive_opt::<Float64Type>()) {
        let (b, v) = (b.clone(), v.clone());
        return Ok(Box::new(move |g, i| b.value(g).partial_cmp(&v.value(i)).unwrap_or(nan)));
    }
    make_comparator(bounds.as_ref(), values.as_ref(), SortOptions::default())
}

/// Appends `batch`'s rows (their chain columns) to `rows`.
fn chain_rows(batch: &RecordBatch, rows: &mut Vec<Row>) -> Result<(), String> {
    let col = |name: &str| batch.column_by_name(name).ok_or_else(|| format!("column {name} missing"));
    let topic = col("kafka_topic")?.as_string_opt::<i32>().ok_or("kafka_topic is not a string")?.clone();
    let partition = col("kafka_partition")?.as_primitive_opt::<Int32Type>().ok_or("kafka_partition type")?.clone();
    let offset = col("kafka_offset")?.as_primitive_opt::<Int64Type>().ok_or("kafka_offset type")?.clone();
    let timestamp =
        col("kafka_timestamp")?.as_primitive_opt::<TimestampMillisecondType>().ok_or("kafka_timestamp type")?.clone();
    let status = col("status")?.as_string_opt::<i32>().ok_or("status type")?.clone();
    let payload = col("payload")?.as_binary_opt::<i32>().ok_or("payload type")?.clone();
    let prev = col("prev_hash")?.as_string_opt::<i32>().ok_or("prev_hash type")?.clone();
    let entry = col("entry_hash")?.as_string_opt::<i32>().ok_or("entry_hash type")?.clone();
    // A null would read as "" or 0 and could pass as a real value (partition 0, say).
    let required: [(&str, &dyn Array); 6] = [
        ("kafka_topic", &topic),
        ("kafka_partition", &partition),
        ("kafka_offset", &offset),
        ("status", &status),
        ("prev_hash", &prev),
        ("entry_hash", &entry),
    ];
    if let Some((name, _)) = required.iter().find(|(_, column)| column.null_count() > 0) {
        return Err(format!("column {name} has nulls"));
    }
    for i in 0..batch.num_rows() {
        let status = match status.value(i) {
            "accepted" => EntryStatus::Accepted,
            "rejected" => EntryStatus::Rejected,
            other => return Err(format!("row {i}: unknown status {other:?}")),
        };
        rows.push(Row {
            offset: offset.value(i),
            kafka_timestamp_ms: timestamp.is_valid(i).then(|| timestamp.value(i)),
            topic: topic.value(i).to_string(),
            partition: partition.value(i),
            status,
            payload: Bytes::copy_from_slice(payload.value(i)),
            prev_hash: prev.value(i).to_string(),
            entry_hash: entry.value(i).to_string(),
        });
    }
    Ok(())
}

/// The event's text columns, each derived from the payload field of the same name.
pub const DERIVED_TEXT_COLUMNS: [&str; 14] = [
    "decision_id",
    "event_type",
    "user_id",
    "session_id",
    "action",
    "policy_version",
    "model_version",
    "request_id",
    "reviewer_id",
    "override_reason",
    "original_action",
    "safety_category",
    "severity",
    "metadata",
];

/// A row's columns that the writer derives from its payload (and its verdict), which the chain
/// does not hash: what `verify` holds against the payload (`schemas/CHAIN.md`).
#[derive(Debug, Clone, PartialEq)]
pub struct DerivedColumns {
    /// In the order of [`DERIVED_TEXT_COLUMNS`].
    pub texts: [Option<String>; 14],
    pub confidence_score: Option<f64>,
    pub occurred_at_us: Option<i64>,
    pub reject_code: Option<String>,
    pub reject_reason: Option<String>,
}

/// The derived columns besides [`DERIVED_TEXT_COLUMNS`].
const DERIVED_OTHER_COLUMNS: [&str; 4] = ["confidence_score", "occurred_at", "reject_code", "reject_reason"];

/// Appends `batch`'s rows' derived columns to `out`.
fn derived_rows(batch: &RecordBatch, out: &mut Vec<DerivedColumns>) -> Result<(), String> {
    let col = |name: &str| batch.column_by_name(name).ok_or_else(|| format!("column {name} missing"));
    let text = |name: &str| -> Result<StringArray, String> {
        Ok(col(name)?.as_string_opt::<i32>().ok_or_else(|| format!("{name} is not a string"))?.clone())
    };
    let texts = DERIVED_TEXT_COLUMNS.map(text);
    let texts: Vec<StringArray> = texts.into_iter().collect::<Result<_, _>>()?;
    let score = col("confidence_score")?.as_primitive_opt::<Float64Type>().ok_or("confidence_score type")?.clone();
    let occurred = col("occurred_at")?
        .as_primitive_opt::<arrow_array::types::TimestampMicrosecondType>()
        .ok_or("occurred_at type")?
        .clone();
    let reject_code = text("reject_code")?;
    let reject_reason = text("reject_reason")?;
    let opt_text = |a: &StringArray, i: usize| a.is_valid(i).then(|| a.value(i).to_string());
    for i in 0..batch.num_rows() {
        out.push(DerivedColumns {
            texts: std::array::from_fn(|c| opt_text(&texts[c], i)),
            confidence_score: score.is_valid(i).then(|| score.value(i)),
            occurred_at_us: occurred.is_valid(i).then(|| occurred.value(i)),
            reject_code: opt_text(&reject_code, i),
            reject_reason: opt_text(&reject_reason, i),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Chain;
    use crate::config::ValidationConfig;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    pub(crate) fn sample_records(topic: &str, partition: i32, payloads: &[(i64, String)]) -> Vec<ChainedRecord> {
        let mut chain = Chain::new(topic, partition);
        payloads
            .iter()
            .map(|(offset, p)| {
                let outcome = crate::decode::decode(
                    Some(&Bytes::from(p.clone())),
                    Some(1_795_000_000_000),
                    &ValidationConfig::default(),
                );
                let status = if outcome.is_ok() { EntryStatus::Accepted } else { EntryStatus::Rejected };
                let link = chain.append(*offset, status, p.as_bytes()).unwrap();
                ChainedRecord {
                    offset: *offset,
                    kafka_timestamp_ms: Some(1_795_000_000_000),
                    payload: Bytes::from(p.clone()),
                    link,
                    outcome,
                }
            })
            .collect()
    }

    fn event(id: &str, env: &str, day: u32) -> String {
        format!(
            r#"{{"decision_id":"{id}","event_type":"decision","occurred_at":"2026-11-{day:02}T12:00:00Z","environment":"{env}","user_id":"u","session_id":"s","action":"a","confidence_score":0.5,"policy_version":"p","model_version":"m","request_id":"r"}}"#
        )
    }

    #[test]
    fn keys_are_deterministic_hive_paths() {
        let p = Placement::Trail { year: 2026, month: 3, day: 7, environment: "prod".into() };
        assert_eq!(
            object_key("trail/", &p, "ai-decisions", 2, 100, 199),
            "trail/year=2026/month=03/day=07/environment=prod/ai-decisions-p0002-00000000000000000100-00000000000000000199.parquet"
        );
        let q = Placement::Quarantine { year: 2026, month: 1, day: 2 };
        assert_eq!(
            object_key("", &q, "t", 0, 0, 0),
            "quarantine/year=2026/month=01/day=02/t-p0000-00000000000000000000-00000000000000000000.parquet"
        );
    }

    #[test]
    fn flush_splits_by_placement_and_round_trips() {
        let records = sample_records(
            "t",
            1,
            &[
                (10, event("a", "prod", 17)),
                (11, event("b", "dev", 17)),
                (12, "garbage".into()),
                (13, event("c", "prod", 18)),
            ],
        );
        let segments = encode_flush("trail", "t", 1, &records, &SegmentConfig::default()).unwrap();
        let keys: Vec<_> = segments.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys.len(), 4, "{keys:?}");
        assert!(keys.iter().all(|k| k.ends_with("t-p0001-00000000000000000010-00000000000000000013.parquet")));
        let total: usize = segments.iter().map(|s| s.rows).sum();
        assert_eq!(total, 4);
        let quarantine = segments.iter().find(|s| matches!(s.placement, Placement::Quarantine { .. })).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(quarantine.body.clone()).unwrap();
        let kv = reader.metadata().file_metadata().key_value_metadata().unwrap().clone();
        assert!(kv.iter().any(|k| k.key == "aegis.flush_last_offset" && k.value.as_deref() == Some("13")));
        let batch = reader.build().unwrap().next().unwrap().unwrap();
        assert_eq!(batch.num_rows(), 1);
        assert_eq!(batch.schema(), arrow_schema());
    }

    #[test]
    fn only_the_writers_directories_directly_under_the_prefix_are_the_trails() {
        let file = "t-p0000-00000000000000000000-00000000000000000009.parquet";
        let trail = format!("year=2026/month=11/day=20/environment=prod/{file}");
        let quarantine = format!("quarantine/year=2026/month=11/day=20/{file}");
        assert_eq!(
            trail_directory("trail", &format!("trail/{trail}")),
            Some("year=2026/month=11/day=20/environment=prod")
        );
        assert_eq!(
            trail_directory("trail/", &format!("trail/{quarantine}")),
            Some("quarantine/year=2026/month=11/day=20")
        );
        assert_eq!(trail_directory("", &trail), Some("year=2026/month=11/day=20/environment=prod"));
        // Another deployment's trail under a longer prefix, or a stray file: not this trail's.
        assert_eq!(trail_directory("trail", &format!("trail/staging/{trail}")), None);
        assert_eq!(trail_directory("", &format!("trail/{trail}")), None);
        assert_eq!(trail_directory("", &format!("quarantine/{trail}")), None);
        assert_eq!(trail_directory("trail", &format!("trail/{file}")), None);
        assert_eq!(trail_directory("trail", &format!("trailer/{trail}")), None);
    }

    #[test]
    fn a_listing_prefix_never_starts_with_a_slash() {
        assert_eq!(dir_prefix(&["trail"]), "trail/");
        assert_eq!(dir_prefix(&["trail/", "_digests"]), "trail/_digests/");
        assert_eq!(dir_prefix(&[""]), "");
        assert_eq!(dir_prefix(&["/"]), "");
    }

    #[test]
    fn interleaved_placements_group_in_offset_order_and_sort_by_placement() {
        let payloads = [
            (20, event("a", "prod", 17)),
            (21, event("b", "dev", 17)),
            (22, "garbage".into()),
            (23, event("c", "prod", 17)),
            (24, event("d", "prod", 18)),
            (25, event("e", "dev", 17)),
            (26, "{}".into()),
        ];
        let records = sample_records("t", 0, &payloads);
        let segments = encode_flush("trail", "t", 0, &records, &SegmentConfig::default()).unwrap();
        let placements: Vec<_> = segments.iter().map(|s| s.placement.clone()).collect();
        let mut sorted = placements.clone();
        sorted.sort();
        assert_eq!(placements, sorted, "objects come in placement order");
        let offsets = |placement: &Placement| {
            records.iter().filter(|r| Placement::of(r) == *placement).map(|r| r.offset).collect::<Vec<_>>()
        };
        for segment in &segments {
            let want = offsets(&segment.placement);
            assert!(!want.is_empty());
            assert_eq!(
                (segment.rows, segment.first_offset, segment.last_offset),
                (want.len(), want[0], *want.last().unwrap())
            );
        }
        for a in &records {
            for b in &records {
                assert_eq!(PlacementKey::of(a) == PlacementKey::of(b), Placement::of(a) == Placement::of(b));
            }
        }
        // prod/17 (20, 23), dev/17 (21, 25), prod/18 (24), quarantine (22, 26).
        assert_eq!(segments.iter().map(|s| s.rows).sum::<usize>(), 7);
        assert_eq!(segments.len(), 4);
    }

    proptest::proptest! {
        // Whatever a record says, its object key stays under the prefix with exactly the Hive shape.
        #[test]
        fn keys_never_escape_the_prefix(env in crate::decode::tests::environment_candidates(), topic in "[a-z][a-z0-9._-]{0,20}", p in 0i32..10_000, first in 0i64..i64::MAX / 2) {
            let json = event("d", "prod", 17).replace("\"prod\"", &serde_json::to_string(&env).unwrap());
            let records = sample_records(&topic, p, &[(first, json)]);
            let placement = Placement::of(&records[0]);
            let key = object_key("trail", &placement, &topic, p, first, first);
            proptest::prop_assert!(key.starts_with("trail/year=2026/month=11/day=") || key.starts_with("trail/quarantine/year="));
            // Only a whole `.`/`..`/empty segment could climb or collapse a path.
            proptest::prop_assert!(key.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."), "{}", key);
            // prefix/year/month/day/environment/file, or prefix/quarantine/year/month/day/file.
            proptest::prop_assert_eq!(key.split('/').count(), 6, "{}", key);
            // A trail key names the record's own environment, and only one the schema allows.
            let pattern = crate::decode::tests::schema_environment_pattern();
            match &placement {
                Placement::Trail { environment, .. } => {
                    proptest::prop_assert_eq!(&environment[..], env.as_str());
                    proptest::prop_assert!(pattern.is_match(&env) && key.contains(&format!("/environment={env}/")), "{}", key);
                }
                Placement::Quarantine { .. } => proptest::prop_assert!(!pattern.is_match(&env), "{:?} quarantined", env),
            }
        }
    }

    /// Ten records over row groups of four: decisions (override columns null), an override and
    /// a rejected record, so columns hold nulls in some row groups and not in others.
    fn footer_sample() -> (Vec<ChainedRecord>, SegmentConfig) {
        let override_event = r#"{"decision_id":"o","event_type":"override","occurred_at":"2026-11-17T12:00:00Z","environment":"prod","user_id":"u","session_id":"s","action":"deny","policy_version":"p","model_version":"m","request_id":"r","reviewer_id":"rev","override_reason":"why","original_action":"a"}"#;
        let payloads: Vec<(i64, String)> = (0..10)
            .map(|i| {
                let payload = match i {
                    5 => override_event.to_string(),
                    7 => "not json".to_string(),
                    // Longer than the statistics keep: row group 2's bounds of it are truncated.
                    9 => event(&format!("id-9{}", "é".repeat(60)), "prod", 17),
                    // '-' is in no hex digest and no base64: a footer patch finds only the bounds.
                    _ => event(&format!("id-{i}"), "prod", 17),
                };
                (1000 + i, payload)
            })
            .collect();
        let config = SegmentConfig { row_group_rows: 4, ..SegmentConfig::default() };
        (sample_records("t", 0, &payloads), config)
    }

    fn footer_problems(body: Bytes) -> Vec<FooterProblem> {
        read_segment_for_verify(body).unwrap().footer_problems
    }

    /// Replaces every copy of `from` in the footer (the thrift metadata before the last 8
    /// bytes) with `to`, of the same length: the file stays readable.
    fn patch_footer(body: &Bytes, from: &[u8], to: &[u8]) -> Bytes {
        let mut bytes = body.to_vec();
        let len = u32::from_le_bytes(bytes[bytes.len() - 8..bytes.len() - 4].try_into().unwrap()) as usize;
        let start = bytes.len() - 8 - len;
        let footer = &mut bytes[start..start + len];
        let mut patched = 0;
        for at in 0..=footer.len() - from.len() {
            if &footer[at..at + from.len()] == from {
                footer[at..at + from.len()].copy_from_slice(to);
                patched += 1;
            }
        }
        assert!(patched > 0, "{from:?} is not in the footer");
        Bytes::from(bytes)
    }

    #[test]
    fn the_writers_footers_hold_for_their_values() {
        let (records, config) = footer_sample();
        let segments = encode_flush("trail", "t", 0, &records, &config).unwrap();
        assert_eq!(segments.len(), 2, "the trail and the quarantine");
        let trail = &segments.iter().find(|s| matches!(s.placement, Placement::Trail { .. })).unwrap().body;
        let footer = ParquetRecordBatchReaderBuilder::try_new(trail.clone()).unwrap().metadata().clone();
        assert_eq!(footer.num_row_groups(), 3, "nine rows in groups of four");
        for segment in &segments {
            assert_eq!(footer_problems(segment.body.clone()), vec![], "{}", segment.key);
        }
    }

    #[test]
    fn a_narrowed_statistic_is_found_with_the_row_it_hides() {
        let (records, config) = footer_sample();
        let segments = encode_flush("trail", "t", 0, &records, &config).unwrap();
        let trail = &segments.iter().find(|s| matches!(s.placement, Placement::Trail { .. })).unwrap().body;
        // Row group 1 holds offsets 1004, 1005, 1006, 1008 (1007 is in quarantine): its max
        // made 1007 hides 1008 from `WHERE kafka_offset = 1008`, and its min made 1005 hides 1004.
        let max_narrowed = patch_footer(trail, &1008i64.to_le_bytes(), &1007i64.to_le_bytes());
        let found = footer_problems(max_narrowed);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].offset, Some(1008));
        assert!(found[0].detail.contains("row group 1: the footer's max of kafka_offset"), "{}", found[0].detail);
        let min_narrowed = patch_footer(trail, &1004i64.to_le_bytes(), &1005i64.to_le_bytes());
        let found = footer_problems(min_narrowed);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].offset, Some(1004));
        assert!(found[0].detail.contains("row group 1: the footer's min of kafka_offset"), "{}", found[0].detail);
        // A text column: row group 0's decision_id max "id-3" made "id-2".
        let found = footer_problems(patch_footer(trail, b"id-3", b"id-2"));
        assert!(found.iter().any(|p| p.offset == Some(1003) && p.detail.contains("max of decision_id")), "{found:?}");
    }

    #[test]
    fn a_widened_or_unreadable_statistic_is_found() {
        let (records, config) = footer_sample();
        let segments = encode_flush("trail", "t", 0, &records, &config).unwrap();
        let trail = &segments.iter().find(|s| matches!(s.placement, Placement::Trail { .. })).unwrap().body;
        // Row group 1's max 1008 made 1009: no row hidden, but `max(kafka_offset)` read from
        // the footer would say 1009.
        let details = |body| footer_problems(body).into_iter().map(|p| (p.offset, p.detail)).collect::<Vec<_>>();
        assert_eq!(
            details(patch_footer(trail, &1008i64.to_le_bytes(), &1009i64.to_le_bytes())),
            [(
                None,
                "row group 1: the footer's max of kafka_offset is not the values' max (an aggregate read from the footer would be wrong)".to_string()
            )]
        );
        // Row group 0's decision_id max "id-3" made "id-4", or made bytes that are not UTF-8.
        assert_eq!(
            details(patch_footer(trail, b"id-3", b"id-4")),
            [(
                None,
                "row group 0: the footer's max of decision_id is not the values' max (an aggregate read from the footer would be wrong)".to_string()
            )]
        );
        assert_eq!(
            details(patch_footer(trail, b"id-3", b"id-\xff")),
            [(None, "row group 0: the footer's max of decision_id does not read as its type".to_string())]
        );
    }

    #[test]
    fn a_null_count_that_is_not_the_values_is_found() {
        let (records, config) = footer_sample();
        let segments = encode_flush("trail", "t", 0, &records, &config).unwrap();
        let trail = &segments.iter().find(|s| matches!(s.placement, Placement::Trail { .. })).unwrap().body;
        let open = open_segment(trail.clone(), CHAIN_COLUMNS.into_iter().chain(DERIVED_TEXT_COLUMNS)).unwrap();
        let mut check = FooterCheck::new(&open.footer, &open.schema);
        for batch in open.reader {
            // The values' reviewer_id filled in where the footer counts nulls (every row but the
            // override's): as if the rows had been edited under a footer left alone.
            let batch = batch.unwrap();
            let index = batch.schema().index_of("reviewer_id").unwrap();
            let filled: StringArray = (0..batch.num_rows()).map(|_| Some("rev")).collect();
            let mut columns = batch.columns().to_vec();
            columns[index] = Arc::new(filled);
            check.check_batch(&RecordBatch::try_new(batch.schema(), columns).unwrap());
        }
        let found = check.finish();
        let details: Vec<&str> = found.iter().map(|p| p.detail.as_str()).collect();
        assert_eq!(
            details,
            [
                "row group 0: the footer counts 4 nulls in reviewer_id, the values 0",
                "row group 1: the footer counts 3 nulls in reviewer_id, the values 0",
                "row group 2: the footer counts 1 nulls in reviewer_id, the values 0",
            ]
        );
    }

    #[test]
    fn a_bloom_filter_is_found_and_a_column_index_held_page_by_page() {
        let (records, config) = footer_sample();
        let rows: Vec<&ChainedRecord> = records.iter().filter(|r| r.outcome.is_ok()).collect();
        let base = || {
            WriterProperties::builder()
                .set_max_row_group_row_count(Some(config.row_group_rows))
                .set_statistics_enabled(EnabledStatistics::Chunk)
        };
        let details = |props| -> Vec<String> {
            footer_problems(encode_rows("t", 0, &rows, props).unwrap()).into_iter().map(|p| p.detail).collect()
        };
        assert_eq!(details(base().build()), Vec::<String>::new());
        let bloom = base()
            .set_column_bloom_filter_enabled("user_id".into(), true)
            .set_column_bloom_filter_enabled("action".into(), true);
        assert_eq!(details(bloom.build()), ["bloom filters, which the writer never writes, on user_id, action"]);

        // Page statistics (as the first images wrote them), two rows a page: the column index
        // holds for the values; values outside a page's bounds are found in that page.
        let paged = base()
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_data_page_row_count_limit(2)
            .set_write_batch_size(2)
            .build();
        let body = encode_rows("t", 0, &rows, paged).unwrap();
        assert_eq!(footer_problems(body.clone()), vec![]);
        let footer = footer_with_page_index(&body).unwrap();
        let open = open_segment(body, ["kafka_offset"]).unwrap();
        assert!(footer.page_index().is_some_and(|p| p.column_index(0, 2).is_some_and(|c| c.num_pages() == 2)));
        let mut check = FooterCheck::new(&footer, &open.schema);
        for batch in open.reader {
            // Offset 1002 (row group 0, page 1, rows 1002 and 1003) read as 1001: inside the
            // row group's bounds, below its page's min.
            let batch = batch.unwrap();
            let offsets: arrow_array::Int64Array = batch
                .column(0)
                .as_primitive::<Int64Type>()
                .iter()
                .map(|o| o.map(|o| if o == 1002 { 1001 } else { o }))
                .collect();
            check.check_batch(&RecordBatch::try_new(batch.schema(), vec![Arc::new(offsets)]).unwrap());
        }
        let found: Vec<_> = check.finish().into_iter().map(|p| (p.offset, p.detail)).collect();
        assert_eq!(
            found,
            [(
                Some(1001),
                "row group 0, page 1: the footer's min of kafka_offset excludes this row's value".to_string()
            )]
        );
    }

    #[test]
    fn a_page_marked_all_null_that_holds_a_value_and_rows_the_footer_does_not_count_are_found() {
        let (records, config) = footer_sample();
        let rows: Vec<&ChainedRecord> = records.iter().filter(|r| r.outcome.is_ok()).collect();
        let paged = WriterProperties::builder()
            .set_max_row_group_row_count(Some(config.row_group_rows))
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_data_page_row_count_limit(2)
            .set_write_batch_size(2)
            .build();
        let body = encode_rows("t", 0, &rows, paged).unwrap();
        let footer = footer_with_page_index(&body).unwrap();
        let open = open_segment(body, ["kafka_offset", "reviewer_id"]).unwrap();
        let mut check = FooterCheck::new(&footer, &open.schema);
        // Only rows 1000-1003 (row group 0: decisions, two pages of nulls), reviewer_id filled in.
        let mut reader = open.reader;
        let batch = reader.next().unwrap().unwrap().slice(0, 4);
        let filled: StringArray = (0..batch.num_rows()).map(|_| Some("rev")).collect();
        let batch = RecordBatch::try_new(batch.schema(), vec![batch.column(0).clone(), Arc::new(filled)]).unwrap();
        check.check_batch(&batch);
        let found: Vec<_> = check.finish().into_iter().map(|p| (p.offset, p.detail)).collect();
        let null_page = (
            Some(1000),
            "row group 0, page 0: the column index says reviewer_id holds only nulls, this row has a value".to_string(),
        );
        assert!(found.contains(&null_page), "{found:?}");
        let uncounted = (None, "the footer counts 9 rows, the pages hold 4".to_string());
        assert!(found.contains(&uncounted), "{found:?}");
    }

    #[test]
    fn encoding_is_deterministic() {
        let records = sample_records("t", 0, &[(0, event("a", "prod", 17)), (1, event("b", "prod", 17))]);
        let a = encode_flush("p", "t", 0, &records, &SegmentConfig::default()).unwrap();
        let b = encode_flush("p", "t", 0, &records, &SegmentConfig::default()).unwrap();
        assert_eq!(a[0].body, b[0].body);
    }

    #[test]
    fn segment_names_parse_with_dashes_in_topics() {
        let key = "trail/year=2026/month=11/day=20/environment=prod/ai-decisions-p0003-00000000000000000010-00000000000000000019.parquet";
        let name = parse_segment_key(key, "ai-decisions").unwrap();
        assert_eq!((name.partition, name.flush_first, name.flush_last), (3, 10, 19));
        assert!(parse_segment_key(key, "ai").is_none(), "another topic's prefix is not this topic");
        assert!(parse_segment_key("trail/_digests/x.digest", "ai-decisions").is_none());
        let wide = object_key("trail", &Placement::Quarantine { year: 2026, month: 1, day: 2 }, "t", 12_345, 0, 9);
        assert_eq!(parse_segment_key(&wide, "t").map(|n| n.partition), Some(12_345), "5-digit partitions");
        assert!(parse_segment_key("t-p+123-00000000000000000000-00000000000000000009.parquet", "t").is_none());
    }
}
