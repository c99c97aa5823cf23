//! The per-partition SHA-256 hash chain. `schemas/CHAIN.md` is the normative description; the
//! test vectors at the bottom of this file are the ones printed there.
//!
//! ```text
//! genesis(topic, p) = SHA-256("aegis-audit/genesis/v1" 0x00 | u16be(len topic) | topic | i32be(p))
//! entry             = SHA-256("aegis-audit/entry/v1" 0x00 | prev(32) | u16be(len topic) | topic
//!                              | i32be(p) | i64be(offset) | u8(status) | u32be(len payload) | payload)
//! ```
//! Every entry commits to the previous hash, so removing, editing or reordering any entry changes
//! every hash after it.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

const GENESIS_TAG: &[u8] = b"aegis-audit/genesis/v1\0";
const ENTRY_TAG: &[u8] = b"aegis-audit/entry/v1\0";

/// Whether the record was accepted into the trail or rejected (dead-lettered). Both are chained,
/// so a verifier sees every offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EntryStatus {
    Accepted = 0,
    Rejected = 1,
}

impl EntryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryStatus::Accepted => "accepted",
            EntryStatus::Rejected => "rejected",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// Offsets must strictly increase along a chain; anything else would fork it.
    #[error("chain {topic}/{partition}: offset {offset} does not follow head offset {head}")]
    OutOfOrder { topic: String, partition: i32, offset: i64, head: i64 },
}

pub fn genesis(topic: &str, partition: i32) -> Hash {
    let mut h = Sha256::new();
    h.update(GENESIS_TAG);
    update_topic_partition(&mut h, topic, partition);
    h.finalize().into()
}

pub fn entry_hash(prev: &Hash, topic: &str, partition: i32, offset: i64, status: EntryStatus, payload: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(ENTRY_TAG);
    h.update(prev);
    update_topic_partition(&mut h, topic, partition);
    h.update(offset.to_be_bytes());
    h.update([status as u8]);
    // Kafka caps records far below 4 GiB; the decoder rejects oversize payloads long before this.
    h.update((payload.len() as u32).to_be_bytes());
    h.update(payload);
    h.finalize().into()
}

fn update_topic_partition(h: &mut Sha256, topic: &str, partition: i32) {
    // Topic names are at most 249 bytes (Kafka's limit), so u16 always fits.
    h.update((topic.len() as u16).to_be_bytes());
    h.update(topic.as_bytes());
    h.update(partition.to_be_bytes());
}

/// One link: the hash the entry extends and the entry's own hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub prev_hash: Hash,
    pub entry_hash: Hash,
}

/// The in-memory tip of one topic-partition's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    topic: String,
    partition: i32,
    last_offset: Option<i64>,
    head: Hash,
}

impl Chain {
    /// A chain with no entries yet: its head is the genesis hash.
    pub fn new(topic: &str, partition: i32) -> Self {
        Self { topic: topic.to_string(), partition, last_offset: None, head: genesis(topic, partition) }
    }

    /// A chain continuing from a persisted head.
    pub fn resume(topic: &str, partition: i32, last_offset: i64, head: Hash) -> Self {
        Self { topic: topic.to_string(), partition, last_offset: Some(last_offset), head }
    }

    pub fn append(&mut self, offset: i64, status: EntryStatus, payload: &[u8]) -> Result<Link, ChainError> {
        if let Some(last) = self.last_offset {
            if offset <= last {
                return Err(ChainError::OutOfOrder {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    offset,
                    head: last,
                });
            }
        }
        let prev_hash = self.head;
        let entry_hash = entry_hash(&prev_hash, &self.topic, self.partition, offset, status, payload);
        self.head = entry_hash;
        self.last_offset = Some(offset);
        Ok(Link { prev_hash, entry_hash })
    }

    pub fn head(&self) -> Hash {
        self.head
    }

    pub fn last_offset(&self) -> Option<i64> {
        self.last_offset
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }
}

