//! The in-memory hot path of one partition, per record: decode + validate → chain (SHA-256) →
//! Arrow batch → Parquet (ZSTD), on realistic events (`aegis-audit produce`'s generator,
//! ~350-700 bytes). Beside it, the reference bound: what any consumer doing the job must at
//! least spend, parsing the JSON (serde_json) and hashing the bytes (SHA-256).
//!
//! `cargo bench --bench hot_path`; throughput is reported in records/s ("elements") and bytes/s.

use std::hint::black_box;

use aegis_audit::chain::{Chain, EntryStatus};
use aegis_audit::config::{SegmentConfig, ValidationConfig};
use aegis_audit::produce::Generator;
use aegis_audit::segment::{encode_flush, read_segment_for_verify, ChainedRecord, FooterCheck};
use aegis_audit::source::PayloadArena;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sha2::{Digest, Sha256};

/// One flush's worth: large enough for Parquet to amortise its footer like a real segment.
const RECORDS: usize = 20_000;

fn payloads() -> Vec<Vec<u8>> {
    let mut generator = Generator::new(7);
    let now = chrono::Utc::now();
    (0..RECORDS).map(|_| generator.next_event(now).1).collect()
}

fn chain_records(payloads: &[Vec<u8>], validation: &ValidationConfig) -> Vec<ChainedRecord> {
    let mut chain = Chain::new("ai-decisions", 0);
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut arena = PayloadArena::default();
    payloads
        .iter()
        .enumerate()
        .map(|(offset, payload)| {
            // As in the consumer: one copy out of librdkafka's buffer, then no more.
            let payload = arena.copy(payload);
            let outcome = aegis_audit::decode::decode(Some(&payload), Some(now_ms), validation);
            let status = if outcome.is_ok() { EntryStatus::Accepted } else { EntryStatus::Rejected };
            let link = chain.append(offset as i64, status, &payload).expect("ascending offsets");
            ChainedRecord { offset: offset as i64, kafka_timestamp_ms: Some(now_ms), payload, link, outcome }
        })
        .collect()
}

/// The reference bound: what any consumer doing the job must at least spend.
fn reference(payloads: &[Vec<u8>]) {
    for p in payloads {
        let value: serde_json::Value = serde_json::from_slice(p).expect("valid JSON");
        black_box(value);
        black_box(Sha256::digest(p));
    }
}

fn full_path(payloads: &[Vec<u8>], validation: &ValidationConfig, segment: &SegmentConfig) {
    let records = chain_records(payloads, validation);
    black_box(encode_flush("trail", "ai-decisions", 0, &records, segment).expect("encodes"));
}

fn hot_path(c: &mut Criterion) {
    // The allocator as the binary configures it: its thresholds decide which buffers are
    // faulted in afresh at every flush, a large part of the path's cost.
    aegis_audit::budget::tune_allocator();
    let payloads = payloads();
    let bytes: usize = payloads.iter().map(Vec::len).sum();
    let validation = ValidationConfig::default();
    let segment = SegmentConfig::default();

    let mut group = c.benchmark_group("per_record");
    group.sample_size(10);
    group.throughput(Throughput::Elements(RECORDS as u64));

    group.bench_function("reference: serde_json parse + sha256", |b| b.iter(|| reference(&payloads)));
    group.bench_function("decode + validate + chain", |b| b.iter(|| black_box(chain_records(&payloads, &validation))));
    group.bench_function("arrow + parquet encode", |b| {
        b.iter_batched(
            || chain_records(&payloads, &validation),
            |records| black_box(encode_flush("trail", "ai-decisions", 0, &records, &segment).expect("encodes")),
            BatchSize::LargeInput,
        )
    });
    group.bench_function("full hot path: decode + validate + chain + arrow + parquet", |b| {
        b.iter(|| full_path(&payloads, &validation, &segment))
    });
    // The compression trade-off. zstd's fast (negative) levels were measured too: no faster
    // here, and ~480 bytes/record instead of ~310.
    let levels = [1, 3];
    for level in levels.iter().copied().filter(|&l| l != segment.zstd_level) {
        let config = SegmentConfig { zstd_level: level, ..SegmentConfig::default() };
        group.bench_function(format!("full hot path, segment.zstd_level = {level}"), |b| {
            b.iter(|| {
                let records = chain_records(&payloads, &validation);
                black_box(encode_flush("trail", "ai-decisions", 0, &records, &config).expect("encodes"))
            })
        });
    }
    group.finish();
    let records = chain_records(&payloads, &validation);
    for level in levels {
        let config = SegmentConfig { zstd_level: level, ..SegmentConfig::default() };
        let size: usize = encode_flush("trail", "ai-decisions", 0, &records, &config)
            .expect("encodes")
            .iter()
            .map(|s| s.body.len())
            .sum();
        println!(
            "parquet size, zstd level {level}: {:.1} bytes/record ({:.1}% of the payload bytes)",
            size as f64 / RECORDS as f64,
            100.0 * size as f64 / bytes as f64
        );
    }

    interleaved_ratio(&payloads, &validation, &segment);

    let mut group = c.benchmark_group("per_byte");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("full hot path", |b| b.iter(|| full_path(&payloads, &validation, &segment)));
    group.finish();
}

