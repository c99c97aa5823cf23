//! Where segments, index items and chain heads become durable.
//!
//! Two seams with real second implementations: [`ObjectStore`] (S3, in-memory) and the DynamoDB
//! pair [`IndexStore`] + [`HeadStore`] (DynamoDB, in-memory). The in-memory versions let the
//! whole flush protocol run in-process in tests; the real ones are tested on the local stack.

pub mod dead_letter;
pub mod dynamodb;
pub mod memory;
pub mod s3;

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;

use crate::chain::Hash;

/// A sink failure, classified once where the backend's error is understood.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// Throttling, 5xx, timeouts, connection refused: retry with backoff, never skip.
    #[error("{backend} {operation} {target}: {message} (retrying)")]
    Transient { backend: &'static str, operation: &'static str, target: String, message: String },
    /// Access denied, missing bucket/table, validation errors: retrying will not help.
    #[error("{backend} {operation} {target}: {message}")]
    Fatal { backend: &'static str, operation: &'static str, target: String, message: String },
    /// The chain head moved under us: another worker owns this partition now.
    #[error("chain head {topic}/{partition} is not the one this worker extended ({detail}): partition lost, stopping writes")]
    FenceLost { topic: String, partition: i32, detail: String },
    /// An object with this key exists with different content: a re-run must never overwrite it.
    #[error("object {key} already exists with different content ({detail}): refusing to overwrite")]
    Conflict { key: String, detail: String },
}

impl SinkError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Transient { .. })
    }

    /// Short label for metrics (`backend_errors_total{kind=...}`).
    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Transient { .. } => "transient",
            SinkError::Fatal { .. } => "fatal",
            SinkError::FenceLost { .. } => "fence_lost",
            SinkError::Conflict { .. } => "conflict",
        }
    }
}

/// What we attach to every segment object so a re-run can recognise its own earlier write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub metadata: BTreeMap<String, String>,
}

/// User metadata naming the body's SHA-256 (hex). A writer that has hashed the body already
/// passes it, and the store sends it as the content checksum instead of hashing the body again.
pub const SHA256_METADATA: &str = "aegis-sha256";
/// S3 user metadata of a segment: its last row's offset and entry hash (how a re-run, and
/// `prune`, recognise a flush's objects), and its row count.
pub const LAST_OFFSET_METADATA: &str = "aegis-last-offset";
pub const LAST_ENTRY_HASH_METADATA: &str = "aegis-last-entry-hash";
pub const ROWS_METADATA: &str = "aegis-rows";

/// The body hash a writer named in `metadata` ([`SHA256_METADATA`]), if any. A value that is
/// not 64 hex digits is the writer's bug, refused rather than stored beside another hash.
pub(crate) fn named_sha256(
    backend: &'static str,
    target: &str,
    metadata: &BTreeMap<String, String>,
) -> Result<Option<[u8; 32]>, SinkError> {
    let Some(text) = metadata.get(SHA256_METADATA) else { return Ok(None) };
    let hash = hex::decode(text).ok().and_then(|bytes| <[u8; 32]>::try_from(bytes).ok());
    hash.map(Some).ok_or_else(|| SinkError::Fatal {
        backend,
        operation: "PutObject",
        target: target.to_string(),
        message: format!("metadata {SHA256_METADATA} = {text:?} is not a SHA-256"),
    })
}

#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// Writes `body` at `key` with user metadata, a SHA-256 content checksum and (when
    /// configured) Object Lock retention and server-side encryption. A [`SHA256_METADATA`]
    /// entry must be the body's SHA-256: S3 refuses the write otherwise.
    async fn put(&self, key: &str, body: Bytes, metadata: &BTreeMap<String, String>) -> Result<(), SinkError>;
    /// Like `put`, but only where no object is (S3 `If-None-Match: *`): `Ok(false)` when one is
    /// already. A writer that lost a race then reads what is there instead of replacing it.
    async fn put_new(&self, key: &str, body: Bytes, metadata: &BTreeMap<String, String>) -> Result<bool, SinkError>;
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, SinkError>;
    async fn get(&self, key: &str) -> Result<Bytes, SinkError>;
    /// The body and the SHA-256 the store recorded for it at write time (hex), when it has one.
    async fn get_checked(&self, key: &str) -> Result<(Bytes, Option<String>), SinkError> {
        Ok((self.get(key).await?, None))
    }
    /// Every object under `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, SinkError>;
}

