//! Inclusion proofs: `aegis-audit prove <decision_id>` shows that a decision's exact bytes are
//! an entry of a segment whose Merkle root a signed digest lists; `verify-proof` checks that
//! offline with the public key alone. Format: `schemas/CHAIN.md`, "Inclusion proofs".

use base64::Engine;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::chain::{entry_hash, parse_hash, EntryStatus};
use crate::digest::{self, DigestObject};
use crate::merkle;
use crate::segment::read_segment;
use crate::sinks::{ObjectStore, SinkError};

pub const PROOF_FORMAT: &str = "aegis-proof/v1";

#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error(transparent)]
    Store(#[from] SinkError),
    #[error("decision {0}: not in the index")]
    UnknownDecision(String),
    #[error("{0}")]
    NotProvable(String),
    #[error("proof rejected: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofEntry {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub status: String,
    pub payload_base64: String,
    pub prev_hash: String,
    pub entry_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofSegment {
    pub key: String,
    pub sha256: String,
    pub merkle_root: String,
    pub rows: u64,
    pub leaf_index: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofDigest {
    pub key: String,
    /// The digest body exactly as signed.
    pub body: String,
    /// The digest's signature line: `ed25519:<key_id>:<hex>`.
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proof {
    pub format: String,
    pub decision_id: String,
    pub entry: ProofEntry,
    pub segment: ProofSegment,
    /// Sibling hashes from the leaf up (`merkle.rs`), hex.
    pub merkle_path: Vec<String>,
    pub digest: ProofDigest,
}

/// Where the index says a decision's record is.
#[derive(Debug, Clone)]
pub struct Located {
    pub segment_key: String,
    pub partition: i32,
    pub offset: i64,
}

/// Builds the proof for the record at `located` (found through the index).
pub async fn prove(
    store: &dyn ObjectStore,
    prefix: &str,
    topic: &str,
    decision_id: &str,
    located: &Located,
) -> Result<Proof, ProofError> {
    let body = store.get(&located.segment_key).await?;
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body));
    let segment = read_segment(body).map_err(|e| ProofError::NotProvable(format!("{}: {e}", located.segment_key)))?;
    let index = segment.rows.iter().position(|r| r.offset == located.offset).ok_or_else(|| {
        ProofError::NotProvable(format!("{} has no row at offset {}", located.segment_key, located.offset))
    })?;
    let entries: Vec<_> = segment.rows.iter().filter_map(|r| parse_hash(&r.entry_hash)).collect();
    if entries.len() != segment.rows.len() {
        return Err(ProofError::NotProvable(format!("{} has unreadable entry hashes", located.segment_key)));
    }
    let root = hex::encode(merkle::root(&entries).expect("a row was found"));
    let path = merkle::path(&entries, index).expect("index is in range");
    let row = &segment.rows[index];

    // The digest whose offset range holds the record: digests follow the chain in sequence
    // order, so a binary search reads about log2(n) of a partition's digests (one every few
    // minutes adds up to ~100k a year), not all of them.
    let dir = digest::partition_dir(prefix, topic, located.partition);
    // Only the writer's names (`<seq:012>.digest` in the partition's folder), with their
    // sequence numbers: a stray object there (`verify`'s digest_unexpected) must not break the
    // search.
    let (seqs, keys): (Vec<u64>, Vec<String>) = store
        .list(&dir)
        .await?
        .into_iter()
        .filter_map(|o| Some((digest::digest_seq(o.key.strip_prefix(&dir)?)?, o.key)))
        .unzip();
    let (mut low, mut high) = (0, keys.len());
    let mut covering = None;
    while low < high {
        let middle = (low + high) / 2;
        let bytes = store.get(&keys[middle]).await?;
        // A digest that does not parse may be tampered with: name it, do not search around it.
        let parsed = DigestObject::parse(&keys[middle], &bytes)
            .map_err(|e| ProofError::NotProvable(format!("{e}; run `aegis-audit verify`")))?;
        if located.offset < parsed.body.first_offset {
            high = middle;
        } else if located.offset > parsed.body.last_offset {
            low = middle + 1;
        } else {
            covering = Some((keys[middle].clone(), bytes, parsed));
            break;
        }
    }
    let Some((digest_key, bytes, parsed)) = covering else {
        if low < keys.len() {
            // Before a digest's range and after the previous one's: written while signing was
            // off, unless a digest between them is missing.
            let expected = if low == 0 { 0 } else { seqs[low - 1] + 1 };
            if expected != seqs[low] {
                return Err(ProofError::NotProvable(format!(
                    "the digests that would cover {} are missing before {}; run `aegis-audit verify`",
                    located.segment_key, keys[low]
                )));
            }
            return Err(ProofError::NotProvable(format!(
                "{} lies between the ranges of two digests (written while digests were off): it is not signed",
                located.segment_key
            )));
        }
        return Err(ProofError::NotProvable(format!(
            "{} is not in a digest yet (digests are written every digest.interval_ms); try again later",
            located.segment_key
        )));
    };
    if !parsed.body.segments.iter().any(|s| s.key == located.segment_key) {
        return Err(ProofError::NotProvable(format!(
            "{digest_key} covers offset {} but does not list {}; run `aegis-audit verify`",
            located.offset, located.segment_key
        )));
    }
    let text = String::from_utf8_lossy(&bytes).to_string();
    let digest = ProofDigest {
        key: digest_key,
        body: String::from_utf8_lossy(&parsed.body_bytes).to_string(),
        signature: text.lines().nth(1).unwrap_or_default().to_string(),
    };
    Ok(Proof {
        format: PROOF_FORMAT.into(),
        decision_id: decision_id.into(),
        entry: ProofEntry {
            topic: row.topic.clone(),
            partition: row.partition,
            offset: row.offset,
            status: row.status.as_str().into(),
            payload_base64: base64::engine::general_purpose::STANDARD.encode(&row.payload),
            prev_hash: row.prev_hash.clone(),
            entry_hash: row.entry_hash.clone(),
        },
        segment: ProofSegment {
            key: located.segment_key.clone(),
            sha256,
            merkle_root: root,
            rows: segment.rows.len() as u64,
            leaf_index: index as u64,
        },
        merkle_path: path.iter().map(hex::encode).collect(),
        digest,
    })
}

/// Checks a proof with nothing but the public key. Returns a one-line summary.
pub fn verify_proof(proof: &Proof, key: &VerifyingKey) -> Result<String, ProofError> {
    let bad = |m: String| ProofError::Invalid(m);
    if proof.format != PROOF_FORMAT {
        return Err(bad(format!("format {:?}, expected {PROOF_FORMAT}", proof.format)));
    }
    let e = &proof.entry;
    // Only an accepted entry is a decision: a rejected one's payload failed decode (a repeated
    // `decision_id`, say, whose last copy this JSON reading would take), and the index never
    // points at one, so `prove` never makes such a proof.
    let status = match e.status.as_str() {
        "accepted" => EntryStatus::Accepted,
        "rejected" => {
            return Err(bad(format!(
                "entry {}/{}@{} was rejected by validation: it is in quarantine, not a decision of the trail",
                e.topic, e.partition, e.offset
            )))
        }
        other => return Err(bad(format!("entry.status {other:?}"))),
    };
    let payload = base64::engine::general_purpose::STANDARD
        .decode(&e.payload_base64)
        .map_err(|err| bad(format!("entry.payload_base64: {err}")))?;
    // Read as the writer reads it: a valid event may hold numbers or nesting in `metadata` that
    // a full parse refuses.
    let decision =
        crate::decode::json_members(&payload).ok_or_else(|| bad("entry payload is not a JSON object".into()))?;
    if crate::decode::member_str(&decision, "decision_id").as_deref() != Some(proof.decision_id.as_str()) {
        return Err(bad(format!("the entry's payload is not decision {}", proof.decision_id)));
    }
    let prev = parse_hash(&e.prev_hash).ok_or_else(|| bad("entry.prev_hash is not 64 hex chars".into()))?;
    let computed = entry_hash(&prev, &e.topic, e.partition, e.offset, status, &payload);
    if hex::encode(computed) != e.entry_hash {
        return Err(bad(format!("entry hashes to {}, proof says {}", hex::encode(computed), e.entry_hash)));
    }
    let path: Vec<_> = proof
        .merkle_path
        .iter()
        .map(|h| parse_hash(h).ok_or_else(|| bad(format!("merkle_path element {h:?} is not a hash"))))
        .collect::<Result<_, _>>()?;
    let root = merkle::root_from_path(&computed, proof.segment.leaf_index as usize, proof.segment.rows as usize, &path)
        .ok_or_else(|| {
            bad(format!(
                "merkle_path has {} hashes, wrong for leaf {} of {}",
                path.len(),
                proof.segment.leaf_index,
                proof.segment.rows
            ))
        })?;
    if hex::encode(root) != proof.segment.merkle_root {
        return Err(bad(format!(
            "Merkle path leads to {}, segment root is {}",
            hex::encode(root),
            proof.segment.merkle_root
        )));
    }
    let object = format!("{}\n{}\n", proof.digest.body, proof.digest.signature);
    let digest = DigestObject::parse(&proof.digest.key, object.as_bytes()).map_err(|err| bad(err.to_string()))?;
    if digest.key_id != digest::key_id(key) {
        return Err(bad(format!(
            "digest signed by key {}, the given public key is {}",
            digest.key_id,
            digest::key_id(key)
        )));
    }
    if !digest.verify(key) {
        return Err(bad(format!(
            "the signature of digest {} does not verify with the public key {}",
            proof.digest.key,
            digest::key_id(key)
        )));
    }
    // The key is not signed: it must be the one the signed body names, or the message below
    // would vouch for a digest the proof does not hold.
    let body = &digest.body;
    let slot = digest::digest_key("", &body.topic, body.partition, body.seq);
    if proof.digest.key != slot && !proof.digest.key.ends_with(&format!("/{slot}")) {
        return Err(bad(format!(
            "digest key {} is not where the signed body ({}/{} seq {}) belongs: {slot}",
            proof.digest.key, body.topic, body.partition, body.seq
        )));
    }
    let listed = digest
        .body
        .segments
        .iter()
        .find(|s| s.key == proof.segment.key)
        .ok_or_else(|| bad(format!("the digest does not list segment {}", proof.segment.key)))?;
    if listed.merkle_root != proof.segment.merkle_root
        || listed.rows != proof.segment.rows
        || listed.sha256 != proof.segment.sha256
    {
        return Err(bad(format!(
            "the digest lists the segment with root {}, {} rows, SHA-256 {}; the proof says {}, {} rows, {}",
            listed.merkle_root,
            listed.rows,
            listed.sha256,
            proof.segment.merkle_root,
            proof.segment.rows,
            proof.segment.sha256
        )));
    }
    if digest.body.topic != e.topic || digest.body.partition != e.partition {
        return Err(bad(format!(
            "the digest is for {}/{}, the entry is {}/{}",
            digest.body.topic, digest.body.partition, e.topic, e.partition
        )));
    }
    Ok(format!(
        "proof OK: decision {} is entry {}/{}@{} in {} (leaf {} of {}), signed in digest {} seq {} by key {}",
        proof.decision_id,
        e.topic,
        e.partition,
        e.offset,
        proof.segment.key,
        proof.segment.leaf_index,
        proof.segment.rows,
        proof.digest.key,
        digest.body.seq,
        digest.key_id
    ))
}
