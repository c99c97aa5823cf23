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

pub async fn prune(
    store: &crate::sinks::s3::S3Store,
    bucket: &str,
    prefix: &str,
    topic: &str,
    older_than_days: u32,
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
        let mut pruning = true;
        for ((_, flush_last), names) in by_flush {
            let expired = names.iter().all(|n| key_date(prefix, &n.key).is_some_and(|d| d < cutoff));
            if !(pruning && expired) {
                pruning = false;
                report.kept_objects += names.len();
                continue;
            }
            // Check every object of the flush before deleting any, so a flush is never split.
            let mut locked = Vec::new();
            let mut last_hash = None;
            for name in &names {
                let head = client
                    .head_object()
                    .bucket(bucket)
                    .key(&name.key)
                    .send()
                    .await
                    .map_err(|e| classify_sdk_error(BACKEND, "HeadObject", &name.key, &e))?;
                if let Some(until) = head.object_lock_retain_until_date().filter(|u| u.secs() > now.secs()) {
                    locked.push((name.key.clone(), until.to_string()));
                } else if head.object_lock_legal_hold_status() == Some(&ObjectLockLegalHoldStatus::On) {
                    // Evidence kept for an incident (RUNBOOK, Safety flags): no delete may touch it.
                    locked.push((name.key.clone(), "legal hold".to_string()));
                }
                // The object holding the flush's last row knows the entry the next flush links to.
                let metadata = head.metadata();
                let value = |key: &str| metadata.and_then(|m| m.get(key));
                if value(crate::sinks::LAST_OFFSET_METADATA) == Some(&flush_last.to_string()) {
                    last_hash = value(crate::sinks::LAST_ENTRY_HASH_METADATA).cloned();
                }
            }
            if !locked.is_empty() {
                report.locked.extend(locked);
                report.kept_objects += names.len();
                pruning = false;
                continue;
            }
            // The marker first: a prune stopped midway (an error, Ctrl-C) then leaves a marker one
            // flush ahead, which the next run (it deletes that flush again) makes true, never a
            // deleted flush without one.
            if let (false, Some(last_entry_hash)) = (dry_run, last_hash) {
                let marker = PruneMarker {
                    format: PRUNE_MARKER_FORMAT.into(),
                    topic: topic.into(),
                    partition,
                    last_offset: flush_last,
                    last_entry_hash,
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
            for name in names {
                if !dry_run {
                    delete_all_versions(client, bucket, &name.key).await?;
                }
                report.deleted.push(name.key);
            }
        }
    }
    Ok(report)
}

/// Removes every version and delete marker of `key` (a plain delete in a versioned bucket only
/// hides it).
async fn delete_all_versions(client: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Result<(), SinkError> {
    let versions = client
        .list_object_versions()
        .bucket(bucket)
        .prefix(key)
        .send()
        .await
        .map_err(|e| classify_sdk_error(BACKEND, "ListObjectVersions", key, &e))?;
    let mut ids: Vec<Option<String>> = versions
        .versions()
        .iter()
        .filter(|v| v.key() == Some(key))
        .map(|v| v.version_id().map(str::to_string))
        .chain(
            versions
                .delete_markers()
                .iter()
                .filter(|m| m.key() == Some(key))
                .map(|m| m.version_id().map(str::to_string)),
        )
        .collect();
    if ids.is_empty() {
        ids.push(None); // unversioned bucket
    }
    for id in ids {
        client
            .delete_object()
            .bucket(bucket)
            .key(key)
            // "null" is a real id: the version written while versioning was off or suspended.
            .set_version_id(id)
            .send()
            .await
            .map_err(|e| classify_sdk_error(BACKEND, "DeleteObject", key, &e))?;
    }
    Ok(())
}

/// Lifecycle transitions and expiry, in days after an object's creation.
#[derive(Debug, Clone, Copy)]
pub struct Lifecycle {
    pub standard_ia_after_days: u32,
    pub glacier_after_days: u32,
    pub expire_after_days: u32,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self { standard_ia_after_days: 30, glacier_after_days: 365, expire_after_days: 3 * 365 }
    }
}

/// `aws s3api put-bucket-lifecycle-configuration --bucket B --lifecycle-configuration file://…`
///
/// Only segments (the trail and quarantine) are tiered and expired. Digests and public keys
/// stay in STANDARD forever: they are tiny, and `verify` must read every one of them.
pub fn lifecycle_json(prefix: &str, l: Lifecycle) -> serde_json::Value {
    let base = crate::segment::dir_prefix(&[prefix]);
    let rule = |id: &str, filter: String| {
        serde_json::json!({
            "ID": id,
            "Filter": { "Prefix": filter },
            "Status": "Enabled",
            "Transitions": [
                { "Days": l.standard_ia_after_days, "StorageClass": "STANDARD_IA" },
                { "Days": l.glacier_after_days, "StorageClass": "GLACIER" }
            ],
            // Object Lock blocks expiry of retained versions until their retention ends.
            "Expiration": { "Days": l.expire_after_days },
            "NoncurrentVersionExpiration": { "NoncurrentDays": 30 },
            "AbortIncompleteMultipartUpload": { "DaysAfterInitiation": 7 }
        })
    };
    serde_json::json!({
        "Rules": [
            rule("aegis-audit-segments", format!("{base}year=")),
            rule("aegis-audit-quarantine", format!("{base}quarantine/")),
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
        assert_eq!(json["Rules"][1]["Filter"]["Prefix"], "trail/quarantine/");
        assert_eq!(rule["Transitions"][0]["Days"], 30);
        assert_eq!(rule["Transitions"][1]["StorageClass"], "GLACIER");
        assert_eq!(rule["Expiration"]["Days"], 1095);
    }

    #[test]
    fn lifecycle_rules_of_a_trail_at_the_bucket_root_match_its_keys() {
        let json = lifecycle_json("", Lifecycle::default());
        assert_eq!(json["Rules"][0]["Filter"]["Prefix"], "year=");
        assert_eq!(json["Rules"][1]["Filter"]["Prefix"], "quarantine/");
    }
}