/// Parses a 64-char lowercase or uppercase hex hash.
/// A hash as the trail stores it: exactly 64 lowercase hex chars (`schemas/CHAIN.md`).
pub fn parse_hash(text: &str) -> Option<Hash> {
    if !is_lower_hex(text, 64) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// Whether `text` is exactly `len` lowercase hex chars, the only spelling the trail uses.
pub fn is_lower_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // These vectors are printed in schemas/CHAIN.md; an independent implementation must match them.
    #[test]
    fn test_vectors_match_chain_md() {
        let hex = |h: Hash| hex::encode(h);
        let g = genesis("ai-decisions", 0);
        assert_eq!(hex(g), "9c3f787772d9e568588361733a67cde94159483ec76fd3c82d7eb1d3b181d7cd");
        assert_eq!(hex(genesis("ai-decisions", 7)), "aaa640bb4a298c8433f431e18a51e90ce40028904a383aec87dfc5853496016b");
        let mut chain = Chain::new("ai-decisions", 0);
        let e0 = chain.append(0, EntryStatus::Accepted, br#"{"decision_id":"d-1","event_type":"decision"}"#).unwrap();
        assert_eq!(e0.prev_hash, g);
        assert_eq!(hex(e0.entry_hash), "94ddd7fb090d327d570688f7c77dcdf99ef8fe863ecdce451758369beb7342ce");
        let e1 = chain.append(1, EntryStatus::Rejected, b"not json").unwrap();
        assert_eq!(hex(e1.entry_hash), "e74ad988c7a070b8a26a20c58667d29dee34de61dcc0fb8c545d5e5a06255ce3");
        // Offsets may skip (transaction markers, compaction): the link, not the offset, proves continuity.
        let e5 = chain.append(5, EntryStatus::Accepted, b"").unwrap();
        assert_eq!(hex(e5.entry_hash), "e0a1cda54dad9aa1399d3862ba0d436f12c29985d6e4522b00e960d846c85806");
    }

    #[test]
    fn append_links_prev_to_head() {
        let mut chain = Chain::new("t", 3);
        let g = chain.head();
        let a = chain.append(10, EntryStatus::Accepted, b"{}").unwrap();
        let b = chain.append(11, EntryStatus::Rejected, b"not json").unwrap();
        assert_eq!(a.prev_hash, g);
        assert_eq!(b.prev_hash, a.entry_hash);
        assert_eq!(chain.head(), b.entry_hash);
        assert_eq!(chain.last_offset(), Some(11));
    }

    #[test]
    fn out_of_order_offset_is_refused_and_chain_unchanged() {
        let mut chain = Chain::new("t", 0);
        chain.append(5, EntryStatus::Accepted, b"x").unwrap();
        let before = chain.clone();
        let err = chain.append(5, EntryStatus::Accepted, b"x").unwrap_err();
        assert!(matches!(err, ChainError::OutOfOrder { offset: 5, head: 5, .. }));
        assert_eq!(chain, before);
    }

    #[test]
    fn every_field_is_committed() {
        let base = entry_hash(&[0; 32], "t", 0, 1, EntryStatus::Accepted, b"p");
        assert_ne!(base, entry_hash(&[1; 32], "t", 0, 1, EntryStatus::Accepted, b"p"));
        assert_ne!(base, entry_hash(&[0; 32], "u", 0, 1, EntryStatus::Accepted, b"p"));
        assert_ne!(base, entry_hash(&[0; 32], "t", 1, 1, EntryStatus::Accepted, b"p"));
        assert_ne!(base, entry_hash(&[0; 32], "t", 0, 2, EntryStatus::Accepted, b"p"));
        assert_ne!(base, entry_hash(&[0; 32], "t", 0, 1, EntryStatus::Rejected, b"p"));
        assert_ne!(base, entry_hash(&[0; 32], "t", 0, 1, EntryStatus::Accepted, b"q"));
        assert_ne!(genesis("t", 0), genesis("t", 1));
    }

    #[test]
    fn parse_hash_round_trips() {
        let h = genesis("x", 1);
        assert_eq!(parse_hash(&hex::encode(h)), Some(h));
        assert_eq!(parse_hash("zz"), None);
        assert_eq!(parse_hash(&hex::encode(h).to_uppercase()), None, "the trail spells hashes in lowercase");
    }

    proptest! {
        // Resuming from a persisted head must give exactly the hashes an uninterrupted run gives.
        #[test]
        fn resume_equals_uninterrupted(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..20), cut in 0usize..20) {
            let cut = cut % payloads.len();
            let mut whole = Chain::new("topic", 2);
            for (i, p) in payloads.iter().enumerate() { whole.append(i as i64, EntryStatus::Accepted, p).unwrap(); }
            let mut first = Chain::new("topic", 2);
            for (i, p) in payloads[..=cut].iter().enumerate() { first.append(i as i64, EntryStatus::Accepted, p).unwrap(); }
            let mut resumed = Chain::resume("topic", 2, cut as i64, first.head());
            for (i, p) in payloads.iter().enumerate().skip(cut + 1) { resumed.append(i as i64, EntryStatus::Accepted, p).unwrap(); }
            prop_assert_eq!(resumed.head(), whole.head());
        }

        // Changing any single payload byte changes the final head (tamper evidence).
        #[test]
        fn any_edit_changes_head(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..32), 1..10), which in 0usize..10, bit in 0u8..8) {
            let which = which % payloads.len();
            let head = |ps: &[Vec<u8>]| { let mut c = Chain::new("t", 0); for (i, p) in ps.iter().enumerate() { c.append(i as i64, EntryStatus::Accepted, p).unwrap(); } c.head() };
            let mut edited = payloads.clone();
            edited[which][0] ^= 1 << bit;
            prop_assert_ne!(head(&payloads), head(&edited));
        }
    }
}
