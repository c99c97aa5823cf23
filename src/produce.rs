//! `aegis-audit produce`: a realistic event generator for demos, tests and benchmarks.
//!
//! A mix of decisions (~80%), human overrides (~12%) and safety flags (~8%) across
//! environments, users and sessions, with payloads of roughly 350-700 bytes. Overrides and flags
//! refer to earlier decisions. Records are keyed by session, so a session's events keep their
//! order within one partition.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("kafka producer: {0}")]
    Kafka(String),
    #[error("delivery to {topic} failed: {message}")]
    Delivery { topic: String, message: String },
}

#[derive(Debug, Clone)]
pub struct ProduceOptions {
    pub count: u64,
    /// Records per second; `None` is as fast as the broker takes them.
    pub rate: Option<u64>,
    /// Only these partitions (round robin); `None` lets the key choose.
    pub partitions: Option<Vec<i32>>,
    pub seed: u64,
}

/// Per-partition delivery summary: count, first and last offset.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Delivered {
    pub count: u64,
    pub first_offset: i64,
    pub last_offset: i64,
}

const ENVIRONMENTS: [(&str, u32); 3] = [("prod", 70), ("staging", 20), ("dev", 10)];
const ACTIONS: [&str; 8] = [
    "approve_loan",
    "deny_loan",
    "flag_transaction",
    "allow_transaction",
    "escalate_ticket",
    "auto_reply",
    "block_content",
    "allow_content",
];
const CATEGORIES: [&str; 5] = ["pii_leak", "toxicity", "self_harm", "prompt_injection", "bias"];
const SEVERITIES: [&str; 4] = ["low", "medium", "high", "critical"];
const REASONS: [&str; 4] = [
    "customer provided new documents",
    "model confidence too low for policy",
    "regulatory hold",
    "false positive confirmed by analyst",
];

