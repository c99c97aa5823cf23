//! Retention: `prune` deletes expired segments, `lifecycle` prints an S3 lifecycle rule set.
//!
//! `prune` only ever removes a **prefix** of each partition's chain, whole flushes at a time
//! (every object of a flush, trail and quarantine, must be past the cutoff), so what remains is
//! one unbroken chain whose first link the signed digests still vouch for (`verify
//! --pruned-before`). It deletes every version of an object, and reports objects Object Lock
//! still retains instead of failing silently; a locked flush stops that partition's pruning.

use std::collections::BTreeMap;

use aws_sdk_s3::primitives::DateTime;
use aws_sdk_s3::types::ObjectLockLegalHoldStatus;
use chrono::{NaiveDate, Utc};
use serde::Serialize;

use crate::segment::{parse_segment_key, SegmentName};
use crate::sinks::{classify_sdk_error, ObjectStore, SinkError};

const BACKEND: &str = "s3";

#[derive(Debug, Default, Serialize)]
pub struct PruneReport {
    pub cutoff: String,
    pub dry_run: bool,
    pub deleted: Vec<String>,
    /// Expired but retained by Object Lock until the given time.
    pub locked: Vec<(String, String)>,
    /// Expired, but no object of the flush carries the entry hash the next flush links to
    /// (metadata lost in a copy or restore), so no marker could anchor what remains: kept.
    pub unanchored: Vec<String>,
    pub kept_objects: usize,
    /// The [`PruneMarker`] objects written.
    pub markers: Vec<String>,
}

pub const PRUNE_MARKER_FORMAT: &str = "aegis-pruned/v1";

/// What `prune` leaves for each partition it pruned: the entry the remaining chain links to.
/// `verify --pruned-before` checks the first remaining entry against it where no digest signed
/// the deleted flushes, so a prune is told from a deletion by anyone else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PruneMarker {
    pub format: String,
    pub topic: String,
    pub partition: i32,
    /// The last offset of the last flush deleted, and its entry hash (hex).
    pub last_offset: i64,
    pub last_entry_hash: String,
    /// The prune's cutoff: every deleted object was dated before it.
    pub cutoff: NaiveDate,
    pub pruned_at: String,
}

/// `<prefix>/_pruned/<topic>/p<PPPP>.json` (Athena skips names starting with `_`).
pub fn prune_marker_key(prefix: &str, topic: &str, partition: i32) -> String {
    crate::segment::join_key(&[prefix, "_pruned", topic, &format!("p{partition:04}.json")])
}

/// The UTC date of a key in the trail under `prefix`, from the writer's `year=/month=/day=`
/// directories only: a prefix such as `archive/year=1999` must not date every key 1999.
pub fn key_date(prefix: &str, key: &str) -> Option<NaiveDate> {
    let directory = crate::segment::trail_directory(prefix, key)?;
    let num = |name: &str| -> Option<u32> {
        directory.split('/').find_map(|part| part.strip_prefix(name)).and_then(|v| v.parse().ok())
    };
    NaiveDate::from_ymd_opt(num("year=")? as i32, num("month=")?, num("day=")?)
}

