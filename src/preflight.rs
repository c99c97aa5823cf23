//! Start-up checks for `run`: every resource the pipeline writes to exists and is reachable,
//! before the consumer joins the group. A failure is one line naming the config key or the
//! resource and what to do, instead of a partition stalling later.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// Missing, refused or misconfigured: no wait changes it.
    #[error("{key}: {message}")]
    Resource { key: &'static str, message: String },
    /// The backend did not answer, or answered "try again" (down, timing out, throttling, 5xx):
    /// `run` waits and checks again instead of exiting into a crash loop.
    #[error("{key}: {message}")]
    Unreachable { key: &'static str, message: String },
}

impl PreflightError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, PreflightError::Unreachable { .. })
    }
}

fn fail(key: &'static str, message: impl Into<String>) -> PreflightError {
    PreflightError::Resource { key, message: message.into() }
}

/// `key: message`, as [`fail`], but retryable when the SDK error is (by the sinks' rule).
fn sdk_failure<E>(
    key: &'static str,
    backend: &'static str,
    operation: &'static str,
    target: &str,
    message: String,
    e: &aws_smithy_runtime_api::client::result::SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> PreflightError
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
{
    if crate::sinks::classify_sdk_error(backend, operation, target, e).is_retryable() {
        PreflightError::Unreachable { key, message }
    } else {
        fail(key, message)
    }
}

fn describe<E: std::error::Error + 'static, R: std::fmt::Debug>(
    e: &aws_smithy_runtime_api::client::result::SdkError<E, R>,
) -> String {
    use aws_smithy_runtime_api::client::result::SdkError;
    match e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
            "cannot connect (is the endpoint right and up?)".to_string()
        }
        _ => aws_smithy_types::error::display::DisplayErrorContext(e).to_string(),
    }
}

/// Runs [`check`] until it passes, fails for good, or `cancel` fires (`Ok(false)`). While a
/// backend does not answer, the process stays up (`/healthz` 200) and not ready (`/readyz` 503,
/// naming the check): a pod restarted during an outage waits for it to end, instead of exiting
/// into a crash loop and a back-off that outlasts the outage.
pub async fn wait_for_backends(
    config: &Config,
    sdk: &aws_config::SdkConfig,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<bool, PreflightError> {
    let mut attempt = 0u32;
    loop {
        match check(config, sdk).await {
            Ok(()) => {
                if attempt > 0 {
                    tracing::info!(attempts = attempt + 1, "start-up checks passed");
                }
                crate::metrics::set_start_up_wait(None);
                return Ok(true);
            }
            Err(e) if e.is_retryable() => {
                attempt += 1;
                crate::metrics::set_start_up_wait(Some(e.to_string()));
                if attempt == 1 || attempt % 10 == 0 {
                    tracing::warn!(attempt, error = %e, "start-up check: a backend does not answer; retrying with backoff");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(crate::retry::backoff(&config.retry, attempt)) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

pub async fn check(config: &Config, sdk: &aws_config::SdkConfig) -> Result<(), PreflightError> {
    check_kafka(config).await?;
    let s3 = crate::sinks::s3::client(sdk, &config.s3);
    let bucket = &config.s3.bucket;
    let endpoint = config.s3.endpoint_url.as_deref().unwrap_or("AWS");
    if let Err(e) = s3.head_bucket().bucket(bucket).send().await {
        let not_found = e.as_service_error().is_some_and(|s| s.is_not_found());
        return Err(if not_found {
            fail(
                "s3.bucket",
                format!("bucket {bucket:?} does not exist at {endpoint}; create it with `aegis-audit init`"),
            )
        } else {
            let message = format!("bucket {bucket:?} at {endpoint}: {}", describe(&e));
            sdk_failure("s3.endpoint_url", "s3", "HeadBucket", bucket, message, &e)
        });
    }
    if let Some(days) = config.s3.object_lock_retention_days {
        let enabled = crate::sinks::s3::object_lock_state(&s3, bucket).await.map_err(|e| {
            let message = format!("bucket {bucket:?} at {endpoint}: {}", describe(&e));
            sdk_failure("s3.object_lock_retention_days", "s3", "GetObjectLockConfiguration", bucket, message, &e)
        })?;
        if !enabled {
            return Err(fail(
                "s3.object_lock_retention_days",
                format!("is {days} but bucket {bucket:?} has no Object Lock; enable it (`aegis-audit init` does) or remove the key"),
            ));
        }
    }
    let ddb = crate::sinks::dynamodb::client(sdk, &config.dynamodb);
    for (key, table) in
        [("dynamodb.table", &config.dynamodb.table), ("dynamodb.chain_table", &config.dynamodb.chain_table)]
    {
        if let Err(e) = ddb.describe_table().table_name(table).send().await {
            let missing = e.as_service_error().is_some_and(|s| s.is_resource_not_found_exception());
            let endpoint = config.dynamodb.endpoint_url.as_deref().unwrap_or("AWS");
            return Err(if missing {
                fail(key, format!("table {table:?} does not exist at {endpoint}; create it with `aegis-audit init`"))
            } else {
                let message = format!("table {table:?} at {endpoint}: {}", describe(&e));
                sdk_failure("dynamodb.endpoint_url", "dynamodb", "DescribeTable", table, message, &e)
            });
        }
    }
    Ok(())
}

async fn check_kafka(config: &Config) -> Result<(), PreflightError> {
    let cc = crate::source::consumer_config(config);
    let topics: Vec<String> =
        std::iter::once(config.kafka.topic.clone()).chain(config.kafka.dead_letter_topic.clone()).collect();
    let brokers = config.kafka.brokers.clone();
    // Metadata requests block; keep them off the runtime threads.
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = cc.create().map_err(|e| fail("kafka.properties", e.to_string()))?;
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            // Brokers down or unreachable: as likely an outage as a wrong address.
            .map_err(|e| PreflightError::Unreachable {
                key: "kafka.brokers",
                message: format!("cannot reach {brokers}: {e}"),
            })?;
        for (key, topic) in [("kafka.topic", topics.first()), ("kafka.dead_letter_topic", topics.get(1))] {
            let Some(topic) = topic else { continue };
            let found = metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
            if !found {
                return Err(fail(
                    key,
                    format!("topic {topic:?} does not exist on {brokers}; create it with `aegis-audit init`"),
                ));
            }
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|e| Err(fail("kafka.brokers", e.to_string())))
}