/// Deterministic event generator (same seed, same events apart from timestamps).
pub struct Generator {
    rng: StdRng,
    recent_decisions: Vec<(String, String, String)>,
    sequence: u64,
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        Self { rng: StdRng::seed_from_u64(seed), recent_decisions: Vec::new(), sequence: 0 }
    }

    /// The next event as (key, JSON bytes).
    pub fn next_event(&mut self, now: chrono::DateTime<chrono::Utc>) -> (String, Vec<u8>) {
        self.sequence += 1;
        let rng = &mut self.rng;
        let roll = rng.gen_range(0..100);
        let env = {
            let mut pick = rng.gen_range(0..100);
            ENVIRONMENTS
                .iter()
                .find(|(_, w)| {
                    if pick < *w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .map(|(e, _)| *e)
                .unwrap_or("prod")
        };
        let occurred_at = (now - chrono::Duration::milliseconds(rng.gen_range(0..5_000)))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let request_id = format!("req-{:016x}", rng.gen::<u64>());
        let channel = ["web", "api", "mobile"][rng.gen_range(0..3)];
        let notes: String = (0..rng.gen_range(0..220)).map(|_| (b'a' + rng.gen_range(0..26)) as char).collect();
        let (kind, decision_id, user, session) = if roll < 80 || self.recent_decisions.is_empty() {
            let user = format!("user-{:04}", rng.gen_range(0..1000));
            let session = format!("sess-{}-{:05}", user, rng.gen_range(0..20));
            let id = format!("dec-{:x}-{:08}", rng.gen::<u32>(), self.sequence);
            if self.recent_decisions.len() >= 256 {
                let i = rng.gen_range(0..self.recent_decisions.len());
                self.recent_decisions.swap_remove(i);
            }
            self.recent_decisions.push((id.clone(), user.clone(), session.clone()));
            ("decision", id, user, session)
        } else {
            let (id, user, session) = self.recent_decisions[rng.gen_range(0..self.recent_decisions.len())].clone();
            (if roll < 92 { "override" } else { "safety_flag" }, id, user, session)
        };
        let mut event = json!({
            "decision_id": decision_id,
            "event_type": kind,
            "occurred_at": occurred_at,
            "environment": env,
            "user_id": user,
            "session_id": session,
            "action": ACTIONS[rng.gen_range(0..ACTIONS.len())],
            "policy_version": format!("policy-{}.{}", rng.gen_range(1..4), rng.gen_range(0..10)),
            "model_version": format!("model-2026-{:02}", rng.gen_range(1..12)),
            "request_id": request_id,
            "metadata": {"channel": channel, "latency_ms": rng.gen_range(5..900), "notes": notes},
        });
        match kind {
            "decision" => event["confidence_score"] = json!((rng.gen_range(0.0..1.0f64) * 1000.0).round() / 1000.0),
            "override" => {
                event["reviewer_id"] = json!(format!("reviewer-{:02}", rng.gen_range(0..40)));
                event["override_reason"] = json!(REASONS[rng.gen_range(0..REASONS.len())]);
                event["original_action"] = event["action"].clone();
            }
            _ => {
                event["safety_category"] = json!(CATEGORIES[rng.gen_range(0..CATEGORIES.len())]);
                event["severity"] = json!(SEVERITIES[rng.gen_range(0..SEVERITIES.len())]);
                event["confidence_score"] = json!((rng.gen_range(0.0..1.0f64) * 1000.0).round() / 1000.0);
            }
        }
        let key = event["session_id"].as_str().unwrap_or_default().to_string();
        (key, serde_json::to_vec(&event).expect("json serialises"))
    }
}

pub async fn run(config: &Config, options: &ProduceOptions) -> Result<BTreeMap<i32, Delivered>, ProduceError> {
    let cc = crate::source::producer_config(config, 60_000);
    let producer: FutureProducer = cc.create().map_err(|e| ProduceError::Kafka(e.to_string()))?;
    let topic = config.kafka.topic.clone();
    let mut generator = Generator::new(options.seed);
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut delivered: BTreeMap<i32, Delivered> = BTreeMap::new();
    let mut interval = options.rate.map(|r| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / r.max(1) as f64));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    });
    use futures::StreamExt;
    let record = |result: Result<(i32, i64), (rdkafka::error::KafkaError, rdkafka::message::OwnedMessage)>,
                  delivered: &mut BTreeMap<i32, Delivered>| match result {
        Ok((partition, offset)) => {
            let d =
                delivered.entry(partition).or_insert(Delivered { count: 0, first_offset: offset, last_offset: offset });
            d.count += 1;
            d.first_offset = d.first_offset.min(offset);
            d.last_offset = d.last_offset.max(offset);
            Ok(())
        }
        Err((e, message)) => {
            use rdkafka::message::Message;
            let mut message_text = e.to_string();
            if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::UnknownPartition) {
                message_text +=
                    &format!(" (--partitions names partition {}, which the topic does not have)", message.partition());
            }
            Err(ProduceError::Delivery { topic: topic.clone(), message: message_text })
        }
    };
    for i in 0..options.count {
        if let Some(interval) = interval.as_mut() {
            interval.tick().await;
        }
        let (key, payload) = generator.next_event(chrono::Utc::now());
        let partition = options.partitions.as_ref().map(|ps| ps[(i as usize) % ps.len()]);
        let producer = producer.clone();
        let topic = config.kafka.topic.clone();
        in_flight.push(async move {
            let mut rec = FutureRecord::to(&topic).key(&key).payload(&payload);
            if let Some(p) = partition {
                rec = rec.partition(p);
            }
            producer.send(rec, Duration::from_secs(60)).await.map(|d| (d.partition, d.offset))
        });
        // Bound memory: keep at most 10k sends in flight.
        while in_flight.len() >= 10_000 {
            if let Some(result) = in_flight.next().await {
                record(result, &mut delivered)?;
            }
        }
    }
    while let Some(result) = in_flight.next().await {
        record(result, &mut delivered)?;
    }
    Ok(delivered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ValidationConfig;

    #[test]
    fn generated_events_are_valid_and_realistically_sized() {
        let mut g = Generator::new(7);
        let now = chrono::Utc::now();
        let mut kinds = BTreeMap::new();
        let mut sizes = Vec::new();
        for _ in 0..2000 {
            let (_, bytes) = g.next_event(now);
            let event = crate::decode::decode(
                Some(&bytes::Bytes::from(bytes.clone())),
                Some(now.timestamp_millis()),
                &ValidationConfig::default(),
            )
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)));
            *kinds.entry(event.event_type.as_str()).or_insert(0) += 1;
            sizes.push(bytes.len());
        }
        assert!(kinds["decision"] > 1400 && kinds["override"] > 100 && kinds["safety_flag"] > 50, "{kinds:?}");
        let mean = sizes.iter().sum::<usize>() / sizes.len();
        assert!((350..=700).contains(&mean), "mean size {mean}");
    }
}
