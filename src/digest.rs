//! Signed, chained digests (`schemas/CHAIN.md`, "Digests"). Each partition's writer, at
//! `digest.interval_ms`, writes one digest object listing the segments it made durable since
//! its previous digest, chained to that digest by hash and signed with Ed25519. A verifier with
//! the public key alone can then tell a deleted, replaced or truncated segment or digest.
//!
//! Object: `<prefix>/_digests/<topic>/p<PPPP>/<seq:012>.digest`, two lines:
//! 1. the digest body, compact JSON: the exact bytes that are signed and hashed;
//! 2. `ed25519:<key_id>:<signature, 128 hex chars>`.
//!
//! `key_id` is the first 16 hex chars of SHA-256 of the raw 32-byte public key; public keys are
//! published at `<prefix>/_digests/keys/<key_id>.pem`.

use std::path::Path;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::chain::{is_lower_hex, Hash};
use crate::segment::join_key;

pub const DIGEST_FORMAT: &str = "aegis-digest/v1";
pub const DIGESTS_DIR: &str = "_digests";

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("{key}: {message}")]
    Key { key: String, message: String },
    #[error("{what}: not a digest object: {message}")]
    Malformed { what: String, message: String },
}

/// One segment object as a digest lists it. (Also the chain table's list of undigested segments,
/// which a newer or older version may read: unknown fields are refused only in digest objects.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    pub key: String,
    /// SHA-256 of the whole object, hex.
    pub sha256: String,
    pub rows: u64,
    pub first_offset: i64,
    pub last_offset: i64,
    /// `prev_hash` of the object's first row and `entry_hash` of its last, hex.
    pub first_prev_hash: String,
    pub last_entry_hash: String,
    /// Merkle root over the object's entry hashes (`merkle.rs`), hex.
    pub merkle_root: String,
}

const SEGMENT_FIELDS: [&str; 8] =
    ["key", "sha256", "rows", "first_offset", "last_offset", "first_prev_hash", "last_entry_hash", "merkle_root"];

/// The signed part of a digest. Field order is the serialization order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigestBody {
    pub format: String,
    pub topic: String,
    pub partition: i32,
    /// 0 for the partition's first digest, then +1 each.
    pub seq: u64,
    /// SHA-256 of the previous digest's body, hex (64 zeros for seq 0).
    pub prev_digest_sha256: String,
    pub key_id: String,
    pub created_at: String,
    /// The chain range the listed segments cover: first offset and the `prev_hash` it links to,
    /// last offset and its `entry_hash` (the partition's head when the digest was made).
    pub first_offset: i64,
    pub first_prev_hash: String,
    pub last_offset: i64,
    pub last_entry_hash: String,
    pub segments: Vec<SegmentEntry>,
}

impl DigestBody {
    /// Builds the next digest after `previous` (seq, body hash) over `segments` (non-empty).
    pub fn next(
        topic: &str,
        partition: i32,
        previous: Option<(u64, Hash)>,
        key_id: &str,
        segments: Vec<SegmentEntry>,
    ) -> Self {
        let first = segments.iter().min_by_key(|s| s.first_offset).expect("a digest lists segments");
        let last = segments.iter().max_by_key(|s| s.last_offset).expect("a digest lists segments");
        DigestBody {
            format: DIGEST_FORMAT.into(),
            topic: topic.into(),
            partition,
            seq: previous.map_or(0, |(seq, _)| seq + 1),
            prev_digest_sha256: hex::encode(previous.map_or([0u8; 32], |(_, hash)| hash)),
            key_id: key_id.into(),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            first_offset: first.first_offset,
            first_prev_hash: first.first_prev_hash.clone(),
            last_offset: last.last_offset,
            last_entry_hash: last.last_entry_hash.clone(),
            segments,
        }
    }
}

/// A digest object split into its parts.
#[derive(Debug, Clone)]
pub struct DigestObject {
    /// The exact signed bytes (line 1).
    pub body_bytes: Vec<u8>,
    pub body: DigestBody,
    pub key_id: String,
    pub signature: [u8; 64],
}

impl DigestObject {
    pub fn body_sha256(&self) -> Hash {
        Sha256::digest(&self.body_bytes).into()
    }

