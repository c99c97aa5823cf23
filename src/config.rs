//! Configuration: one TOML file plus `AEGIS_*` environment overrides, validated into a typed
//! [`Config`] before any client is built.
//!
//! Environment keys use `__` between levels: `AEGIS_KAFKA__BROKERS`, `AEGIS_SEGMENT__MAX_RECORDS`.
//! Unknown keys are rejected (`deny_unknown_fields`) so a typo never silently falls back to a default.

use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Config errors always name the key (or file) at fault; they are never retryable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Parse(String),
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("config file {path}: not found (pass --config or set AEGIS_CONFIG)")]
    MissingFile { path: String },
}

/// S3 Object Lock's longest retention.
const MAX_RETENTION_DAYS: u32 = 36_500;

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub s3: S3Config,
    pub dynamodb: DynamoConfig,
    #[serde(default)]
    pub aws: AwsConfig,
    #[serde(default)]
    pub segment: SegmentConfig,
    #[serde(default)]
    pub validation: ValidationConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub digest: DigestConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated.
    pub brokers: String,
    /// Topic the decision events arrive on.
    pub topic: String,
    /// Consumer group; run more instances with the same group to scale out.
    #[serde(default = "defaults::group_id")]
    pub group_id: String,
    /// Dead-letter topic for records that fail decoding or validation.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Partition count `init` creates the topic with.
    #[serde(default = "defaults::partitions")]
    pub partitions: i32,
    #[serde(default = "defaults::replication_factor")]
    pub replication_factor: i32,
    #[serde(default = "defaults::session_timeout_ms")]
    pub session_timeout_ms: u32,
    /// Record bytes queued for the partition workers, all together, before the consumer stops
    /// reading until they catch up (`source.rs`).
    #[serde(default = "defaults::max_queued_bytes")]
    pub max_queued_bytes: usize,
    /// Whether a worker checks that the partition's log reaches past the chain head before it
    /// skips records as already chained (a topic recreated under the same name). Off only for a
    /// broker whose high watermark is unreliable (tansu's in-memory storage, in the benchmarks).
    #[serde(default = "defaults::check_log_end")]
    pub check_log_end: bool,
    /// Extra librdkafka properties (security.protocol, sasl.*, ...), passed through verbatim,
    /// except that `_` reads as `.` (so the environment can set them).
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix of the trail; segments land under `<prefix>/year=/month=/day=/environment=/`.
    #[serde(default = "defaults::prefix")]
    pub prefix: String,
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Path-style addressing, needed by MinIO and moto.
    #[serde(default)]
    pub force_path_style: bool,
    /// Object Lock retention in days (compliance mode). `None` writes without retention.
    #[serde(default)]
    pub object_lock_retention_days: Option<u32>,
    #[serde(default)]
    pub sse: Sse,
    /// KMS key id for `sse = "aws:kms"`.
    #[serde(default)]
    pub sse_kms_key_id: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sse {
    #[default]
    #[serde(rename = "none")]
    None,
    #[serde(rename = "AES256")]
    Aes256,
    #[serde(rename = "aws:kms")]
    Kms,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamoConfig {
    /// Single-table index of decisions, overrides and safety flags (derived; rebuildable from S3).
    pub table: String,
    /// Chain heads, one item per topic-partition: the authoritative progress marker and fence.
    pub chain_table: String,
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Concurrent BatchWriteItem calls per flush.
    #[serde(default = "defaults::write_concurrency")]
    pub write_concurrency: usize,
    /// `false` writes only S3 and the chain table (a fast backfill); `rebuild-index` fills the
    /// index from S3 afterwards.
    #[serde(default = "defaults::yes")]
    pub write_index: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    #[serde(default)]
    pub region: Option<String>,
    /// Static credentials (local stacks); otherwise the default AWS credential chain is used.
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentConfig {
    /// Flush a partition's segment after this many records...
    #[serde(default = "defaults::max_records")]
    pub max_records: usize,
    /// ...or this many payload bytes...
    #[serde(default = "defaults::max_bytes")]
    pub max_bytes: usize,
    /// ...or when its oldest record is this old.
    #[serde(default = "defaults::max_age_ms")]
    pub max_age_ms: u64,
    /// Parquet row group size in rows.
    #[serde(default = "defaults::row_group_rows")]
    pub row_group_rows: usize,
    #[serde(default = "defaults::zstd_level")]
    pub zstd_level: i32,
    /// All partitions' segment buffers together stay under this (`budget.rs`): past it, the
    /// largest buffers flush early.
    #[serde(default = "defaults::memory_budget_bytes")]
    pub memory_budget_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Records larger than this are rejected (dead-lettered), not indexed.
    #[serde(default = "defaults::max_record_bytes")]
    pub max_record_bytes: usize,
    /// `occurred_at` further than this from the record's Kafka timestamp is rejected (a record
    /// without one is not checked: the wall clock would judge a replay differently).
    #[serde(default = "defaults::max_clock_skew_days")]
    pub max_clock_skew_days: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default = "defaults::initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    #[serde(default = "defaults::max_backoff_ms")]
    pub max_backoff_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz. Empty disables it.
    #[serde(default = "defaults::metrics_listen")]
    pub listen: String,
}

/// Signed digests (`schemas/CHAIN.md`, "Digests"). Enabled when a signing key is configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigestConfig {
    /// Ed25519 private key file: PKCS#8 PEM (`aegis-audit keygen`, `openssl genpkey -algorithm ed25519`).
    #[serde(default)]
    pub signing_key_file: Option<String>,
    /// The key itself (PEM or 64 hex chars of seed); a secret: prefer `AEGIS_DIGEST__SIGNING_KEY`.
    #[serde(default)]
    pub signing_key: Option<String>,
    /// How often each partition writes a digest of the segments it made durable.
    #[serde(default = "defaults::digest_interval_ms")]
    pub interval_ms: u64,
}

impl DigestConfig {
    pub fn enabled(&self) -> bool {
        self.key_text().is_some() || self.key_file().is_some()
    }

    // An empty value (e.g. an unset variable in compose) means "not set".
    fn key_text(&self) -> Option<&String> {
        self.signing_key.as_ref().filter(|s| !s.trim().is_empty())
    }

    fn key_file(&self) -> Option<&String> {
        self.signing_key_file.as_ref().filter(|s| !s.trim().is_empty())
    }

    /// The configured signer, if any; errors name the key.
    pub fn signer(&self) -> Result<Option<crate::digest::DigestSigner>, ConfigError> {
        let to_config = |e: crate::digest::DigestError| ConfigError::Parse(e.to_string());
        match (self.key_text(), self.key_file()) {
            (Some(text), _) => {
                crate::digest::DigestSigner::from_text("digest.signing_key", text).map(Some).map_err(to_config)
            }
            (None, Some(path)) => crate::digest::DigestSigner::from_file("digest.signing_key_file", Path::new(path))
                .map(Some)
                .map_err(to_config),
            (None, None) => Ok(None),
        }
    }
}

impl Default for DigestConfig {
    fn default() -> Self {
        Self { signing_key_file: None, signing_key: None, interval_ms: defaults::digest_interval_ms() }
    }
}

mod defaults {
    pub fn digest_interval_ms() -> u64 {
        300_000
    }
    pub fn group_id() -> String {
        "aegis-audit".into()
    }
    pub fn partitions() -> i32 {
        6
    }
    pub fn replication_factor() -> i32 {
        1
    }
    pub fn max_queued_bytes() -> usize {
        16 * 1024 * 1024
    }
    pub fn check_log_end() -> bool {
        true
    }
    pub fn session_timeout_ms() -> u32 {
        30_000
    }
    pub fn prefix() -> String {
        "trail".into()
    }
    pub fn write_concurrency() -> usize {
        8
    }
    pub fn yes() -> bool {
        true
    }
    // Athena wants few large files: ~100k records of ~500 B is ~15-25 MB of ZSTD Parquet.
    pub fn max_records() -> usize {
        100_000
    }
    pub fn max_bytes() -> usize {
        64 * 1024 * 1024
    }
    pub fn max_age_ms() -> u64 {
        60_000
    }
    pub fn row_group_rows() -> usize {
        128 * 1024
    }
    // Level 1: on decision events it compresses as well as 3 (the bench prints both sizes) and
    // encodes about 1.6x faster; ZSTD dominated the hot path's profile at 3.
    pub fn zstd_level() -> i32 {
        1
    }
    // With librdkafka's queue (16 MiB), the worker queues, encoding and uploads in flight, an
    // instance stays under ~240 MiB resident; at 96 MiB, peaks reached 255-335 MiB (README,
    // Performance).
    pub fn memory_budget_bytes() -> usize {
        64 * 1024 * 1024
    }
    pub fn max_record_bytes() -> usize {
        256 * 1024
    }
    pub fn max_clock_skew_days() -> u32 {
        365
    }
    pub fn initial_backoff_ms() -> u64 {
        200
    }
    pub fn max_backoff_ms() -> u64 {
        30_000
    }
    pub fn metrics_listen() -> String {
        "127.0.0.1:9898".into()
    }
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self {
            max_records: defaults::max_records(),
            max_bytes: defaults::max_bytes(),
            max_age_ms: defaults::max_age_ms(),
            row_group_rows: defaults::row_group_rows(),
            memory_budget_bytes: defaults::memory_budget_bytes(),
            zstd_level: defaults::zstd_level(),
        }
    }
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self { max_record_bytes: defaults::max_record_bytes(), max_clock_skew_days: defaults::max_clock_skew_days() }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { initial_backoff_ms: defaults::initial_backoff_ms(), max_backoff_ms: defaults::max_backoff_ms() }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { listen: defaults::metrics_listen() }
    }
}

