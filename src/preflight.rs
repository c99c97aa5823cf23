//! Start-up checks for `run`: every resource the pipeline writes to exists and is reachable,
//! before the consumer joins the group. A failure is one line naming the config key or the
//! resource and what to do, instead of a partition stalling later.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;

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

/// `key: {resource} at {endpoint}: {what went wrong}`, as [`fail`], but retryable when the SDK
/// error is one an outage gives: no connection or a timeout, throttling, a 5xx (the sinks'
/// rule). A request that could not be sent for another reason (an endpoint or identity that
/// does not resolve) is not.
fn sdk_failure<E>(
    key: &'static str,
    backend: &'static str,
    operation: &'static str,
    target: &str,
    resource: String,
    e: &aws_smithy_runtime_api::client::result::SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> PreflightError
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_smithy_runtime_api::client::result::SdkError;
    let outage = match e {
        SdkError::DispatchFailure(d) => {
            d.is_io() || d.is_timeout() || d.as_other() == Some(aws_smithy_types::retry::ErrorKind::TransientError)
        }
        _ => crate::sinks::classify_sdk_error(backend, operation, target, e).is_retryable(),
    };
    let message = format!("{resource}: {}", describe(e));
    if outage {
        PreflightError::Unreachable { key, message }
    } else {
        fail(key, message)
    }
}

/// The credentials every AWS call signs with, resolved once: missing or invalid ones are a
/// configuration error (exit), not an outage; a provider that times out or fails (IMDS, STS)
/// is waited for, with its own words in `/readyz`.
async fn check_credentials(sdk: &aws_config::SdkConfig) -> Result<(), PreflightError> {
    use aws_credential_types::provider::error::CredentialsError;
    use aws_credential_types::provider::ProvideCredentials;
    const KEY: &str = "aws.access_key_id";
    let Some(provider) = sdk.credentials_provider() else {
        return Err(fail(KEY, "no AWS credentials provider is configured"));
    };
    match provider.provide_credentials().await {
        Ok(_) => Ok(()),
        Err(e) => {
            let message = format!(
                "AWS credentials: {} (the default chain: environment, web identity/IRSA, profile, instance metadata)",
                aws_smithy_types::error::display::DisplayErrorContext(&e)
            );
            match e {
                CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_) => {
                    Err(fail(KEY, message))
                }
                _ => Err(PreflightError::Unreachable { key: KEY, message }),
            }
        }
    }
}

fn describe<E: std::error::Error + 'static>(
    e: &aws_smithy_runtime_api::client::result::SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> String {
    use aws_smithy_runtime_api::client::result::SdkError;
    let detail = aws_smithy_types::error::display::DisplayErrorContext(e);
    match e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
            format!("cannot connect (is the endpoint right and up?): {detail}")
        }
        // S3 answers a request for a bucket of another region with a bodiless 301.
        SdkError::ServiceError(service) if service.raw().status().as_u16() == 301 => {
            let region = service.raw().headers().get("x-amz-bucket-region").unwrap_or("another region");
            format!("the bucket is in {region}: set aws.region (or AWS_REGION) to it")
        }
        _ => detail.to_string(),
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
    // `aegis_backend_up` is 0 while a start-up check waits, as during any other outage.
    let recovered = |attempt: u32| {
        if attempt > 0 {
            crate::metrics::set_backend_up(true);
        }
        crate::metrics::set_start_up_wait(None);
    };
    loop {
        // A check can take a minute against a hung backend: a SIGTERM does not wait for it.
        let checked = tokio::select! {
            _ = cancel.cancelled() => None,
            checked = check(config, sdk) => Some(checked),
        };
        let Some(checked) = checked.filter(|_| !cancel.is_cancelled()) else {
            recovered(attempt);
            return Ok(false);
        };
        match checked {
            Ok(()) => {
                if attempt > 0 {
                    tracing::info!(attempts = attempt + 1, "start-up checks passed");
                }
                recovered(attempt);
                return Ok(true);
            }
            Err(e) if e.is_retryable() => {
                attempt += 1;
                if attempt == 1 {
                    crate::metrics::set_backend_up(false);
                }
                crate::metrics::set_start_up_wait(Some(e.to_string()));
                if attempt == 1 || attempt % 10 == 0 {
                    tracing::warn!(attempt, error = %e, "start-up check: a backend does not answer; retrying with backoff");
                }
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(crate::retry::backoff(&config.retry, attempt)) => {}
                }
            }
            Err(e) => {
                recovered(attempt);
                return Err(e);
            }
        }
    }
}

