//! The DynamoDB single-table layout (`schemas/dynamodb-layout.md`), as pure functions from a
//! chained record to its index item, plus the rule that picks one winner when a `decision_id`
//! arrives twice with different content. Same record, same item: replays are idempotent.
//!
//! | entity      | PK                 | SK                                            |
//! |-------------|--------------------|-----------------------------------------------|
//! | decision    | `DECISION#<id>`    | `DECISION` (one per id: the winner)           |
//! | duplicate   | `DECISION#<id>`    | `DUPLICATE#<rank>` (every other decision record with this id) |
//! | override    | `DECISION#<id>`    | `OVERRIDE#<rank>`                             |
//! | safety flag | `DECISION#<id>`    | `SAFETY_FLAG#<rank>`                          |
//!
//! GSI1: `GSI1PK = USER#<user_id>`, GSI2: `GSI2PK = SESSION#<session_id>`; both sort by
//! `<occurred_at>#<event_type>#<decision_id>`. Overrides and flags carry the Kafka coordinates in
//! their sort key (zero-padded, as in the rank: two overrides at one `occurred_at` sort in Kafka
//! order), so they never clobber the decision or each other.
//!
//! Winner rule: the decision with the smallest rank `<occurred_at>#<topic>#<partition:010>#<offset:020>`
//! (earliest `occurred_at`, ties by Kafka coordinates) holds the `DECISION` item; every other
//! record with that id is kept as a `DUPLICATE#<rank>` item. The winner carries `conflict = true`
//! when any of them has different payload bytes (same bytes: a producer redelivery). Every step
//! is a conditional write on the rank it observed, so the outcome is the same whatever order
//! partitions, restarts and replays deliver the records in.

use std::collections::BTreeMap;

