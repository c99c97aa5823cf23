//! `aegis-audit init`: create the topic(s), the bucket and the two DynamoDB tables, idempotently.
//! The table definitions match `schemas/dynamodb-*.json` (a unit test holds them together).

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection, ProjectionType,
    ScalarAttributeType, TableStatus,
};
use aws_sdk_s3::types::{
    BucketLocationConstraint, BucketVersioningStatus, CreateBucketConfiguration, ObjectLockConfiguration,
    ObjectLockEnabled, VersioningConfiguration,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Config;
use crate::index::{GSI1, GSI2};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("kafka: creating topic {topic}: {message}")]
    Topic { topic: String, message: String },
    #[error("s3: bucket {bucket}: {message}")]
    Bucket { bucket: String, message: String },
    #[error("dynamodb: table {table}: {message}")]
    Table { table: String, message: String },
}

/// What `init` found or did, one line per resource.
pub type Report = Vec<String>;

pub async fn run(config: &Config) -> Result<Report, InitError> {
    let mut report = Vec::new();
    create_topics(config, &mut report).await?;
    let sdk = crate::sinks::aws_sdk_config(&config.aws).await;
    create_bucket(&crate::sinks::s3::client(&sdk, &config.s3), config, &mut report).await?;
    let ddb = crate::sinks::dynamodb::client(&sdk, &config.dynamodb);
    create_table(&ddb, &config.dynamodb.table, index_table_shape(), &mut report).await?;
    create_table(&ddb, &config.dynamodb.chain_table, chain_table_shape(), &mut report).await?;
    Ok(report)
}

async fn create_topics(config: &Config, report: &mut Report) -> Result<(), InitError> {
    let cc = crate::source::client_config(config, []);
    let admin: AdminClient<DefaultClientContext> =
        cc.create().map_err(|e| InitError::Topic { topic: config.kafka.topic.clone(), message: e.to_string() })?;
    let mut topics = vec![config.kafka.topic.as_str()];
    topics.extend(config.kafka.dead_letter_topic.as_deref());
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, config.kafka.partitions, TopicReplication::Fixed(config.kafka.replication_factor)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&new, &options).await.map_err(|e| InitError::Topic {
        topic: topics.join(","),
        message: format!("{e} (is kafka.brokers = {:?} reachable?)", config.kafka.brokers),
    })?;
    for result in results {
        match result {
            Ok(topic) => report.push(format!("topic {topic}: created with {} partitions", config.kafka.partitions)),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => report.push(format!("topic {topic}: exists")),
            Err((topic, code)) => {
                let message = format!(
                    "{code} (kafka.partitions = {}, kafka.replication_factor = {})",
                    config.kafka.partitions, config.kafka.replication_factor
                );
                return Err(InitError::Topic { topic, message });
            }
        }
    }
    Ok(())
}

async fn create_bucket(s3: &aws_sdk_s3::Client, config: &Config, report: &mut Report) -> Result<(), InitError> {
    let bucket = &config.s3.bucket;
    let err = |message: String| InitError::Bucket { bucket: bucket.clone(), message };
    let lock = config.s3.object_lock_retention_days.is_some();
    let mut request = s3.create_bucket().bucket(bucket).object_lock_enabled_for_bucket(lock);
    let region = s3.config().region().map(|r| r.as_ref().to_string()).unwrap_or_default();
    if !region.is_empty() && region != "us-east-1" {
        let location = CreateBucketConfiguration::builder()
            .location_constraint(BucketLocationConstraint::from(region.as_str()))
            .build();
        request = request.create_bucket_configuration(location);
    }
    // us-east-1 answers 200 to re-creating a bucket you own, so ask first.
    let exists = s3.head_bucket().bucket(bucket).send().await.is_ok();
    match if exists { Ok(None) } else { request.send().await.map(Some) } {
        Ok(None) => report.push(format!("bucket {bucket}: exists")),
        Ok(Some(_)) => report.push(format!("bucket {bucket}: created{}", if lock { " with Object Lock" } else { "" })),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_bucket_already_owned_by_you()) => {
            report.push(format!("bucket {bucket}: exists"))
        }
        Err(e) => return Err(err(aws_smithy_types::error::display::DisplayErrorContext(&e).to_string())),
    }
    let versioning = VersioningConfiguration::builder().status(BucketVersioningStatus::Enabled).build();
    s3.put_bucket_versioning()
        .bucket(bucket)
        .versioning_configuration(versioning)
        .send()
        .await
        .map_err(|e| err(aws_smithy_types::error::display::DisplayErrorContext(&e).to_string()))?;
    if lock {
        let enabled = crate::sinks::s3::object_lock_enabled(s3, bucket).await;
        if !enabled {
            // S3 allows enabling Object Lock on an existing versioned bucket.
            let cfg = ObjectLockConfiguration::builder().object_lock_enabled(ObjectLockEnabled::Enabled).build();
            s3.put_object_lock_configuration().bucket(bucket).object_lock_configuration(cfg).send().await.map_err(
                |e| {
                    err(format!(
                        "s3.object_lock_retention_days is set but Object Lock cannot be enabled: {}",
                        aws_smithy_types::error::display::DisplayErrorContext(&e)
                    ))
                },
            )?;
        }
        report.push(format!(
            "bucket {bucket}: Object Lock enabled (compliance retention {} days per object)",
            config.s3.object_lock_retention_days.unwrap_or_default()
        ));
    }
    Ok(())
}