/// The ratio to the reference bound, measured so that machine noise cancels: the two loops
/// alternate, and each keeps its fastest round. On a shared VM, criterion's sequential groups
/// drift by ±25% between one group and the next, which is more than the ratio's own margin.
fn interleaved_ratio(payloads: &[Vec<u8>], validation: &ValidationConfig, segment: &SegmentConfig) {
    // `AEGIS_BENCH_ROUNDS=1` under `valgrind --tool=callgrind`: instruction counts per loop that
    // do not move with the machine's load (ops/bench/README.md).
    let rounds: usize = std::env::var("AEGIS_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(15);
    let time = |f: &dyn Fn()| {
        let start = std::time::Instant::now();
        f();
        start.elapsed().as_secs_f64()
    };
    let (mut best_reference, mut best_full) = (f64::MAX, f64::MAX);
    for _ in 0..rounds {
        best_reference = best_reference.min(time(&|| reference(payloads)));
        best_full = best_full.min(time(&|| full_path(payloads, validation, segment)));
    }
    let rate = |seconds: f64| payloads.len() as f64 / seconds / 1000.0;
    println!(
        "interleaved, best of {rounds}: reference {:.0}k records/s, full hot path {:.0}k records/s, ratio {:.2}x",
        rate(best_reference),
        rate(best_full),
        best_full / best_reference
    );
}

/// What `verify` spends reading a segment back, per record: the chain and derived columns with
/// the footer held against them (`read_segment_for_verify`), and the footer check alone.
fn verify_read(c: &mut Criterion) {
    aegis_audit::budget::tune_allocator();
    let payloads = payloads();
    let records = chain_records(&payloads, &ValidationConfig::default());
    let segments = encode_flush("trail", "ai-decisions", 0, &records, &SegmentConfig::default()).expect("encodes");
    let mut group = c.benchmark_group("verify_read");
    group.sample_size(10);
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.bench_function("read_segment_for_verify", |b| {
        b.iter(|| {
            for segment in &segments {
                black_box(read_segment_for_verify(segment.body.clone()).expect("reads"));
            }
        })
    });
    // The same columns decoded, then only the footer check over them.
    let decoded: Vec<_> = segments
        .iter()
        .map(|segment| {
            let reader = ParquetRecordBatchReaderBuilder::try_new(segment.body.clone()).expect("opens");
            let (footer, schema) = (reader.metadata().clone(), reader.schema().clone());
            let batches: Vec<_> = reader.build().expect("reads").map(|b| b.expect("decodes")).collect();
            (footer, schema, batches)
        })
        .collect();
    group.bench_function("footer check alone", |b| {
        b.iter(|| {
            for (footer, schema, batches) in &decoded {
                let mut check = FooterCheck::new(footer, schema);
                batches.iter().for_each(|batch| check.check_batch(batch));
                black_box(check.finish());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, hot_path, verify_read);
criterion_main!(benches);