impl Config {
    /// Loads `path` (TOML) with `AEGIS_*` overrides and validates the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::MissingFile { path: path.display().to_string() });
        }
        Self::from_figment(with_env(Figment::from(Toml::file(path)))?, env_properties())
    }

    /// Parses TOML text and validates it, without environment overrides (tests, examples).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(text)), Vec::new())
    }

    /// Parses TOML text with `AEGIS_*` overrides, as [`Config::load`] does for a file.
    pub fn from_toml_str_with_env(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(with_env(Figment::from(Toml::string(text)))?, env_properties())
    }

    /// `env_properties` override the file's `[kafka.properties]`. Environment variable names
    /// cannot hold dots, so AEGIS_KAFKA__PROPERTIES__SASL_PASSWORD arrives as `sasl_password`;
    /// librdkafka's property names use dots, never underscores.
    fn from_figment(figment: Figment, env_properties: Vec<(String, String)>) -> Result<Self, ConfigError> {
        let mut config: Config = figment.extract().map_err(|e| ConfigError::Parse(one_line(&e)))?;
        config.kafka.properties = std::mem::take(&mut config.kafka.properties)
            .into_iter()
            .chain(env_properties)
            .map(|(key, value)| (key.replace('_', "."), value))
            .collect();
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must not be empty (e.g. \"127.0.0.1:9092\")"));
        }
        if !is_valid_topic(&self.kafka.topic) {
            return Err(invalid("kafka.topic", "must be 1-249 chars of [a-zA-Z0-9._-]"));
        }
        // Segment files are named after the topic, and Athena skips files named `_…` or `.…`.
        if self.kafka.topic.starts_with(['_', '.']) {
            return Err(invalid(
                "kafka.topic",
                "may not start with '_' or '.': segment files are named after it and Athena skips such files",
            ));
        }
        if let Some(dlq) = &self.kafka.dead_letter_topic {
            if !is_valid_topic(dlq) || dlq == &self.kafka.topic {
                return Err(invalid("kafka.dead_letter_topic", "must be a valid topic name other than kafka.topic"));
            }
        }
        if self.kafka.group_id.is_empty() {
            return Err(invalid("kafka.group_id", "must not be empty"));
        }
        if self.kafka.partitions < 1 {
            return Err(invalid("kafka.partitions", "must be at least 1"));
        }
        if self.kafka.replication_factor < 1 {
            return Err(invalid("kafka.replication_factor", "must be at least 1"));
        }
        if !is_valid_bucket(&self.s3.bucket) {
            return Err(invalid("s3.bucket", "must be a valid S3 bucket name (3-63 chars of [a-z0-9.-])"));
        }
        if self.s3.prefix.starts_with('/') || self.s3.prefix.split('/').any(|p| p == ".." || p == ".") {
            return Err(invalid("s3.prefix", "must be a relative key prefix without '.' or '..' segments"));
        }
        // Athena reads `a//b` as `a/b` (another place) and skips `_`/`.` names (hidden files).
        let segments: Vec<&str> = self.s3.prefix.trim_end_matches('/').split('/').collect();
        if !self.s3.prefix.is_empty() && segments.iter().any(|s| s.is_empty() || s.starts_with(['_', '.'])) {
            return Err(invalid(
                "s3.prefix",
                "segments may not be empty or start with '_' or '.' (Athena reads a//b as a/b and skips hidden names)",
            ));
        }
        // The writer's own directory names: a trail under `x/quarantine` or `x/year=…` would lie
        // inside the directories (and lifecycle rules) of a trail under `x`.
        if segments.iter().any(|s| *s == "quarantine" || s.starts_with("year=")) {
            return Err(invalid(
                "s3.prefix",
                "segments may not be 'quarantine' or start with 'year=' (the trail's own directory names)",
            ));
        }
        if self.s3.object_lock_retention_days.is_some_and(|days| !(1..=MAX_RETENTION_DAYS).contains(&days)) {
            return Err(invalid(
                "s3.object_lock_retention_days",
                format!("must be between 1 and {MAX_RETENTION_DAYS} (100 years), or omitted to disable retention"),
            ));
        }
        // librdkafka refuses a session timeout above max.poll.interval.ms, and Kafka brokers
        // (group.min.session.timeout.ms) refuse the join below 6 s: both only at run time.
        let max_poll_ms: u32 = match self.kafka.properties.get("max.poll.interval.ms") {
            Some(v) => v
                .parse()
                .map_err(|_| invalid("kafka.properties", "max.poll.interval.ms must be a number of milliseconds"))?,
            None => 300_000,
        };
        // A session.timeout.ms property is applied last, so it is the one to check.
        let (session_key, session_ms) = match self.kafka.properties.get("session.timeout.ms") {
            Some(v) => (
                "kafka.properties",
                v.parse()
                    .map_err(|_| invalid("kafka.properties", "session.timeout.ms must be a number of milliseconds"))?,
            ),
            None => ("kafka.session_timeout_ms", self.kafka.session_timeout_ms),
        };
        if !(6_000..=max_poll_ms).contains(&session_ms) {
            return Err(invalid(
                session_key,
                format!(
                    "session timeout {session_ms} ms: must be between 6000 (Kafka's default group.min.session.timeout.ms) and max.poll.interval.ms ({max_poll_ms})"
                ),
            ));
        }
        match (self.s3.sse, &self.s3.sse_kms_key_id) {
            (Sse::Kms, None) => return Err(invalid("s3.sse_kms_key_id", "is required when s3.sse = \"aws:kms\"")),
            (Sse::None | Sse::Aes256, Some(_)) => {
                return Err(invalid("s3.sse_kms_key_id", "is only used with s3.sse = \"aws:kms\""))
            }
            _ => {}
        }
        for (key, url) in
            [("s3.endpoint_url", &self.s3.endpoint_url), ("dynamodb.endpoint_url", &self.dynamodb.endpoint_url)]
        {
            if let Some(url) = url {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(invalid(key, format!("must be an http(s) URL, got {url:?}")));
                }
            }
        }
        for (key, table) in
            [("dynamodb.table", &self.dynamodb.table), ("dynamodb.chain_table", &self.dynamodb.chain_table)]
        {
            if !is_valid_table(table) {
                return Err(invalid(key, "must be a DynamoDB table name (3-255 chars of [A-Za-z0-9_.-])"));
            }
        }
        if self.dynamodb.chain_table == self.dynamodb.table {
            return Err(invalid("dynamodb.chain_table", "must be a table name different from dynamodb.table"));
        }
        for (name, why) in RESERVED_PROPERTIES {
            if self.kafka.properties.contains_key(name) {
                return Err(invalid("kafka.properties", format!("{name} is set by aegis-audit: {why}")));
            }
        }
        if self.dynamodb.write_concurrency == 0 {
            return Err(invalid("dynamodb.write_concurrency", "must be at least 1"));
        }
        if self.aws.access_key_id.is_some() != self.aws.secret_access_key.is_some() {
            return Err(invalid("aws.secret_access_key", "aws.access_key_id and aws.secret_access_key go together"));
        }
        if self.segment.max_records == 0 {
            return Err(invalid("segment.max_records", "must be at least 1"));
        }
        if self.kafka.max_queued_bytes < 64 * 1024 {
            return Err(invalid("kafka.max_queued_bytes", "must be at least 65536"));
        }
        if self.segment.memory_budget_bytes < 1024 * 1024 {
            return Err(invalid("segment.memory_budget_bytes", "must be at least 1 MiB"));
        }
        if self.segment.max_bytes < 1024 {
            return Err(invalid("segment.max_bytes", "must be at least 1024"));
        }
        if self.segment.max_age_ms < 10 {
            return Err(invalid("segment.max_age_ms", "must be at least 10"));
        }
        if self.segment.row_group_rows == 0 {
            return Err(invalid("segment.row_group_rows", "must be at least 1"));
        }
        if !(1..=22).contains(&self.segment.zstd_level) {
            return Err(invalid("segment.zstd_level", "must be between 1 and 22"));
        }
        // DynamoDB items are capped at 400 KB; the index keeps the payload's fields, so cap records below it.
        if self.validation.max_record_bytes == 0 || self.validation.max_record_bytes > 350 * 1024 {
            return Err(invalid("validation.max_record_bytes", "must be between 1 and 358400 (DynamoDB item limit)"));
        }
        if self.retry.initial_backoff_ms == 0 || self.retry.max_backoff_ms < self.retry.initial_backoff_ms {
            return Err(invalid("retry.max_backoff_ms", "needs 0 < retry.initial_backoff_ms <= retry.max_backoff_ms"));
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid("metrics.listen", "must be IP:port (e.g. \"0.0.0.0:9898\"; not a host name) or empty"));
        }
        if self.digest.key_text().is_some() && self.digest.key_file().is_some() {
            return Err(invalid("digest.signing_key", "set digest.signing_key or digest.signing_key_file, not both"));
        }
        if self.digest.interval_ms < 100 {
            return Err(invalid("digest.interval_ms", "must be at least 100"));
        }
        // The private key itself is read by `run` and `config check` only (`DigestConfig::signer`):
        // verifiers and other tools must work without it.
        Ok(())
    }

    pub fn max_age(&self) -> Duration {
        Duration::from_millis(self.segment.max_age_ms)
    }

    /// The effective config as TOML with secrets replaced, for `config check`.
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.aws.secret_access_key.is_some() {
            shown.aws.secret_access_key = Some("<redacted>".into());
        }
        if shown.digest.signing_key.is_some() {
            shown.digest.signing_key = Some("<redacted>".into());
        }
        for (k, v) in shown.kafka.properties.iter_mut() {
            if k.contains("password") || k.contains("secret") || k.contains("jaas") {
                *v = "<redacted>".into();
            }
        }
        toml_string(&shown)
    }
}

