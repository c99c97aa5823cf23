//! [`ObjectStore`] on Amazon S3 (or MinIO / moto through `s3.endpoint_url`).

use std::collections::BTreeMap;

use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, ObjectLockMode, ServerSideEncryption};
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{classify_sdk_error, ObjectInfo, ObjectStore, SinkError};
use crate::config::{S3Config, Sse};

const BACKEND: &str = "s3";

#[derive(Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    retention_days: Option<u32>,
    sse: Sse,
    sse_kms_key_id: Option<String>,
}

impl S3Store {
    pub fn new(sdk: &aws_config::SdkConfig, config: &S3Config) -> Self {
        Self {
            client: client(sdk, config),
            bucket: config.bucket.clone(),
            retention_days: config.object_lock_retention_days,
            sse: config.sse,
            sse_kms_key_id: config.sse_kms_key_id.clone(),
        }
    }

    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn target(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, key)
    }

    /// A PutObject with everything every write carries: content type, user metadata, a SHA-256
    /// checksum, Object Lock retention and server-side encryption as configured. The body is
    /// hashed once (or not at all, when the metadata names its hash): that one hash is both the
    /// checksum S3 checks and stores, and the payload hash the SigV4 signature covers, where
    /// the SDK would hash the body twice more, for each of those.
    fn put_request(
        &self,
        key: &str,
        body: Bytes,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder, String), SinkError> {
        let named = super::named_sha256(BACKEND, &self.target(key), metadata)?;
        let sha256: [u8; 32] = named.unwrap_or_else(|| Sha256::digest(&body).into());
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type(key))
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_sha256(aws_smithy_types::base64::encode(sha256))
            .set_metadata(Some(metadata.clone().into_iter().collect()))
            .body(ByteStream::from(body));
        if let Some(days) = self.retention_days {
            let until = chrono::Utc::now() + chrono::Duration::days(i64::from(days));
            request = request
                .object_lock_mode(ObjectLockMode::Compliance)
                .object_lock_retain_until_date(aws_smithy_types::DateTime::from_secs(until.timestamp()));
        }
        let request = match self.sse {
            Sse::None => request,
            Sse::Aes256 => request.server_side_encryption(ServerSideEncryption::Aes256),
            Sse::Kms => request
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .set_ssekms_key_id(self.sse_kms_key_id.clone()),
        };
        Ok((request, hex::encode(sha256)))
    }

    /// The body of `key` (at `version`, or the latest). `checked`: validated against the
    /// checksum S3 stored, as the SDK does by default whenever S3 returns one.
    async fn fetch(&self, key: &str, version: Option<String>, checked: bool) -> Result<Bytes, SinkError> {
        let mut request = self.client.get_object().bucket(&self.bucket).key(key).set_version_id(version).customize();
        if !checked {
            request = request.config_override(
                aws_sdk_s3::config::Builder::default()
                    .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired),
            );
        }
        let out = request.send().await.map_err(|e| classify_sdk_error(BACKEND, "GetObject", &self.target(key), &e))?;
        let body = out.body.collect().await.map_err(|e| body_error(self.target(key), e))?;
        Ok(body.into_bytes())
    }
}

/// Gives the SigV4 signer the body's SHA-256 (hex) instead of letting it hash the body. S3
/// still checks the body against it (`x-amz-content-sha256`), so nothing goes unsigned.
#[derive(Debug)]
struct SignedPayloadHash(String);

impl aws_smithy_runtime_api::client::interceptors::Intercept for SignedPayloadHash {
    fn name(&self) -> &'static str {
        "SignedPayloadHash"
    }

    fn modify_before_signing(
        &self,
        _context: &mut aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextMut<'_>,
        _components: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        cfg.interceptor_state().store_put(aws_runtime::auth::PayloadSigningOverride::Precomputed(self.0.clone()));
        Ok(())
    }
}

/// A body read that broke. A body that differs from the checksum S3 stored at upload will not
/// read differently on a retry: fatal, and said plainly (the object was altered or corrupted).
fn body_error(target: String, error: aws_smithy_types::byte_stream::error::Error) -> SinkError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = source {
        if e.downcast_ref::<aws_smithy_checksums::body::validate::Error>().is_some() {
            return SinkError::Fatal {
                backend: BACKEND,
                operation: "GetObject",
                target,
                message: format!(
                    "the body does not match the checksum S3 stored at upload ({e}); run `aegis-audit verify`"
                ),
            };
        }
        source = e.source();
    }
    SinkError::Transient { backend: BACKEND, operation: "GetObject", target, message: error.to_string() }
}

pub fn client(sdk: &aws_config::SdkConfig, config: &S3Config) -> aws_sdk_s3::Client {
    let mut builder = aws_sdk_s3::config::Builder::from(sdk).force_path_style(config.force_path_style);
    if let Some(url) = &config.endpoint_url {
        builder = builder.endpoint_url(url);
    }
    aws_sdk_s3::Client::from_conf(builder.build())
}

/// Whether `bucket` has Object Lock enabled (false when it cannot be read).
pub async fn object_lock_enabled(client: &aws_sdk_s3::Client, bucket: &str) -> bool {
    object_lock_state(client, bucket).await.unwrap_or(false)
}

