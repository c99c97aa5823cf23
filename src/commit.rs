//! The only place Kafka offsets are committed. A worker calls [`Committer::commit`] with the
//! offset a completed flush returned, i.e. only after the segments, the index items and the
//! chain head are durable. The committed offset is advisory: on assignment the worker resumes
//! from the chain head, so a lost or late commit costs a re-read, never a gap or a duplicate.

use std::sync::Arc;
use std::time::Instant;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::metrics;
use crate::source::AuditContext;

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Usually a revoked partition or a broker hiccup; the next flush commits again.
    #[error("commit {topic}/{partition} offset {offset}: {message}")]
    Failed { topic: String, partition: i32, offset: i64, message: String },
    /// The broker did not say where the partition's log ends (a broker hiccup).
    #[error("watermarks of {topic}/{partition}: {message}")]
    Watermarks { topic: String, partition: i32, message: String },
}

#[derive(Clone)]
pub struct Committer {
    consumer: Arc<StreamConsumer<AuditContext>>,
    topic: String,
    /// One synchronous commit at a time: workers of several partitions may finish together (or
    /// all commit past the head at once after a replay), and librdkafka's group handling is
    /// safest without concurrent commit calls racing a rebalance.
    serial: Arc<std::sync::Mutex<()>>,
}

impl Committer {
    pub fn new(consumer: Arc<StreamConsumer<AuditContext>>, topic: &str) -> Self {
        Self { consumer, topic: topic.to_string(), serial: Arc::default() }
    }

    /// Synchronously commits `offset` (the next offset to read) for `partition`.
    pub async fn commit(&self, partition: i32, offset: i64) -> Result<(), CommitError> {
        let started = Instant::now();
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let serial = self.serial.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _one_at_a_time = serial.lock().unwrap_or_else(|e| e.into_inner());
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, partition, Offset::Offset(offset)).map_err(|e| e.to_string())?;
            consumer.commit(&tpl, CommitMode::Sync).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match result {
            Ok(()) => {
                metrics::committed(partition, offset, started.elapsed());
                Ok(())
            }
            Err(message) => {
                metrics::commit_failed();
                Err(CommitError::Failed { topic: self.topic.clone(), partition, offset, message })
            }
        }
    }

    /// The offset the partition's log ends at (the high watermark: the next offset written), asked
    /// of the broker. A worker checks it against the chain head before it skips records as
    /// already chained.
    pub async fn log_end(&self, partition: i32) -> Result<i64, CommitError> {
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&topic, partition, LOG_END_TIMEOUT))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map(|(_low, high)| high).map_err(|e| e.to_string()))
            .map_err(|message| CommitError::Watermarks { topic: self.topic.clone(), partition, message })
    }
}

const LOG_END_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
