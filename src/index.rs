//! The DynamoDB single-table layout (`schemas/dynamodb-layout.md`), as pure functions from a
//! chained record to its index item. Same record, same item: replays are idempotent upserts.
//!
//! | entity      | PK                 | SK                                          |
//! |-------------|--------------------|---------------------------------------------|
//! | decision    | `DECISION#<id>`    | `DECISION#<occurred_at>`                    |
//! | override    | `DECISION#<id>`    | `OVERRIDE#<occurred_at>#<topic>#<p>#<off>`  |
//! | safety flag | `DECISION#<id>`    | `SAFETY_FLAG#<occurred_at>#<topic>#<p>#<off>` |
//!
//! GSI1: `GSI1PK = USER#<user_id>`, GSI2: `GSI2PK = SESSION#<session_id>`; both sort by
//! `<occurred_at>#<event_type>#<decision_id>`. Overrides and flags carry the Kafka coordinates in
//! their sort key, so they never clobber the decision or each other.

use std::collections::BTreeMap;

use crate::decode::{DecisionEvent, EventType};
use crate::segment::ChainedRecord;
use crate::sinks::{Attr, IndexItem};

pub const GSI1: &str = "GSI1";
pub const GSI2: &str = "GSI2";

/// The item for an accepted record, or `None` for a rejected one (rejects live in quarantine).
pub fn item_for(topic: &str, partition: i32, record: &ChainedRecord, segment_key: &str) -> Option<IndexItem> {
    let event = record.outcome.as_ref().ok()?;
    let ts = event.occurred_at_key();
    let coordinates = format!("{topic}#{partition}#{}", record.offset);
    let sk = match event.event_type {
        EventType::Decision => format!("DECISION#{ts}"),
        EventType::Override => format!("OVERRIDE#{ts}#{coordinates}"),
        EventType::SafetyFlag => format!("SAFETY_FLAG#{ts}#{coordinates}"),
    };
    let gsi_sort = format!("{ts}#{}#{}", event.event_type.as_str(), event.decision_id);
    let mut attrs: BTreeMap<&'static str, Attr> = BTreeMap::new();
    let s = |v: &str| Attr::S(v.to_string());
    attrs.insert("GSI1PK", Attr::S(format!("USER#{}", event.user_id)));
    attrs.insert("GSI1SK", s(&gsi_sort));
    attrs.insert("GSI2PK", Attr::S(format!("SESSION#{}", event.session_id)));
    attrs.insert("GSI2SK", Attr::S(gsi_sort));
    insert_event_fields(&mut attrs, event, &ts);
    attrs.insert("kafka_topic", s(topic));
    attrs.insert("kafka_partition", Attr::N(partition.to_string()));
    attrs.insert("kafka_offset", Attr::N(record.offset.to_string()));
    attrs.insert("entry_hash", Attr::S(hex::encode(record.link.entry_hash)));
    attrs.insert("segment_key", s(segment_key));
    Some(IndexItem { pk: format!("DECISION#{}", event.decision_id), sk, attrs })
}

fn insert_event_fields(attrs: &mut BTreeMap<&'static str, Attr>, e: &DecisionEvent, ts: &str) {
    let s = |v: &str| Attr::S(v.to_string());
    attrs.insert("event_type", s(e.event_type.as_str()));
    attrs.insert("decision_id", s(&e.decision_id));
    attrs.insert("occurred_at", s(ts));
    attrs.insert("environment", s(&e.environment));
    attrs.insert("user_id", s(&e.user_id));
    attrs.insert("session_id", s(&e.session_id));
    attrs.insert("action", s(&e.action));
    attrs.insert("policy_version", s(&e.policy_version));
    attrs.insert("model_version", s(&e.model_version));
    attrs.insert("request_id", s(&e.request_id));
    if let Some(score) = e.confidence_score {
        attrs.insert("confidence_score", Attr::N(score.to_string()));
    }
    for (name, value) in [
        ("reviewer_id", &e.reviewer_id),
        ("override_reason", &e.override_reason),
        ("original_action", &e.original_action),
        ("safety_category", &e.safety_category),
        ("severity", &e.severity),
        ("metadata", &e.metadata),
    ] {
        if let Some(v) = value {
            attrs.insert(name, s(v));
        }
    }
}

/// Items for a flush, one per key: BatchWriteItem rejects a batch naming a key twice. When two
/// records map to one key (same decision_id and occurred_at), the later offset wins, as it
/// would across flushes.
pub fn dedupe_by_key(items: Vec<IndexItem>) -> Vec<IndexItem> {
    let mut by_key: BTreeMap<(String, String), IndexItem> = BTreeMap::new();
    for item in items {
        by_key.insert((item.pk.clone(), item.sk.clone()), item);
    }
    by_key.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Chain;
    use crate::config::ValidationConfig;
    use bytes::Bytes;

    fn record(offset: i64, json: &str) -> ChainedRecord {
        let mut chain = Chain::new("t", 0);
        let outcome = crate::decode::decode(Some(json.as_bytes()), None, &ValidationConfig::default());
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
        assert_eq!(d.sk, "DECISION#2026-11-20T08:00:00.000000Z");
        assert_eq!(o.sk, "OVERRIDE#2026-11-20T08:00:00.000000Z#t#0#2");
        assert_eq!(f.sk, "SAFETY_FLAG#2026-11-20T08:00:00.000000Z#t#0#3");
        assert_eq!(d.attrs["GSI1PK"], Attr::S("USER#u-1".into()));
        assert_eq!(d.attrs["GSI2PK"], Attr::S("SESSION#s-1".into()));
        assert_eq!(o.attrs["reviewer_id"], Attr::S("rv".into()));
        assert_eq!(d.attrs["confidence_score"], Attr::N("0.25".into()));
    }

    #[test]
    fn rejected_records_have_no_item() {
        assert!(item_for("t", 0, &record(1, "nope"), "k").is_none());
    }

    #[test]
    fn dedupe_keeps_later_item_per_key() {
        let a = item_for("t", 0, &record(1, &json("decision", "")), "k1").unwrap();
        let b = item_for("t", 0, &record(5, &json("decision", "")), "k2").unwrap();
        let out = dedupe_by_key(vec![a, b]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].attrs["kafka_offset"], Attr::N("5".into()));
    }
}
