//! In-memory [`ObjectStore`], [`IndexStore`] and [`HeadStore`] with the same contracts as the
//! real ones, plus switchable failures, so the flush protocol is tested in-process.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::dead_letter::{DeadLetter, DeadLetterSink};
use super::DigestPos;
use super::{
    Attr, ChainHead, Guard, Guarded, HeadPos, HeadStore, IndexItem, IndexStore, ObjectInfo, ObjectStore, PendingFlush,
    SinkError,
};
use crate::digest::SegmentEntry;

fn outage(backend: &'static str, operation: &'static str) -> SinkError {
    SinkError::Transient { backend, operation, target: "memory".into(), message: "injected outage".into() }
}

/// An object's body and user metadata.
type StoredObject = (Bytes, BTreeMap<String, String>);

#[derive(Default)]
pub struct MemoryObjectStore {
    objects: Mutex<BTreeMap<String, StoredObject>>,
    pub down: AtomicBool,
    puts: std::sync::atomic::AtomicUsize,
}

impl MemoryObjectStore {
    pub fn keys(&self) -> Vec<String> {
        self.objects.lock().unwrap().keys().cloned().collect()
    }

    pub fn put_count(&self) -> usize {
        self.puts.load(Ordering::SeqCst)
    }

    /// Removes an object (tests: deletion and truncation).
    pub fn remove(&self, key: &str) -> Option<Bytes> {
        self.objects.lock().unwrap().remove(key).map(|(b, _)| b)
    }

    pub fn body(&self, key: &str) -> Option<Bytes> {
        self.objects.lock().unwrap().get(key).map(|(b, _)| b.clone())
    }

    fn check(&self, op: &'static str) -> Result<(), SinkError> {
        if self.down.load(Ordering::SeqCst) {
            Err(outage("memory-s3", op))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl ObjectStore for MemoryObjectStore {
    async fn put(&self, key: &str, body: Bytes, metadata: &BTreeMap<String, String>) -> Result<(), SinkError> {
        self.check("PutObject")?;
        check_named_hash(key, &body, metadata)?;
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.objects.lock().unwrap().insert(key.to_string(), (body, metadata.clone()));
        Ok(())
    }

    async fn put_new(&self, key: &str, body: Bytes, metadata: &BTreeMap<String, String>) -> Result<bool, SinkError> {
        self.check("PutObject")?;
        check_named_hash(key, &body, metadata)?;
        let mut objects = self.objects.lock().unwrap();
        if objects.contains_key(key) {
            return Ok(false);
        }
        self.puts.fetch_add(1, Ordering::SeqCst);
        objects.insert(key.to_string(), (body, metadata.clone()));
        Ok(true)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, SinkError> {
        self.check("HeadObject")?;
        Ok(self.objects.lock().unwrap().get(key).map(|(b, m)| ObjectInfo {
            key: key.to_string(),
            size: b.len() as u64,
            metadata: m.clone(),
        }))
    }

    async fn get(&self, key: &str) -> Result<Bytes, SinkError> {
        self.check("GetObject")?;
        self.objects.lock().unwrap().get(key).map(|(b, _)| b.clone()).ok_or_else(|| SinkError::Fatal {
            backend: "memory-s3",
            operation: "GetObject",
            target: key.to_string(),
            message: "no such key".into(),
        })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, SinkError> {
        self.check("ListObjectsV2")?;
        Ok(self
            .objects
            .lock()
            .unwrap()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (b, _))| ObjectInfo { key: k.clone(), size: b.len() as u64, metadata: BTreeMap::new() })
            .collect())
    }
}

#[derive(Default)]
pub struct MemoryIndex {
    items: Mutex<BTreeMap<(String, String), IndexItem>>,
    pub down: AtomicBool,
}

impl MemoryIndex {
    pub fn items(&self) -> Vec<IndexItem> {
        self.items.lock().unwrap().values().cloned().collect()
    }
}

#[async_trait]
impl IndexStore for MemoryIndex {
    async fn write(&self, items: Vec<IndexItem>) -> Result<(), SinkError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(outage("memory-dynamodb", "BatchWriteItem"));
        }
        let mut stored = self.items.lock().unwrap();
        for item in items {
            stored.insert((item.pk.clone(), item.sk.clone()), item);
        }
        Ok(())
    }

    async fn put_guarded(&self, item: &IndexItem, guard: Guard<'_>) -> Result<Guarded, SinkError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(outage("memory-dynamodb", "PutItem"));
        }
        let mut stored = self.items.lock().unwrap();
        let key = (item.pk.clone(), item.sk.clone());
        let current = stored.get(&key);
        let holds = match guard {
            Guard::Absent => current.is_none(),
            Guard::Damaged => {
                current.is_some_and(|c| !matches!(c.attrs.get("rank"), Some(Attr::S(rank)) if !rank.is_empty()))
            }
            Guard::Rank { rank, flagged } => current.is_some_and(|c| {
                c.attrs.get("rank") == Some(&Attr::S(rank.to_string()))
                    && (flagged || !matches!(c.attrs.get("conflict"), Some(Attr::Bool(true))))
            }),
        };
        if !holds {
            return Ok(Guarded::Refused(current.cloned()));
        }
        stored.insert(key, item.clone());
        Ok(Guarded::Written)
    }

