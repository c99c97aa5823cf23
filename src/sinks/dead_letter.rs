//! The dead-letter topic: rejected records with their original bytes and headers naming why and
//! where they came from. Written inside the flush, before the chain head advances, so the
//! consumer commits past a bad record only once its dead letter is durable (acks=all).
//!
//! A flush re-run after a crash may produce a dead letter twice; the headers carry the source
//! coordinates, so DLQ readers can drop repeats. The authoritative copy is the quarantine row in
//! S3, which is written exactly once like every segment.

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::SinkError;

/// One rejected record, as it goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub kafka_timestamp_ms: Option<i64>,
    pub payload: Option<bytes::Bytes>,
    pub reason_code: &'static str,
    pub reason: String,
}

#[async_trait]
pub trait DeadLetterSink: Send + Sync {
    /// Durably writes every dead letter (all acknowledged) or returns an error.
    async fn send(&self, letters: &[DeadLetter]) -> Result<(), SinkError>;
}

pub struct KafkaDeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl KafkaDeadLetters {
    pub fn new(config: &crate::config::Config, topic: &str) -> Result<Self, SinkError> {
        let cc = crate::source::producer_config(config, 30_000);
        let producer = cc.create().map_err(|e| SinkError::Fatal {
            backend: "kafka",
            operation: "CreateProducer",
            target: topic.to_string(),
            message: e.to_string(),
        })?;
        Ok(Self { producer, topic: topic.to_string() })
    }
}

impl KafkaDeadLetters {
    /// Produces one letter; `with_payload = false` sends the headers alone, marked as such.
    async fn produce(&self, letter: &DeadLetter, with_payload: bool) -> Result<(), rdkafka::error::KafkaError> {
        let partition = letter.source_partition.to_string();
        let offset = letter.source_offset.to_string();
        let timestamp = letter.kafka_timestamp_ms.map(|ts| ts.to_string());
        // The retry without the payload must fit whatever the reason says (its whole text is in
        // the quarantine row's `reject_reason`).
        let reason =
            if with_payload { letter.reason.as_str() } else { prefix_within(&letter.reason, MAX_REASON_BYTES) };
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: "aegis.reason_code", value: Some(letter.reason_code) })
            .insert(Header { key: "aegis.reason", value: Some(reason) })
            .insert(Header { key: "aegis.source_topic", value: Some(letter.source_topic.as_str()) })
            .insert(Header { key: "aegis.source_partition", value: Some(partition.as_str()) })
            .insert(Header { key: "aegis.source_offset", value: Some(offset.as_str()) });
        if let Some(ts) = &timestamp {
            headers = headers.insert(Header { key: "aegis.source_timestamp", value: Some(ts.as_str()) });
        }
        if !with_payload {
            headers = headers.insert(Header { key: "aegis.payload_omitted", value: Some(PAYLOAD_OMITTED) });
        }
        let key = letter_key(letter);
        let mut record: FutureRecord<'_, String, [u8]> = FutureRecord::to(&self.topic).key(&key).headers(headers);
        if let (true, Some(payload)) = (with_payload, &letter.payload) {
            record = record.payload(payload.as_ref());
        }
        // The letter's own timestamp is when it was sent: with the source record's, a backfill's
        // letters would be due for deletion under the topic's retention as soon as written (and
        // a broker bounding timestamps would refuse them). The source's is in a header.
        self.producer.send(record, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| e)
    }
}

/// The reason header of a letter sent without its payload is cut to this many bytes.
const MAX_REASON_BYTES: usize = 1024;

/// The longest prefix of `text` within `max` bytes that ends on a character boundary.
fn prefix_within(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Why a dead letter may come without its payload.
const PAYLOAD_OMITTED: &str = "too large for the dead-letter topic; the bytes are in the trail's quarantine segment";

fn letter_key(letter: &DeadLetter) -> String {
    format!("{}/{}/{}", letter.source_topic, letter.source_partition, letter.source_offset)
}

/// Errors no retry fixes: a rejected record stays rejected, a missing permission stays missing.
fn is_permanent(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::InvalidTopic
    )
}

#[async_trait]
impl DeadLetterSink for KafkaDeadLetters {
    async fn send(&self, letters: &[DeadLetter]) -> Result<(), SinkError> {
        let sends = letters.iter().map(|letter| async move {
            let mut result = self.produce(letter, true).await;
            if let Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) = &result {
                // A record near Kafka's size limit plus our headers may not fit: send the letter
                // without its bytes (they are durable in the quarantine segment already).
                tracing::warn!(key = %letter_key(letter), "dead letter too large for the topic; sending it without the payload");
                result = self.produce(letter, false).await;
            }
            result.map_err(|e| {
                let (backend, operation, target) = ("kafka", "Produce", format!("{} (from {})", self.topic, letter_key(letter)));
                match e.rdkafka_error_code() {
                    Some(code) if is_permanent(code) => SinkError::Fatal { backend, operation, target, message: e.to_string() },
                    _ => SinkError::Transient { backend, operation, target, message: e.to_string() },
                }
            })
        });
        futures::future::try_join_all(sends).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_within;

    #[test]
    fn a_cut_reason_ends_on_a_character_boundary() {
        assert_eq!(prefix_within("short", 1024), "short");
        let text = "é".repeat(1000); // 2000 bytes
        let cut = prefix_within(&text, 1023);
        assert_eq!(cut.len(), 1022);
        assert_eq!(prefix_within(&text, 1024).len(), 1024);
    }
}