/// Deletes whole expired flushes, oldest first, `batch_flushes` at a time (`prune
/// --batch-flushes`): a lock or legal hold set after a batch's check can split at most that
/// batch's progress, a stopped run loses no more, and the versions held in memory stay bounded,
/// however long the backlog.
pub async fn prune(
    store: &crate::sinks::s3::S3Store,
    bucket: &str,
    prefix: &str,
    topic: &str,
    older_than_days: u32,
    batch_flushes: usize,
    dry_run: bool,
) -> Result<PruneReport, SinkError> {
    let client = store.client();
    let cutoff = Utc::now().date_naive() - chrono::Days::new(older_than_days as u64);
    let mut report = PruneReport { cutoff: cutoff.to_string(), dry_run, ..Default::default() };
    // Segments by partition, then by flush.
    let mut flushes: BTreeMap<i32, BTreeMap<(i64, i64), Vec<SegmentName>>> = BTreeMap::new();
    let mut pages =
        client.list_objects_v2().bucket(bucket).prefix(crate::segment::dir_prefix(&[prefix])).into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| classify_sdk_error(BACKEND, "ListObjectsV2", bucket, &e))?;
        for key in page.contents().iter().filter_map(|o| o.key()) {
            // Only this trail's directories: a trail under a longer prefix belongs to another
            // deployment, whose segments (same topic name) this must never delete.
            if crate::segment::trail_directory(prefix, key).is_none() {
                continue;
            }
            if let Some(name) = parse_segment_key(key, topic) {
                flushes
                    .entry(name.partition)
                    .or_default()
                    .entry((name.flush_first, name.flush_last))
                    .or_default()
                    .push(name);
            }
        }
    }
    let now = DateTime::from(std::time::SystemTime::now());
    for (partition, by_flush) in flushes {
        // The newest flush may still be being written (pruning part of it would split it), and
        // it holds the entry the chain table's head names: it is kept, whatever its date.
        let newest = by_flush.keys().next_back().copied();
        let mut doomed: Vec<DoomedFlush> = Vec::new();
        let mut pruning = true;
        for (flush, names) in by_flush {
            let expired = names.iter().all(|n| key_date(prefix, &n.key).is_some_and(|d| d < cutoff));
            if !(pruning && expired) || Some(flush) == newest {
                pruning = false;
                report.kept_objects += names.len();
                continue;
            }
            let checked = check_flush(client, bucket, flush.1, names, now).await?;
            if !checked.locked.is_empty() || checked.last_hash.is_none() {
                if checked.locked.is_empty() {
                    // Without the entry the next flush links to, no marker could vouch for the
                    // rest of the chain after this flush is gone.
                    report.unanchored.extend(checked.objects.iter().map(|(key, _)| key.clone()));
                }
                report.locked.extend(checked.locked);
                report.kept_objects += checked.objects.len();
                pruning = false;
                continue;
            }
            doomed.push(DoomedFlush {
                last_offset: flush.1,
                last_hash: checked.last_hash.unwrap_or_default(),
                objects: checked.objects,
            });
            if doomed.len() >= batch_flushes {
                delete_flushes(
                    store,
                    prefix,
                    topic,
                    partition,
                    cutoff,
                    std::mem::take(&mut doomed),
                    dry_run,
                    &mut report,
                )
                .await?;
            }
        }
        delete_flushes(store, prefix, topic, partition, cutoff, doomed, dry_run, &mut report).await?;
    }
    Ok(report)
}

struct CheckedFlush {
    locked: Vec<(String, String)>,
    /// The entry hash of the flush's last row (the one the next flush links to).
    last_hash: Option<String>,
    objects: Vec<(String, Vec<Version>)>,
}

/// Every version of every object of the flush ending at `flush_last`: locks and legal holds
/// (checked before anything is deleted, so a flush is never split by one met halfway through
/// its deletes), and the entry the next flush links to.
async fn check_flush(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    flush_last: i64,
    names: Vec<SegmentName>,
    now: DateTime,
) -> Result<CheckedFlush, SinkError> {
    let mut checked = CheckedFlush { locked: Vec::new(), last_hash: None, objects: Vec::new() };
    for name in names {
        let versions = list_versions(client, bucket, &name.key).await?;
        for version in versions.iter().filter(|v| !v.delete_marker) {
            let head = client
                .head_object()
                .bucket(bucket)
                .key(&name.key)
                .set_version_id(version.id.clone())
                .send()
                .await
                .map_err(|e| classify_sdk_error(BACKEND, "HeadObject", &version.target(&name.key), &e))?;
            let which = match (&version.id, version.latest) {
                (Some(id), false) => format!(" (noncurrent version {id})"),
                _ => String::new(),
            };
            if let Some(until) = head.object_lock_retain_until_date().filter(|u| u.secs() > now.secs()) {
                checked.locked.push((name.key.clone(), format!("{until}{which}")));
            } else if head.object_lock_legal_hold_status() == Some(&ObjectLockLegalHoldStatus::On) {
                // Evidence kept for an incident (RUNBOOK, Safety flags): no delete may touch it.
                checked.locked.push((name.key.clone(), format!("legal hold{which}")));
            }
            // The object holding the flush's last row knows the entry the next flush links to:
            // the current version's word, else the newest one's.
            let metadata = head.metadata();
            let value = |key: &str| metadata.and_then(|m| m.get(key));
            if value(crate::sinks::LAST_OFFSET_METADATA) == Some(&flush_last.to_string())
                && (version.latest || checked.last_hash.is_none())
            {
                checked.last_hash = value(crate::sinks::LAST_ENTRY_HASH_METADATA).cloned();
            }
        }
        checked.objects.push((name.key, versions));
    }
    Ok(checked)
}