/// A neutral attribute value; the DynamoDB store maps it to `AttributeValue`.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    S(String),
    N(String),
    Bool(bool),
}

/// One index item: primary key plus attributes (including GSI keys).
#[derive(Debug, Clone, PartialEq)]
pub struct IndexItem {
    pub pk: String,
    pub sk: String,
    pub attrs: BTreeMap<String, Attr>,
}

/// The precondition of a guarded decision-item write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard<'a> {
    /// No item with this key exists yet.
    Absent,
    /// The stored item is still the one this writer looked at: the same `rank`, and, if it was
    /// not flagged, still without `conflict` (a writer that saw no flag computes a replacement
    /// without one, and must not erase a flag set meanwhile).
    Rank { rank: &'a str, flagged: bool },
    /// The stored item has no `rank` a writer can compare (missing, not a string, or empty: a
    /// hand edit). The winner rule cannot place it, so the candidate replaces it.
    Damaged,
}

/// Result of a guarded write.
#[derive(Debug, Clone, PartialEq)]
pub enum Guarded {
    Written,
    /// The precondition did not hold; the item as stored now (`None`: there is none).
    Refused(Option<IndexItem>),
}

#[async_trait]
pub trait IndexStore: Send + Sync {
    /// Upserts every item (idempotent: the same record always yields the same item).
    async fn write(&self, items: Vec<IndexItem>) -> Result<(), SinkError>;
    /// Puts `item` (whole) only if `guard` holds for the stored item with its key.
    async fn put_guarded(&self, item: &IndexItem, guard: Guard<'_>) -> Result<Guarded, SinkError>;
    /// Sets `conflict = true` on the item at (pk, sk) only if its `rank` is still `rank`.
    async fn mark_conflict(&self, pk: &str, sk: &str, rank: &str) -> Result<Guarded, SinkError>;
}

/// Position of a chain's last durable entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadPos {
    pub last_offset: i64,
    pub last_hash: Hash,
}

/// A flush in progress: recorded before any object is written, cleared when it completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingFlush {
    pub first_offset: i64,
    pub last_offset: i64,
    pub last_hash: Hash,
}

/// The last digest written for a partition: its sequence number and body hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestPos {
    pub seq: u64,
    pub hash: Hash,
}

/// The stored head of one topic-partition's chain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChainHead {
    /// The chain table holds an item for the partition with nothing but its key (and
    /// `updated_at`): an operator's word that the chain starts afresh (an unrecoverable first
    /// flush cleared, RUNBOOK). No item, or one whose attributes do not read as a head, where
    /// the trail has begun, is a lost or damaged table: refused, never a second chain.
    pub afresh: bool,
    pub committed: Option<HeadPos>,
    pub pending: Option<PendingFlush>,
    pub digest: Option<DigestPos>,
    /// Segments made durable since the last digest (appended atomically with the head), so a
    /// crash between a flush and the next digest cannot leave a segment out of every digest.
    pub undigested: Vec<crate::digest::SegmentEntry>,
}

#[async_trait]
pub trait HeadStore: Send + Sync {
    async fn load(&self, topic: &str, partition: i32) -> Result<ChainHead, SinkError>;
    /// Records `pending` only if the stored head is still `expected` and nothing is pending;
    /// otherwise [`SinkError::FenceLost`].
    async fn begin_flush(
        &self,
        topic: &str,
        partition: i32,
        expected: Option<HeadPos>,
        pending: PendingFlush,
    ) -> Result<(), SinkError>;
    /// Advances the head to `pending` and appends `segments` to the undigested list, only if
    /// `pending` is still the recorded intent; otherwise [`SinkError::FenceLost`].
    async fn complete_flush(
        &self,
        topic: &str,
        partition: i32,
        pending: PendingFlush,
        segments: &[crate::digest::SegmentEntry],
    ) -> Result<(), SinkError>;
    /// Records digest `digest` (after `previous`) and keeps `remaining` as the undigested list,
    /// only if the head is still `head` with nothing pending and the last digest is `previous`;
    /// otherwise [`SinkError::FenceLost`].
    async fn record_digest(
        &self,
        topic: &str,
        partition: i32,
        head: HeadPos,
        previous: Option<DigestPos>,
        digest: DigestPos,
        remaining: &[crate::digest::SegmentEntry],
    ) -> Result<(), SinkError>;
}