    async fn mark_conflict(&self, pk: &str, sk: &str, rank: &str) -> Result<Guarded, SinkError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(outage("memory-dynamodb", "UpdateItem"));
        }
        let mut stored = self.items.lock().unwrap();
        match stored.get_mut(&(pk.to_string(), sk.to_string())) {
            Some(item) if item.attrs.get("rank") == Some(&Attr::S(rank.to_string())) => {
                item.attrs.insert("conflict".into(), Attr::Bool(true));
                Ok(Guarded::Written)
            }
            current => Ok(Guarded::Refused(current.cloned())),
        }
    }
}

#[derive(Default)]
pub struct MemoryHeads {
    heads: Mutex<BTreeMap<(String, i32), ChainHead>>,
    pub down: AtomicBool,
}

impl MemoryHeads {
    pub fn get(&self, topic: &str, partition: i32) -> ChainHead {
        let heads = self.heads.lock().unwrap();
        let head = heads.get(&(topic.to_string(), partition)).cloned().unwrap_or_default();
        // As DynamoDB's: an item is bare when its head, intent and digest state are all gone.
        let bare = heads.contains_key(&(topic.to_string(), partition))
            && head.committed.is_none()
            && head.pending.is_none()
            && head.digest.is_none()
            && head.undigested.is_empty();
        ChainHead { afresh: bare, ..head }
    }

    /// What an operator does for an irreproducible flush (RUNBOOK): the intent removed, the
    /// item kept.
    pub fn clear_pending(&self, topic: &str, partition: i32) {
        if let Some(head) = self.heads.lock().unwrap().get_mut(&(topic.to_string(), partition)) {
            head.pending = None;
        }
    }