/// The file's keys overridden by `AEGIS_<SECTION>__<KEY>`: typed keys through figment, text keys
/// (`TEXT_KEYS`) as text (`env_text`).
fn with_env(figment: Figment) -> Result<Figment, ConfigError> {
    let typed = Env::prefixed("AEGIS_")
        // Only AEGIS_<SECTION>__<KEY> are config keys; other AEGIS_* variables (AEGIS_CONFIG,
        // AEGIS_LOG_FORMAT, scripts' own settings) are not, and must not trip
        // deny_unknown_fields. librdkafka properties are read verbatim instead (`env_properties`).
        .filter(|key| {
            key.as_str().contains("__")
                && !key.starts_with(PROPERTIES_ENV)
                && !TEXT_KEYS.iter().any(|text| key.as_str().eq_ignore_ascii_case(&text_key_env(text)))
        })
        .split("__");
    Ok(env_text()?
        .into_iter()
        .fold(figment.merge(typed), |figment, (key, value)| figment.merge(Serialized::default(key, value))))
}

/// The keys whose values are text. Through figment an environment value is typed first (a group
/// id `2024` became a number and was refused as one, `007` would have become `7`) and unquoted;
/// these arrive as text, only trimmed.
const TEXT_KEYS: &[&str] = &[
    "kafka.brokers",
    "kafka.topic",
    "kafka.group_id",
    "kafka.dead_letter_topic",
    "s3.bucket",
    "s3.prefix",
    "s3.endpoint_url",
    "s3.sse_kms_key_id",
    "dynamodb.table",
    "dynamodb.chain_table",
    "dynamodb.endpoint_url",
    "aws.region",
    "aws.access_key_id",
    "aws.secret_access_key",
    "metrics.listen",
    "digest.signing_key_file",
    "digest.signing_key",
];