/// Turns an AWS SDK error into a [`SinkError`], deciding retryable vs fatal in one place.
pub(crate) fn classify_sdk_error<E>(
    backend: &'static str,
    operation: &'static str,
    target: &str,
    err: &aws_smithy_runtime_api::client::result::SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> SinkError
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_smithy_runtime_api::client::result::SdkError;
    let message = aws_smithy_types::error::display::DisplayErrorContext(err).to_string();
    let retryable = match err {
        SdkError::ConstructionFailure(_) => false,
        SdkError::ServiceError(service) => {
            const RETRYABLE_CODES: [&str; 13] = [
                "ThrottlingException",
                "ConditionalRequestConflict", // S3: a concurrent conditional write; try again
                "OperationAborted",           // S3: a conflicting operation on the same key or bucket
                "Throttling",
                "ProvisionedThroughputExceededException",
                "RequestLimitExceeded",
                "SlowDown",
                "InternalError",
                "InternalServerError",
                "ServiceUnavailable",
                "RequestTimeout", // S3 (a 400): the upload's socket idled; send again
                "RequestTimeoutException",
                "TransactionInProgressException",
            ];
            let code = service.err().code().unwrap_or_default();
            let status = service.raw().status().as_u16();
            // The status settles what the code does not: any 5xx, 408 or 429 passes; a 4xx without
            // a code (a HEAD's 403 has no body to carry one) is a refusal no retry changes, and so
            // is a bodiless 3xx (S3's 301 for a bucket in another region).
            RETRYABLE_CODES.contains(&code) || status >= 500 || status == 408 || status == 429
        }
        // Timeouts, connection refused/reset, truncated responses: the backend may come back.
        _ => true,
    };
    let target = target.to_string();
    if retryable {
        SinkError::Transient { backend, operation, target, message }
    } else {
        SinkError::Fatal { backend, operation, target, message }
    }
}

/// Shared AWS SDK configuration: rustls(ring) HTTP client, region, optional static credentials.
pub async fn aws_sdk_config(aws: &crate::config::AwsConfig) -> aws_config::SdkConfig {
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
    let http =
        aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build_https();
    // Explicit timeouts: a backend that accepts connections but never answers must surface as a
    // transient error (and a retry), not hang a partition forever.
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(std::time::Duration::from_secs(3))
        .operation_attempt_timeout(std::time::Duration::from_secs(20))
        .operation_timeout(std::time::Duration::from_secs(60))
        .build();
    let mut loader =
        aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http).timeout_config(timeouts);
    if let Some(region) = &aws.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let (Some(id), Some(secret)) = (&aws.access_key_id, &aws.secret_access_key) {
        loader = loader.credentials_provider(aws_credential_types::Credentials::from_keys(id, secret, None));
    }
    let mut config = loader.load().await;
    if config.region().is_none() {
        // The SDK refuses to sign without a region; local stacks do not care which.
        config = config.into_builder().region(aws_config::Region::new("us-east-1")).build();
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::operation::head_object::HeadObjectError;
    use aws_smithy_runtime_api::client::result::SdkError;
    use aws_smithy_runtime_api::http::{Response, StatusCode};
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    fn classify(status: u16, code: Option<&str>) -> &'static str {
        let mut meta = ErrorMetadata::builder();
        if let Some(code) = code {
            meta = meta.code(code);
        }
        let raw = Response::new(StatusCode::try_from(status).unwrap(), SdkBody::empty());
        let err = SdkError::service_error(HeadObjectError::generic(meta.build()), raw);
        classify_sdk_error("s3", "HeadObject", "k", &err).kind()
    }

    #[test]
    fn service_errors_are_retried_exactly_when_a_retry_can_help() {
        for (status, code) in [
            (400, Some("RequestTimeout")),
            (500, Some("InternalServerError")),
            (409, Some("OperationAborted")),
            (503, Some("SlowDown")),
            (502, None),
            (504, Some("SomethingNew")),
            (429, None),
        ] {
            assert_eq!(classify(status, code), "transient", "{status} {code:?}");
        }
        // A HEAD's 403 has no body, so no code: denied, and no retry will change that.
        for (status, code) in
            [(403, None), (403, Some("AccessDenied")), (400, Some("ValidationException")), (301, None)]
        {
            assert_eq!(classify(status, code), "fatal", "{status} {code:?}");
        }
    }
}