use futures::stream::{self, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::decode::{DecisionEvent, EventType};
use crate::segment::ChainedRecord;
use crate::sinks::{Attr, Guard, Guarded, IndexItem, IndexStore, SinkError};

pub const GSI1: &str = "GSI1";
pub const GSI2: &str = "GSI2";
/// Sort key of the single decision item per `decision_id`.
pub const DECISION_SK: &str = "DECISION";
const GSI_ATTRS: [&str; 4] = ["GSI1PK", "GSI1SK", "GSI2PK", "GSI2SK"];
/// Conditional rounds before contention is reported as a transient error (each round is a
/// conditional write that failed because another writer changed the item in between).
const MAX_ROUNDS: usize = 16;

/// The order key of the winner rule: smaller wins. Fixed-width fields make byte order equal
/// time order, then Kafka order (topic names cannot contain `#` or anything below it).
pub fn rank(occurred_at_key: &str, topic: &str, partition: i32, offset: i64) -> String {
    format!("{occurred_at_key}#{topic}#{partition:010}#{offset:020}")
}

/// The item for an accepted record, or `None` for a rejected one (rejects live in quarantine).
pub fn item_for(topic: &str, partition: i32, record: &ChainedRecord, segment_key: &str) -> Option<IndexItem> {
    let event = record.outcome.as_ref().ok()?;
    let ts = event.occurred_at_key();
    let sk = match event.event_type {
        EventType::Decision => DECISION_SK.to_string(),
        EventType::Override => format!("OVERRIDE#{}", rank(&ts, topic, partition, record.offset)),
        EventType::SafetyFlag => format!("SAFETY_FLAG#{}", rank(&ts, topic, partition, record.offset)),
    };
    let gsi_sort = format!("{ts}#{}#{}", event.event_type.as_str(), event.decision_id());
    let mut attrs = Attrs::new();
    attrs.s("GSI1PK", format!("USER#{}", event.user_id()));
    attrs.s("GSI1SK", gsi_sort.clone());
    attrs.s("GSI2PK", format!("SESSION#{}", event.session_id()));
    attrs.s("GSI2SK", gsi_sort);
    insert_event_fields(&mut attrs, event, &ts);
    attrs.s("kafka_topic", topic);
    attrs.0.insert("kafka_partition".into(), Attr::N(partition.to_string()));
    attrs.0.insert("kafka_offset".into(), Attr::N(record.offset.to_string()));
    attrs.s("entry_hash", hex::encode(record.link.entry_hash));
    attrs.s("payload_sha256", hex::encode(Sha256::digest(&record.payload)));
    attrs.s("segment_key", segment_key);
    if event.event_type == EventType::Decision {
        attrs.s("rank", rank(&ts, topic, partition, record.offset));
    }
    Some(IndexItem { pk: format!("DECISION#{}", event.decision_id()), sk, attrs: attrs.0 })
}

struct Attrs(BTreeMap<String, Attr>);

impl Attrs {
    fn new() -> Self {
        Self(BTreeMap::new())
    }
    fn s(&mut self, name: &str, value: impl Into<String>) {
        self.0.insert(name.to_string(), Attr::S(value.into()));
    }
}

fn insert_event_fields(attrs: &mut Attrs, e: &DecisionEvent, ts: &str) {
    let mut s = |name: &str, v: &str| attrs.s(name, v);
    s("event_type", e.event_type.as_str());
    s("decision_id", e.decision_id());
    s("occurred_at", ts);
    s("environment", e.environment());
    s("user_id", e.user_id());
    s("session_id", e.session_id());
    s("action", e.action());
    s("policy_version", e.policy_version());
    s("model_version", e.model_version());
    s("request_id", e.request_id());
    if let Some(score) = e.confidence_score {
        attrs.0.insert("confidence_score".into(), Attr::N(dynamodb_number(score)));
    }
    for (name, value) in [
        ("reviewer_id", e.reviewer_id()),
        ("override_reason", e.override_reason()),
        ("original_action", e.original_action()),
        ("safety_category", e.safety_category()),
        ("severity", e.severity()),
        ("metadata", e.metadata()),
    ] {
        if let Some(v) = value {
            attrs.s(name, v);
        }
    }
}

/// Items for a flush, one per key: BatchWriteItem rejects a batch naming a key twice. Two
/// override/flag items share a key only when they come from the same record.
pub fn dedupe_by_key(items: Vec<IndexItem>) -> Vec<IndexItem> {
    let mut by_key: BTreeMap<(String, String), IndexItem> = BTreeMap::new();
    for item in items {
        by_key.insert((item.pk.clone(), item.sk.clone()), item);
    }
    by_key.into_values().collect()
}

/// What one flush's index writes did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IndexReport {
    pub items: usize,
    /// Decisions whose `decision_id` was already held by different content (either side lost).
    pub conflicts: usize,
}

/// Writes a flush's items: overrides and flags in batches, then each decision through the winner
/// rule. Decisions sharing an id are applied in order; distinct ids run `concurrency` at a time.
pub async fn write_items(
    store: &dyn IndexStore,
    items: Vec<IndexItem>,
    concurrency: usize,
) -> Result<IndexReport, SinkError> {
    let total = items.len();
    let (decisions, others): (Vec<IndexItem>, Vec<IndexItem>) = items.into_iter().partition(|i| i.sk == DECISION_SK);
    if !others.is_empty() {
        store.write(dedupe_by_key(others)).await?;
    }
    let mut by_id: BTreeMap<String, Vec<IndexItem>> = BTreeMap::new();
    for item in decisions {
        by_id.entry(item.pk.clone()).or_default().push(item);
    }
    let conflicts = stream::iter(by_id.into_values().map(Ok))
        .map_ok(|group| async move {
            let mut conflicts = 0;
            for item in group {
                conflicts += usize::from(upsert_decision(store, item).await?);
            }
            Ok::<usize, SinkError>(conflicts)
        })
        .try_buffer_unordered(concurrency.max(1))
        .try_fold(0, |sum, n| async move { Ok(sum + n) })
        .await?;
    Ok(IndexReport { items: total, conflicts })
}

