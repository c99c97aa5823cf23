//! aegis-audit: a Kafka topic of AI decision events becomes a tamper-evident, queryable audit
//! trail. The modules follow the data:
//!
//! source (Kafka) → decode (validate) → chain (SHA-256) → segment (Arrow/Parquet)
//! → sinks (S3, DynamoDB) → commit (Kafka offsets),
//!
//! with `partition` holding one partition's ordered writer and flush protocol, and the operator
//! commands (`init`, `produce`) beside them.

pub mod budget;
pub mod chain;
pub mod cli;
pub mod commit;
pub mod config;
pub mod decode;
pub mod digest;
pub mod index;
pub mod init;
pub mod merkle;
pub mod metrics;
pub mod partition;
pub mod preflight;
pub mod produce;
pub mod prove;
pub mod retry;
pub mod segment;
pub mod sinks;
pub mod source;
pub mod tools;
pub mod verify;