    fn check(&self, op: &'static str) -> Result<(), SinkError> {
        if self.down.load(Ordering::SeqCst) {
            Err(outage("memory-dynamodb", op))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl HeadStore for MemoryHeads {
    async fn load(&self, topic: &str, partition: i32) -> Result<ChainHead, SinkError> {
        self.check("GetItem")?;
        Ok(self.get(topic, partition))
    }

    async fn begin_flush(
        &self,
        topic: &str,
        partition: i32,
        expected: Option<HeadPos>,
        pending: PendingFlush,
    ) -> Result<(), SinkError> {
        self.check("UpdateItem")?;
        let mut heads = self.heads.lock().unwrap();
        // A refused conditional write creates no item (as in DynamoDB).
        let stored = heads.get(&(topic.to_string(), partition)).cloned().unwrap_or_default();
        if stored.committed != expected || stored.pending.is_some() {
            return Err(SinkError::FenceLost {
                topic: topic.into(),
                partition,
                detail: format!("stored {stored:?}, expected {expected:?}"),
            });
        }
        heads.entry((topic.to_string(), partition)).or_default().pending = Some(pending);
        Ok(())
    }

    async fn complete_flush(
        &self,
        topic: &str,
        partition: i32,
        pending: PendingFlush,
        segments: &[SegmentEntry],
    ) -> Result<(), SinkError> {
        self.check("UpdateItem")?;
        let mut heads = self.heads.lock().unwrap();
        let mut missing = ChainHead::default();
        let head = heads.get_mut(&(topic.to_string(), partition)).unwrap_or(&mut missing);
        if head.pending != Some(pending) {
            return Err(SinkError::FenceLost {
                topic: topic.into(),
                partition,
                detail: format!("stored {head:?}, expected pending {pending:?}"),
            });
        }
        head.committed = Some(HeadPos { last_offset: pending.last_offset, last_hash: pending.last_hash });
        head.pending = None;
        head.undigested.extend_from_slice(segments);
        Ok(())
    }

    async fn record_digest(
        &self,
        topic: &str,
        partition: i32,
        expected: HeadPos,
        previous: Option<DigestPos>,
        digest: DigestPos,
        remaining: &[SegmentEntry],
    ) -> Result<(), SinkError> {
        self.check("UpdateItem")?;
        let mut heads = self.heads.lock().unwrap();
        let mut missing = ChainHead::default();
        let head = heads.get_mut(&(topic.to_string(), partition)).unwrap_or(&mut missing);
        if head.committed != Some(expected) || head.pending.is_some() || head.digest != previous {
            return Err(SinkError::FenceLost {
                topic: topic.into(),
                partition,
                detail: format!("stored {head:?}, expected head {expected:?} digest {previous:?}"),
            });
        }
        head.digest = Some(digest);
        head.undigested = remaining.to_vec();
        Ok(())
    }
}

#[derive(Default)]
pub struct MemoryDeadLetters {
    letters: Mutex<Vec<DeadLetter>>,
    pub down: AtomicBool,
}

impl MemoryDeadLetters {
    pub fn letters(&self) -> Vec<DeadLetter> {
        self.letters.lock().unwrap().clone()
    }
}

#[async_trait]
impl DeadLetterSink for MemoryDeadLetters {
    async fn send(&self, letters: &[DeadLetter]) -> Result<(), SinkError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(outage("memory-kafka", "Produce"));
        }
        self.letters.lock().unwrap().extend_from_slice(letters);
        Ok(())
    }
}

/// As S3 does with the checksum the S3 store derives from it: a named body hash that is not the
/// body's refuses the write (`BadDigest`).
fn check_named_hash(key: &str, body: &[u8], metadata: &BTreeMap<String, String>) -> Result<(), SinkError> {
    use sha2::{Digest, Sha256};
    match super::named_sha256("memory", key, metadata)? {
        Some(named) if named != <[u8; 32]>::from(Sha256::digest(body)) => Err(SinkError::Fatal {
            backend: "memory",
            operation: "PutObject",
            target: key.to_string(),
            message: format!("BadDigest: {} does not match the body", super::SHA256_METADATA),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[tokio::test]
    async fn a_named_body_hash_must_be_the_bodys() {
        let store = MemoryObjectStore::default();
        let body = Bytes::from_static(b"segment");
        let named = |hash: String| BTreeMap::from([(crate::sinks::SHA256_METADATA.to_string(), hash)]);
        let right = named(hex::encode(Sha256::digest(&body)));
        assert!(store.put_new("a", body.clone(), &right).await.unwrap());
        let wrong = named(hex::encode(Sha256::digest(b"other")));
        assert!(matches!(store.put("b", body.clone(), &wrong).await, Err(SinkError::Fatal { .. })));
        let malformed = named("not a hash".into());
        let error = store.put_new("c", body, &malformed).await.unwrap_err();
        assert!(error.to_string().contains("is not a SHA-256"), "{error}");
        assert_eq!(store.keys(), vec!["a".to_string()]);
    }
}
