//! Operator tools beside the pipeline: group status and replay, index rebuild, retention,
//! Athena DDL. (`verify` and `prove` live in `crate::verify` and `crate::prove`.)

pub mod athena;
pub mod group;
pub mod rebuild;
pub mod retention;