    /// Parses a digest object exactly as `schemas/CHAIN.md` specifies it: two lines, each ending
    /// in a newline; a body of exactly the documented fields with lowercase-hex hashes and this
    /// format; `ed25519:<16 lowercase hex>:<128 lowercase hex>`. Anything else is malformed.
    pub fn parse(what: &str, bytes: &[u8]) -> Result<Self, DigestError> {
        let bad = |message: String| DigestError::Malformed { what: what.to_string(), message };
        let text = std::str::from_utf8(bytes).map_err(|e| bad(e.to_string()))?;
        let mut lines = text.split('\n');
        let (Some(body_line), Some(sig_line), Some(""), None) =
            (lines.next(), lines.next(), lines.next(), lines.next())
        else {
            return Err(bad("expected exactly two lines, each ending in a newline: body and signature".into()));
        };
        let body: DigestBody = serde_json::from_str(body_line).map_err(|e| bad(format!("body: {e}")))?;
        // Every listed field is required, so a segment object with more keys has unknown ones.
        let listed: serde_json::Value = serde_json::from_str(body_line).map_err(|e| bad(format!("body: {e}")))?;
        let segment_keys = listed["segments"].as_array().into_iter().flatten().filter_map(|s| s.as_object());
        if let Some(extra) = segment_keys.flat_map(|s| s.keys()).find(|k| !SEGMENT_FIELDS.contains(&k.as_str())) {
            return Err(bad(format!("segments[]: unknown field {extra:?}")));
        }
        if body.format != DIGEST_FORMAT {
            return Err(bad(format!("format is {:?}, expected {DIGEST_FORMAT:?}", body.format)));
        }
        let hashes = [("prev_digest_sha256", &body.prev_digest_sha256), ("first_prev_hash", &body.first_prev_hash)];
        let hashes = hashes.into_iter().chain([("last_entry_hash", &body.last_entry_hash)]);
        let listed = body.segments.iter().flat_map(|s| {
            [
                ("segments[].sha256", &s.sha256),
                ("segments[].first_prev_hash", &s.first_prev_hash),
                ("segments[].last_entry_hash", &s.last_entry_hash),
                ("segments[].merkle_root", &s.merkle_root),
            ]
        });
        if let Some((field, value)) = hashes.chain(listed).find(|(_, v)| !is_lower_hex(v, 64)) {
            return Err(bad(format!("{field} {value:?} is not 64 lowercase hex chars")));
        }
        let signature_line = sig_line
            .strip_prefix("ed25519:")
            .and_then(|rest| rest.split_once(':'))
            .filter(|(key_id, sig)| is_lower_hex(key_id, 16) && is_lower_hex(sig, 128));
        let Some((key_id, sig_hex)) = signature_line else {
            return Err(bad("signature line is not ed25519:<16 lowercase hex key_id>:<128 lowercase hex>".into()));
        };
        let mut signature = [0u8; 64];
        hex::decode_to_slice(sig_hex, &mut signature).map_err(|e| bad(format!("signature: {e}")))?;
        Ok(Self { body_bytes: body_line.as_bytes().to_vec(), body, key_id: key_id.to_string(), signature })
    }

    /// Whether the signature over the body verifies with `key`.
    pub fn verify(&self, key: &VerifyingKey) -> bool {
        key.verify(&self.body_bytes, &ed25519_dalek::Signature::from_bytes(&self.signature)).is_ok()
    }
}

/// The digest signing key and its public half's id.
pub struct DigestSigner {
    key: SigningKey,
    pub key_id: String,
}

impl std::fmt::Debug for DigestSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestSigner").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl DigestSigner {
    pub fn new(key: SigningKey) -> Self {
        let key_id = key_id(&key.verifying_key());
        Self { key, key_id }
    }

    /// Loads a PKCS#8 PEM private key (`openssl genpkey -algorithm ed25519`, `aegis-audit keygen`)
    /// or 64 hex chars of raw seed. `what` names the config key in errors.
    pub fn from_text(what: &str, text: &str) -> Result<Self, DigestError> {
        let text = text.trim();
        let key = if text.starts_with("-----BEGIN") {
            SigningKey::from_pkcs8_pem(text).map_err(|e| DigestError::Key {
                key: what.into(),
                message: format!("not an Ed25519 PKCS#8 PEM key: {e}"),
            })?
        } else {
            let seed: [u8; 32] = hex::decode(text).ok().and_then(|v| v.try_into().ok()).ok_or_else(|| {
                DigestError::Key { key: what.into(), message: "expected a PKCS#8 PEM key or 64 hex characters".into() }
            })?;
            SigningKey::from_bytes(&seed)
        };
        Ok(Self::new(key))
    }

    pub fn from_file(what: &str, path: &Path) -> Result<Self, DigestError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DigestError::Key { key: what.into(), message: format!("{}: {e}", path.display()) })?;
        Self::from_text(what, &text)
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn public_key_pem(&self) -> String {
        public_key_pem(&self.verifying_key())
    }

    /// The object bytes for `body`: body line, signature line.
    pub fn encode(&self, body: &DigestBody) -> Vec<u8> {
        let body_bytes = serde_json::to_vec(body).expect("digest bodies serialize");
        let signature = self.key.sign(&body_bytes);
        let mut out = body_bytes;
        out.push(b'\n');
        out.extend_from_slice(format!("ed25519:{}:{}\n", self.key_id, hex::encode(signature.to_bytes())).as_bytes());
        out
    }
}

pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

pub fn public_key_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(LineEnding::LF).expect("Ed25519 public keys encode")
}

/// Reads an SPKI PEM public key (or 64 hex chars of raw key).
pub fn parse_public_key(what: &str, text: &str) -> Result<VerifyingKey, DigestError> {
    let text = text.trim();
    let bad = |message: String| DigestError::Key { key: what.into(), message };
    if text.starts_with("-----BEGIN") {
        VerifyingKey::from_public_key_pem(text).map_err(|e| bad(format!("not an Ed25519 public key PEM: {e}")))
    } else {
        let raw: [u8; 32] = hex::decode(text)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad("expected an SPKI PEM or 64 hex characters".into()))?;
        VerifyingKey::from_bytes(&raw).map_err(|e| bad(e.to_string()))
    }
}

/// A new random signing key as PKCS#8 v1 PEM, the form `openssl genpkey` writes. (dalek's own
/// encoding is v2, with the public key embedded, which some libraries refuse, e.g. Python's
/// `cryptography`.)
pub fn generate_pem() -> (String, String) {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let v1 = ed25519_dalek::pkcs8::KeypairBytes { secret_key: key.to_bytes(), public_key: None };
    let pem = v1.to_pkcs8_pem(LineEnding::LF).expect("Ed25519 keys encode").to_string();
    (pem, public_key_pem(&key.verifying_key()))
}

/// Folder of one partition's digests.
pub fn partition_dir(prefix: &str, topic: &str, partition: i32) -> String {
    join_key(&[prefix, DIGESTS_DIR, topic, &format!("p{partition:04}")]) + "/"
}

/// The sequence number of a digest file name as the writer spells it (`<seq:012>.digest`).
pub fn digest_seq(file: &str) -> Option<u64> {
    file.strip_suffix(".digest").filter(|d| d.len() == 12 && d.bytes().all(|b| b.is_ascii_digit()))?.parse().ok()
}

pub fn digest_key(prefix: &str, topic: &str, partition: i32, seq: u64) -> String {
    format!("{}{seq:012}.digest", partition_dir(prefix, topic, partition))
}

pub fn public_key_key(prefix: &str, key_id: &str) -> String {
    join_key(&[prefix, DIGESTS_DIR, "keys", &format!("{key_id}.pem")])
}

