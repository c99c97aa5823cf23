//! The subcommands: each loads the configuration it needs, builds its clients, calls the
//! library and prints. `main.rs` only sets up the process and turns an error into one line.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use aegis_audit::cli::{Cli, Command, ConfigCommand};
use aegis_audit::config::Config;
use aegis_audit::partition::Sinks;
use aegis_audit::sinks::dead_letter::{DeadLetterSink, KafkaDeadLetters};
use aegis_audit::sinks::{dynamodb::DynamoStore, s3::S3Store, ObjectStore};
use aegis_audit::tools::{athena, group, rebuild, retention};
use aegis_audit::verify::{Report, VerifyOptions};
use aegis_audit::{init, metrics, produce, source};

fn load(cli: &Cli) -> anyhow::Result<Config> {
    Ok(Config::load(&cli.config)?)
}

pub async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match &cli.command {
        Command::Config { command: ConfigCommand::Check } => {
            let config = load(&cli)?;
            if let Some(signer) = config.digest.signer()? {
                println!("# digest signing key loaded: key_id {}", signer.key_id);
            }
            println!("# effective configuration ({}; AEGIS_* overrides applied)", cli.config.display());
            print!("{}", config.redacted_toml());
        }
        Command::Init => {
            let config = load(&cli)?;
            for line in init::run(&config).await? {
                println!("{line}");
            }
        }
        Command::Produce { count, rate, partitions, seed } => {
            let config = load(&cli)?;
            let options =
                produce::ProduceOptions { count: *count, rate: *rate, partitions: partitions.clone(), seed: *seed };
            let delivered = produce::run(&config, &options).await?;
            println!(
                "{}",
                serde_json::to_string(&serde_json::json!({ "topic": config.kafka.topic, "partitions": delivered }))?
            );
        }
        Command::Verify {
            topic,
            partition,
            from,
            to,
            pruned_before,
            public_key,
            concurrency,
            against_chain_table,
            json,
        } => {
            let config = load(&cli)?;
            let public_keys = public_key
                .iter()
                .map(|path| {
                    let text =
                        std::fs::read_to_string(path).with_context(|| format!("--public-key {}", path.display()))?;
                    Ok(aegis_audit::digest::parse_public_key(&format!("--public-key {}", path.display()), &text)?)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let topic = topic.clone().unwrap_or_else(|| config.kafka.topic.clone());
            let sdk = aegis_audit::sinks::aws_sdk_config(&config.aws).await;
            // Read before the bucket is listed: a live writer then only adds to what must be there.
            let chain_heads = match against_chain_table {
                true => Some(DynamoStore::new(&sdk, &config.dynamodb).chain_heads(&topic).await?),
                false => None,
            };
            let options = VerifyOptions {
                topic,
                partition: *partition,
                from: *from,
                to: *to,
                pruned_before: *pruned_before,
                public_keys,
                concurrency: *concurrency,
                progress: !json,
                chain_heads,
            };
            let store: Arc<dyn ObjectStore> = Arc::new(S3Store::new(&sdk, &config.s3));
            let report = aegis_audit::verify::verify(store, &config.s3.prefix, &options).await?;
            print_report(&report, *json, &config.s3.bucket)?;
            if !report.ok {
                return Ok(std::process::ExitCode::from(1));
            }
        }
        Command::Prove { decision_id, out } => {
            let config = load(&cli)?;
            let sdk = aegis_audit::sinks::aws_sdk_config(&config.aws).await;
            let dynamo = DynamoStore::new(&sdk, &config.dynamodb);
            let (segment_key, partition, offset) = dynamo.locate_decision(decision_id).await?.ok_or_else(|| {
                anyhow::anyhow!("decision {decision_id}: not in the index table {}", config.dynamodb.table)
            })?;
            let located = aegis_audit::prove::Located { segment_key, partition, offset };
            let store = S3Store::new(&sdk, &config.s3);
            let proof =
                aegis_audit::prove::prove(&store, &config.s3.prefix, &config.kafka.topic, decision_id, &located)
                    .await?;
            let text = serde_json::to_string_pretty(&proof)? + "\n";
            match out {
                Some(path) => std::fs::write(path, text).with_context(|| format!("--out {}", path.display()))?,
                None => print!("{text}"),
            }
        }
        Command::VerifyProof { proof, public_key } => {
            let text = std::fs::read_to_string(proof).with_context(|| format!("{}", proof.display()))?;
            let proof: aegis_audit::prove::Proof =
                serde_json::from_str(&text).with_context(|| format!("{}: not a proof", proof.display()))?;
            let key_text = std::fs::read_to_string(public_key)
                .with_context(|| format!("--public-key {}", public_key.display()))?;
            let key = aegis_audit::digest::parse_public_key("--public-key", &key_text)?;
            match aegis_audit::prove::verify_proof(&proof, &key) {
                Ok(summary) => println!("{summary}"),
                Err(e) => {
                    println!("{e}");
                    return Ok(std::process::ExitCode::from(1));
                }
            }
        }
        Command::Keygen { out, public_out } => {
            let (private, public) = aegis_audit::digest::generate_pem();
            write_private(out, &private).with_context(|| format!("--out {}", out.display()))?;
            if let Some(path) = public_out {
                std::fs::write(path, &public).with_context(|| format!("--public-out {}", path.display()))?;
            }
            print!("{public}");
        }
        Command::Status { json } => {
            let config = load(&cli)?;
            let sdk = aegis_audit::sinks::aws_sdk_config(&config.aws).await;
            let dynamo = DynamoStore::new(&sdk, &config.dynamodb);
            let status = group::status(&config, &dynamo).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", group::render_status(&status));
            }
        }
        Command::Replay { group: group_id, to_earliest, to_time, to_offsets, dry_run, force, json } => {
            let config = load(&cli)?;
            let target = match (to_earliest, to_time, to_offsets) {
                (true, _, _) => group::ReplayTarget::Earliest,
                (_, Some(t), _) => {
                    let at = chrono::DateTime::parse_from_rfc3339(t)
                        .with_context(|| format!("--to-time {t:?}: expected RFC 3339, e.g. 2026-11-23T08:00:00Z"))?;
                    group::ReplayTarget::Time(at.timestamp_millis())
                }
                (_, _, Some(o)) => group::ReplayTarget::Offsets(group::parse_offsets(o)?),
                _ => anyhow::bail!("replay: pass one of --to-earliest, --to-time or --to-offsets"),
            };
            let group_id = group_id.clone().unwrap_or_else(|| config.kafka.group_id.clone());
            let sdk = aegis_audit::sinks::aws_sdk_config(&config.aws).await;
            let dynamo = DynamoStore::new(&sdk, &config.dynamodb);
            let members = group::members(&config, &group_id, &dynamo).await?;
            if !*dry_run {
                group::refuse_live_members(&group_id, &members, *force)?;
            }
            let headless = group::headless_partitions(&config, &dynamo).await?;
            let planning = (config.clone(), group_id.clone());
            let mut plan = tokio::task::spawn_blocking(move || {
                group::plan(&planning.0, &planning.1, &members, &headless, &target)
            })
            .await??;
            if !*dry_run {
                // Planning takes seconds of broker calls: a member that joined meanwhile would
                // commit its flushes over the reset. Asked again just before the commit.
                let members = group::members(&config, &group_id, &dynamo).await?;
                group::refuse_live_members(&group_id, &members, *force)?;
                plan.members = members;
                let config = config.clone();
                plan = tokio::task::spawn_blocking(move || group::apply(&config, &mut plan).map(|()| plan)).await??;
            }
            if *json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", group::render_plan(&plan));
            }
        }
        Command::RebuildIndex { from, to, environment, concurrency, checkpoint } => {
            let config = load(&cli)?;
            let sdk = aegis_audit::sinks::aws_sdk_config(&config.aws).await;
            let objects: Arc<dyn ObjectStore> = Arc::new(S3Store::new(&sdk, &config.s3));
            let index: Arc<dyn aegis_audit::sinks::IndexStore> = Arc::new(DynamoStore::new(&sdk, &config.dynamodb));
            let options = rebuild::RebuildOptions {
                from: *from,
                to: *to,
                environment: environment.clone(),
                concurrency: *concurrency,
                checkpoint: checkpoint.clone(),
                progress: true,
            };
            let report = rebuild::rebuild(&config, objects, index, &options).await?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Prune { older_than, batch_flushes, dry_run, json } => {
            let config = load(&cli)?;
            let sdk = aegis_audit::sinks::aws_sdk_config(&config.aws).await;
            let store = S3Store::new(&sdk, &config.s3);
            let report = retention::prune(
                &store,
                &config.s3.bucket,
                &config.s3.prefix,
                &config.kafka.topic,
                *older_than,
                usize::from(*batch_flushes),
                *dry_run,
            )
            .await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let verb = if report.dry_run { "would delete" } else { "deleted" };
                for key in &report.deleted {
                    println!("{verb} {key}");
                }
                for (key, until) in &report.locked {
                    println!("locked until {until}: {key}");
                }
                for key in &report.unanchored {
                    println!("kept, no entry-hash metadata to anchor a prune marker: {key}");
                }
                println!(
                    "{verb} {} objects dated before {}; {} expired but locked; {} kept. Verify with --pruned-before {}",
                    report.deleted.len(),
                    report.cutoff,
                    report.locked.len(),
                    report.kept_objects,
                    report.cutoff
                );
            }
        }
        Command::Lifecycle {
            standard_ia_after_days,
            glacier_after_days,
            archive_class,
            expire_after_days,
            no_expiration,
            noncurrent_expire_days,
            keep_noncurrent,
        } => {
            let config = load(&cli)?;
            let l = retention::Lifecycle {
                standard_ia_after_days: *standard_ia_after_days,
                archive_after_days: *glacier_after_days,
                archive_class: *archive_class,
                expire_after_days: (!no_expiration).then_some(*expire_after_days),
                // Expiry in a versioned bucket only hides an object; the noncurrent version it
                // leaves is what frees the storage when it expires too.
                noncurrent_expire_days: match (keep_noncurrent, noncurrent_expire_days, no_expiration) {
                    (true, _, _) => None,
                    (false, Some(days), _) => Some(*days),
                    (false, None, false) => Some(retention::DEFAULT_NONCURRENT_EXPIRE_DAYS),
                    (false, None, true) => None,
                },
            };
            l.check(config.s3.object_lock_retention_days).map_err(|why| anyhow::anyhow!("lifecycle: {why}"))?;
            println!("{}", serde_json::to_string_pretty(&retention::lifecycle_json(&config.s3.prefix, l))?);
        }
        Command::AthenaDdl { database, table, projection_start_year } => {
            let config = load(&cli)?;
            print!("{}", athena::ddl(database, table, &config.s3.bucket, &config.s3.prefix, *projection_start_year)?);
        }
        Command::Run { exit_when_idle } => {
            let config = Arc::new(load(&cli)?);
            let idle = exit_when_idle
                .map(|secs| {
                    Duration::try_from_secs_f64(secs).map_err(|_| {
                        anyhow::anyhow!("--exit-when-idle {secs}: expected a number of seconds, 0 or more")
                    })
                })
                .transpose()?;
            let stopped = run_consumer(config, idle).await?;
            if idle.is_some() && !stopped.is_empty() {
                // A backfill's runner must not read success: these partitions' records after
                // their chain heads are not in the trail.
                eprintln!(
                    "error: partition(s) {stopped:?} stopped for good during the run (the log says why; ops/RUNBOOK.md): their records after the chain head are not in the trail"
                );
                return Ok(std::process::ExitCode::from(3));
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn write_private(path: &std::path::Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(pem.as_bytes())
}

fn print_report(report: &Report, json: bool, bucket: &str) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for note in &report.notes {
        println!("note: {note}");
    }
    const SHOWN: usize = 50;
    for problem in report.problems.iter().take(SHOWN) {
        println!("FAIL {problem}");
    }
    if report.problems.len() > SHOWN {
        println!("… and {} more problems (use --json for all)", report.problems.len() - SHOWN);
    }
    let verdict = if report.ok { "OK".to_string() } else { format!("FAILED ({} problems)", report.problems.len()) };
    println!(
        "{verdict}: s3://{bucket}: {} records in {} objects, {} partitions, {} digests ({} segments not yet signed) in {:.2}s, {:.0} records/s",
        report.records,
        report.objects,
        report.partitions,
        report.digests,
        report.unsigned_segments,
        report.seconds,
        report.records_per_second
    );
    Ok(())
}

/// Runs the pipeline; returns the partitions that had stopped for good when it ended.
async fn run_consumer(config: Arc<Config>, exit_when_idle: Option<Duration>) -> anyhow::Result<Vec<i32>> {
    let shutdown = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let handle = metrics::install();
    if !config.metrics.listen.is_empty() {
        let addr = config.metrics.listen.parse().context("metrics.listen")?;
        let server_stop = hard_stop.clone();
        let listener = tokio::spawn(metrics::serve(addr, handle, server_stop));
        tokio::time::sleep(Duration::from_millis(50)).await;
        if listener.is_finished() {
            listener.await?.with_context(|| format!("metrics.listen = {addr}: cannot listen"))?;
        }
    }
    // Before the start-up checks, which may wait out an outage: a SIGTERM ends the wait.
    spawn_signal_handler(shutdown.clone(), hard_stop.clone());
    let sdk = aegis_audit::sinks::aws_sdk_config(&config.aws).await;
    if !aegis_audit::preflight::wait_for_backends(&config, &sdk, &shutdown).await? {
        tracing::info!("stopped while waiting for the start-up checks");
        return Ok(Vec::new());
    }
    let dynamo = Arc::new(DynamoStore::new(&sdk, &config.dynamodb));
    let dead_letters: Option<Arc<dyn DeadLetterSink>> = match &config.kafka.dead_letter_topic {
        Some(topic) => Some(Arc::new(KafkaDeadLetters::new(&config, topic).context("kafka.dead_letter_topic")?)),
        None => None,
    };
    let objects: Arc<dyn ObjectStore> = Arc::new(S3Store::new(&sdk, &config.s3));
    let signer = config.digest.signer()?.map(Arc::new);
    metrics::describe_run(signer.as_ref().map(|_| config.digest.interval_ms as f64 / 1000.0));
    match &signer {
        Some(signer) => {
            // Retried as a flush is: S3 may still be coming back.
            let publish = || aegis_audit::digest::publish_public_key(objects.as_ref(), &config.s3.prefix, signer);
            match aegis_audit::retry::retry(
                "digest public key",
                &config.retry,
                &shutdown,
                metrics::set_backend_up,
                publish,
            )
            .await
            {
                Ok(()) => {}
                Err(aegis_audit::retry::RetryError::Cancelled { .. }) => return Ok(Vec::new()),
                Err(e) => return Err(e).context("publishing the digest public key"),
            }
        }
        None => tracing::warn!(
            "digest.signing_key(_file) not set: segments are hash-chained but no signed digests are written"
        ),
    }
    let index: Option<Arc<dyn aegis_audit::sinks::IndexStore>> = if config.dynamodb.write_index {
        Some(dynamo.clone())
    } else {
        tracing::warn!(
            "dynamodb.write_index = false: the decision index is not written; fill it later with rebuild-index"
        );
        None
    };
    let memory = aegis_audit::budget::MemoryBudget::new(config.segment.memory_budget_bytes);
    let sinks = Sinks { objects, index, heads: dynamo.clone(), dead_letters, signer, memory };
    let member = spawn_heartbeat(dynamo.clone(), config.kafka.group_id.clone(), hard_stop.clone());
    let options = source::RunOptions { exit_when_idle };
    let result = source::run(config.clone(), sinks, options, shutdown, hard_stop.clone()).await;
    hard_stop.cancel();
    if let Err(e) = dynamo.leave(&config.kafka.group_id, &member).await {
        tracing::warn!(error = %e, "could not remove this member's heartbeat (it expires by itself)");
    }
    Ok(result?)
}

/// Every 5 s, tells `replay` and `status` this member is alive (for brokers that cannot
/// describe groups). Failures only log: the pipeline does not depend on it.
fn spawn_heartbeat(dynamo: Arc<DynamoStore>, group: String, stop: CancellationToken) -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let member = format!("{}-{}-{:08x}", host, std::process::id(), rand::random::<u32>());
    let detail = format!("aegis-audit@{host} pid {}", std::process::id());
    let id = member.clone();
    tokio::spawn(async move {
        loop {
            if let Err(e) = dynamo.heartbeat(&group, &id, &detail).await {
                tracing::debug!(error = %e, "member heartbeat failed");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
    member
}

/// First SIGTERM/SIGINT: graceful (flush, commit, leave the group). Second: stop now.
fn spawn_signal_handler(shutdown: CancellationToken, hard_stop: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        for round in 0..2 {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if round == 0 {
                tracing::info!("signal received: finishing the current flush, committing, leaving the group (signal again to stop now)");
                shutdown.cancel();
            } else {
                tracing::warn!("second signal: stopping without flushing buffered records (they will be re-read)");
                hard_stop.cancel();
            }
        }
    });
}