/// `kafka.group_id` -> `KAFKA__GROUP_ID` (after the `AEGIS_` prefix).
fn text_key_env(key: &str) -> String {
    key.replace('.', "__").to_ascii_uppercase()
}

/// The text keys set in the environment (case-insensitive, as figment matches the rest),
/// trimmed of surrounding whitespace as figment trims (a secret file's trailing newline would
/// otherwise join another consumer group or move the trail).
fn env_text() -> Result<Vec<(&'static str, String)>, ConfigError> {
    let mut found = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = strip_prefix_ignore_case(name, "AEGIS_") else { continue };
        let Some(key) = TEXT_KEYS.iter().find(|key| rest.eq_ignore_ascii_case(&text_key_env(key))) else { continue };
        let value = value
            .into_string()
            .map_err(|_| ConfigError::Invalid { key, message: format!("{name} is not valid UTF-8") })?;
        found.push((*key, value.trim().to_string()));
    }
    Ok(found)
}

/// `text` after `prefix`, matched case-insensitively, as figment matches `AEGIS_*`.
fn strip_prefix_ignore_case<'t>(text: &'t str, prefix: &str) -> Option<&'t str> {
    text.get(prefix.len()..).filter(|_| text[..prefix.len()].eq_ignore_ascii_case(prefix))
}

