//! `aegis-audit verify`: checks the trail straight from the object store, trusting only the
//! bytes there and a public key. Follows `schemas/CHAIN.md` (entries, Merkle roots, digests);
//! `ops/verify_trail.py` is an independent implementation of the same page, and both report
//! the same problem codes.
//!
//! Per partition, oldest first:
//! - the digest chain: seq 0, 1, 2, … with no gap; every signature verifies with a trusted key;
//!   each digest names the previous digest's body hash and continues its chain range;
//! - every flush (the objects named `<topic>-pPPPP-<first>-<last>.parquet`, in every Hive
//!   directory and quarantine): rows merged by offset cover exactly `first..=last`; every
//!   entry hash recomputes; every row links to the one before, across flushes and directories;
//!   each object's Merkle root and stored checksum match its bytes; every row's derived columns
//!   agree with its payload, and it lies in the directory its payload (or verdict) names;
//! - coverage: every segment a digest lists exists with the SHA-256 and Merkle root the digest
//!   signed (deletion, replacement and tail truncation show here), and every segment inside the
//!   signed range is listed.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ed25519_dalek::VerifyingKey;
use futures::stream::{self, StreamExt};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::chain::{entry_hash, genesis, parse_hash, Hash};
use crate::digest::{self, DigestObject, SegmentEntry, DIGESTS_DIR};
use crate::segment::{
    join_key, parse_segment_key, read_segment_for_verify, DerivedColumns, Placement, Row, SegmentName,
    DERIVED_TEXT_COLUMNS,
};
use crate::sinks::{ChainHead, ObjectStore, SinkError};
use crate::tools::retention::{prune_marker_key, PruneMarker, PRUNE_MARKER_FORMAT};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Store(#[from] SinkError),
    #[error("{0}")]
    Key(#[from] digest::DigestError),
    #[error("no public key: pass --public-key, or publish one under {0}")]
    NoPublicKey(String),
}

/// What to check.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    pub topic: String,
    pub partition: Option<i32>,
    /// Offsets: check flushes that overlap `from..=to` (the first link is then an anchor).
    pub from: Option<i64>,
    pub to: Option<i64>,
    /// Segments dated before this were pruned on purpose (`aegis-audit prune`): a missing
    /// prefix of whole flushes older than it is expected, and the first remaining entry must
    /// link to what the digests signed for the last pruned one.
    pub pruned_before: Option<chrono::NaiveDate>,
    /// Trusted keys; when empty, the keys published in the bucket are used (and said so).
    pub public_keys: Vec<VerifyingKey>,
    /// Objects fetched concurrently.
    pub concurrency: usize,
    pub progress: bool,
    /// The chain table's heads, read before the bucket is listed: the bucket must hold at least
    /// what they record (its newest entry and digest). `None`: not checked.
    /// A head whose item does not read is that partition's `chain_head` problem.
    pub chain_heads: Option<crate::sinks::dynamodb::ChainHeads>,
}

/// One finding. `code` is shared with `ops/verify_trail.py`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub code: &'static str,
    pub partition: i32,
    pub key: String,
    pub offset: Option<i64>,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.offset {
            Some(o) => write!(f, "{} p{} {} offset {}: {}", self.code, self.partition, self.key, o, self.detail),
            None => write!(f, "{} p{} {}: {}", self.code, self.partition, self.key, self.detail),
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub ok: bool,
    pub partitions: usize,
    pub objects: usize,
    pub records: u64,
    pub digests: usize,
    /// Segments newer than the partition's last digest (not yet signed; checked by links only).
    pub unsigned_segments: usize,
    /// Signed segments absent because they were pruned (`--pruned-before`).
    pub pruned_segments: usize,
    pub seconds: f64,
    pub records_per_second: f64,
    pub notes: Vec<String>,
    pub problems: Vec<Problem>,
}

/// Holds a row's derived columns against its payload and verdict (`schemas/CHAIN.md`, "Derived
/// columns"): the columns that disagree, and the directory the row belongs in, when the payload
/// says (an accepted row whose payload gives no date or environment says nowhere).
pub fn derived_check(row: &Row, columns: &DerivedColumns) -> (Vec<&'static str>, Option<String>) {
    let mut wrong = Vec::new();
    if row.status == crate::chain::EntryStatus::Rejected {
        for (name, value) in DERIVED_TEXT_COLUMNS.iter().zip(&columns.texts) {
            if value.is_some() {
                wrong.push(*name);
            }
        }
        if columns.confidence_score.is_some() {
            wrong.push("confidence_score");
        }
        if columns.occurred_at_us.is_some() {
            wrong.push("occurred_at");
        }
        if columns.reject_code.is_none() {
            wrong.push("reject_code");
        }
        if columns.reject_reason.is_none() {
            wrong.push("reject_reason");
        }
        return (wrong, Some(Placement::quarantine(row.kafka_timestamp_ms).directory()));
    }
    let Some(event) = crate::decode::json_members(&row.payload) else {
        return (vec!["payload (not a JSON object)"], None);
    };
    let text = |name: &str| crate::decode::member_str(&event, name);
    for (name, value) in DERIVED_TEXT_COLUMNS.iter().zip(&columns.texts) {
        let expected = if *name == "metadata" {
            event.get("metadata").and_then(|raw| crate::decode::stored_metadata(raw.get())).map(|m| m.into_owned())
        } else {
            text(name)
        };
        // Images before c32fe7f (2026-11-23) re-serialised metadata instead: exactly that text.
        // Not any text of the same value: `{"k":"low","k":"high"}` parses to the payload's
        // `{"k":"high"}` here (the last wins), while a reader taking the first sees "low".
        let reserialised = || {
            let parse = |text: Option<&str>| text.and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok());
            *name == "metadata" && parse(expected.as_deref()).is_some_and(|e| value.as_deref() == Some(&e.to_string()))
        };
        if expected != *value && !reserialised() {
            wrong.push(*name);
        }
    }
    let score = event.get("confidence_score").and_then(|raw| serde_json::from_str::<f64>(raw.get()).ok());
    if score != columns.confidence_score {
        wrong.push("confidence_score");
    }
    let occurred = text("occurred_at").and_then(|text| crate::decode::parse_rfc3339_utc(&text).ok());
    if occurred.map(|at| at.timestamp_micros()) != columns.occurred_at_us {
        wrong.push("occurred_at");
    }
    if columns.reject_code.is_some() {
        wrong.push("reject_code");
    }
    if columns.reject_reason.is_some() {
        wrong.push("reject_reason");
    }
    let directory =
        occurred.zip(text("environment")).map(|(at, environment)| Placement::trail(at, environment.into()).directory());
    (wrong, directory)
}

/// The entry hash a row should have, from its own columns, or why it has none.
pub fn recompute(row: &Row) -> Result<Hash, String> {
    let prev = parse_hash(&row.prev_hash)
        .ok_or_else(|| format!("prev_hash {:?} is not 64 lowercase hex chars", row.prev_hash))?;
    // The hash prefixes the topic's length as u16 and the payload's as u32 (CHAIN.md): a longer
    // field has no encoding, and truncating its length would let two rows hash alike.
    if u16::try_from(row.topic.len()).is_err() || u32::try_from(row.payload.len()).is_err() {
        return Err(format!(
            "a kafka_topic of {} bytes or a payload of {} bytes has no entry hash",
            row.topic.len(),
            row.payload.len()
        ));
    }
    Ok(entry_hash(&prev, &row.topic, row.partition, row.offset, row.status, &row.payload))
}

struct Fetched {
    name: SegmentName,
    result: Result<(Bytes, Option<String>), SinkError>,
}