/// Whether the bucket has Object Lock on; an error only when S3 did not answer for good (down,
/// throttling, 5xx). A refusal, such as `ObjectLockConfigurationNotFoundError` for a bucket
/// without a lock, is `Ok(false)`.
pub async fn object_lock_state(
    client: &aws_sdk_s3::Client,
    bucket: &str,
) -> Result<
    bool,
    aws_sdk_s3::error::SdkError<
        aws_sdk_s3::operation::get_object_lock_configuration::GetObjectLockConfigurationError,
        aws_smithy_runtime_api::http::Response,
    >,
> {
    match client.get_object_lock_configuration().bucket(bucket).send().await {
        Ok(out) => Ok(out
            .object_lock_configuration
            .is_some_and(|c| c.object_lock_enabled == Some(aws_sdk_s3::types::ObjectLockEnabled::Enabled))),
        Err(e) if classify_sdk_error(BACKEND, "GetObjectLockConfiguration", bucket, &e).is_retryable() => Err(e),
        Err(_) => Ok(false),
    }
}

/// The slowest upload a PUT allows before it times out and is retried.
const MIN_UPLOAD_BYTES_PER_SEC: u64 = 512 * 1024;

/// Timeouts for a PUT of `len` bytes: the client's 20 s per attempt fits a segment of up to
/// 10 MiB at the floor rate; a larger one (up to `segment.max_bytes`, 64 MiB) gets time in
/// proportion, or a slow link would time it out on every retry and stall the partition for good.
fn attempt_timeout(len: usize) -> std::time::Duration {
    std::time::Duration::from_secs((len as u64 / MIN_UPLOAD_BYTES_PER_SEC).max(20))
}

fn upload_timeouts(len: usize) -> aws_sdk_s3::config::Builder {
    let attempt = attempt_timeout(len);
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(std::time::Duration::from_secs(3))
        .operation_attempt_timeout(attempt)
        .operation_timeout((attempt * 3).max(std::time::Duration::from_secs(60)))
        .build();
    aws_sdk_s3::config::Builder::default().timeout_config(timeouts)
}

fn content_type(key: &str) -> &'static str {
    match key.rsplit('.').next() {
        Some("parquet") => "application/vnd.apache.parquet",
        Some("pem") => "application/x-pem-file",
        _ => "text/plain; charset=utf-8",
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, body: Bytes, metadata: &BTreeMap<String, String>) -> Result<(), SinkError> {
        let len = body.len();
        let (request, sha256) = self.put_request(key, body, metadata)?;
        let request = request.customize().interceptor(SignedPayloadHash(sha256)).config_override(upload_timeouts(len));
        request.send().await.map_err(|e| classify_sdk_error(BACKEND, "PutObject", &self.target(key), &e))?;
        Ok(())
    }

    async fn put_new(&self, key: &str, body: Bytes, metadata: &BTreeMap<String, String>) -> Result<bool, SinkError> {
        let len = body.len();
        let (request, sha256) = self.put_request(key, body, metadata)?;
        let request = request
            .if_none_match("*")
            .customize()
            .interceptor(SignedPayloadHash(sha256))
            .config_override(upload_timeouts(len));
        match request.send().await {
            Ok(_) => Ok(true),
            // 412: an object is there already (a 409 ConditionalRequestConflict is retried).
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 412) => Ok(false),
            Err(e) => Err(classify_sdk_error(BACKEND, "PutObject", &self.target(key), &e)),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, SinkError> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: out.content_length().unwrap_or_default().max(0) as u64,
                metadata: out.metadata().cloned().unwrap_or_default().into_iter().collect(),
            })),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(classify_sdk_error(BACKEND, "HeadObject", &self.target(key), &e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, SinkError> {
        self.fetch(key, None, true).await
    }

    async fn get_checked(&self, key: &str) -> Result<(Bytes, Option<String>), SinkError> {
        // ChecksumMode::Enabled: the SDK also validates the body against it while reading.
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
            .send()
            .await
            .map_err(|e| classify_sdk_error(BACKEND, "GetObject", &self.target(key), &e))?;
        use base64::Engine;
        let stored = out
            .checksum_sha256()
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
            .map(hex::encode);
        let version = out.version_id().map(str::to_string);
        match out.body.collect().await {
            Ok(body) => Ok((body.into_bytes(), stored)),
            // The SDK found the body differs from the stored checksum (or the read broke): fetch
            // the same version again unchecked, so the caller sees both and can say how they differ.
            Err(_) => Ok((self.fetch(key, version, false).await?, stored)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, SinkError> {
        let mut out = Vec::new();
        let mut pages = self.client.list_objects_v2().bucket(&self.bucket).prefix(prefix).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify_sdk_error(BACKEND, "ListObjectsV2", &self.target(prefix), &e))?;
            for object in page.contents() {
                if let Some(key) = object.key() {
                    out.push(ObjectInfo {
                        key: key.to_string(),
                        size: object.size().unwrap_or_default().max(0) as u64,
                        metadata: BTreeMap::new(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_segment_gets_time_to_upload_in_proportion() {
        assert_eq!(attempt_timeout(0).as_secs(), 20);
        assert_eq!(attempt_timeout(10 << 20).as_secs(), 20);
        assert_eq!(attempt_timeout(64 << 20).as_secs(), 128);
    }
}