/// Writes the partition's marker for the last of `doomed`, then deletes them, oldest first.
/// The marker comes first: a prune stopped midway (an error, Ctrl-C) leaves it ahead of what is
/// gone, which the next run makes true, never a deleted flush without one. One write per batch,
/// not per flush: in a locked bucket each write is a version no one can delete until its
/// retention ends.
#[allow(clippy::too_many_arguments)]
async fn delete_flushes(
    store: &crate::sinks::s3::S3Store,
    prefix: &str,
    topic: &str,
    partition: i32,
    cutoff: NaiveDate,
    doomed: Vec<DoomedFlush>,
    dry_run: bool,
    report: &mut PruneReport,
) -> Result<(), SinkError> {
    let Some(last) = doomed.last() else { return Ok(()) };
    if !dry_run {
        let marker = PruneMarker {
            format: PRUNE_MARKER_FORMAT.into(),
            topic: topic.into(),
            partition,
            last_offset: last.last_offset,
            last_entry_hash: last.last_hash.clone(),
            cutoff,
            pruned_at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        let key = prune_marker_key(prefix, topic, partition);
        let body = serde_json::to_vec_pretty(&marker).expect("a marker serialises");
        // Through the store: the bucket's encryption and Object Lock settings apply.
        store.put(&key, body.into(), &BTreeMap::new()).await?;
        if !report.markers.contains(&key) {
            report.markers.push(key);
        }
    }
    for (key, versions) in doomed.into_iter().flat_map(|f| f.objects) {
        if !dry_run {
            delete_versions(store.client(), store.bucket(), &key, &versions).await?;
        }
        report.deleted.push(key);
    }
    Ok(())
}

/// A flush `prune` deletes: its objects with the versions found when it was checked.
struct DoomedFlush {
    last_offset: i64,
    last_hash: String,
    objects: Vec<(String, Vec<Version>)>,
}

/// One version or delete marker of a key. `id` is `None` in a bucket that never had versioning.
struct Version {
    id: Option<String>,
    latest: bool,
    delete_marker: bool,
}

impl Version {
    /// `key?versionId=…`, for errors: a denial on one version is not one on the key.
    fn target(&self, key: &str) -> String {
        match &self.id {
            Some(id) => format!("{key}?versionId={id}"),
            None => key.to_string(),
        }
    }
}

/// Every version and delete marker of `key` (a plain delete in a versioned bucket only hides it).
async fn list_versions(client: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Result<Vec<Version>, SinkError> {
    let mut found = Vec::new();
    let (mut key_marker, mut version_marker) = (None, None);
    loop {
        let page = client
            .list_object_versions()
            .bucket(bucket)
            .prefix(key)
            .set_key_marker(key_marker.take())
            .set_version_id_marker(version_marker.take())
            .send()
            .await
            .map_err(|e| classify_sdk_error(BACKEND, "ListObjectVersions", key, &e))?;
        for v in page.versions().iter().filter(|v| v.key() == Some(key)) {
            let id = v.version_id().map(str::to_string);
            found.push(Version { id, latest: v.is_latest().unwrap_or(false), delete_marker: false });
        }
        for m in page.delete_markers().iter().filter(|m| m.key() == Some(key)) {
            let id = m.version_id().map(str::to_string);
            found.push(Version { id, latest: m.is_latest().unwrap_or(false), delete_marker: true });
        }
        if page.is_truncated() != Some(true) {
            break;
        }
        key_marker = page.next_key_marker().map(str::to_string);
        version_marker = page.next_version_id_marker().map(str::to_string);
        if key_marker.is_none() {
            break;
        }
    }
    if found.is_empty() {
        // A bucket that does not list versions: the object itself.
        found.push(Version { id: None, latest: true, delete_marker: false });
    }
    Ok(found)
}

async fn delete_versions(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    versions: &[Version],
) -> Result<(), SinkError> {
    for version in versions {
        client
            .delete_object()
            .bucket(bucket)
            .key(key)
            // "null" is a real id: the version written while versioning was off or suspended.
            .set_version_id(version.id.clone())
            .send()
            .await
            .map_err(|e| classify_sdk_error(BACKEND, "DeleteObject", &version.target(key), &e))?;
    }
    Ok(())
}

/// Storage classes segments can be archived to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchiveClass {
    /// Glacier Flexible Retrieval: a restore before any read.
    #[value(name = "GLACIER")]
    Glacier,
    /// Glacier Instant Retrieval: read as any object, so `verify` keeps reading old segments.
    #[value(name = "GLACIER_IR")]
    GlacierIr,
    /// Deep Archive: a restore (hours) before any read.
    #[value(name = "DEEP_ARCHIVE")]
    DeepArchive,
}

impl ArchiveClass {
    pub fn storage_class(self) -> &'static str {
        match self {
            ArchiveClass::Glacier => "GLACIER",
            ArchiveClass::GlacierIr => "GLACIER_IR",
            ArchiveClass::DeepArchive => "DEEP_ARCHIVE",
        }
    }
}