pub async fn check(config: &Config, sdk: &aws_config::SdkConfig) -> Result<(), PreflightError> {
    check_kafka(config).await?;
    check_credentials(sdk).await?;
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
            sdk_failure("s3.endpoint_url", "s3", "HeadBucket", bucket, format!("bucket {bucket:?} at {endpoint}"), &e)
        });
    }
    if let Some(days) = config.s3.object_lock_retention_days {
        let enabled = crate::sinks::s3::object_lock_state(&s3, bucket).await.map_err(|e| {
            let resource = format!("bucket {bucket:?} at {endpoint}");
            sdk_failure("s3.object_lock_retention_days", "s3", "GetObjectLockConfiguration", bucket, resource, &e)
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
                let resource = format!("table {table:?} at {endpoint}");
                sdk_failure("dynamodb.endpoint_url", "dynamodb", "DescribeTable", table, resource, &e)
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
        for (key, topic) in [("kafka.topic", topics.first()), ("kafka.dead_letter_topic", topics.get(1))] {
            let Some(topic) = topic else { continue };
            // By name: a request for all topics leaves out those the principal may not describe,
            // so a forbidden topic would read as a missing one. (A consumer never creates one.)
            let metadata = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                // Brokers down or unreachable: as likely an outage as a wrong address.
                .map_err(|e| PreflightError::Unreachable {
                    key: "kafka.brokers",
                    message: format!("cannot reach {brokers}: {e}"),
                })?;
            let listed = metadata.topics().iter().find(|t| t.name() == topic);
            let state = listed.map(|t| (t.error().map(RDKafkaErrorCode::from), t.partitions().len()));
            if let Some(problem) = topic_problem(key, topic, &brokers, state) {
                return Err(problem);
            }
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|e| Err(fail("kafka.brokers", e.to_string())))
}

/// What the brokers' metadata says of a topic the service needs (`state`: the topic's error and
/// partition count, `None` when it is not listed). A missing or forbidden topic is an error to
/// fix; one whose leader is being elected (a broker or controller coming back) is waited for.
fn topic_problem(
    key: &'static str,
    topic: &str,
    brokers: &str,
    state: Option<(Option<RDKafkaErrorCode>, usize)>,
) -> Option<PreflightError> {
    let missing =
        || fail(key, format!("topic {topic:?} does not exist on {brokers}; create it with `aegis-audit init`"));
    match state {
        None | Some((Some(RDKafkaErrorCode::UnknownTopicOrPartition), _)) => Some(missing()),
        Some((Some(RDKafkaErrorCode::TopicAuthorizationFailed), _)) => Some(fail(
            key,
            format!(
                "topic {topic:?} on {brokers}: not authorized (grant the consumer's principal DESCRIBE and READ on it)"
            ),
        )),
        Some((Some(code), _)) => Some(PreflightError::Unreachable {
            key,
            message: format!("topic {topic:?} on {brokers}: {code} (the cluster is recovering?)"),
        }),
        Some((None, 0)) => Some(missing()),
        Some((None, _)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_forbidden_topic_exits_and_a_leaderless_one_is_waited_for() {
        let judge = |state| topic_problem("kafka.topic", "t", "b:9092", state);
        assert!(judge(Some((None, 4))).is_none());
        for state in [None, Some((Some(RDKafkaErrorCode::UnknownTopicOrPartition), 0)), Some((None, 0))] {
            let e = judge(state).unwrap();
            assert!(!e.is_retryable() && e.to_string().contains("does not exist"), "{e}");
        }
        let forbidden = judge(Some((Some(RDKafkaErrorCode::TopicAuthorizationFailed), 0))).unwrap();
        assert!(!forbidden.is_retryable() && forbidden.to_string().contains("not authorized"), "{forbidden}");
        let recovering = judge(Some((Some(RDKafkaErrorCode::LeaderNotAvailable), 4))).unwrap();
        assert!(recovering.is_retryable() && recovering.to_string().starts_with("kafka.topic: "), "{recovering}");
    }
}