/// `AEGIS_KAFKA__PROPERTIES__<NAME>`, after the `AEGIS_` prefix.
const PROPERTIES_ENV: &str = "KAFKA__PROPERTIES__";

/// librdkafka properties from `AEGIS_KAFKA__PROPERTIES__*`, byte for byte. Through figment a
/// value is typed first (a password `12345` became a number, and failed as one) and trimmed and
/// unquoted: a secret must arrive as it was set.
fn env_properties() -> Vec<(String, String)> {
    let prefix = format!("AEGIS_{PROPERTIES_ENV}");
    std::env::vars_os()
        .filter_map(|(key, value)| {
            let key = key.into_string().ok()?;
            let name = strip_prefix_ignore_case(&key, &prefix)?;
            Some((name.to_ascii_lowercase(), value.into_string().ok()?))
        })
        .filter(|(name, _)| !name.is_empty())
        .collect()
}

fn toml_string(config: &Config) -> String {
    // figment brings serde + toml support; round-trip through its value type keeps this dependency-free.
    let value = figment::value::Value::serialize(config).expect("config serialises");
    let mut out = String::new();
    write_toml(&mut out, &value, "");
    out
}

fn write_toml(out: &mut String, value: &figment::value::Value, table: &str) {
    use figment::value::Value;
    let Value::Dict(_, dict) = value else { return };
    let mut nested = Vec::new();
    for (key, v) in dict {
        match v {
            Value::Dict(..) => nested.push((key, v)),
            // TOML has no null: show unset options as comments so the output still parses.
            Value::Empty(..) => out.push_str(&format!("# {} (unset)\n", toml_key(key))),
            _ => out.push_str(&format!("{} = {}\n", toml_key(key), toml_scalar(v))),
        }
    }
    for (key, v) in nested {
        let name = if table.is_empty() { key.clone() } else { format!("{table}.{key}") };
        out.push_str(&format!("\n[{name}]\n"));
        write_toml(out, v, &name);
    }
}