/// A score as a DynamoDB number. DynamoDB refuses magnitudes below 1e-130 (a
/// `ValidationException`, which would stop the partition on a valid event), so those are stored
/// as 0; the trail keeps the exact value.
fn dynamodb_number(score: f64) -> String {
    if score.abs() < 1e-130 {
        return "0".into();
    }
    score.to_string()
}

/// What the winner rule does with a candidate decision, given the item that holds its id.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// The stored item is the candidate itself (a replay).
    Keep,
    /// The stored decision outranks the candidate: keep the candidate as a duplicate item, and
    /// mark the winner when the bytes differ and it is not marked yet.
    Lose { duplicate: IndexItem, differs: bool, mark_winner: bool },
    /// The candidate outranks the stored decision: keep the displaced one as a duplicate item
    /// and put the candidate in its place (marked when any bytes seen so far differ).
    Replace { displaced: IndexItem, differs: bool, replacement: IndexItem },
    /// The stored decision has no rank to compare (a hand edit): the candidate replaces it,
    /// keeping its conflict flag. `rebuild-index` then puts the true winner back.
    Damaged { replacement: IndexItem },
}

fn attr_s<'a>(item: &'a IndexItem, name: &str) -> &'a str {
    match item.attrs.get(name) {
        Some(Attr::S(s)) => s,
        _ => "",
    }
}

fn has_conflict(item: &IndexItem) -> bool {
    matches!(item.attrs.get("conflict"), Some(Attr::Bool(true)))
}

/// Whether `stored` holds what `candidate` (the same record: same rank) would write. `conflict`
/// is left out (it records other records), and numbers compare by value (DynamoDB may return
/// `1.50` as `1.5`).
fn holds_the_same(candidate: &IndexItem, stored: &IndexItem) -> bool {
    let without_flag = |item: &IndexItem| item.attrs.iter().filter(|(name, _)| *name != "conflict").count();
    without_flag(candidate) == without_flag(stored)
        && candidate.attrs.iter().filter(|(name, _)| *name != "conflict").all(|(name, value)| {
            match (value, stored.attrs.get(name)) {
                (Attr::N(a), Some(Attr::N(b))) => a == b || a.parse::<f64>().ok() == b.parse::<f64>().ok(),
                (a, b) => Some(a) == b,
            }
        })
}

/// The item that keeps a non-winning decision record: its own attributes, no GSI keys (user and
/// session queries see only winners), under `DUPLICATE#<rank>`.
pub fn duplicate_item(decision: &IndexItem) -> IndexItem {
    let mut attrs = decision.attrs.clone();
    for name in GSI_ATTRS.iter().chain(&["conflict"]) {
        attrs.remove(*name);
    }
    IndexItem { pk: decision.pk.clone(), sk: format!("DUPLICATE#{}", attr_s(decision, "rank")), attrs }
}

/// The winner rule as a pure function. Every record that is not the final winner ends up as a
/// duplicate item (written when it loses or is displaced), and the winner's `conflict` flag ends
/// up true exactly when two records with different bytes were seen, whatever the order.
pub fn resolve(candidate: &IndexItem, existing: &IndexItem) -> Resolution {
    let (mine, theirs) = (attr_s(candidate, "rank"), attr_s(existing, "rank"));
    if theirs.is_empty() {
        let mut replacement = candidate.clone();
        if has_conflict(existing) {
            replacement.attrs.insert("conflict".into(), Attr::Bool(true));
        }
        return Resolution::Damaged { replacement };
    }
    if mine == theirs {
        return Resolution::Keep;
    }
    let differs = attr_s(candidate, "payload_sha256") != attr_s(existing, "payload_sha256");
    if mine < theirs {
        let mut replacement = candidate.clone();
        if has_conflict(existing) || differs {
            replacement.attrs.insert("conflict".into(), Attr::Bool(true));
        }
        Resolution::Replace { displaced: duplicate_item(existing), differs, replacement }
    } else {
        Resolution::Lose {
            duplicate: duplicate_item(candidate),
            differs,
            mark_winner: differs && !has_conflict(existing),
        }
    }
}