/// Key attributes and GSIs of a table: `(attributes, key schema, GSIs as (name, hash, range))`.
pub struct TableShape {
    pub attributes: Vec<&'static str>,
    pub hash_key: &'static str,
    pub range_key: Option<&'static str>,
    pub gsis: Vec<(&'static str, &'static str, &'static str)>,
}

pub fn index_table_shape() -> TableShape {
    TableShape {
        attributes: vec!["PK", "SK", "GSI1PK", "GSI1SK", "GSI2PK", "GSI2SK"],
        hash_key: "PK",
        range_key: Some("SK"),
        gsis: vec![(GSI1, "GSI1PK", "GSI1SK"), (GSI2, "GSI2PK", "GSI2SK")],
    }
}

pub fn chain_table_shape() -> TableShape {
    TableShape { attributes: vec!["PK"], hash_key: "PK", range_key: None, gsis: vec![] }
}

fn key_schema(hash: &str, range: Option<&str>) -> Vec<KeySchemaElement> {
    let mut keys =
        vec![KeySchemaElement::builder().attribute_name(hash).key_type(KeyType::Hash).build().expect("complete")];
    if let Some(range) = range {
        keys.push(
            KeySchemaElement::builder().attribute_name(range).key_type(KeyType::Range).build().expect("complete"),
        );
    }
    keys
}

async fn create_table(
    ddb: &aws_sdk_dynamodb::Client,
    table: &str,
    shape: TableShape,
    report: &mut Report,
) -> Result<(), InitError> {
    let err = |message: String| InitError::Table { table: table.to_string(), message };
    let mut request = ddb
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .set_key_schema(Some(key_schema(shape.hash_key, shape.range_key)));
    for attribute in &shape.attributes {
        request = request.attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(*attribute)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("complete"),
        );
    }
    for (name, hash, range) in &shape.gsis {
        request = request.global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name(*name)
                .set_key_schema(Some(key_schema(hash, Some(range))))
                .projection(Projection::builder().projection_type(ProjectionType::All).build())
                .build()
                .expect("complete"),
        );
    }
    match request.send().await {
        Ok(_) => report.push(format!("table {table}: created")),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_in_use_exception()) => {
            report.push(format!("table {table}: exists"))
        }
        Err(e) => return Err(err(aws_smithy_types::error::display::DisplayErrorContext(&e).to_string())),
    }
    for _ in 0..120 {
        let out = ddb
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| err(aws_smithy_types::error::display::DisplayErrorContext(&e).to_string()))?;
        if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(err("did not become ACTIVE within 60 s".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str, shape: TableShape) {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let attrs: Vec<&str> = v["AttributeDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["AttributeName"].as_str().unwrap())
            .collect();
        assert_eq!(attrs, shape.attributes);
        assert_eq!(v["KeySchema"][0]["AttributeName"], shape.hash_key);
        assert_eq!(v["KeySchema"].get(1).and_then(|k| k["AttributeName"].as_str()), shape.range_key);
        let gsis: Vec<(String, String, String)> = v["GlobalSecondaryIndexes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|g| {
                        let k = |i: usize| g["KeySchema"][i]["AttributeName"].as_str().unwrap().to_string();
                        (g["IndexName"].as_str().unwrap().to_string(), k(0), k(1))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let want: Vec<(String, String, String)> =
            shape.gsis.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect();
        assert_eq!(gsis, want);
        assert_eq!(v["BillingMode"], "PAY_PER_REQUEST");
    }

    #[test]
    fn schema_files_match_what_init_creates() {
        check(include_str!("../schemas/dynamodb-index-table.json"), index_table_shape());
        check(include_str!("../schemas/dynamodb-chain-table.json"), chain_table_shape());
    }
}