fn toml_key(key: &str) -> String {
    if !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

fn toml_scalar(value: &figment::value::Value) -> String {
    use figment::value::Value;
    match value {
        Value::String(_, s) => format!("{s:?}"),
        Value::Char(_, c) => format!("\"{c}\""),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => n
            .to_u128()
            .map(|v| v.to_string())
            .or_else(|| n.to_i128().map(|v| v.to_string()))
            .or_else(|| n.to_f64().map(|v| v.to_string()))
            .unwrap_or_default(),
        Value::Empty(..) => "\"\"".into(),
        Value::Array(_, items) => format!("[{}]", items.iter().map(toml_scalar).collect::<Vec<_>>().join(", ")),
        Value::Dict(..) => String::new(),
    }
}

/// figment errors can span lines (one per nested error); operators want one line.
fn one_line(error: &figment::Error) -> String {
    // figment names keys `default.<path>` (its profile); operators know them as `<path>`.
    error.clone().into_iter().map(|e| e.to_string().replace("key \"default.", "key \"")).collect::<Vec<_>>().join("; ")
}

pub fn is_valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// S3's general-purpose bucket naming rules.
fn is_valid_bucket(bucket: &str) -> bool {
    (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && bucket.as_bytes()[0].is_ascii_alphanumeric()
        && bucket.as_bytes()[bucket.len() - 1].is_ascii_alphanumeric()
        && !bucket.contains("..")
        && !bucket.contains(".-")
        && !bucket.contains("-.")
        && bucket.parse::<std::net::Ipv4Addr>().is_err()
}

fn is_valid_table(table: &str) -> bool {
    (3..=255).contains(&table.len())
        && table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// librdkafka properties the guarantees rest on: `kafka.properties` may not change them.
const RESERVED_PROPERTIES: [(&str, &str); 9] = [
    ("bootstrap.servers", "set kafka.brokers instead"),
    ("group.id", "set kafka.group_id instead (replay, status and heartbeats use it)"),
    ("enable.auto.commit", "offsets are committed only once S3 and DynamoDB hold the records"),
    ("enable.auto.offset.store", "offsets are committed only once S3 and DynamoDB hold the records"),
    ("auto.offset.reset", "a new group starts at the earliest record, or the trail would begin with a gap"),
    ("partition.assignment.strategy", "workers are handed over by cooperative-sticky rebalancing"),
    ("isolation.level", "only committed records enter the trail"),
    ("acks", "a dead letter is on every in-sync replica before its offset is committed"),
    ("enable.idempotence", "producer retries must not duplicate dead letters"),
];

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [kafka]
        brokers = "127.0.0.1:9092"
        topic = "decisions"
        [s3]
        bucket = "audit-bucket"
        [dynamodb]
        table = "audit-index"
        chain_table = "audit-chain"
    "#;

    /// Every text key of the config is read from the environment as text (`TEXT_KEYS`): the
    /// strings of a parsed config, and its unset options, which must be classified here.
    #[test]
    fn every_text_key_is_read_from_the_environment_as_text() {
        fn leaves(value: &serde_json::Value, path: String, out: &mut Vec<(String, serde_json::Value)>) {
            match value {
                serde_json::Value::Object(map) => {
                    for (key, v) in map {
                        let path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                        if path != "kafka.properties" {
                            leaves(v, path, out);
                        }
                    }
                }
                other => out.push((path, other.clone())),
            }
        }
        let mut found = Vec::new();
        leaves(&serde_json::to_value(Config::from_toml_str(MINIMAL).unwrap()).unwrap(), String::new(), &mut found);
        let text: Vec<&str> = found.iter().filter(|(_, v)| v.is_string()).map(|(k, _)| k.as_str()).collect();
        let unset: Vec<&str> = found.iter().filter(|(_, v)| v.is_null()).map(|(k, _)| k.as_str()).collect();
        // Enums: their names never read as numbers or booleans.
        let enums = ["s3.sse"];
        let missing: Vec<_> = text.iter().filter(|k| !TEXT_KEYS.contains(k) && !enums.contains(k)).collect();
        assert!(missing.is_empty(), "text keys not in TEXT_KEYS: {missing:?}");
        // Unset options: text ones are in TEXT_KEYS, the others are named here.
        let typed_options = ["s3.object_lock_retention_days"];
        for key in &unset {
            assert!(TEXT_KEYS.contains(key) != typed_options.contains(key), "{key}: text (TEXT_KEYS) or typed?");
        }
        for key in TEXT_KEYS {
            assert!(text.contains(key) || unset.contains(key), "{key} is not a config key");
        }
    }

    // Env overrides are process-global; tests that set them hold this lock.
    static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        Config::from_toml_str(text)
    }

    #[test]
    fn the_shipped_configs_load_and_the_reference_shows_the_defaults() {
        for text in [include_str!("../config/local.toml"), include_str!("../config/example.toml")] {
            parse(text).unwrap();
        }
        // The reference claims every key is at its default except where its comment says why:
        // those exceptions set, it must equal a config of only the required keys.
        let example = parse(include_str!("../config/example.toml")).unwrap();
        let defaults = parse(&format!(
            "[kafka]\nbrokers = {:?}\ntopic = {:?}\nreplication_factor = 3\n\
             [s3]\nbucket = {:?}\n[dynamodb]\ntable = {:?}\nchain_table = {:?}\n[metrics]\nlisten = {:?}\n",
            example.kafka.brokers,
            example.kafka.topic,
            example.s3.bucket,
            example.dynamodb.table,
            example.dynamodb.chain_table,
            example.metrics.listen,
        ))
        .unwrap();
        assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.kafka.group_id, "aegis-audit");
        assert_eq!(c.s3.prefix, "trail");
        assert_eq!(c.segment.max_records, 100_000);
        assert_eq!(c.segment.max_age_ms, 60_000);
        assert_eq!(c.s3.sse, Sse::None);
        assert_eq!(c.metrics.listen, "127.0.0.1:9898");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse(&format!("{MINIMAL}\n[segment]\nmax_recrods = 5\n")).unwrap_err().to_string();
        assert!(err.contains("max_recrods"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = parse(&format!("{MINIMAL}\n[segment]\nmax_records = \"many\"\n")).unwrap_err().to_string();
        assert!(err.contains("max_records"), "{err}");
    }

    #[test]
    fn missing_required_key_is_named() {
        let err = parse(
            "[kafka]\nbrokers = \"x:1\"\n[s3]\nbucket = \"abc\"\n[dynamodb]\ntable = \"abc\"\nchain_table = \"abd\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("topic"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let cases = [
            ("[kafka]\nbrokers = \"\"\ntopic = \"t\"", "kafka.brokers"),
            ("[kafka]\nbrokers = \"b:1\"\ntopic = \"a/b\"", "kafka.topic"),
        ];
        for (kafka, key) in cases {
            let text =
                MINIMAL.replace("[kafka]\n        brokers = \"127.0.0.1:9092\"\n        topic = \"decisions\"", kafka);
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{err} should name {key}");
        }
        let err = parse(&MINIMAL.replace("audit-bucket", "Bad_Bucket")).unwrap_err().to_string();
        assert!(err.contains("s3.bucket"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[metrics]\nlisten = \"nope\"\n")).unwrap_err().to_string();
        assert!(err.contains("metrics.listen"), "{err}");
        // Values that would only fail at run time: a retain-until date past chrono's range (a
        // panic at the first flush), a session timeout librdkafka or the broker refuses.
        let retention = |days: u32| {
            MINIMAL.replace(
                "bucket = \"audit-bucket\"",
                &format!("bucket = \"audit-bucket\"\nobject_lock_retention_days = {days}"),
            )
        };
        assert!(parse(&retention(36_500)).is_ok());
        for days in [0, 36_501, 100_000_000] {
            assert!(
                parse(&retention(days)).unwrap_err().to_string().contains("s3.object_lock_retention_days"),
                "{days}"
            );
        }
        let session = |ms: u32, extra: &str| {
            MINIMAL
                .replace("topic = \"decisions\"", &format!("topic = \"decisions\"\nsession_timeout_ms = {ms}{extra}"))
        };
        assert!(parse(&session(6_000, "")).is_ok());
        assert!(parse(&session(300_000, "")).is_ok());
        for ms in [5_999, 300_001] {
            assert!(parse(&session(ms, "")).unwrap_err().to_string().contains("kafka.session_timeout_ms"), "{ms}");
        }
        let longer_polls = "\n[kafka.properties]\n\"max.poll.interval.ms\" = \"600000\"";
        assert!(parse(&session(400_000, longer_polls)).is_ok());
        // A session.timeout.ms property wins over the key, so it is the one checked.
        let property = |ms: &str| session(30_000, &format!("\n[kafka.properties]\n\"session.timeout.ms\" = \"{ms}\""));
        assert!(parse(&property("10000")).is_ok());
        for ms in ["3000", "abc"] {
            assert!(parse(&property(ms)).unwrap_err().to_string().contains("kafka.properties"), "{ms}");
        }
        let kms = MINIMAL.replace("bucket = \"audit-bucket\"", "bucket = \"audit-bucket\"\nsse = \"aws:kms\"");
        assert!(parse(&kms).unwrap_err().to_string().contains("s3.sse_kms_key_id"));
        let missing = format!("{MINIMAL}\n[digest]\nsigning_key_file = \"/nonexistent/key.pem\"\n");
        let err = parse(&missing).unwrap().digest.signer().unwrap_err().to_string();
        assert!(err.contains("digest.signing_key_file") && err.contains("/nonexistent/key.pem"), "{err}");
        let garbage = format!("{MINIMAL}\n[digest]\nsigning_key = \"not a key\"\n");
        assert!(parse(&garbage).unwrap().digest.signer().unwrap_err().to_string().contains("digest.signing_key"));
        let empty = format!("{MINIMAL}\n[digest]\nsigning_key = \"\"\n");
        assert!(!parse(&empty).unwrap().digest.enabled(), "an empty key means digests off");
    }

    #[test]
    fn names_that_athena_s3_or_dynamodb_would_misread_or_refuse_name_their_key() {
        let with = |from: &str, to: &str| parse(&MINIMAL.replace(from, to));
        let error = |from: &str, to: &str| with(from, to).unwrap_err().to_string();
        // Athena skips `_`/`.` files (segments are named after the topic) and reads a//b as a/b.
        for topic in ["_decisions", ".decisions"] {
            assert!(error("topic = \"decisions\"", &format!("topic = \"{topic}\"")).contains("kafka.topic"));
        }
        assert!(with("topic = \"decisions\"", "topic = \"de_cisions.v1\"").is_ok());
        for prefix in ["a//b", "a/_b", ".a", "_trail/x", "trail/quarantine", "archive/year=2019/x"] {
            let text = format!("bucket = \"audit-bucket\"\nprefix = \"{prefix}\"");
            assert!(error("bucket = \"audit-bucket\"", &text).contains("s3.prefix"), "{prefix}");
        }
        for prefix in ["", "trail/", "audit/trail-v2", "quarantined/year"] {
            let text = format!("bucket = \"audit-bucket\"\nprefix = \"{prefix}\"");
            assert!(with("bucket = \"audit-bucket\"", &text).is_ok(), "{prefix}");
        }
        for bucket in ["a..b", "a.-b", "192.168.1.1", "ab"] {
            assert!(error("audit-bucket", bucket).contains("s3.bucket"), "{bucket}");
        }
        assert!(with("audit-bucket", "audit.bucket-1").is_ok());
        assert!(error("table = \"audit-index\"", "table = \"bad table\"").contains("dynamodb.table"));
        assert!(error("chain_table = \"audit-chain\"", "chain_table = \"c#\"").contains("dynamodb.chain_table"));
    }

    #[test]
    fn properties_the_guarantees_rest_on_are_refused() {
        for (name, file_key) in [
            ("group.id", "group_id"),
            ("bootstrap.servers", "bootstrap.servers"),
            ("enable.auto.commit", "enable_auto_commit"),
            ("auto.offset.reset", "auto.offset.reset"),
            ("acks", "acks"),
        ] {
            let text = MINIMAL.replace(
                "topic = \"decisions\"",
                &format!("topic = \"decisions\"\n[kafka.properties]\n\"{file_key}\" = \"x\""),
            );
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains("kafka.properties") && err.contains(name), "{err}");
        }
    }

    #[test]
    fn env_overrides_file_values() {
        let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        std::env::set_var("AEGIS_SEGMENT__MAX_RECORDS", "42");
        std::env::set_var("AEGIS_KAFKA__BROKERS", "broker-a:9092");
        std::env::set_var("AEGIS_BIN", "/not/a/config/key");
        std::env::set_var("AEGIS_KAFKA__PROPERTIES__SASL_PASSWORD", "from-env");
        // Secrets arrive verbatim: not typed as numbers, not trimmed, not unquoted.
        std::env::set_var("AEGIS_KAFKA__PROPERTIES__SSL_KEY_PASSWORD", "00123");
        std::env::set_var("aegis_kafka__properties__sasl_username", " \"quoted\" ");
        std::env::set_var("AEGIS_KAFKA__PROPERTIES__SSL.CA.LOCATION", "/ca.pem");
        // Text keys too: a value that reads as a number or a boolean stays the text it was.
        std::env::set_var("AEGIS_KAFKA__GROUP_ID", "2024");
        std::env::set_var("aegis_s3__prefix", "007");
        std::env::set_var("AEGIS_AWS__SECRET_ACCESS_KEY", " \"true\"\n");
        std::env::set_var("AEGIS_AWS__ACCESS_KEY_ID", "12345");
        let c = Config::from_toml_str_with_env(MINIMAL);
        std::env::remove_var("AEGIS_KAFKA__GROUP_ID");
        std::env::remove_var("aegis_s3__prefix");
        std::env::remove_var("AEGIS_AWS__SECRET_ACCESS_KEY");
        std::env::remove_var("AEGIS_AWS__ACCESS_KEY_ID");
        std::env::remove_var("AEGIS_KAFKA__PROPERTIES__SASL_PASSWORD");
        std::env::remove_var("AEGIS_KAFKA__PROPERTIES__SSL_KEY_PASSWORD");
        std::env::remove_var("aegis_kafka__properties__sasl_username");
        std::env::remove_var("AEGIS_KAFKA__PROPERTIES__SSL.CA.LOCATION");
        std::env::remove_var("AEGIS_BIN");
        std::env::remove_var("AEGIS_SEGMENT__MAX_RECORDS");
        std::env::remove_var("AEGIS_KAFKA__BROKERS");
        let c = c.unwrap();
        assert_eq!(c.segment.max_records, 42);
        assert_eq!(c.kafka.brokers, "broker-a:9092");
        assert_eq!(c.kafka.properties.get("sasl.password").map(String::as_str), Some("from-env"));
        assert_eq!(c.kafka.properties.get("ssl.key.password").map(String::as_str), Some("00123"));
        assert_eq!(c.kafka.properties.get("sasl.username").map(String::as_str), Some(" \"quoted\" "));
        assert_eq!(c.kafka.properties.get("ssl.ca.location").map(String::as_str), Some("/ca.pem"), "dots work too");
        assert_eq!((c.kafka.group_id.as_str(), c.s3.prefix.as_str()), ("2024", "007"));
        assert_eq!(c.aws.secret_access_key.as_deref(), Some("\"true\""), "trimmed, quotes kept");
        assert_eq!(c.aws.access_key_id.as_deref(), Some("12345"));
        // In the file, too, `_` reads as `.` in property keys.
        let file = MINIMAL.replace(
            "topic = \"decisions\"",
            "topic = \"decisions\"\n[kafka.properties]\nsasl_mechanisms = \"SCRAM-SHA-512\"",
        );
        // This test holds ENV_LOCK already: `Config::from_toml_str`, not `parse`.
        let from_file = Config::from_toml_str(&file).unwrap();
        assert_eq!(from_file.kafka.properties.get("sasl.mechanisms").map(String::as_str), Some("SCRAM-SHA-512"));
    }

    #[test]
    fn redacted_output_hides_secrets_and_round_trips() {
        let text = format!("{MINIMAL}\n[aws]\naccess_key_id = \"AKIA\"\nsecret_access_key = \"hunter2\"\n")
            .replace("topic = \"decisions\"", "topic = \"decisions\"\n[kafka.properties]\n\"sasl.password\" = \"pw\"");
        let c = parse(&text).unwrap();
        let shown = c.redacted_toml();
        assert!(!shown.contains("hunter2") && !shown.contains("\"pw\""), "{shown}");
        assert!(shown.contains("<redacted>"));
        let again = parse(&shown).unwrap();
        assert_eq!(again.segment.max_records, c.segment.max_records);
        assert_eq!(again.kafka.topic, "decisions");
    }
}