/// Writes the signer's public key beside the trail (`_digests/keys/<key_id>.pem`) unless it is
/// there already. Verifiers should get the key from a trusted channel; this copy is a convenience.
pub async fn publish_public_key(
    objects: &dyn crate::sinks::ObjectStore,
    prefix: &str,
    signer: &DigestSigner,
) -> Result<(), crate::sinks::SinkError> {
    let key = public_key_key(prefix, &signer.key_id);
    if objects.head(&key).await?.is_none() {
        let metadata = std::collections::BTreeMap::from([("aegis-key-id".to_string(), signer.key_id.clone())]);
        objects.put(&key, bytes::Bytes::from(signer.public_key_pem()), &metadata).await?;
        tracing::info!(%key, key_id = %signer.key_id, "published the digest public key");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(first: i64, last: i64) -> SegmentEntry {
        SegmentEntry {
            key: format!("trail/x/t-p0000-{first:020}-{last:020}.parquet"),
            sha256: "aa".repeat(32),
            rows: (last - first + 1) as u64,
            first_offset: first,
            last_offset: last,
            first_prev_hash: format!("{first:064}"),
            last_entry_hash: format!("{last:064}"),
            merkle_root: "bb".repeat(32),
        }
    }

    fn signer() -> DigestSigner {
        DigestSigner::from_text("digest.signing_key", &"11".repeat(32)).unwrap()
    }

    #[test]
    fn encode_parse_verify_round_trip() {
        let s = signer();
        let body = DigestBody::next("t", 0, None, &s.key_id, vec![segment(5, 9), segment(0, 4)]);
        assert_eq!((body.first_offset, body.last_offset), (0, 9));
        assert_eq!(body.first_prev_hash, format!("{:064}", 0));
        let bytes = s.encode(&body);
        let parsed = DigestObject::parse("k", &bytes).unwrap();
        assert_eq!(parsed.body, body);
        assert!(parsed.verify(&s.verifying_key()));
        let other = DigestSigner::from_text("x", &"22".repeat(32)).unwrap();
        assert!(!parsed.verify(&other.verifying_key()), "another key's signature must not verify");
        let next = DigestBody::next("t", 0, Some((body.seq, parsed.body_sha256())), &s.key_id, vec![segment(10, 12)]);
        assert_eq!(next.seq, 1);
        assert_eq!(next.prev_digest_sha256, hex::encode(parsed.body_sha256()));
    }

    #[test]
    fn edited_body_fails_signature() {
        let s = signer();
        let body = DigestBody::next("t", 0, None, &s.key_id, vec![segment(0, 4)]);
        let text = String::from_utf8(s.encode(&body)).unwrap().replace("\"rows\":5", "\"rows\":6");
        let parsed = DigestObject::parse("k", text.as_bytes()).unwrap();
        assert!(!parsed.verify(&s.verifying_key()));
    }

    #[test]
    fn anything_off_the_documented_format_is_malformed() {
        let s = signer();
        let good =
            String::from_utf8(s.encode(&DigestBody::next("t", 0, None, &s.key_id, vec![segment(0, 4)]))).unwrap();
        let (signed_part, signature_hex) = good.rsplit_once(':').unwrap();
        let upper_sig = format!("{signed_part}:{}", signature_hex.to_uppercase());
        let cases = [
            ("no final newline", good.trim_end().to_string(), "two lines"),
            ("a third line", format!("{good}\n"), "two lines"),
            ("uppercase signature hex", upper_sig, "lowercase hex"),
            ("another format", good.replace(DIGEST_FORMAT, "aegis-digest/v2"), "format"),
            ("uppercase hash", good.replacen(&"bb".repeat(32), &"BB".repeat(32), 1), "merkle_root"),
            ("unknown segment field", good.replace("\"rows\":", "\"extra\":1,\"rows\":"), "extra"),
        ];
        for (case, text, says) in cases {
            let err = DigestObject::parse("k", text.as_bytes()).expect_err(case).to_string();
            assert!(err.contains(says), "{case}: {err}");
        }
        // The chain table's copy of an entry, written by another version, still loads.
        let entry = serde_json::to_string(&segment(0, 4)).unwrap().replace("\"rows\":", "\"extra\":1,\"rows\":");
        assert_eq!(serde_json::from_str::<SegmentEntry>(&entry).unwrap(), segment(0, 4));
    }

    #[test]
    fn keys_round_trip_through_pem() {
        let (private, public) = generate_pem();
        // PKCS#8 v1: version 0, the Ed25519 OID, the 32-byte seed; 48 bytes of DER, like openssl's.
        assert!(private.contains("\nMC4CAQAwBQYDK2VwBCIEI"), "{private}");
        let s = DigestSigner::from_text("k", &private).unwrap();
        assert_eq!(parse_public_key("p", &public).unwrap(), s.verifying_key());
        assert!(DigestSigner::from_text("digest.signing_key", "nope")
            .unwrap_err()
            .to_string()
            .contains("digest.signing_key"));
    }

    /// The vector in schemas/CHAIN.md ("Digests"): seed 0x11 * 32.
    #[test]
    fn chain_md_key_vector() {
        let s = signer();
        assert_eq!(
            hex::encode(s.verifying_key().as_bytes()),
            "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737"
        );
        assert_eq!(s.key_id, "10ba682c8ad13513");
        // Ed25519 is deterministic: the same message always has this signature.
        let sig = s.key.sign(br#"{"format":"aegis-digest/v1"}"#);
        assert_eq!(
            hex::encode(sig.to_bytes()),
            "70af2add3043a9e77eaed85df3c5ccbec454fdb0aa4c6b88c1249e9fb41d6279a6f9f8f6cb554b675d5019d0fc204486ba53a051ab411cc9e51e4b48e97d110e"
        );
    }
}
