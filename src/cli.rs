//! Command-line interface. `main.rs` parses it and calls into the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "aegis-audit",
    version,
    about = "Kafka AI-decision events -> tamper-evident audit trail (hash chain, Parquet on S3, DynamoDB index)"
)]
pub struct Cli {
    /// Config file (TOML); `AEGIS_*` environment variables override its keys.
    #[arg(long, short, global = true, env = "AEGIS_CONFIG", default_value = "aegis-audit.toml")]
    pub config: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "AEGIS_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Join the consumer group and write the audit trail until SIGTERM/SIGINT.
    Run {
        /// Stop gracefully after this many seconds without a new record (demos, backfills, tests).
        #[arg(long, value_name = "SECS")]
        exit_when_idle: Option<f64>,
    },
    /// Create the topic, the bucket and the DynamoDB tables (idempotent).
    Init,
    /// Produce realistic sample events to the topic.
    Produce {
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Records per second (default: as fast as possible).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        rate: Option<u64>,
        /// Produce only to these partitions, round robin (e.g. `0,2`); default: keyed by session.
        #[arg(long, value_delimiter = ',')]
        partitions: Option<Vec<i32>>,
        /// Random seed for the generator.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Check the trail straight from S3: every entry hash, link, offset, Merkle root, checksum
    /// and signed digest. Exit status 0 only when everything holds (1: problems found).
    Verify {
        /// Topic (default: kafka.topic).
        #[arg(long)]
        topic: Option<String>,
        /// Only this partition.
        #[arg(long)]
        partition: Option<i32>,
        /// Only flushes reaching this offset or later (the first link is then taken as the anchor).
        #[arg(long)]
        from: Option<i64>,
        /// Only flushes starting at this offset or earlier.
        #[arg(long)]
        to: Option<i64>,
        /// Segments dated before this day (YYYY-MM-DD) were pruned on purpose (`prune`).
        #[arg(long, value_name = "DATE")]
        pruned_before: Option<chrono::NaiveDate>,
        /// Trusted Ed25519 public key (SPKI PEM); default: the keys published in the bucket.
        #[arg(long, value_name = "FILE")]
        public_key: Vec<PathBuf>,
        /// Objects fetched concurrently.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Also check that the bucket holds what the chain table (dynamodb.chain_table) recorded:
        /// each partition's newest entry and digest. Needs dynamodb:Scan on that table.
        #[arg(long)]
        against_chain_table: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Emit a JSON inclusion proof for a decision (entry, Merkle path, segment, signed digest).
    Prove {
        decision_id: String,
        /// Write the proof here instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Check an inclusion proof offline with the public key alone (no S3, no config needed).
    VerifyProof {
        proof: PathBuf,
        #[arg(long, value_name = "FILE")]
        public_key: PathBuf,
    },
    /// Generate an Ed25519 digest signing key (PKCS#8 PEM, mode 0600) and print its public key.
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Also write the public key (SPKI PEM) here.
        #[arg(long, value_name = "FILE")]
        public_out: Option<PathBuf>,
    },
    /// Per partition: committed offset, end offset, lag, chain head, digest state.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Rewind a consumer group (it must be stopped). Replaying is idempotent: records already
    /// in the chain are recognised by offset and not written again.
    Replay {
        /// Group to reset (default: kafka.group_id).
        #[arg(long)]
        group: Option<String>,
        #[arg(long, group = "target")]
        to_earliest: bool,
        /// RFC 3339 time: the first offset at or after it, per partition.
        #[arg(long, group = "target", value_name = "TIME")]
        to_time: Option<String>,
        /// Explicit offsets: `0:100,3:42`.
        #[arg(long, group = "target", value_name = "P:O,...")]
        to_offsets: Option<String>,
        /// Show the plan only.
        #[arg(long)]
        dry_run: bool,
        /// Reset even though the group has live members (they may overwrite it).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Restore the DynamoDB index from the segments in S3 (parallel, idempotent, resumable).
    RebuildIndex {
        /// First day (YYYY-MM-DD, the event's occurred_at date).
        #[arg(long)]
        from: Option<chrono::NaiveDate>,
        /// Last day, inclusive.
        #[arg(long)]
        to: Option<chrono::NaiveDate>,
        #[arg(long)]
        environment: Option<String>,
        /// Segments processed concurrently.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Progress file: finished segments; an interrupted run resumes after them.
        #[arg(long, value_name = "FILE", default_value = "aegis-rebuild-index.checkpoint")]
        checkpoint: PathBuf,
    },
    /// Delete segments older than D days (whole flushes, oldest first, where Object Lock allows).
    Prune {
        /// Up to 100,000 (273 years).
        #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(0..=100_000))]
        older_than: u32,
        /// Flushes checked and deleted per prune-marker write: a lock set meanwhile splits at
        /// most one batch's progress; each write is a version Object Lock may retain.
        #[arg(long, value_name = "FLUSHES", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=10_000))]
        batch_flushes: u16,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print an S3 lifecycle configuration for the trail (for `aws s3api put-bucket-lifecycle-configuration`).
    Lifecycle {
        #[arg(long, default_value_t = 30)]
        standard_ia_after_days: u32,
        /// Days after which segments move to `--archive-class`: at least 30 after STANDARD_IA.
        #[arg(long, default_value_t = 365)]
        glacier_after_days: u32,
        /// GLACIER and DEEP_ARCHIVE need a restore before `verify`, `prove` or `rebuild-index`
        /// can read a segment; GLACIER_IR does not.
        #[arg(long, value_enum, default_value_t = crate::tools::retention::ArchiveClass::Glacier)]
        archive_class: crate::tools::retention::ArchiveClass,
        /// At least `s3.object_lock_retention_days` when Object Lock is on.
        #[arg(long, default_value_t = 1095, conflicts_with = "no_expiration")]
        expire_after_days: u32,
        /// No expiration rule: `prune` does the deleting (it keeps `verify` whole; RUNBOOK).
        #[arg(long)]
        no_expiration: bool,
        /// Delete noncurrent versions after N days: what expiry leaves in a versioned bucket
        /// (so storage is freed), and the originals of overwritten or deleted segments.
        /// Default 30 with expiry, none with --no-expiration.
        #[arg(long, value_name = "DAYS", conflicts_with = "keep_noncurrent")]
        noncurrent_expire_days: Option<u32>,
        /// Keep noncurrent versions for ever (expired segments then still take storage).
        #[arg(long)]
        keep_noncurrent: bool,
    },
    /// Print the Athena CREATE EXTERNAL TABLE statement for the configured bucket and prefix.
    AthenaDdl {
        #[arg(long, default_value = "aegis_audit")]
        database: String,
        #[arg(long, default_value = "decisions")]
        table: String,
        /// First year partition projection covers (events before it are invisible to Athena);
        /// 2000 to 2200, the years an event may have.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(i32).range(2000..=2200))]
        projection_start_year: i32,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the config and print the effective values (secrets redacted).
    Check,
}
