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
        #[arg(long)]
        rate: Option<u64>,
        /// Produce only to these partitions, round robin (e.g. `0,2`); default: keyed by session.
        #[arg(long, value_delimiter = ',')]
        partitions: Option<Vec<i32>>,
        /// Random seed for the generator.
        #[arg(long, default_value_t = 1)]
        seed: u64,
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