pub async fn verify(store: Arc<dyn ObjectStore>, prefix: &str, options: &VerifyOptions) -> Result<Report, VerifyError> {
    let started = Instant::now();
    let mut report = Report::default();
    let keys = trusted_keys(store.as_ref(), prefix, options, &mut report).await?;
    let listing = store.list(&crate::segment::dir_prefix(&[prefix])).await?;
    let digests_root = join_key(&[prefix, DIGESTS_DIR]) + "/";
    let mut segments: BTreeMap<i32, Vec<SegmentName>> = BTreeMap::new();
    let mut other_topics = std::collections::BTreeSet::new();
    for object in &listing {
        if object.key.starts_with(&digests_root) {
            continue;
        }
        // Only this trail's directories: another trail under a longer prefix is not part of it.
        if crate::segment::trail_directory(prefix, &object.key).is_none() {
            continue;
        }
        let file = object.key.rsplit('/').next().unwrap_or_default();
        if let Some(name) = parse_segment_key(&object.key, &options.topic) {
            if options.partition.is_none_or(|p| p == name.partition) {
                segments.entry(name.partition).or_default().push(name);
            }
        } else if file.is_empty() || file.starts_with(['_', '.']) {
            // Folder markers, and what Athena skips.
        } else if let Some(topic) = crate::segment::segment_topic(&object.key) {
            other_topics.insert(topic.to_string());
        } else if options.partition.is_none() {
            // Athena reads every file of the table's directories: a row no chain holds.
            report.problems.push(Problem {
                code: "unexpected_object",
                partition: -1,
                key: object.key.clone(),
                offset: None,
                detail: "in a trail directory but not a segment of any topic: Athena reads it as part of the table"
                    .into(),
            });
        }
    }
    if !other_topics.is_empty() {
        report.notes.push(format!(
            "segments of other topics share the trail's directories, not verified here: {} (verify each with --topic)",
            other_topics.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    let mut digest_keys: BTreeMap<i32, Vec<DigestName>> = BTreeMap::new();
    let topic_digests = join_key(&[prefix, DIGESTS_DIR, &options.topic]) + "/";
    for object in listing.iter().filter(|o| o.key.starts_with(&topic_digests)) {
        let Some((p, seq)) = parse_digest_key(&object.key[topic_digests.len()..]) else {
            continue;
        };
        if options.partition.is_none_or(|want| want == p) {
            digest_keys.entry(p).or_default().push(DigestName { key: object.key.clone(), seq });
            segments.entry(p).or_default();
        }
    }
    // A partition the chain table knows is checked even when the bucket has nothing of it.
    for &partition in options.chain_heads.iter().flat_map(|heads| heads.keys()) {
        if options.partition.is_none_or(|p| p == partition) {
            segments.entry(partition).or_default();
        }
    }
    // Prune markers are found in the listing, like everything else verify reads.
    let listed_keys: std::collections::HashSet<&str> = match options.pruned_before {
        Some(_) => listing.iter().map(|o| o.key.as_str()).collect(),
        None => Default::default(),
    };
    let total_objects: usize = segments.values().map(Vec::len).sum();
    let bar = progress_bar(options.progress, total_objects as u64, "verifying");
    for (&partition, names) in &segments {
        report.partitions += 1;
        let digests = digest_keys.remove(&partition).unwrap_or_default();
        let signed = check_digests(store.as_ref(), &options.topic, partition, &digests, &keys, &mut report).await?;
        let marker = match options.pruned_before {
            Some(cutoff) => {
                let key = prune_marker_key(prefix, &options.topic, partition);
                let listed = listed_keys.contains(key.as_str());
                prune_marker(store.as_ref(), key, listed, &options.topic, partition, cutoff, &mut report).await
            }
            None => None,
        };
        let head = options.chain_heads.as_ref().and_then(|heads| heads.get(&partition));
        let readable = head.and_then(|h| h.as_ref().ok());
        let seen = check_partition(
            store.clone(),
            prefix,
            &options.topic,
            partition,
            names,
            &signed,
            marker,
            readable.and_then(|h| h.committed).map(|h| h.last_offset),
            options,
            &bar,
            &mut report,
        )
        .await;
        match head {
            Some(Ok(head)) => {
                check_against_head(prefix, &options.topic, partition, head, &signed, seen, options, &mut report)
            }
            Some(Err(reason)) => report.problems.push(Problem {
                code: "chain_head",
                partition,
                key: format!("chain table item {}", crate::sinks::dynamodb::chain_head_pk(&options.topic, partition)),
                offset: None,
                detail: format!("the bucket was not checked against the chain table: {reason}"),
            }),
            None => {}
        }
    }
    bar.finish_and_clear();
    report.seconds = started.elapsed().as_secs_f64();
    report.records_per_second = report.records as f64 / report.seconds.max(1e-9);
    report.ok = report.problems.is_empty();
    Ok(report)
}

/// A progress bar on a terminal's stderr; hidden otherwise (logs, pipes, CI).
pub fn progress_bar(enabled: bool, total: u64, verb: &str) -> indicatif::ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    let template = format!("{{spinner}} {verb} {{pos}}/{{len}} objects {{msg}} [{{elapsed}}, eta {{eta}}]");
    bar.set_style(indicatif::ProgressStyle::with_template(&template).expect("valid template"));
    bar
}

async fn trusted_keys(
    store: &dyn ObjectStore,
    prefix: &str,
    options: &VerifyOptions,
    report: &mut Report,
) -> Result<HashMap<String, VerifyingKey>, VerifyError> {
    let mut keys: HashMap<String, VerifyingKey> = options.public_keys.iter().map(|k| (digest::key_id(k), *k)).collect();
    if keys.is_empty() {
        let dir = join_key(&[prefix, DIGESTS_DIR, "keys"]) + "/";
        let mut unusable = None;
        for object in store.list(&dir).await? {
            // Only `<key_id>.pem` beside each other: below them live the digests of a topic
            // that happens to be named `keys`.
            let name = &object.key[dir.len()..];
            if name.contains('/') || !name.ends_with(".pem") {
                continue;
            }
            // Unchecked against S3's stored checksum: the key's own parse decides (as for digests).
            let (bytes, _) = store.get_checked(&object.key).await?;
            let text = String::from_utf8_lossy(&bytes).to_string();
            match digest::parse_public_key(&object.key, &text) {
                Ok(key) => {
                    keys.insert(digest::key_id(&key), key);
                }
                // One unusable file must not hide the others (or stop the run): digests signed
                // by its key, if any, show as signed by an unknown key.
                Err(e) => {
                    report.notes.push(format!("skipped a published key: {e}"));
                    unusable.get_or_insert(e);
                }
            }
        }
        // None usable at all: say why rather than that none was published.
        if let (true, Some(e)) = (keys.is_empty(), unusable) {
            return Err(e.into());
        }
        if !keys.is_empty() {
            report.notes.push(format!(
                "using {} public key(s) published in the bucket; pass --public-key to trust only your own copy",
                keys.len()
            ));
        }
    }
    Ok(keys)
}

/// What the digests signed for one partition.
#[derive(Debug, Default)]
struct Signed {
    /// Listed segments by key.
    segments: BTreeMap<String, SegmentEntry>,
    /// Chain positions the digests signed (offset → entry hash): each digest's last entry.
    /// (Two digests may claim one offset, e.g. one replayed from another slot: each is checked.)
    anchors: BTreeMap<i64, Vec<(String, String)>>, // offset → [(entry hash, digest key)]
    /// Highest offset covered by a digest.
    through: Option<i64>,
    /// Lowest offset covered by a digest.
    from: Option<i64>,
    /// Body SHA-256 of each digest that parsed, by seq.
    bodies: BTreeMap<u64, Hash>,
}

/// An object in a partition's digest folder: `seq` when it is named `<seq:012>.digest`.
#[derive(Debug, Clone)]
struct DigestName {
    key: String,
    seq: Option<u64>,
}

/// `p<digits>/<rest>` under `_digests/<topic>/`: the partition and, when the folder is spelled
/// as the writer spells it (`p{:04}`) and `rest` is exactly `<seq:012>.digest`, the sequence
/// number. `None` for anything outside a partition folder, which belongs to no chain.
fn parse_digest_key(under_topic: &str) -> Option<(i32, Option<u64>)> {
    let (dir, rest) = under_topic.split_once('/')?;
    let digits = dir.strip_prefix('p').filter(|d| d.len() >= 4 && d.bytes().all(|b| b.is_ascii_digit()))?;
    let partition: i32 = digits.parse().ok()?;
    if rest.is_empty() {
        return None;
    }
    if dir != format!("p{partition:04}") {
        return Some((partition, None)); // p00002/ beside p0002/: not the chain's folder
    }
    Some((partition, crate::digest::digest_seq(rest)))
}

async fn check_digests(
    store: &dyn ObjectStore,
    topic: &str,
    partition: i32,
    names: &[DigestName],
    trusted: &HashMap<String, VerifyingKey>,
    report: &mut Report,
) -> Result<Signed, VerifyError> {
    let mut signed = Signed::default();
    if names.is_empty() {
        return Ok(signed);
    }
    if trusted.is_empty() {
        return Err(VerifyError::NoPublicKey(format!("{DIGESTS_DIR}/keys/")));
    }
    let mut problem = |code, key: &str, detail: String| {
        report.problems.push(Problem { code, partition, key: key.to_string(), offset: None, detail })
    };
    let mut previous: Option<(DigestObject, Hash)> = None;
    let mut expected_seq = 0u64;
    let mut digests = Vec::new();
    for name in names {
        match name.seq {
            Some(seq) => digests.push((seq, &name.key)),
            None => problem("digest_unexpected", &name.key, "in a digest folder but not named <seq:012>.digest".into()),
        }
    }
    digests.sort();
    for (seq, key) in digests {
        if seq > expected_seq {
            // One problem per gap, named after the digest that reveals it.
            let absent = if seq == expected_seq + 1 {
                format!("digest {expected_seq} is")
            } else {
                format!("digests {expected_seq}..={} are", seq - 1)
            };
            problem("digest_missing", key, format!("{absent} absent, found {seq}"));
            previous = None;
        }
        expected_seq = seq + 1;
        // A digest is signed: its signature, not S3's stored checksum, says whether it changed.
        let bytes = match store.get_checked(key).await {
            Ok((bytes, _)) => bytes,
            Err(e) => {
                problem("digest_missing", key, format!("listed but unreadable: {e}"));
                previous = None;
                continue;
            }
        };
        report.digests += 1;
        let object = match DigestObject::parse(key, &bytes) {
            Ok(o) => o,
            Err(e) => {
                problem("digest_malformed", key, e.to_string());
                previous = None;
                continue;
            }
        };
        let body = &object.body;
        match trusted.get(&object.key_id) {
            None => problem("digest_signature", key, format!("signed by unknown key {}", object.key_id)),
            Some(_) if body.key_id != object.key_id => problem(
                "digest_signature",
                key,
                format!("body key_id {} differs from the signature's {}", body.key_id, object.key_id),
            ),
            Some(k) if !object.verify(k) => {
                problem("digest_signature", key, format!("signature does not verify with key {}", object.key_id))
            }
            Some(_) => {}
        }
        // A digest copied from another slot (replayed) is well formed but out of place.
        if body.topic != topic || body.partition != partition || body.seq != seq {
            problem(
                "digest_chain",
                key,
                format!(
                    "body says {}/p{} seq {}, its key says {topic}/p{partition} seq {seq}",
                    body.topic, body.partition, body.seq
                ),
            );
        }
        let expected_prev = previous.as_ref().map_or([0u8; 32], |(_, body_sha)| *body_sha);
        // After a gap or an unreadable digest the expected hash is unknown (already reported).
        if (seq == 0 || previous.is_some()) && body.prev_digest_sha256 != hex::encode(expected_prev) {
            problem(
                "digest_chain",
                key,
                format!(
                    "prev_digest_sha256 {} but the previous digest hashes to {}",
                    body.prev_digest_sha256,
                    hex::encode(expected_prev)
                ),
            );
        }
        if let Some((p, _)) = &previous {
            if body.first_prev_hash != p.body.last_entry_hash || body.first_offset <= p.body.last_offset {
                problem(
                    "digest_chain",
                    key,
                    format!(
                        "range starts at offset {} linking to {}, previous digest ended at {} with {}",
                        body.first_offset, body.first_prev_hash, p.body.last_offset, p.body.last_entry_hash
                    ),
                );
            }
        }
        for entry in &body.segments {
            // The first listing stands, as in `ops/verify_trail.py`: a later digest (perhaps
            // one whose signature failed) naming a signed segment with another SHA-256 must not
            // make an edit of that segment look as signed.
            signed.segments.entry(entry.key.clone()).or_insert_with(|| entry.clone());
        }
        signed.anchors.entry(body.last_offset).or_default().push((body.last_entry_hash.clone(), key.clone()));
        signed.through = signed.through.max(Some(body.last_offset));
        signed.from = Some(signed.from.map_or(body.first_offset, |f: i64| f.min(body.first_offset)));
        let body_sha = object.body_sha256();
        signed.bodies.insert(seq, body_sha);
        previous = Some((object, body_sha));
    }
    Ok(signed)
}

/// The marker `prune` left for the partition at `key` (read only if the listing holds it), if it
/// pruned it with a cutoff no later than the one the verifier was given.
async fn prune_marker(
    store: &dyn ObjectStore,
    key: String,
    listed: bool,
    topic: &str,
    partition: i32,
    cutoff: chrono::NaiveDate,
    report: &mut Report,
) -> Option<PruneMarker> {
    if !listed {
        return None;
    }
    let body = store.get(&key).await;
    let marker = match body.map(|b| serde_json::from_slice::<PruneMarker>(&b)) {
        Ok(Ok(m)) if m.format == PRUNE_MARKER_FORMAT && m.topic == topic && m.partition == partition => m,
        Ok(_) => {
            report.notes.push(format!("{key}: not a prune marker of {topic}/{partition}; ignored"));
            return None;
        }
        Err(e) => {
            report.notes.push(format!("{key}: unreadable ({e}); ignored"));
            return None;
        }
    };
    if marker.cutoff > cutoff {
        report.notes.push(format!(
            "partition {partition}: prune recorded cutoff {}, later than --pruned-before {cutoff}; marker not used",
            marker.cutoff
        ));
        return None;
    }
    Some(marker)
}

/// What a partition's check saw of the offset the chain table names as its head.
#[derive(Debug, Default)]
struct HeadSeen {
    /// The entry hash of the row at that offset.
    row: Option<String>,
    /// Objects of the flush holding that offset that could not be read.
    unreadable: Vec<String>,
    /// The highest offset pruned on purpose (digests and prune marker, with `--pruned-before`).
    pruned_through: Option<i64>,
}

/// What the chain table recorded and the bucket must therefore hold (`--against-chain-table`):
/// the row at the head's offset with the head's entry hash, and the digest it last recorded.
/// Read before the listing, so a live writer only adds to what is checked here.
#[allow(clippy::too_many_arguments)]
fn check_against_head(
    prefix: &str,
    topic: &str,
    partition: i32,
    head: &ChainHead,
    signed: &Signed,
    seen: HeadSeen,
    options: &VerifyOptions,
    report: &mut Report,
) {
    let item = format!("chain table item {}", crate::sinks::dynamodb::chain_head_pk(topic, partition));
    let mut problem = |offset, detail: String| {
        report.problems.push(Problem { code: "chain_head", partition, key: item.clone(), offset, detail })
    };
    // A range check (--from/--to) reads only part of the trail: the head may lie outside it.
    if let (Some(committed), None, None) = (head.committed, options.from, options.to) {
        let want = hex::encode(committed.last_hash);
        match seen.row {
            Some(found) if found == want => {}
            Some(found) => problem(
                Some(committed.last_offset),
                format!("the chain table's head is entry {want}, the row at its offset has {found}"),
            ),
            // Everything up to there was pruned on purpose, and checked as such.
            None if seen.pruned_through.is_some_and(|p| p >= committed.last_offset) => {}
            None if !seen.unreadable.is_empty() => problem(
                Some(committed.last_offset),
                format!(
                    "the chain table's head (entry {want}) was not checked: {} could not be read",
                    seen.unreadable.join(", ")
                ),
            ),
            None => problem(
                Some(committed.last_offset),
                format!("the chain table's head (entry {want}) has no row in the bucket: the newest flushes are gone"),
            ),
        }
    }
    if let Some(recorded) = head.digest {
        let key = digest::digest_key(prefix, topic, partition, recorded.seq);
        match signed.bodies.get(&recorded.seq) {
            Some(found) if *found == recorded.hash => {}
            Some(found) => problem(
                None,
                format!(
                    "the chain table recorded digest {} with body SHA-256 {}, {key} has {}",
                    recorded.seq,
                    hex::encode(recorded.hash),
                    hex::encode(found)
                ),
            ),
            None => problem(
                None,
                format!("the chain table recorded digest {}, the bucket has no readable {key}", recorded.seq),
            ),
        }
    }
}

/// Checks one partition's flushes; returns what it saw of `head_offset`.
#[allow(clippy::too_many_arguments)]
async fn check_partition(
    store: Arc<dyn ObjectStore>,
    prefix: &str,
    topic: &str,
    partition: i32,
    names: &[SegmentName],
    signed: &Signed,
    marker: Option<PruneMarker>,
    head_offset: Option<i64>,
    options: &VerifyOptions,
    bar: &indicatif::ProgressBar,
    report: &mut Report,
) -> HeadSeen {
    let mut seen = HeadSeen::default();
    let mut problems: Vec<Problem> = Vec::new();
    let problem = |code, key: &str, offset: Option<i64>, detail: String| Problem {
        code,
        partition,
        key: key.to_string(),
        offset,
        detail,
    };
    // Coverage: every signed segment exists, every segment in the signed range is signed.
    let present: BTreeMap<&str, &SegmentName> = names.iter().map(|n| (n.key.as_str(), n)).collect();
    let (pruned, anchor) =
        pruned_prefix(signed, &present, prefix, &options.topic, options.pruned_before, marker.as_ref());
    report.pruned_segments += pruned.len();
    for (key, entry) in &signed.segments {
        if pruned.contains(key.as_str()) {
            continue;
        }
        let in_range =
            options.from.is_none_or(|f| entry.last_offset >= f) && options.to.is_none_or(|t| entry.first_offset <= t);
        if in_range && !present.contains_key(key.as_str()) {
            problems.push(problem(
                "missing_segment",
                key,
                Some(entry.first_offset),
                format!(
                    "signed in a digest ({} rows, offsets {}..={}) but absent",
                    entry.rows, entry.first_offset, entry.last_offset
                ),
            ));
        }
    }
    let mut flushes: BTreeMap<(i64, i64), Vec<SegmentName>> = BTreeMap::new();
    for name in names {
        let wanted =
            options.from.is_none_or(|f| name.flush_last >= f) && options.to.is_none_or(|t| name.flush_first <= t);
        if wanted {
            flushes.entry((name.flush_first, name.flush_last)).or_default().push(name.clone());
        }
        if !wanted || signed.segments.contains_key(&name.key) {
            continue;
        }
        if signed.through.is_some_and(|t| name.flush_last <= t) && signed.from.is_some_and(|f| name.flush_first >= f) {
            problems.push(problem(
                "unsigned_segment",
                &name.key,
                Some(name.flush_first),
                "inside the range the digests signed, but listed in none of them".into(),
            ));
        } else {
            report.unsigned_segments += 1;
        }
    }
    if signed.segments.is_empty() && !names.is_empty() {
        report.notes.push(format!("partition {partition}: no digests; links and hashes checked, signatures not"));
    }

    // Fetch flush by flush (objects of one flush concurrently, a few flushes ahead).
    let concurrency = options.concurrency.max(1);
    let fetches = stream::iter(flushes.into_iter().map(|(range, names)| {
        let store = store.clone();
        async move {
            let objects: Vec<Fetched> = stream::iter(names)
                .map(|name| {
                    let store = store.clone();
                    async move {
                        let result = store.get_checked(&name.key).await;
                        Fetched { name, result }
                    }
                })
                .buffered(concurrency)
                .collect()
                .await;
            (range, objects)
        }
    }))
    .buffered(2);
    futures::pin_mut!(fetches);

    let mut expected_prev: Option<(String, i64, String)> = None; // (hash, offset, key) of the last entry seen
    let mut seen_anchors = std::collections::BTreeSet::new();
    let mut first_flush = true;
    let mut highest: Option<i64> = None; // the highest offset seen so far in the partition
    while let Some(((first, last), objects)) = fetches.next().await {
        let first_key = objects.first().map(|o| o.name.key.clone()).unwrap_or_default();
        // An object that cannot be read is reported, and noted if it may hold the head's row.
        let holds_head = head_offset.is_some_and(|h| (first..=last).contains(&h));
        let unreadable = |problems: &mut Vec<Problem>, seen: &mut HeadSeen, key: String, detail: String| {
            problems.push(problem("object_unreadable", &key, None, detail));
            if holds_head {
                seen.unreadable.push(key);
            }
        };
        let mut rows: Vec<(Row, String)> = Vec::new();
        for fetched in objects {
            bar.inc(1);
            report.objects += 1;
            let key = fetched.name.key.clone();
            let (body, stored_sha) = match fetched.result {
                Ok(v) => v,
                Err(e) => {
                    unreadable(&mut problems, &mut seen, key, e.to_string());
                    continue;
                }
            };
            let actual_sha = hex::encode(Sha256::digest(&body));
            if let Some(stored) = stored_sha {
                if stored != actual_sha {
                    problems.push(problem(
                        "object_checksum",
                        &key,
                        None,
                        format!("stored checksum {stored}, body hashes to {actual_sha}"),
                    ));
                }
            }
            if let Some(entry) = signed.segments.get(&key) {
                if entry.sha256 != actual_sha {
                    problems.push(problem(
                        "object_changed",
                        &key,
                        None,
                        format!("the digest signed SHA-256 {}, the object now hashes to {actual_sha}", entry.sha256),
                    ));
                }
            }
            let read = match read_segment_for_verify(body) {
                Ok(read) => read,
                Err(e) => {
                    unreadable(&mut problems, &mut seen, key, format!("not a readable segment: {e}"));
                    continue;
                }
            };
            let (segment, derived) = (read.segment, read.derived);
            for found in read.footer_problems {
                problems.push(problem("statistics", &key, found.offset, found.detail));
            }
            let directory = crate::segment::trail_directory(prefix, &key);
            for (row, columns) in segment.rows.iter().zip(&derived) {
                let (wrong, expected_directory) = derived_check(row, columns);
                if !wrong.is_empty() {
                    let detail = format!("{} do not match the payload", wrong.join(", "));
                    problems.push(problem("derived_column", &key, Some(row.offset), detail));
                }
                if let Some(expected) = expected_directory.filter(|e| Some(e.as_str()) != directory) {
                    let detail = format!("the row belongs under {expected}/");
                    problems.push(problem("misplaced_row", &key, Some(row.offset), detail));
                }
            }
            if segment.rows.is_empty() {
                // The writer never makes one (CHAIN.md): no tree to compare, and nothing to link.
                problems.push(problem("segment_range", &key, Some(first), "the object has no rows".into()));
                continue;
            }
            let entries: Vec<Hash> = segment.rows.iter().filter_map(|r| parse_hash(&r.entry_hash)).collect();
            let root = crate::merkle::root(&entries).map(hex::encode).unwrap_or_default();
            let footer = segment.metadata.get("aegis.merkle_root").cloned().unwrap_or_default();
            if footer != root {
                problems.push(problem("merkle_root", &key, None, format!("footer says {footer}, rows give {root}")));
            }
            if let Some(entry) = signed.segments.get(&key) {
                if entry.merkle_root != root {
                    problems.push(problem(
                        "merkle_root",
                        &key,
                        None,
                        format!("the digest signed {}, rows give {root}", entry.merkle_root),
                    ));
                }
            }
            rows.extend(segment.rows.into_iter().map(|r| (r, key.clone())));
        }
        rows.sort_by_key(|(r, _)| r.offset);
        report.records += rows.len() as u64;
        // The flush's rows cover exactly first..=last, each offset once.
        match (rows.first(), rows.last()) {
            // Every object of the flush unreadable (reported above), or none with rows.
            (None, _) => problems.push(problem(
                "segment_range",
                &first_key,
                Some(first),
                format!("flush {first}..={last} has no readable rows"),
            )),
            (Some((f, fk)), Some((l, lk))) if f.offset != first || l.offset != last => problems.push(problem(
                "segment_range",
                if f.offset != first { fk } else { lk },
                Some(if f.offset != first { f.offset } else { l.offset }),
                format!("flush {first}..={last} has rows {}..={}", f.offset, l.offset),
            )),
            _ => {}
        }
        for (row, key) in &rows {
            // Offsets are unique across the trail and rise along the chain: a row written twice,
            // or a flush overlapping another (a zombie's), repeats them.
            match highest {
                Some(h) if row.offset <= h => problems.push(problem(
                    "duplicate_offset",
                    key,
                    Some(row.offset),
                    if row.offset == h {
                        "offset appears again".into()
                    } else {
                        format!("offset is not above {h}, seen before")
                    },
                )),
                _ => highest = Some(row.offset),
            }
            if Some(row.offset) == head_offset {
                seen.row = Some(row.entry_hash.clone());
            }
            if row.topic != topic || row.partition != partition {
                problems.push(problem(
                    "misplaced_row",
                    key,
                    Some(row.offset),
                    format!("row says {}/{}", row.topic, row.partition),
                ));
            }
            // The link: this row's prev_hash is the previous entry (genesis for the first).
            let expected = match &expected_prev {
                Some((hash, _, _)) => Some(hash.clone()),
                None if first_flush && options.from.is_none() => match (&anchor, &marker) {
                    // Flushes no digest ever listed (signing off, not yet on, or the writer
                    // stopped before its next digest) were pruned, alone or after signed ones:
                    // the marker `prune` left says which entry the rest links to.
                    (anchor, Some(m))
                        if row.offset > m.last_offset && anchor.as_ref().is_none_or(|(at, _)| m.last_offset > *at) =>
                    {
                        report.notes.push(format!(
                            "partition {partition}: the chain starts at offset {} in {key}, after the flushes \
                             prune deleted through offset {} (cutoff {}); no digest signed those",
                            row.offset, m.last_offset, m.cutoff
                        ));
                        Some(m.last_entry_hash.clone())
                    }
                    (Some((_, anchor)), _) => Some(anchor.clone()),
                    _ => Some(hex::encode(genesis(topic, partition))),
                },
                None => None, // --from: the first row is the anchor
            };
            if let Some(expected) = expected {
                if row.prev_hash != expected {
                    let after =
                        expected_prev.as_ref().map_or("genesis".to_string(), |(_, o, k)| format!("offset {o} in {k}"));
                    problems.push(problem(
                        "broken_link",
                        key,
                        Some(row.offset),
                        format!("prev_hash {} but the previous entry ({after}) is {expected}", row.prev_hash),
                    ));
                }
            }
            match recompute(row) {
                Ok(h) if hex::encode(h) == row.entry_hash => {}
                Ok(h) => problems.push(problem(
                    "entry_hash",
                    key,
                    Some(row.offset),
                    format!("entry_hash {} but the row's contents hash to {}", row.entry_hash, hex::encode(h)),
                )),
                Err(why) => problems.push(problem("entry_hash", key, Some(row.offset), why)),
            }
            for (anchor, digest_key) in signed.anchors.get(&row.offset).into_iter().flatten() {
                seen_anchors.insert(row.offset);
                if anchor != &row.entry_hash {
                    problems.push(problem(
                        "digest_mismatch",
                        key,
                        Some(row.offset),
                        format!("{digest_key} signed entry {anchor} here, the row has {}", row.entry_hash),
                    ));
                }
            }
            expected_prev = Some((row.entry_hash.clone(), row.offset, key.clone()));
        }
        first_flush = false;
        bar.set_message(format!("p{partition} offset {last}"));
    }
    // A signed head whose row is gone (with its segment, reported above as well).
    let pruned_through = signed.segments.values().filter(|e| pruned.contains(&e.key)).map(|e| e.last_offset).max();
    for (&offset, (hash, digest_key)) in
        signed.anchors.iter().flat_map(|(o, claims)| claims.iter().map(move |c| (o, c)))
    {
        let in_range = options.from.is_none_or(|f| offset >= f) && options.to.is_none_or(|t| offset <= t);
        if in_range && !seen_anchors.contains(&offset) && pruned_through.is_none_or(|p| offset > p) {
            problems.push(problem(
                "digest_mismatch",
                digest_key,
                Some(offset),
                format!("the digest signed entry {hash} at offset {offset}, but no row has that offset"),
            ));
        }
    }
    report.problems.extend(problems);
    seen.pruned_through = pruned_through.max(marker.map(|m| m.last_offset));
    seen
}

/// The signed flushes at the start of the partition that are gone and dated before `cutoff`
/// (pruned on purpose), and the offset and entry hash of the last of them (what the first
/// remaining entry links to, unless the marker names a later one). Where `prune` left a marker,
/// only flushes up to the one it names count as pruned.
fn pruned_prefix(
    signed: &Signed,
    present: &BTreeMap<&str, &SegmentName>,
    prefix: &str,
    topic: &str,
    cutoff: Option<chrono::NaiveDate>,
    marker: Option<&PruneMarker>,
) -> (std::collections::BTreeSet<String>, Option<(i64, String)>) {
    let mut pruned = std::collections::BTreeSet::new();
    let mut anchor = None;
    let Some(cutoff) = cutoff else { return (pruned, anchor) };
    let mut by_flush: BTreeMap<(i64, i64), Vec<&SegmentEntry>> = BTreeMap::new();
    for entry in signed.segments.values() {
        if let Some(name) = parse_segment_key(&entry.key, topic) {
            by_flush.entry((name.flush_first, name.flush_last)).or_default().push(entry);
        }
    }
    for (&(_, flush_last), entries) in &by_flush {
        if marker.is_some_and(|m| flush_last > m.last_offset) {
            break;
        }
        let gone = entries.iter().all(|e| {
            !present.contains_key(e.key.as_str())
                && crate::tools::retention::key_date(prefix, &e.key).is_some_and(|d| d < cutoff)
        });
        if !gone {
            break;
        }
        pruned.extend(entries.iter().map(|e| e.key.clone()));
        anchor = entries.iter().max_by_key(|e| e.last_offset).map(|e| (e.last_offset, e.last_entry_hash.clone()));
    }
    (pruned, anchor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::digest::DigestSigner;
    use crate::partition::{PartitionWriter, Sinks};
    use crate::sinks::memory::{MemoryHeads, MemoryIndex, MemoryObjectStore};
    use tokio_util::sync::CancellationToken;

    const TOPIC: &str = "t";

    fn signer() -> Arc<DigestSigner> {
        Arc::new(DigestSigner::from_text("k", &"11".repeat(32)).unwrap())
    }

    /// A signed trail of 12 records in 4 flushes of 3, digests after flushes 2 and 4. Offset 7
    /// is not JSON: a rejected entry, in quarantine.
    async fn trail() -> Arc<MemoryObjectStore> {
        trail_signed_by(Some(signer())).await
    }

    async fn trail_signed_by(signer: Option<Arc<DigestSigner>>) -> Arc<MemoryObjectStore> {
        trail_and_heads(signer).await.0
    }

    async fn trail_and_heads(signer: Option<Arc<DigestSigner>>) -> (Arc<MemoryObjectStore>, Arc<MemoryHeads>) {
        trail_under("trail", signer).await
    }

    async fn trail_under(
        prefix: &str,
        signer: Option<Arc<DigestSigner>>,
    ) -> (Arc<MemoryObjectStore>, Arc<MemoryHeads>) {
        let mut config = Config::from_toml_str(
            "[kafka]\nbrokers = \"x:1\"\ntopic = \"t\"\n[s3]\nbucket = \"bkt\"\n[dynamodb]\ntable = \"idx\"\nchain_table = \"chn\"\n",
        )
        .unwrap();
        config.segment.max_records = 3;
        config.s3.prefix = prefix.to_string();
        let objects = Arc::new(MemoryObjectStore::default());
        let heads = Arc::new(MemoryHeads::default());
        let sinks = Sinks {
            objects: objects.clone(),
            index: Some(Arc::new(MemoryIndex::default())),
            heads: heads.clone(),
            dead_letters: None,
            signer: signer.clone(),
            memory: crate::budget::MemoryBudget::new(1 << 30),
        };
        let cancel = CancellationToken::new();
        let mut w = PartitionWriter::open(TOPIC, 0, Arc::new(config), sinks, &cancel).await.unwrap();
        for i in 0..12i64 {
            let env = if i % 2 == 0 { "prod" } else { "dev" };
            let payload = format!(
                r#"{{"decision_id":"d-{i}","event_type":"decision","occurred_at":"2026-11-20T08:00:00Z","environment":"{env}","user_id":"u","session_id":"s","action":"a","confidence_score":0.5,"policy_version":"p","model_version":"m","request_id":"r"}}"#
            );
            let payload = if i == 7 { "not json".to_string() } else { payload };
            w.admit(i, Some(1_795_600_000_000), Some(bytes::Bytes::from(payload))).unwrap();
            if w.should_flush(Instant::now()) {
                w.flush(&cancel).await.unwrap();
                if signer.is_some() && (i == 5 || i == 11) {
                    w.write_digest(&cancel).await.unwrap();
                }
            }
        }
        (objects, heads)
    }

    async fn check(objects: &Arc<MemoryObjectStore>) -> Report {
        let options = VerifyOptions {
            topic: TOPIC.into(),
            public_keys: vec![signer().verifying_key()],
            concurrency: 4,
            ..Default::default()
        };
        verify(objects.clone(), "trail", &options).await.unwrap()
    }

    fn codes(report: &Report) -> Vec<&'static str> {
        let mut codes: Vec<_> = report.problems.iter().map(|p| p.code).collect();
        codes.dedup();
        codes
    }

    fn segment_keys(objects: &MemoryObjectStore) -> Vec<String> {
        objects.keys().into_iter().filter(|k| k.ends_with(".parquet")).collect()
    }

    #[tokio::test]
    async fn a_trail_at_the_bucket_root_is_read() {
        // `s3.prefix = ""`: the same trail written at the root of the bucket.
        let objects = trail().await;
        let (root, _) = trail_under("", Some(signer())).await;
        assert!(root.keys().iter().all(|k| !k.starts_with('/') && !k.starts_with("trail/")));
        let options = VerifyOptions {
            topic: TOPIC.into(),
            public_keys: vec![signer().verifying_key()],
            concurrency: 4,
            ..Default::default()
        };
        let report = verify(root.clone(), "", &options).await.unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.objects, segment_keys(&objects).len());
        assert_eq!(report.objects, check(&objects).await.objects);
    }

    #[tokio::test]
    async fn another_trail_under_a_longer_prefix_is_not_read() {
        // A second deployment writing the same topic under `trail/staging`, in the same bucket.
        let objects = trail().await;
        let own = check(&objects).await.objects;
        let (staging, _) = trail_under("trail/staging", Some(signer())).await;
        for key in staging.keys() {
            let metadata = staging.head(&key).await.unwrap().unwrap().metadata;
            objects.put(&key, staging.body(&key).unwrap(), &metadata).await.unwrap();
        }
        let report = check(&objects).await;
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.objects, own);
    }

    #[tokio::test]
    async fn intact_trail_verifies() {
        let objects = trail().await;
        let report = check(&objects).await;
        assert!(report.ok, "{:?}", report.problems);
        assert_eq!((report.records, report.objects, report.digests), (12, 8, 2));
    }

    #[tokio::test]
    async fn deleted_segment_is_missing_and_breaks_the_link() {
        let objects = trail().await;
        let victim = segment_keys(&objects).into_iter().find(|k| k.contains("-00000000000000000003-")).unwrap();
        objects.remove(&victim);
        let report = check(&objects).await;
        assert!(codes(&report).contains(&"missing_segment"), "{:?}", report.problems);
        assert!(codes(&report).contains(&"broken_link"));
    }

    #[test]
    fn metadata_holds_as_compacted_text_or_as_an_older_images_reserialised_value() {
        let payload = r#"{"decision_id":"d","event_type":"decision","occurred_at":"2026-11-20T08:00:00Z","environment":"prod","user_id":"u","session_id":"s","action":"a","confidence_score":0.5,"policy_version":"p","model_version":"m","request_id":"r","metadata": {"z": 1, "a": [true]}}"#;
        let row = Row {
            offset: 0,
            kafka_timestamp_ms: None,
            topic: TOPIC.into(),
            partition: 0,
            status: crate::chain::EntryStatus::Accepted,
            payload: Bytes::from(payload),
            prev_hash: String::new(),
            entry_hash: String::new(),
        };
        let columns = |metadata: &str| {
            let texts = ["d", "decision", "u", "s", "a", "p", "m", "r"].map(|t| Some(t.to_string()));
            DerivedColumns {
                texts: std::array::from_fn(|i| match i {
                    0..=7 => texts[i].clone(),
                    13 => Some(metadata.to_string()),
                    _ => None,
                }),
                confidence_score: Some(0.5),
                occurred_at_us: Some(1_795_132_800_000_000 + 8 * 3_600_000_000),
                reject_code: None,
                reject_reason: None,
            }
        };
        let check = |metadata: &str| derived_check(&row, &columns(metadata));
        let placed = Some("year=2026/month=11/day=20/environment=prod".to_string());
        assert_eq!(check(r#"{"z":1,"a":[true]}"#), (vec![], placed.clone()));
        assert_eq!(check(r#"{"a":[true],"z":1}"#), (vec![], placed.clone()), "as images before c32fe7f wrote it");
        assert_eq!(check(r#"{"a":[true],"z":2}"#), (vec!["metadata"], placed.clone()));
        // The same value in another text is not what any image wrote: a duplicate key that a
        // first-wins reader sees, a number spelled otherwise, keys in another order.
        assert_eq!(check(r#"{"a":[true],"z":2,"z":1}"#), (vec!["metadata"], placed.clone()));
        assert_eq!(check(r#"{"a":[true],"z":1.0}"#), (vec!["metadata"], placed.clone()));
        assert_eq!(check(r#"{"z":1, "a":[true]}"#), (vec!["metadata"], placed));
        // What those images made of unusual payloads, as `ops/verify_trail.py`'s self-test reads
        // them: the last repeated key, -0 and huge integers as floats.
        let old_image = |raw: &str| serde_json::from_str::<serde_json::Value>(raw).unwrap().to_string();
        assert_eq!(old_image(r#"{"a":1,"a":2}"#), r#"{"a":2}"#);
        assert_eq!(old_image(r#"{"a":-0}"#), r#"{"a":-0.0}"#);
        assert_eq!(old_image(r#"{"a":18446744073709551616}"#), r#"{"a":1.8446744073709552e+19}"#);
    }

    /// CHAIN.md's occurred_at vectors, also checked by `ops/verify_trail.py --self-test`.
    #[test]
    fn occurred_at_vectors() {
        /// Microseconds since the epoch, and the UTC date.
        type Read = Option<(i64, (i32, u32, u32))>;
        let vectors: [(&str, Read); 9] = [
            ("2026-11-18T10:00:00.5+01:00", Some((1794992400500000, (2026, 11, 18)))),
            ("2026-12-31T23:59:60.25Z", Some((1798761600250000, (2026, 12, 31)))),
            ("2026-11-18t10:00:00z", Some((1794996000000000, (2026, 11, 18)))),
            ("2026-11-18T10:00:00.1234567\u{2212}00:30", Some((1794997800123456, (2026, 11, 18)))),
            ("2026-11-18 00:30:00+01:00", Some((1794958200000000, (2026, 11, 17)))),
            ("2026-02-29T00:00:00Z", None),
            ("2026-11-18T24:00:00Z", None),
            ("2026-11-18T10:00:00+24:00", None),
            ("2026-11-18T10:00Z", None),
        ];
        for (text, want) in vectors {
            use chrono::Datelike;
            let got = crate::decode::parse_rfc3339_utc(text)
                .ok()
                .map(|at| (at.timestamp_micros(), (at.year(), at.month(), at.day())));
            assert_eq!(got, want, "{text}");
        }
    }

    #[test]
    fn a_field_longer_than_its_length_prefix_has_no_entry_hash() {
        let row = Row {
            offset: 0,
            kafka_timestamp_ms: None,
            topic: "t".repeat(65_536),
            partition: 0,
            status: crate::chain::EntryStatus::Accepted,
            payload: Bytes::new(),
            prev_hash: "00".repeat(32),
            entry_hash: String::new(),
        };
        let why = recompute(&row).unwrap_err();
        assert!(why.contains("kafka_topic of 65536 bytes"), "{why}");
        assert!(recompute(&Row { topic: "t".repeat(65_535), ..row }).is_ok());
    }

    /// `body` with column `name` replaced by `values` (nulls for `None`), footer kept.
    fn with_text_column(body: Bytes, name: &str, values: &[Option<&str>]) -> Bytes {
        use arrow_array::{ArrayRef, RecordBatch, StringArray};
        let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(body).unwrap();
        let footer = builder.metadata().file_metadata().key_value_metadata().cloned();
        let batch = builder.build().unwrap().next().unwrap().unwrap();
        let index = batch.schema().index_of(name).unwrap();
        let mut columns = batch.columns().to_vec();
        columns[index] = Arc::new(StringArray::from(values.to_vec())) as ArrayRef;
        let batch = RecordBatch::try_new(batch.schema(), columns).unwrap();
        let props = parquet::file::properties::WriterProperties::builder()
            .set_key_value_metadata(footer)
            .set_statistics_enabled(parquet::file::properties::EnabledStatistics::Chunk)
            .build();
        let mut out = Vec::new();
        let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        Bytes::from(out)
    }

    #[tokio::test]
    async fn derived_columns_and_directories_are_held_to_the_payload() {
        let objects = trail_signed_by(None).await;
        assert!(check(&objects).await.ok);
        let first_flush = |env: &str| {
            segment_keys(&objects)
                .into_iter()
                .find(|k| k.contains(env) && k.contains("-00000000000000000000-"))
                .unwrap()
        };
        // An analyst-visible column edited, the payload left alone: the chain cannot see it.
        let prod = first_flush("environment=prod");
        let edited = with_text_column(objects.body(&prod).unwrap(), "action", &[Some("a"), Some("b")]);
        objects.put(&prod, edited, &BTreeMap::new()).await.unwrap();
        let report = check(&objects).await;
        let found: Vec<_> = report.problems.iter().map(|p| (p.code, p.offset)).collect();
        assert_eq!(found, vec![("derived_column", Some(2))], "{:?}", report.problems);
        assert!(report.problems[0].detail.starts_with("action do not match"), "{:?}", report.problems);

        // An object moved to another environment's directory.
        let objects = trail_signed_by(None).await;
        let dev = first_flush("environment=dev");
        let body = objects.remove(&dev).unwrap();
        objects.put(&dev.replace("environment=dev", "environment=staging"), body, &BTreeMap::new()).await.unwrap();
        let report = check(&objects).await;
        let found: Vec<_> = report.problems.iter().map(|p| (p.code, p.offset)).collect();
        assert_eq!(found, vec![("misplaced_row", Some(1))], "{:?}", report.problems);
        assert!(report.problems[0].detail.contains("environment=dev/"), "{:?}", report.problems);

        // A rejected row given an event's columns.
        let objects = trail_signed_by(None).await;
        let quarantined = segment_keys(&objects).into_iter().find(|k| k.contains("/quarantine/")).unwrap();
        let edited = with_text_column(objects.body(&quarantined).unwrap(), "decision_id", &[Some("d-7")]);
        objects.put(&quarantined, edited, &BTreeMap::new()).await.unwrap();
        let report = check(&objects).await;
        let found: Vec<_> = report.problems.iter().map(|p| (p.code, p.offset)).collect();
        assert_eq!(found, vec![("derived_column", Some(7))], "{:?}", report.problems);
    }

    #[tokio::test]
    async fn a_footer_statistic_that_hides_a_row_is_found() {
        let objects = trail_signed_by(None).await;
        let prod = segment_keys(&objects)
            .into_iter()
            .find(|k| k.contains("environment=prod") && k.contains("-00000000000000000000-"))
            .unwrap();
        // Rows d-0 and d-2: decision_id's max made "d-1" hides d-2 from `WHERE decision_id =
        // 'd-2'` in Athena, while every row and link still verifies.
        let mut body = objects.body(&prod).unwrap().to_vec();
        let at = body.windows(3).rposition(|w| w == b"d-2").unwrap();
        let footer_len = u32::from_le_bytes(body[body.len() - 8..body.len() - 4].try_into().unwrap()) as usize;
        assert!(at > body.len() - 8 - footer_len, "the last \"d-2\" is in the footer");
        body[at..at + 3].copy_from_slice(b"d-1");
        objects.put(&prod, Bytes::from(body), &BTreeMap::new()).await.unwrap();
        let report = check(&objects).await;
        let found: Vec<_> = report.problems.iter().map(|p| (p.code, p.offset)).collect();
        assert_eq!(found, vec![("statistics", Some(2))], "{:?}", report.problems);
        assert_eq!(report.problems[0].detail, "row group 0: the footer's max of decision_id excludes this row's value");
    }

    #[tokio::test]
    async fn the_chain_table_reveals_a_tail_removed_with_its_digest() {
        let (objects, heads) = trail_and_heads(Some(signer())).await;
        let against = |heads: BTreeMap<i32, ChainHead>| VerifyOptions {
            topic: TOPIC.into(),
            public_keys: vec![signer().verifying_key()],
            concurrency: 4,
            chain_heads: Some(heads.into_iter().map(|(p, h)| (p, Ok(h))).collect()),
            ..Default::default()
        };
        let recorded = BTreeMap::from([(0, heads.get(TOPIC, 0))]);
        let report = verify(objects.clone(), "trail", &against(recorded.clone())).await.unwrap();
        assert!(report.ok, "{:?}", report.problems);
        // The newest flush (9..=11) and the digest that signed it (seq 1) removed together.
        for key in segment_keys(&objects).into_iter().filter(|k| k.contains("-00000000000000000009-")) {
            objects.remove(&key);
        }
        objects.remove(&crate::digest::digest_key("trail", TOPIC, 0, 1));
        assert!(check(&objects).await.ok, "the bucket alone cannot tell (CHAIN.md)");
        let report = verify(objects.clone(), "trail", &against(recorded)).await.unwrap();
        let found: Vec<_> = report.problems.iter().map(|p| (p.code, p.offset)).collect();
        assert_eq!(found, vec![("chain_head", Some(11)), ("chain_head", None)], "{:?}", report.problems);
        // A partition the chain table knows and the bucket has nothing of.
        let elsewhere = BTreeMap::from([(3, heads.get(TOPIC, 0))]);
        let report = verify(objects.clone(), "trail", &against(elsewhere)).await.unwrap();
        assert!(report.problems.iter().any(|p| p.code == "chain_head" && p.partition == 3), "{:?}", report.problems);
        // An item that does not read is its partition's problem; the others are still checked.
        let (objects, heads) = trail_and_heads(Some(signer())).await;
        let damaged = VerifyOptions {
            chain_heads: Some(BTreeMap::from([(0, Ok(heads.get(TOPIC, 0))), (1, Err("damaged chain item: x".into()))])),
            ..against(BTreeMap::new())
        };
        let report = verify(objects.clone(), "trail", &damaged).await.unwrap();
        let found: Vec<_> = report.problems.iter().map(|p| (p.code, p.partition)).collect();
        assert_eq!(found, vec![("chain_head", 1)], "{:?}", report.problems);
        assert!(report.problems[0].detail.contains("damaged chain item: x"), "{:?}", report.problems);

        // A partition pruned to its head: every flush older than the cutoff, gone on purpose.
        let (objects, heads) = trail_and_heads(Some(signer())).await;
        for key in segment_keys(&objects) {
            objects.remove(&key);
        }
        let pruned = VerifyOptions {
            pruned_before: chrono::NaiveDate::from_ymd_opt(2026, 11, 26),
            ..against(BTreeMap::from([(0, heads.get(TOPIC, 0))]))
        };
        let report = verify(objects.clone(), "trail", &pruned).await.unwrap();
        assert!(report.ok && report.pruned_segments == 8, "{:?}", report.problems);
    }

    #[tokio::test]
    async fn a_deleted_quarantine_segment_is_missing_and_breaks_the_link() {
        let objects = trail().await;
        let quarantined: Vec<String> =
            segment_keys(&objects).into_iter().filter(|k| k.contains("/quarantine/")).collect();
        assert_eq!(quarantined.len(), 1, "{quarantined:?}");
        objects.remove(&quarantined[0]);
        let report = check(&objects).await;
        assert!(codes(&report).contains(&"missing_segment"), "{:?}", report.problems);
        assert!(
            report.problems.iter().any(|p| p.code == "broken_link" && p.offset == Some(8)),
            "{:?}",
            report.problems
        );
    }

    #[tokio::test]
    async fn an_unsigned_prefix_counts_as_pruned_only_with_prunes_marker() {
        let objects = trail_signed_by(None).await;
        let first_flush: Vec<String> =
            segment_keys(&objects).into_iter().filter(|k| k.contains("-00000000000000000000-")).collect();
        let mut last_hash = None;
        for key in &first_flush {
            let info = objects.head(key).await.unwrap().unwrap();
            if info.metadata.get("aegis-last-offset").map(String::as_str) == Some("2") {
                last_hash = info.metadata.get("aegis-last-entry-hash").cloned();
            }
            objects.remove(key);
        }
        let day = |d: u32| chrono::NaiveDate::from_ymd_opt(2026, 11, d).unwrap();
        let options =
            VerifyOptions { topic: TOPIC.into(), pruned_before: Some(day(21)), concurrency: 4, ..Default::default() };
        let pruned = || async { verify(objects.clone(), "trail", &options).await.unwrap() };
        assert_eq!(codes(&check(&objects).await), vec!["broken_link"]);
        // Deleted by anyone but prune: nothing says where the rest starts, whatever the cutoff.
        assert_eq!(codes(&pruned().await), vec!["broken_link"]);

        let marker = |cutoff, hash: &str| PruneMarker {
            format: PRUNE_MARKER_FORMAT.into(),
            topic: TOPIC.into(),
            partition: 0,
            last_offset: 2,
            last_entry_hash: hash.into(),
            cutoff,
            pruned_at: "2026-11-30T00:00:00Z".into(),
        };
        let put = |m: PruneMarker| {
            let objects = objects.clone();
            async move {
                let key = prune_marker_key("trail", TOPIC, 0);
                objects.put(&key, Bytes::from(serde_json::to_vec(&m).unwrap()), &BTreeMap::new()).await.unwrap();
            }
        };
        put(marker(day(21), &last_hash.clone().unwrap())).await;
        let report = pruned().await;
        assert!(report.ok, "{:?}", report.problems);
        assert_eq!(report.records, 9);
        assert!(report.notes.iter().any(|n| n.contains("starts at offset 3")), "{:?}", report.notes);
        // The marker must name the entry the rest links to, from a prune no later than the cutoff.
        put(marker(day(21), &"00".repeat(32))).await;
        assert_eq!(codes(&pruned().await), vec!["broken_link"]);
        put(marker(day(22), &last_hash.unwrap())).await;
        assert_eq!(codes(&pruned().await), vec!["broken_link"]);
    }

    #[tokio::test]
    async fn signed_flushes_count_as_pruned_only_up_to_prunes_marker() {
        let objects = trail().await;
        for key in segment_keys(&objects)
            .into_iter()
            .filter(|k| k.contains("-00000000000000000000-") || k.contains("-00000000000000000003-"))
        {
            objects.remove(&key);
        }
        let options = VerifyOptions {
            topic: TOPIC.into(),
            public_keys: vec![signer().verifying_key()],
            pruned_before: chrono::NaiveDate::from_ymd_opt(2026, 11, 21),
            concurrency: 4,
            ..Default::default()
        };
        let report = verify(objects.clone(), "trail", &options).await.unwrap();
        assert!(report.ok && report.pruned_segments == 4, "{:?}", report.problems);
        // prune recorded that it stopped after offset 2: the flush 3..=5 went some other way.
        let marker = PruneMarker {
            format: PRUNE_MARKER_FORMAT.into(),
            topic: TOPIC.into(),
            partition: 0,
            last_offset: 2,
            last_entry_hash: "00".repeat(32),
            cutoff: chrono::NaiveDate::from_ymd_opt(2026, 11, 21).unwrap(),
            pruned_at: "2026-11-30T00:00:00Z".into(),
        };
        let key = prune_marker_key("trail", TOPIC, 0);
        objects.put(&key, Bytes::from(serde_json::to_vec(&marker).unwrap()), &BTreeMap::new()).await.unwrap();
        let report = verify(objects.clone(), "trail", &options).await.unwrap();
        assert!(codes(&report).contains(&"missing_segment"), "{:?}", report.problems);
        assert_eq!(report.pruned_segments, 2);
    }

    #[tokio::test]
    async fn a_marker_past_the_last_signed_flush_anchors_the_rest() {
        // Digest 0 signs flushes 0..=2 and 3..=5; the writer stopped before the digest of the
        // next ones (digest 1 never written). prune then deleted flushes through offset 8.
        let objects = trail().await;
        objects.remove(&crate::digest::digest_key("trail", TOPIC, 0, 1));
        let mut last_hash = None;
        for key in segment_keys(&objects).into_iter().filter(|k| {
            ["-00000000000000000000-", "-00000000000000000003-", "-00000000000000000006-"].iter().any(|f| k.contains(f))
        }) {
            let info = objects.head(&key).await.unwrap().unwrap();
            if info.metadata.get("aegis-last-offset").map(String::as_str) == Some("8") {
                last_hash = info.metadata.get("aegis-last-entry-hash").cloned();
            }
            objects.remove(&key);
        }
        let cutoff = chrono::NaiveDate::from_ymd_opt(2026, 11, 21).unwrap();
        let marker = |hash: String| PruneMarker {
            format: PRUNE_MARKER_FORMAT.into(),
            topic: TOPIC.into(),
            partition: 0,
            last_offset: 8,
            last_entry_hash: hash,
            cutoff,
            pruned_at: "2026-11-30T00:00:00Z".into(),
        };
        let key = prune_marker_key("trail", TOPIC, 0);
        let options = VerifyOptions {
            topic: TOPIC.into(),
            public_keys: vec![signer().verifying_key()],
            pruned_before: Some(cutoff),
            concurrency: 4,
            ..Default::default()
        };
        objects
            .put(&key, Bytes::from(serde_json::to_vec(&marker(last_hash.unwrap())).unwrap()), &BTreeMap::new())
            .await
            .unwrap();
        let report = verify(objects.clone(), "trail", &options).await.unwrap();
        assert!(report.ok, "{:?}", report.problems);
        assert_eq!(report.pruned_segments, 4, "the signed flushes 0..=5");
        assert!(report.notes.iter().any(|n| n.contains("starts at offset 9")), "{:?}", report.notes);
        // A marker that names another entry does not vouch for the rest.
        objects
            .put(&key, Bytes::from(serde_json::to_vec(&marker("00".repeat(32))).unwrap()), &BTreeMap::new())
            .await
            .unwrap();
        let report = verify(objects.clone(), "trail", &options).await.unwrap();
        assert_eq!(codes(&report), vec!["broken_link"]);
    }

    #[tokio::test]
    async fn tail_truncation_is_caught_by_the_digest() {
        let objects = trail().await;
        for key in segment_keys(&objects).into_iter().filter(|k| k.contains("-00000000000000000009-")) {
            objects.remove(&key);
        }
        let report = check(&objects).await;
        assert_eq!(codes(&report), vec!["missing_segment", "digest_mismatch"], "{:?}", report.problems);
    }

    #[tokio::test]
    async fn replaced_or_foreign_signed_digest_is_caught() {
        let objects = trail().await;
        let key = crate::digest::digest_key("trail", TOPIC, 0, 0);
        let original = DigestObject::parse(&key, &objects.body(&key).unwrap()).unwrap();
        let intruder = DigestSigner::from_text("k", &"22".repeat(32)).unwrap();
        objects.put(&key, Bytes::from(intruder.encode(&original.body)), &BTreeMap::new()).await.unwrap();
        assert_eq!(codes(&check(&objects).await), vec!["digest_signature"]);
        objects.remove(&key);
        assert!(codes(&check(&objects).await).contains(&"digest_missing"));
    }

    #[tokio::test]
    async fn a_later_digest_cannot_re_sign_a_segment_an_earlier_one_listed() {
        let objects = trail().await;
        let first = crate::digest::digest_key("trail", TOPIC, 0, 0);
        let signed = DigestObject::parse(&first, &objects.body(&first).unwrap()).unwrap();
        let victim = signed.body.segments[0].clone();
        // The victim's bytes change (here: another object's body), and a forged digest 2 lists
        // it with the new SHA-256.
        let other = segment_keys(&objects).into_iter().find(|k| *k != victim.key).unwrap();
        let edited = objects.body(&other).unwrap();
        objects.put(&victim.key, edited.clone(), &BTreeMap::new()).await.unwrap();
        let second = crate::digest::digest_key("trail", TOPIC, 0, 1);
        let mut forged = DigestObject::parse(&second, &objects.body(&second).unwrap()).unwrap().body;
        forged.seq = 2;
        forged.segments = vec![SegmentEntry { sha256: hex::encode(Sha256::digest(&edited)), ..victim.clone() }];
        let intruder = DigestSigner::from_text("k", &"22".repeat(32)).unwrap();
        let forged_key = crate::digest::digest_key("trail", TOPIC, 0, 2);
        objects.put(&forged_key, Bytes::from(intruder.encode(&forged)), &BTreeMap::new()).await.unwrap();
        let report = check(&objects).await;
        assert!(
            report.problems.iter().any(|p| p.code == "object_changed" && p.key == victim.key),
            "{:?}",
            report.problems
        );
    }

    #[tokio::test]
    async fn a_flush_overlapping_another_repeats_offsets() {
        let objects = trail().await;
        // A zombie's flush named 3..=6, holding rows 3..=5, beside the real 3..=5: its rows repeat
        // offsets of an earlier flush, which is more than a broken link.
        for key in segment_keys(&objects).into_iter().filter(|k| k.contains("-00000000000000000003-")) {
            let body = objects.body(&key).unwrap();
            let overlapping = key.replace("-00000000000000000005.parquet", "-00000000000000000006.parquet");
            objects.put(&overlapping, body, &BTreeMap::new()).await.unwrap();
        }
        let report = check(&objects).await;
        let mut repeated: Vec<i64> =
            report.problems.iter().filter(|p| p.code == "duplicate_offset").filter_map(|p| p.offset).collect();
        repeated.sort();
        assert_eq!(repeated, vec![3, 4, 5], "{:?}", report.problems);
    }

    #[tokio::test]
    async fn objects_athena_would_read_that_are_no_segment_are_unexpected() {
        let objects = trail().await;
        let listing = objects.list("trail/").await.unwrap();
        let segment = listing.iter().map(|o| o.key.as_str()).find(|k| k.ends_with(".parquet")).unwrap();
        let body = objects.body(segment).unwrap();
        let directory = segment.rsplit_once('/').unwrap().0.to_string();
        // Made-up rows under a name of no segment, and under this topic's name with offsets no
        // chain can have: both in the table Athena reads.
        let strangers = [
            format!("{directory}/extra.parquet"),
            format!("{directory}/{TOPIC}-p0000-99999999999999999999-99999999999999999999.parquet"),
        ];
        for key in &strangers {
            objects.put(key, body.clone(), &BTreeMap::new()).await.unwrap();
        }
        // What Athena skips, and another topic's segment: not problems; the topic is named.
        for file in
            ["_SUCCESS", ".hidden.parquet", "other-topic-p0000-00000000000000000000-00000000000000000002.parquet"]
        {
            objects.put(&format!("{directory}/{file}"), body.clone(), &BTreeMap::new()).await.unwrap();
        }
        let report = check(&objects).await;
        let mut found: Vec<_> = report.problems.iter().map(|p| (p.code, p.key.clone())).collect();
        found.sort();
        let mut expected: Vec<_> = strangers.iter().map(|k| ("unexpected_object", k.clone())).collect();
        expected.sort();
        assert_eq!(found, expected);
        assert!(
            report.notes.iter().any(|n| n.contains("other topics") && n.contains("other-topic")),
            "{:?}",
            report.notes
        );
        assert_eq!(
            crate::segment::segment_topic("a/b-c-p0001-00000000000000000000-00000000000000000002.parquet"),
            Some("b-c")
        );
        assert_eq!(crate::segment::segment_topic("a/-p0001-00000000000000000000-00000000000000000002.parquet"), None);
    }

    #[tokio::test]
    async fn digests_named_off_the_pattern_are_unexpected() {
        let objects = trail().await;
        let key = crate::digest::digest_key("trail", TOPIC, 0, 1);
        let body = objects.body(&key).unwrap();
        objects.remove(&key);
        objects.put("trail/_digests/t/p0000/1.digest", body, &BTreeMap::new()).await.unwrap();
        let report = check(&objects).await;
        let found: Vec<_> = report.problems.iter().map(|p| (p.code, p.key.as_str())).collect();
        // The newest digest gone from its slot: only the stray object shows (CHAIN.md says why).
        assert_eq!(found, vec![("digest_unexpected", "trail/_digests/t/p0000/1.digest")]);
        assert_eq!(parse_digest_key("p0003/000000000012.digest"), Some((3, Some(12))));
        assert_eq!(parse_digest_key("p0003/sub/000000000012.digest"), Some((3, None)));
        assert_eq!(parse_digest_key("p3/000000000012.digest"), None, "partition folders have 4+ digits");
        assert_eq!(parse_digest_key("p0003/"), None);
        assert_eq!(parse_digest_key("p00003/000000000012.digest"), Some((3, None)), "not the writer's spelling");
        assert_eq!(parse_digest_key("p12345/000000000001.digest"), Some((12345, Some(1))));
    }

    #[tokio::test]
    async fn proof_round_trip_and_tampered_proof() {
        let objects = trail().await;
        let key = segment_keys(&objects)
            .into_iter()
            .find(|k| k.contains("environment=prod") && k.contains("-00000000000000000003-"))
            .unwrap();
        let located = crate::prove::Located { segment_key: key.clone(), partition: 0, offset: 4 };
        let proof = crate::prove::prove(objects.as_ref(), "trail", TOPIC, "d-4", &located).await.unwrap();
        let public = signer().verifying_key();
        assert!(crate::prove::verify_proof(&proof, &public).unwrap().starts_with("proof OK"));
        // A proof file is read whole: an extra field anywhere in it (an edit) is refused.
        let mut text: serde_json::Value = serde_json::to_value(&proof).unwrap();
        assert!(serde_json::from_value::<crate::prove::Proof>(text.clone()).is_ok());
        for part in ["entry", "segment", "digest"] {
            let mut edited = text.clone();
            edited[part]["note"] = "added".into();
            assert!(serde_json::from_value::<crate::prove::Proof>(edited).is_err(), "{part}");
        }
        text["note"] = "added".into();
        assert!(serde_json::from_value::<crate::prove::Proof>(text).is_err());
        let mut forged = proof.clone();
        forged.entry.payload_base64 = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            String::from_utf8(
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &proof.entry.payload_base64)
                    .unwrap(),
            )
            .unwrap()
            .replace("\"action\":\"a\"", "\"action\":\"b\""),
        );
        assert!(crate::prove::verify_proof(&forged, &public).is_err());
        let mut rejected = proof.clone();
        rejected.entry.status = "rejected".into();
        let err = crate::prove::verify_proof(&rejected, &public).unwrap_err().to_string();
        assert!(err.contains("was rejected by validation"), "{err}");
        let other = DigestSigner::from_text("k", &"22".repeat(32)).unwrap();
        assert!(crate::prove::verify_proof(&proof, &other.verifying_key()).is_err());

        // A record of the second digest (the search goes past the first).
        let later = segment_keys(&objects)
            .into_iter()
            .find(|k| k.contains("environment=prod") && k.contains("-00000000000000000009-"))
            .unwrap();
        let located = crate::prove::Located { segment_key: later, partition: 0, offset: 10 };
        let proof = crate::prove::prove(objects.as_ref(), "trail", TOPIC, "d-10", &located).await.unwrap();
        assert!(proof.digest.key.ends_with("000000000001.digest"), "{}", proof.digest.key);
        assert!(crate::prove::verify_proof(&proof, &public).unwrap().starts_with("proof OK"));
        // A digest that no longer parses is named, not skipped (the record would read as
        // "not in a digest yet").
        let first_digest = objects.keys().into_iter().find(|k| k.ends_with("000000000000.digest")).unwrap();
        objects.put(&first_digest, bytes::Bytes::from_static(b"garbage"), &Default::default()).await.unwrap();
        let located = crate::prove::Located { segment_key: key, partition: 0, offset: 4 };
        let err = crate::prove::prove(objects.as_ref(), "trail", TOPIC, "d-4", &located).await.unwrap_err().to_string();
        assert!(err.contains(&first_digest) && err.contains("verify"), "{err}");
    }
}