/// What `aegis-audit lifecycle` prints: segments to STANDARD_IA, then to an archive class, then
/// (unless `prune` does the deleting) expired.
#[derive(Debug, Clone, Copy)]
pub struct Lifecycle {
    pub standard_ia_after_days: u32,
    pub archive_after_days: u32,
    pub archive_class: ArchiveClass,
    pub expire_after_days: Option<u32>,
    pub noncurrent_expire_days: Option<u32>,
}

/// Days a noncurrent version lives when `lifecycle` expires objects (and nothing else is said).
pub const DEFAULT_NONCURRENT_EXPIRE_DAYS: u32 = 30;

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            standard_ia_after_days: 30,
            archive_after_days: 365,
            archive_class: ArchiveClass::Glacier,
            expire_after_days: Some(3 * 365),
            noncurrent_expire_days: Some(DEFAULT_NONCURRENT_EXPIRE_DAYS),
        }
    }
}

impl Lifecycle {
    /// S3's rules for these transitions (an object stays at least 30 days in STANDARD_IA before
    /// it moves on), and expiry no sooner than Object Lock's retention: an expiry inside it
    /// hides segments that are still locked (a delete marker on top), and `verify` and `prove`
    /// fail on them.
    pub fn check(&self, object_lock_retention_days: Option<u32>) -> Result<(), String> {
        if self.standard_ia_after_days < 30 {
            return Err("--standard-ia-after-days must be at least 30 (S3's minimum for STANDARD_IA)".into());
        }
        if self.archive_after_days < self.standard_ia_after_days.saturating_add(30) {
            return Err(format!(
                "--glacier-after-days must be at least 30 more than --standard-ia-after-days ({}): S3 keeps an \
                 object 30 days in STANDARD_IA before it moves on",
                self.standard_ia_after_days
            ));
        }
        if let Some(expire) = self.expire_after_days {
            if expire <= self.archive_after_days {
                return Err(format!(
                    "--expire-after-days must be more than --glacier-after-days ({})",
                    self.archive_after_days
                ));
            }
            if let Some(retention) = object_lock_retention_days.filter(|&r| expire < r) {
                return Err(format!(
                    "--expire-after-days {expire} is shorter than s3.object_lock_retention_days ({retention}): expiry \
                     would hide segments still locked. Raise it, or use --no-expiration and prune"
                ));
            }
        }
        if self.noncurrent_expire_days == Some(0) {
            return Err("--noncurrent-expire-days must be at least 1".into());
        }
        Ok(())
    }
}

