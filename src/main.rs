use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use aegis_audit::cli::{Cli, Command, ConfigCommand, LogFormat};
use aegis_audit::config::Config;
use aegis_audit::partition::Sinks;
use aegis_audit::sinks::dead_letter::{DeadLetterSink, KafkaDeadLetters};
use aegis_audit::sinks::{dynamodb::DynamoStore, s3::S3Store, ObjectStore};
use aegis_audit::{init, metrics, produce, source};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line an operator can act on: what failed and why, outermost first.
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            std::process::ExitCode::from(2)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,rdkafka=warn,aws=warn".into());
    use std::io::IsTerminal;
    // Colour only on a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    Ok(Config::load(&cli.config)?)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Config { command: ConfigCommand::Check } => {
            let config = load(&cli)?;
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
        Command::Run { exit_when_idle } => {
            let config = Arc::new(load(&cli)?);
            run_consumer(config, exit_when_idle.map(Duration::from_secs_f64)).await?;
        }
    }
    Ok(())
}

async fn run_consumer(config: Arc<Config>, exit_when_idle: Option<Duration>) -> anyhow::Result<()> {
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
    let sdk = aegis_audit::sinks::aws_sdk_config(&config.aws).await;
    aegis_audit::preflight::check(&config, &sdk).await?;
    let dynamo = Arc::new(DynamoStore::new(&sdk, &config.dynamodb));
    let dead_letters: Option<Arc<dyn DeadLetterSink>> = match &config.kafka.dead_letter_topic {
        Some(topic) => Some(Arc::new(KafkaDeadLetters::new(&config, topic).context("kafka.dead_letter_topic")?)),
        None => None,
    };
    let objects: Arc<dyn ObjectStore> = Arc::new(S3Store::new(&sdk, &config.s3));
    let signer = config.digest.signer()?.map(Arc::new);
    match &signer {
        Some(signer) => aegis_audit::digest::publish_public_key(objects.as_ref(), &config.s3.prefix, signer)
            .await
            .context("publishing the digest public key")?,
        None => tracing::warn!(
            "digest.signing_key(_file) not set: segments are hash-chained but no signed digests are written"
        ),
    }
    let sinks = Sinks { objects, index: dynamo.clone(), heads: dynamo, dead_letters, signer };
    spawn_signal_handler(shutdown.clone(), hard_stop.clone());
    let options = source::RunOptions { exit_when_idle };
    source::run(config, sinks, options, shutdown, hard_stop.clone()).await?;
    hard_stop.cancel();
    Ok(())
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
