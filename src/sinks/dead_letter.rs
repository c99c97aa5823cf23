//! The dead-letter topic: rejected records with their original bytes and headers naming why and
//! where they came from. Written inside the flush, before the chain head advances, so the
//! consumer commits past a bad record only once its dead letter is durable (acks=all).
//!
//! A flush re-run after a crash may produce a dead letter twice; the headers carry the source
//! coordinates, so DLQ readers can drop repeats. The authoritative copy is the quarantine row in
//! S3, which is written exactly once like every segment.

use std::time::Duration;

use async_trait::async_trait;
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

#[async_trait]
impl DeadLetterSink for KafkaDeadLetters {
    async fn send(&self, letters: &[DeadLetter]) -> Result<(), SinkError> {
        let sends = letters.iter().map(|letter| async move {
            let partition = letter.source_partition.to_string();
            let offset = letter.source_offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header { key: "aegis.reason_code", value: Some(letter.reason_code) })
                .insert(Header { key: "aegis.reason", value: Some(letter.reason.as_str()) })
                .insert(Header { key: "aegis.source_topic", value: Some(letter.source_topic.as_str()) })
                .insert(Header { key: "aegis.source_partition", value: Some(partition.as_str()) })
                .insert(Header { key: "aegis.source_offset", value: Some(offset.as_str()) });
            let key = format!("{}/{}/{}", letter.source_topic, letter.source_partition, letter.source_offset);
            let mut record: FutureRecord<'_, String, [u8]> = FutureRecord::to(&self.topic).key(&key).headers(headers);
            if let Some(payload) = &letter.payload {
                record = record.payload(payload.as_ref());
            }
            if let Some(ts) = letter.kafka_timestamp_ms {
                record = record.timestamp(ts);
            }
            self.producer.send(record, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| {
                SinkError::Transient {
                    backend: "kafka",
                    operation: "Produce",
                    target: format!("{} (from {key})", self.topic),
                    message: e.to_string(),
                }
            })
        });
        futures::future::try_join_all(sends).await.map(|_| ())
    }
}