/// Applies the winner rule for one decision item. Returns whether its bytes differed from the
/// decision it met (a conflict, as opposed to a redelivery).
///
/// Crash-safe by order: a displaced or losing record is written as a duplicate item before the
/// winner item changes, so a crash between the two loses nothing, and the replay (the flush is
/// repeated until the head advances) finishes the step.
pub async fn upsert_decision(store: &dyn IndexStore, candidate: IndexItem) -> Result<bool, SinkError> {
    let mut conflicted = false;
    let mut outcome = store.put_guarded(&candidate, Guard::Absent).await?;
    for _ in 0..MAX_ROUNDS {
        let existing = match outcome {
            Guarded::Written => return Ok(conflicted),
            Guarded::Refused(None) => {
                outcome = store.put_guarded(&candidate, Guard::Absent).await?;
                continue;
            }
            Guarded::Refused(Some(existing)) => existing,
        };
        let observed = attr_s(&existing, "rank").to_string();
        outcome = match resolve(&candidate, &existing) {
            Resolution::Keep if holds_the_same(&candidate, &existing) => return Ok(conflicted),
            Resolution::Keep => {
                // The same record, but the item was changed (by hand, or by an older image):
                // put back what the record gives, keeping the conflict flag as found.
                let mut repaired = candidate.clone();
                if has_conflict(&existing) {
                    repaired.attrs.insert("conflict".into(), Attr::Bool(true));
                }
                store.put_guarded(&repaired, Guard::Rank { rank: &observed, flagged: has_conflict(&existing) }).await?
            }
            Resolution::Lose { duplicate, differs, mark_winner } => {
                conflicted |= differs;
                store.write(vec![duplicate]).await?;
                if !mark_winner {
                    return Ok(conflicted);
                }
                store.mark_conflict(&existing.pk, &existing.sk, &observed).await?
            }
            Resolution::Damaged { replacement } => store.put_guarded(&replacement, Guard::Damaged).await?,
            Resolution::Replace { displaced, differs, replacement } => {
                conflicted |= differs;
                store.write(vec![displaced]).await?;
                store
                    .put_guarded(&replacement, Guard::Rank { rank: &observed, flagged: has_conflict(&existing) })
                    .await?
            }
        };
    }
    Err(SinkError::Transient {
        backend: "dynamodb",
        operation: "PutItem",
        target: candidate.pk.clone(),
        message: format!("decision item still contended after {MAX_ROUNDS} conditional rounds"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Chain;
    use crate::config::ValidationConfig;
    use crate::sinks::memory::MemoryIndex;
    use bytes::Bytes;
    use proptest::prelude::Strategy;

    fn record(offset: i64, json: &str) -> ChainedRecord {
        let mut chain = Chain::new("t", 0);
        let outcome = crate::decode::decode(
            Some(&bytes::Bytes::copy_from_slice(json.as_bytes())),
            None,
            &ValidationConfig::default(),
        );
        let status =
            if outcome.is_ok() { crate::chain::EntryStatus::Accepted } else { crate::chain::EntryStatus::Rejected };
        let link = chain.append(offset, status, json.as_bytes()).unwrap();
        ChainedRecord { offset, kafka_timestamp_ms: None, payload: Bytes::from(json.to_string()), link, outcome }
    }

    fn json(event_type: &str, extra: &str) -> String {
        format!(
            r#"{{"decision_id":"d-9","event_type":"{event_type}","occurred_at":"2026-11-20T08:00:00Z","environment":"prod","user_id":"u-1","session_id":"s-1","action":"deny","confidence_score":0.25,"policy_version":"p","model_version":"m","request_id":"r"{extra}}}"#
        )
    }

    #[test]
    fn decision_override_and_flag_share_pk_with_distinct_sks() {
        let d = item_for("t", 0, &record(1, &json("decision", "")), "k").unwrap();
        let o = item_for("t", 0, &record(2, &json("override", r#","reviewer_id":"rv","override_reason":"x""#)), "k")
            .unwrap();
        let f =
            item_for("t", 0, &record(3, &json("safety_flag", r#","safety_category":"pii","severity":"high""#)), "k")
                .unwrap();
        assert_eq!(d.pk, "DECISION#d-9");
        assert_eq!(o.pk, d.pk);
        assert_eq!(d.sk, "DECISION");
        assert_eq!(d.attrs["rank"], Attr::S("2026-11-20T08:00:00.000000Z#t#0000000000#00000000000000000001".into()));
        assert_eq!(o.sk, "OVERRIDE#2026-11-20T08:00:00.000000Z#t#0000000000#00000000000000000002");
        assert_eq!(f.sk, "SAFETY_FLAG#2026-11-20T08:00:00.000000Z#t#0000000000#00000000000000000003");
        // Two overrides at one instant: the later record sorts last, so the newest-override
        // query (descending, limit 1) finds it.
        let override_at = |offset| {
            item_for("t", 0, &record(offset, &json("override", r#","reviewer_id":"rv","override_reason":"x""#)), "k")
                .unwrap()
                .sk
        };
        assert!(override_at(9) < override_at(10));
        assert_eq!(d.attrs["GSI1PK"], Attr::S("USER#u-1".into()));
        assert_eq!(d.attrs["GSI2PK"], Attr::S("SESSION#s-1".into()));
        assert_eq!(o.attrs["reviewer_id"], Attr::S("rv".into()));
        assert_eq!(d.attrs["confidence_score"], Attr::N("0.25".into()));
    }

    #[test]
    fn rejected_records_have_no_item() {
        assert!(item_for("t", 0, &record(1, "nope"), "k").is_none());
    }

    fn decision(offset: i64, occurred_at: &str, action: &str) -> IndexItem {
        let payload = json("decision", "").replace("2026-11-20T08:00:00Z", occurred_at).replace("deny", action);
        item_for("t", 0, &record(offset, &payload), "k").unwrap()
    }

    fn stored(index: &MemoryIndex) -> BTreeMap<String, IndexItem> {
        index.items().into_iter().map(|i| (i.sk.clone(), i)).collect()
    }

    #[test]
    fn earlier_occurred_at_wins_and_ties_go_to_the_lower_offset() {
        let early = decision(9, "2026-11-20T07:00:00Z", "deny");
        let late = decision(1, "2026-11-20T08:00:00Z", "approve");
        assert!(matches!(resolve(&late, &early), Resolution::Lose { differs: true, mark_winner: true, .. }));
        let Resolution::Replace { displaced: c, differs: true, replacement } = resolve(&early, &late) else { panic!() };
        assert_eq!(c.sk, format!("DUPLICATE#{}", attr_s(&late, "rank")));
        assert!(!c.attrs.contains_key("GSI1PK"), "duplicate items stay out of the user/session indexes");
        assert_eq!(replacement.attrs["conflict"], Attr::Bool(true));
        let tie_low = decision(2, "2026-11-20T08:00:00Z", "deny");
        assert!(matches!(resolve(&late, &tie_low), Resolution::Replace { .. }), "offset 1 outranks offset 2");
    }

    #[test]
    fn same_bytes_at_another_offset_is_a_redelivery_not_a_conflict() {
        let a = decision(1, "2026-11-20T08:00:00Z", "deny");
        let redelivered = decision(7, "2026-11-20T08:00:00Z", "deny");
        assert_eq!(resolve(&a, &a), Resolution::Keep);
        assert!(matches!(resolve(&redelivered, &a), Resolution::Lose { differs: false, mark_winner: false, .. }));
        let Resolution::Replace { differs: false, replacement, .. } = resolve(&a, &redelivered) else { panic!() };
        assert!(!replacement.attrs.contains_key("conflict"));
    }

    #[tokio::test]
    async fn conflicting_decision_is_kept_and_the_winner_marked() {
        let index = MemoryIndex::default();
        let late = decision(1, "2026-11-20T08:00:00Z", "approve");
        let early = decision(2, "2026-11-20T07:00:00Z", "deny");
        assert!(!upsert_decision(&index, late.clone()).await.unwrap());
        assert!(upsert_decision(&index, early.clone()).await.unwrap());
        let items = stored(&index);
        assert_eq!(items.len(), 2);
        assert_eq!(items["DECISION"].attrs["action"], Attr::S("deny".into()));
        assert_eq!(items["DECISION"].attrs["conflict"], Attr::Bool(true));
        assert_eq!(items[&format!("DUPLICATE#{}", attr_s(&late, "rank"))].attrs["action"], Attr::S("approve".into()));
        // Replaying either record changes nothing.
        upsert_decision(&index, late).await.unwrap();
        upsert_decision(&index, early).await.unwrap();
        assert_eq!(stored(&index), items);
    }

    #[test]
    fn scores_too_small_for_dynamodb_are_stored_as_zero() {
        let score = |extra: &str| {
            let text = json("decision", "").replace(r#""confidence_score":0.25"#, extra);
            item_for("t", 0, &record(1, &text), "k").unwrap().attrs["confidence_score"].clone()
        };
        assert_eq!(score(r#""confidence_score":1e-200"#), Attr::N("0".into()));
        assert_eq!(score(r#""confidence_score":-0.0"#), Attr::N("0".into()));
        assert_eq!(score(r#""confidence_score":9e-131"#), Attr::N("0".into()));
        assert_eq!(score(r#""confidence_score":2e-130"#), Attr::N(2e-130f64.to_string()));
        assert_eq!(score(r#""confidence_score":0.913"#), Attr::N("0.913".into()));
    }

    #[tokio::test]
    async fn a_replacement_computed_before_a_conflict_was_flagged_cannot_erase_the_flag() {
        let index = MemoryIndex::default();
        let stored_winner = decision(5, "2026-11-20T08:00:00Z", "deny");
        let redelivery = decision(1, "2026-11-20T08:00:00Z", "deny"); // same bytes, outranks it
        let other = decision(9, "2026-11-20T08:00:00Z", "approve"); // different bytes, ranks below
        assert!(!upsert_decision(&index, stored_winner.clone()).await.unwrap());
        // One writer reads the winner and computes its replacement (no conflict seen)...
        let Resolution::Replace { replacement, .. } = resolve(&redelivery, &stored_winner) else { panic!() };
        // ...meanwhile another loses to the winner and flags it...
        assert!(upsert_decision(&index, other).await.unwrap());
        // ...so the first writer's guarded put, on the rank it saw unflagged, is refused.
        let guard = Guard::Rank { rank: attr_s(&stored_winner, "rank"), flagged: false };
        assert!(matches!(index.put_guarded(&replacement, guard).await.unwrap(), Guarded::Refused(Some(_))));
        // Its retry round sees the flag and keeps it.
        upsert_decision(&index, redelivery.clone()).await.unwrap();
        let items = stored(&index);
        assert_eq!(items["DECISION"].attrs["rank"], redelivery.attrs["rank"]);
        assert_eq!(items["DECISION"].attrs["conflict"], Attr::Bool(true));
    }

    #[tokio::test]
    async fn a_decision_item_changed_by_hand_is_put_back_by_its_record_with_its_flag() {
        let index = MemoryIndex::default();
        let winner = decision(1, "2026-11-20T07:00:00Z", "deny");
        upsert_decision(&index, winner.clone()).await.unwrap();
        assert!(upsert_decision(&index, decision(2, "2026-11-20T08:00:00Z", "approve")).await.unwrap());
        let flagged = stored(&index)["DECISION"].clone();
        assert_eq!(flagged.attrs["conflict"], Attr::Bool(true));
        // Same rank, other content (what rebuild-index is run to repair).
        let mut edited = flagged.clone();
        edited.attrs.insert("action".into(), Attr::S("approve".into()));
        edited.attrs.insert("segment_key".into(), Attr::S("elsewhere".into()));
        edited.attrs.remove("user_id");
        index.write(vec![edited]).await.unwrap();
        assert!(!upsert_decision(&index, winner.clone()).await.unwrap());
        assert_eq!(stored(&index)["DECISION"], flagged);
        // What the record gives, with a number spelled as DynamoDB may return it: left alone.
        let mut respelled = flagged.clone();
        let Some(Attr::N(score)) = respelled.attrs.get("confidence_score").cloned() else { panic!("{respelled:?}") };
        respelled.attrs.insert("confidence_score".into(), Attr::N(format!("{score}0")));
        index.write(vec![respelled.clone()]).await.unwrap();
        upsert_decision(&index, winner).await.unwrap();
        assert_eq!(stored(&index)["DECISION"], respelled);
    }

    #[tokio::test]
    async fn a_decision_item_without_a_rank_is_replaced_not_fought_over() {
        for damage in [None, Some(Attr::N("1".into())), Some(Attr::S(String::new()))] {
            let index = MemoryIndex::default();
            let mut damaged = decision(5, "2026-11-20T08:00:00Z", "deny");
            match &damage {
                None => damaged.attrs.remove("rank"),
                Some(value) => damaged.attrs.insert("rank".into(), value.clone()),
            };
            damaged.attrs.insert("conflict".into(), Attr::Bool(true));
            index.write(vec![damaged]).await.unwrap();
            let candidate = decision(9, "2026-11-20T09:00:00Z", "approve");
            upsert_decision(&index, candidate.clone()).await.unwrap();
            let winner = &stored(&index)["DECISION"];
            assert_eq!(winner.attrs["rank"], candidate.attrs["rank"], "{damage:?}");
            assert_eq!(winner.attrs["conflict"], Attr::Bool(true), "the flag is kept");
        }
    }

    #[tokio::test]
    async fn overrides_are_batched_beside_the_decision() {
        let index = MemoryIndex::default();
        let d = decision(1, "2026-11-20T08:00:00Z", "deny");
        let o = item_for("t", 0, &record(2, &json("override", r#","reviewer_id":"rv","override_reason":"x""#)), "k")
            .unwrap();
        let report = write_items(&index, vec![d, o.clone(), o], 4).await.unwrap();
        assert_eq!(report, IndexReport { items: 3, conflicts: 0 });
        assert_eq!(index.items().len(), 2);
    }

    proptest::proptest! {
        /// Whatever order records arrive in (partitions interleave, replays repeat), the index
        /// ends in the same state.
        #[test]
        fn winner_rule_is_order_independent(
            order in proptest::sample::subsequence((0..6usize).collect::<Vec<_>>(), 6).prop_shuffle(),
            replays in proptest::collection::vec(0..6usize, 0..4),
        ) {
            let candidates = [
                decision(10, "2026-11-20T08:00:00Z", "approve"),
                decision(11, "2026-11-20T07:00:00Z", "deny"),
                decision(12, "2026-11-20T07:00:00Z", "deny"),
                decision(13, "2026-11-20T07:00:00Z", "escalate"),
                decision(14, "2026-11-20T09:00:00Z", "approve"),
                decision(15, "2026-11-20T08:00:00Z", "approve"),
            ];
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let run = |sequence: Vec<usize>| {
                let index = MemoryIndex::default();
                rt.block_on(async {
                    for i in sequence {
                        upsert_decision(&index, candidates[i].clone()).await.unwrap();
                    }
                });
                stored(&index)
            };
            let reference = run((0..6).collect());
            let mut sequence = order.clone();
            sequence.extend(replays);
            proptest::prop_assert_eq!(run(sequence), reference.clone());
            // Winner: offset 11 (earliest occurred_at, lowest offset among the ties).
            proptest::prop_assert_eq!(&reference["DECISION"].attrs["kafka_offset"], &Attr::N("11".into()));
            proptest::prop_assert_eq!(&reference["DECISION"].attrs["conflict"], &Attr::Bool(true));
            // Every other record is a duplicate item, redelivery (12) or conflict (10, 13, 14, 15).
            let duplicates = reference.keys().filter(|k| k.starts_with("DUPLICATE#")).count();
            proptest::prop_assert_eq!(duplicates, 5);
        }
    }
}