/// `aws s3api put-bucket-lifecycle-configuration --bucket B --lifecycle-configuration file://…`
///
/// Only segments (the trail and quarantine) are tiered and expired. Digests and public keys
/// stay in STANDARD forever: they are tiny, and `verify` must read every one of them. The rule
/// IDs name the prefix, so the rules of several trails in one bucket can be merged into the one
/// configuration S3 keeps per bucket.
pub fn lifecycle_json(prefix: &str, l: Lifecycle) -> serde_json::Value {
    let base = crate::segment::dir_prefix(&[prefix]);
    let trail = crate::segment::join_key(&[prefix]);
    let rule = |what: &str, filter: String| {
        let mut rule = serde_json::json!({
            "ID": format!("aegis-audit {what} under '{trail}'"),
            "Filter": { "Prefix": filter },
            "Status": "Enabled",
            "Transitions": [
                { "Days": l.standard_ia_after_days, "StorageClass": "STANDARD_IA" },
                { "Days": l.archive_after_days, "StorageClass": l.archive_class.storage_class() }
            ],
            "AbortIncompleteMultipartUpload": { "DaysAfterInitiation": 7 }
        });
        // In a versioned bucket, expiry adds a delete marker; Object Lock keeps the locked
        // version (now noncurrent) until its retention ends.
        if let Some(days) = l.expire_after_days {
            rule["Expiration"] = serde_json::json!({ "Days": days });
        }
        if let Some(days) = l.noncurrent_expire_days {
            rule["NoncurrentVersionExpiration"] = serde_json::json!({ "NoncurrentDays": days });
        }
        rule
    };
    serde_json::json!({
        "Rules": [
            rule("segments", format!("{base}year=")),
            // `quarantine/year=`, not `quarantine/`: the digests, keys and markers of a trail
            // under `<prefix>/quarantine...` are not this rule's (config refuses such a prefix).
            rule("quarantine", format!("{base}quarantine/year=")),
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_dates_come_from_hive_directories() {
        assert_eq!(
            key_date("trail", "trail/quarantine/year=2024/month=02/day=29/t-p0000-1-2.parquet"),
            NaiveDate::from_ymd_opt(2024, 2, 29)
        );
        assert_eq!(key_date("trail", "trail/_digests/t/p0000/000000000001.digest"), None);
        // A prefix that looks like a date directory does not date the keys under it.
        let prefix = "archive/year=1999";
        assert_eq!(
            key_date(prefix, "archive/year=1999/year=2026/month=11/day=20/environment=prod/t-p0000-1-2.parquet"),
            NaiveDate::from_ymd_opt(2026, 11, 20)
        );
    }

    #[test]
    fn lifecycle_defaults_match_the_docs() {
        let json = lifecycle_json("trail", Lifecycle::default());
        let rule = &json["Rules"][0];
        assert_eq!(rule["Filter"]["Prefix"], "trail/year=");
        assert_eq!(json["Rules"][1]["Filter"]["Prefix"], "trail/quarantine/year=");
        assert_eq!(rule["Transitions"][0]["Days"], 30);
        assert_eq!(rule["Transitions"][1]["StorageClass"], "GLACIER");
        assert_eq!(rule["Transitions"][1]["Days"], 365);
        assert_eq!(rule["Expiration"]["Days"], 1095);
        assert_eq!(rule["NoncurrentVersionExpiration"]["NoncurrentDays"], 30, "expiry frees storage");
        assert_ne!(rule["ID"], lifecycle_json("trail/staging", Lifecycle::default())["Rules"][0]["ID"]);
        assert_eq!(Lifecycle::default().check(None), Ok(()));
    }

    #[test]
    fn lifecycle_refuses_what_s3_or_the_lock_would_not_allow() {
        let with = |f: fn(&mut Lifecycle)| {
            let mut l = Lifecycle::default();
            f(&mut l);
            l
        };
        let refused = |l: Lifecycle, retention: Option<u32>, naming: &str| {
            let why = l.check(retention).unwrap_err();
            assert!(why.contains(naming), "{why}");
        };
        refused(with(|l| l.standard_ia_after_days = 29), None, "--standard-ia-after-days");
        refused(with(|l| l.archive_after_days = 59), None, "at least 30 more");
        assert_eq!(with(|l| l.archive_after_days = 60).check(None), Ok(()));
        refused(with(|l| l.expire_after_days = Some(365)), None, "--expire-after-days");
        refused(Lifecycle::default(), Some(2555), "s3.object_lock_retention_days");
        assert_eq!(with(|l| l.expire_after_days = Some(2555)).check(Some(2555)), Ok(()));
        // Without expiry, the lock is prune's business.
        let kept = with(|l| l.expire_after_days = None);
        assert_eq!(kept.check(Some(2555)), Ok(()));
        assert!(lifecycle_json("trail", kept)["Rules"][0].get("Expiration").is_none());
        refused(with(|l| l.noncurrent_expire_days = Some(0)), None, "--noncurrent-expire-days");
        let ir = lifecycle_json("trail", with(|l| l.archive_class = ArchiveClass::GlacierIr));
        assert_eq!(ir["Rules"][1]["Transitions"][1]["StorageClass"], "GLACIER_IR");
    }

    #[test]
    fn lifecycle_rules_of_a_trail_at_the_bucket_root_match_its_keys() {
        let json = lifecycle_json("", Lifecycle::default());
        assert_eq!(json["Rules"][0]["Filter"]["Prefix"], "year=");
        assert_eq!(json["Rules"][1]["Filter"]["Prefix"], "quarantine/year=");
    }
}
