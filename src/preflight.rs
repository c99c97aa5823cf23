//! Start-up checks for `run`: every resource the pipeline writes to exists and is reachable,
//! before the consumer joins the group. A failure is one line naming the config key or the
//! resource and what to do, instead of a partition stalling later.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("{key}: {message}")]
    Resource { key: &'static str, message: String },
}

fn fail(key: &'static str, message: impl Into<String>) -> PreflightError {
    PreflightError::Resource { key, message: message.into() }
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
            fail("s3.endpoint_url", format!("bucket {bucket:?} at {endpoint}: {}", describe(&e)))
        });
    }
    if let Some(days) = config.s3.object_lock_retention_days {
        let enabled = crate::sinks::s3::object_lock_enabled(&s3, bucket).await;
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
                fail("dynamodb.endpoint_url", format!("table {table:?} at {endpoint}: {}", describe(&e)))
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
            .map_err(|e| fail("kafka.brokers", format!("cannot reach {brokers}: {e}")))?;
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
