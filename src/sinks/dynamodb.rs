//! [`IndexStore`] and [`HeadStore`] on DynamoDB (or DynamoDB Local / moto through
//! `dynamodb.endpoint_url`).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, ReturnValuesOnConditionCheckFailure, WriteRequest};
use futures::stream::{self, TryStreamExt};

use super::DigestPos;
use super::{
    classify_sdk_error, Attr, ChainHead, Guard, Guarded, HeadPos, HeadStore, IndexItem, IndexStore, PendingFlush,
    SinkError,
};
use crate::chain::{parse_hash, Hash};
use crate::config::DynamoConfig;
use crate::digest::SegmentEntry;

const BACKEND: &str = "dynamodb";
/// BatchWriteItem's hard limit.
const BATCH: usize = 25;
/// Attempts at draining UnprocessedItems before handing a transient error to the caller's retry.
const UNPROCESSED_ATTEMPTS: u32 = 8;

/// The chain table's key of a partition's head item (`schemas/dynamodb-layout.md`).
pub fn chain_head_pk(topic: &str, partition: i32) -> String {
    format!("{}{partition}", chain_head_pk_prefix(topic))
}

/// What every head item of `topic` starts its key with.
fn chain_head_pk_prefix(topic: &str) -> String {
    format!("CHAIN#{topic}#")
}

#[derive(Clone)]
pub struct DynamoStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
    chain_table: String,
    concurrency: usize,
}

pub fn client(sdk: &aws_config::SdkConfig, config: &DynamoConfig) -> aws_sdk_dynamodb::Client {
    let mut builder = aws_sdk_dynamodb::config::Builder::from(sdk);
    if let Some(url) = &config.endpoint_url {
        builder = builder.endpoint_url(url);
    }
    aws_sdk_dynamodb::Client::from_conf(builder.build())
}

impl DynamoStore {
    pub fn new(sdk: &aws_config::SdkConfig, config: &DynamoConfig) -> Self {
        Self {
            client: client(sdk, config),
            table: config.table.clone(),
            chain_table: config.chain_table.clone(),
            concurrency: config.write_concurrency,
        }
    }

    pub fn client(&self) -> &aws_sdk_dynamodb::Client {
        &self.client
    }

    async fn write_batch(&self, batch: Vec<WriteRequest>) -> Result<(), SinkError> {
        let mut pending = batch;
        let mut delay = Duration::from_millis(50);
        for _ in 0..UNPROCESSED_ATTEMPTS {
            let out = self
                .client
                .batch_write_item()
                .request_items(&self.table, pending)
                .send()
                .await
                .map_err(|e| classify_sdk_error(BACKEND, "BatchWriteItem", &self.table, &e))?;
            pending = out.unprocessed_items.unwrap_or_default().remove(&self.table).unwrap_or_default();
            if pending.is_empty() {
                return Ok(());
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        Err(SinkError::Transient {
            backend: BACKEND,
            operation: "BatchWriteItem",
            target: self.table.clone(),
            message: format!(
                "{} items still unprocessed after {UNPROCESSED_ATTEMPTS} attempts (throttled)",
                pending.len()
            ),
        })
    }

    fn head_key(topic: &str, partition: i32) -> HashMap<String, AttributeValue> {
        HashMap::from([("PK".to_string(), AttributeValue::S(chain_head_pk(topic, partition)))])
    }

    fn fence_lost(&self, topic: &str, partition: i32, what: &str, found: ChainHead) -> SinkError {
        SinkError::FenceLost {
            topic: topic.to_string(),
            partition,
            detail: format!("{what}; stored head is {}", describe(&found)),
        }
    }
}

fn describe(head: &ChainHead) -> String {
    let committed = head
        .committed
        .map(|c| format!("offset {} hash {}", c.last_offset, hex::encode(c.last_hash)))
        .unwrap_or_else(|| "empty".into());
    match head.pending {
        Some(p) => format!("{committed}, pending {}..={}", p.first_offset, p.last_offset),
        None => committed,
    }
}

fn to_attribute(attr: &Attr) -> AttributeValue {
    match attr {
        Attr::S(s) => AttributeValue::S(s.clone()),
        Attr::N(n) => AttributeValue::N(n.clone()),
        Attr::Bool(b) => AttributeValue::Bool(*b),
    }
}

fn to_map(item: &IndexItem) -> HashMap<String, AttributeValue> {
    let mut map: HashMap<String, AttributeValue> =
        item.attrs.iter().map(|(k, v)| (k.clone(), to_attribute(v))).collect();
    map.insert("PK".into(), AttributeValue::S(item.pk.clone()));
    map.insert("SK".into(), AttributeValue::S(item.sk.clone()));
    map
}

/// The stored item back as an [`IndexItem`] (we only ever write S, N and BOOL).
fn from_map(mut map: HashMap<String, AttributeValue>) -> Option<IndexItem> {
    let pk = map.remove("PK")?.as_s().ok()?.clone();
    let sk = map.remove("SK")?.as_s().ok()?.clone();
    let attrs = map
        .into_iter()
        .filter_map(|(k, v)| {
            let attr = match v {
                AttributeValue::S(s) => Attr::S(s),
                AttributeValue::N(n) => Attr::N(n),
                AttributeValue::Bool(b) => Attr::Bool(b),
                _ => return None,
            };
            Some((k, attr))
        })
        .collect();
    Some(IndexItem { pk, sk, attrs })
}

fn to_write_request(item: &IndexItem) -> WriteRequest {
    let put = PutRequest::builder().set_item(Some(to_map(item))).build().expect("item is set");
    WriteRequest::builder().put_request(put).build()
}

fn item_key(pk: &str, sk: &str) -> HashMap<String, AttributeValue> {
    HashMap::from([("PK".into(), AttributeValue::S(pk.into())), ("SK".into(), AttributeValue::S(sk.into()))])
}

#[async_trait]
impl IndexStore for DynamoStore {
    async fn write(&self, items: Vec<IndexItem>) -> Result<(), SinkError> {
        let batches: Vec<Vec<WriteRequest>> =
            items.chunks(BATCH).map(|c| c.iter().map(to_write_request).collect()).collect();
        stream::iter(batches.into_iter().map(Ok))
            .try_for_each_concurrent(self.concurrency, |batch| self.write_batch(batch))
            .await
    }

    async fn put_guarded(&self, item: &IndexItem, guard: Guard<'_>) -> Result<Guarded, SinkError> {
        let request = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(to_map(item)))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        let request = match guard {
            Guard::Absent => request.condition_expression("attribute_not_exists(PK)"),
            Guard::Damaged => request
                .condition_expression(
                    "attribute_exists(PK) AND (attribute_not_exists(#rank) OR NOT attribute_type(#rank, :s) OR #rank = :empty)",
                )
                .expression_attribute_names("#rank", "rank")
                .expression_attribute_values(":s", AttributeValue::S("S".into()))
                .expression_attribute_values(":empty", AttributeValue::S(String::new())),
            Guard::Rank { rank, flagged } => {
                let request = request
                    .expression_attribute_names("#rank", "rank")
                    .expression_attribute_values(":rank", AttributeValue::S(rank.into()));
                match flagged {
                    true => request.condition_expression("#rank = :rank"),
                    // As the reader decided "unflagged": anything but BOOL true (an operator's
                    // `conflict = false` failed `attribute_not_exists` on every retry, forever).
                    false => request
                        .condition_expression("#rank = :rank AND (attribute_not_exists(#conflict) OR #conflict <> :yes)")
                        .expression_attribute_names("#conflict", "conflict")
                        .expression_attribute_values(":yes", AttributeValue::Bool(true)),
                }
            }
        };
        match request.send().await {
            Ok(_) => Ok(Guarded::Written),
            Err(e) => match e.as_service_error() {
                Some(PutItemError::ConditionalCheckFailedException(failed)) => {
                    let current = failed.item().cloned();
                    self.refused(&item.pk, &item.sk, current).await
                }
                _ => Err(classify_sdk_error(BACKEND, "PutItem", &self.table, &e)),
            },
        }
    }

    async fn mark_conflict(&self, pk: &str, sk: &str, rank: &str) -> Result<Guarded, SinkError> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(item_key(pk, sk)))
            .update_expression("SET #conflict = :yes")
            .condition_expression("#rank = :rank")
            .expression_attribute_names("#conflict", "conflict")
            .expression_attribute_names("#rank", "rank")
            .expression_attribute_values(":yes", AttributeValue::Bool(true))
            .expression_attribute_values(":rank", AttributeValue::S(rank.into()))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match out {
            Ok(_) => Ok(Guarded::Written),
            Err(e) if is_condition_failure(&e) => {
                let current = match e.as_service_error() {
                    Some(UpdateItemError::ConditionalCheckFailedException(failed)) => failed.item().cloned(),
                    _ => None,
                };
                self.refused(pk, sk, current).await
            }
            Err(e) => Err(classify_sdk_error(BACKEND, "UpdateItem", &self.table, &e)),
        }
    }
}

impl DynamoStore {
    /// Records that `member` of `group` is alive (an item in the chain table, refreshed every
    /// few seconds by `run`; `replay` refuses while one is fresh).
    pub async fn heartbeat(&self, group: &str, member: &str, detail: &str) -> Result<(), SinkError> {
        let now = chrono::Utc::now().timestamp();
        self.client
            .put_item()
            .table_name(&self.chain_table)
            .item("PK", AttributeValue::S(format!("MEMBER#{group}#{member}")))
            .item("detail", AttributeValue::S(detail.into()))
            .item("seen_at", n(now))
            // For a DynamoDB TTL on `expires_at`, if the operator enables one.
            .item("expires_at", n(now + 3600))
            .send()
            .await
            .map_err(|e| classify_sdk_error(BACKEND, "PutItem", &self.chain_table, &e))?;
        Ok(())
    }

    pub async fn leave(&self, group: &str, member: &str) -> Result<(), SinkError> {
        self.client
            .delete_item()
            .table_name(&self.chain_table)
            .key("PK", AttributeValue::S(format!("MEMBER#{group}#{member}")))
            .send()
            .await
            .map_err(|e| classify_sdk_error(BACKEND, "DeleteItem", &self.chain_table, &e))?;
        Ok(())
    }

    /// The chain table's items whose PK starts with `prefix` and that pass `filter` (a condition
    /// on `:v`, if any): a Scan, for tools and the rare fallback, never the data path.
    async fn scan_chain_table(
        &self,
        prefix: String,
        filter: Option<(&str, AttributeValue)>,
    ) -> Result<Vec<HashMap<String, AttributeValue>>, SinkError> {
        let mut request = self
            .client
            .scan()
            .table_name(&self.chain_table)
            .filter_expression(match filter {
                Some((condition, _)) => format!("begins_with(PK, :prefix) AND {condition}"),
                None => "begins_with(PK, :prefix)".to_string(),
            })
            .expression_attribute_values(":prefix", AttributeValue::S(prefix))
            .consistent_read(true);
        if let Some((_, value)) = filter {
            request = request.expression_attribute_values(":v", value);
        }
        let mut pages = request.into_paginator().send();
        let mut items = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify_sdk_error(BACKEND, "Scan", &self.chain_table, &e))?;
            items.extend(page.items().iter().cloned());
        }
        Ok(items)
    }

    /// Members of `group` whose heartbeat is younger than `max_age`.
    pub async fn live_members(&self, group: &str, max_age: Duration) -> Result<Vec<String>, SinkError> {
        let oldest = chrono::Utc::now().timestamp() - max_age.as_secs() as i64;
        let items = self.scan_chain_table(format!("MEMBER#{group}#"), Some(("seen_at >= :v", n(oldest)))).await?;
        Ok(items.iter().filter_map(|item| item.get("detail").and_then(|v| v.as_s().ok()).cloned()).collect())
    }

    /// Every partition of `topic` the chain table holds a head for (`verify --against-chain-table`);
    /// a damaged item is that partition's error, not the whole scan's (`verify` reports it and
    /// checks the rest).
    pub async fn chain_heads(&self, topic: &str) -> Result<ChainHeads, SinkError> {
        let prefix = chain_head_pk_prefix(topic);
        let items = self.scan_chain_table(prefix.clone(), None).await?;
        let mut heads = std::collections::BTreeMap::new();
        for item in &items {
            let Some(pk) = item.get("PK").and_then(|v| v.as_s().ok()) else { continue };
            let Some(partition) = pk.strip_prefix(&prefix).and_then(|p| p.parse::<i32>().ok()) else { continue };
            heads.insert(partition, parse_head(item).map_err(|e| damaged(&self.chain_table, pk, e).to_string()));
        }
        Ok(heads)
    }

    /// Where the index says decision `id`'s winning record is: (segment key, partition, offset).
    pub async fn locate_decision(&self, id: &str) -> Result<Option<(String, i32, i64)>, SinkError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(item_key(&format!("DECISION#{id}"), crate::index::DECISION_SK)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify_sdk_error(BACKEND, "GetItem", &self.table, &e))?;
        let Some(item) = out.item else { return Ok(None) };
        let key = item.get("segment_key").and_then(|v| v.as_s().ok()).cloned();
        let partition = read_i64(&item, "kafka_partition");
        let offset = read_i64(&item, "kafka_offset");
        Ok(match (key, partition, offset) {
            (Some(k), Some(p), Some(o)) => Some((k, p as i32, o)),
            _ => None,
        })
    }

    /// The item a failed condition met: from the error when the server returns it (DynamoDB
    /// does; some emulators do not), else a consistent read.
    async fn refused(
        &self,
        pk: &str,
        sk: &str,
        current: Option<HashMap<String, AttributeValue>>,
    ) -> Result<Guarded, SinkError> {
        let current = match current {
            Some(map) if !map.is_empty() => Some(map),
            _ => {
                self.client
                    .get_item()
                    .table_name(&self.table)
                    .set_key(Some(item_key(pk, sk)))
                    .consistent_read(true)
                    .send()
                    .await
                    .map_err(|e| classify_sdk_error(BACKEND, "GetItem", &self.table, &e))?
                    .item
            }
        };
        Ok(Guarded::Refused(current.and_then(from_map)))
    }
}

fn n(value: i64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn s_hash(hash: &Hash) -> AttributeValue {
    AttributeValue::S(hex::encode(hash))
}

fn read_i64(item: &HashMap<String, AttributeValue>, name: &str) -> Option<i64> {
    item.get(name)?.as_n().ok()?.parse().ok()
}

fn read_hash(item: &HashMap<String, AttributeValue>, name: &str) -> Option<Hash> {
    parse_hash(item.get(name)?.as_s().ok()?)
}

/// The undigested list as stored: a list of JSON strings, one per segment.
fn segment_list(segments: &[SegmentEntry]) -> AttributeValue {
    AttributeValue::L(
        segments
            .iter()
            .map(|s| AttributeValue::S(serde_json::to_string(s).expect("segment entries serialize")))
            .collect(),
    )
}

/// Each partition's chain head, or why its item does not read.
pub type ChainHeads = std::collections::BTreeMap<i32, Result<ChainHead, String>>;

/// The `operation` of a [`SinkError::Fatal`] for a chain item that was read but holds what no
/// writer leaves: `status` shows it as that partition's warning, where other fatal errors (access,
/// a missing table) end the report.
pub const READ_CHAIN_ITEM: &str = "ReadChainItem";

/// A chain item no writer could have left: fatal, naming the item (ops/RUNBOOK.md, Lost chain
/// table, has the repair).
fn damaged(table: &str, pk: &str, message: String) -> SinkError {
    SinkError::Fatal {
        backend: BACKEND,
        operation: READ_CHAIN_ITEM,
        target: format!("{table} {pk}"),
        message: format!("damaged chain item: {message}"),
    }
}

/// A chain item with its key alone (and `updated_at`): what an operator leaves to start a chain
/// afresh. Any other attribute, even one that does not read as part of a head (a misspelt or
/// mistyped hand edit), makes the item a damaged head, not a fresh start.
fn bare_item(item: &HashMap<String, AttributeValue>) -> bool {
    item.contains_key("PK") && item.keys().all(|k| k == "PK" || k == "updated_at")
}

/// The head an item holds. An `undigested` list with an entry that does not read is an error
/// (the message names it): dropping the entry would leave its segment unsigned for good and
/// break the next digest's link, and the next digest would erase it from the table.
fn parse_head(item: &HashMap<String, AttributeValue>) -> Result<ChainHead, String> {
    let committed = match (read_i64(item, "last_offset"), read_hash(item, "last_hash")) {
        (Some(last_offset), Some(last_hash)) => Some(HeadPos { last_offset, last_hash }),
        _ => None,
    };
    let pending =
        match (read_i64(item, "pending_first"), read_i64(item, "pending_last"), read_hash(item, "pending_hash")) {
            (Some(first_offset), Some(last_offset), Some(last_hash)) => {
                Some(PendingFlush { first_offset, last_offset, last_hash })
            }
            _ => None,
        };
    let digest = match (read_i64(item, "digest_seq"), read_hash(item, "digest_hash")) {
        (Some(seq), Some(hash)) => Some(DigestPos { seq: seq as u64, hash }),
        _ => None,
    };
    let undigested = match item.get("undigested") {
        Some(AttributeValue::L(list)) => list
            .iter()
            .enumerate()
            .map(|(i, value)| {
                let json = value.as_s().map_err(|_| format!("undigested[{i}] is not a string"))?;
                serde_json::from_str(json).map_err(|e| format!("undigested[{i}] does not read ({e}): {json}"))
            })
            .collect::<Result<_, String>>()?,
        None => Vec::new(),
        Some(_) => return Err("undigested is not a list".into()),
    };
    Ok(ChainHead { afresh: false, committed, pending, digest, undigested })
}

fn is_condition_failure<R>(
    err: &aws_smithy_runtime_api::client::result::SdkError<
        aws_sdk_dynamodb::operation::update_item::UpdateItemError,
        R,
    >,
) -> bool {
    err.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception())
}

#[async_trait]
impl HeadStore for DynamoStore {
    async fn load(&self, topic: &str, partition: i32) -> Result<ChainHead, SinkError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.chain_table)
            .set_key(Some(Self::head_key(topic, partition)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify_sdk_error(BACKEND, "GetItem", &self.chain_table, &e))?;
        let Some(item) = out.item() else { return Ok(ChainHead::default()) };
        let pk = chain_head_pk(topic, partition);
        Ok(ChainHead { afresh: bare_item(item), ..parse_head(item).map_err(|e| damaged(&self.chain_table, &pk, e))? })
    }

    async fn begin_flush(
        &self,
        topic: &str,
        partition: i32,
        expected: Option<HeadPos>,
        pending: PendingFlush,
    ) -> Result<(), SinkError> {
        let mut request = self
            .client
            .update_item()
            .table_name(&self.chain_table)
            .set_key(Some(Self::head_key(topic, partition)))
            .update_expression("SET pending_first = :pf, pending_last = :pl, pending_hash = :ph, updated_at = :now")
            .expression_attribute_values(":pf", n(pending.first_offset))
            .expression_attribute_values(":pl", n(pending.last_offset))
            .expression_attribute_values(":ph", s_hash(&pending.last_hash))
            .expression_attribute_values(":now", AttributeValue::S(chrono::Utc::now().to_rfc3339()));
        request = match expected {
            None => {
                request.condition_expression("attribute_not_exists(last_offset) AND attribute_not_exists(pending_last)")
            }
            Some(head) => request
                .condition_expression("last_offset = :lo AND last_hash = :lh AND attribute_not_exists(pending_last)")
                .expression_attribute_values(":lo", n(head.last_offset))
                .expression_attribute_values(":lh", s_hash(&head.last_hash)),
        };
        match request.send().await {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => {
                let found = self.load(topic, partition).await?;
                let wanted = expected
                    .map(|h| format!("expected offset {}", h.last_offset))
                    .unwrap_or_else(|| "expected an empty chain".into());
                Err(self.fence_lost(topic, partition, &wanted, found))
            }
            Err(e) => Err(classify_sdk_error(BACKEND, "UpdateItem", &self.chain_table, &e)),
        }
    }

    async fn complete_flush(
        &self,
        topic: &str,
        partition: i32,
        pending: PendingFlush,
        segments: &[SegmentEntry],
    ) -> Result<(), SinkError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.chain_table)
            .set_key(Some(Self::head_key(topic, partition)))
            .update_expression(
                "SET last_offset = :pl, last_hash = :ph, updated_at = :now, \
                 undigested = list_append(if_not_exists(undigested, :empty), :segments) \
                 REMOVE pending_first, pending_last, pending_hash",
            )
            .condition_expression("pending_first = :pf AND pending_last = :pl AND pending_hash = :ph")
            .expression_attribute_values(":empty", AttributeValue::L(Vec::new()))
            .expression_attribute_values(":segments", segment_list(segments))
            .expression_attribute_values(":pf", n(pending.first_offset))
            .expression_attribute_values(":pl", n(pending.last_offset))
            .expression_attribute_values(":ph", s_hash(&pending.last_hash))
            .expression_attribute_values(":now", AttributeValue::S(chrono::Utc::now().to_rfc3339()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => {
                let found = self.load(topic, partition).await?;
                Err(self.fence_lost(
                    topic,
                    partition,
                    &format!("expected pending {}..={}", pending.first_offset, pending.last_offset),
                    found,
                ))
            }
            Err(e) => Err(classify_sdk_error(BACKEND, "UpdateItem", &self.chain_table, &e)),
        }
    }

    async fn record_digest(
        &self,
        topic: &str,
        partition: i32,
        head: HeadPos,
        previous: Option<DigestPos>,
        digest: DigestPos,
        remaining: &[SegmentEntry],
    ) -> Result<(), SinkError> {
        let mut request = self
            .client
            .update_item()
            .table_name(&self.chain_table)
            .set_key(Some(Self::head_key(topic, partition)))
            .update_expression("SET digest_seq = :ds, digest_hash = :dh, undigested = :rest, updated_at = :now")
            .expression_attribute_values(":ds", n(digest.seq as i64))
            .expression_attribute_values(":dh", s_hash(&digest.hash))
            .expression_attribute_values(":rest", segment_list(remaining))
            .expression_attribute_values(":now", AttributeValue::S(chrono::Utc::now().to_rfc3339()))
            .expression_attribute_values(":lo", n(head.last_offset))
            .expression_attribute_values(":lh", s_hash(&head.last_hash));
        let fence = "last_offset = :lo AND last_hash = :lh AND attribute_not_exists(pending_last)";
        request = match previous {
            None => request.condition_expression(format!("{fence} AND attribute_not_exists(digest_seq)")),
            Some(p) => request
                .condition_expression(format!("{fence} AND digest_seq = :ps AND digest_hash = :ph"))
                .expression_attribute_values(":ps", n(p.seq as i64))
                .expression_attribute_values(":ph", s_hash(&p.hash)),
        };
        match request.send().await {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => {
                let found = self.load(topic, partition).await?;
                let wanted = format!(
                    "expected head offset {} and digest {}",
                    head.last_offset,
                    previous.map_or("none".to_string(), |p| p.seq.to_string())
                );
                Err(self.fence_lost(topic, partition, &wanted, found))
            }
            Err(e) => Err(classify_sdk_error(BACKEND, "UpdateItem", &self.chain_table, &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_item_with_its_key_alone_starts_a_chain_afresh() {
        let item = |attrs: &[(&str, AttributeValue)]| -> HashMap<String, AttributeValue> {
            attrs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
        };
        let pk = ("PK", AttributeValue::S(chain_head_pk("t", 3)));
        let now = ("updated_at", AttributeValue::S("2026-12-03T04:00:00Z".into()));
        assert!(bare_item(&item(std::slice::from_ref(&pk))));
        assert!(bare_item(&item(&[pk.clone(), now.clone()])));
        // A hand edit that misspells the head reads as no head: damaged, never a fresh start.
        let misspelt = item(&[pk.clone(), now, ("last_ofset", AttributeValue::N("41".into()))]);
        assert!(!bare_item(&misspelt) && parse_head(&misspelt).unwrap().committed.is_none());
        assert!(!bare_item(&item(&[pk, ("last_offset", AttributeValue::S("41".into()))])));
        assert!(!bare_item(&HashMap::new()), "an emulator's empty answer is no item");
    }

    #[test]
    fn an_undigested_entry_that_does_not_read_is_an_error_not_dropped() {
        let entry = crate::digest::SegmentEntry {
            key: "trail/k.parquet".into(),
            sha256: "00".repeat(32),
            rows: 1,
            first_offset: 0,
            last_offset: 0,
            first_prev_hash: "00".repeat(32),
            last_entry_hash: "11".repeat(32),
            merkle_root: "11".repeat(32),
        };
        let good = AttributeValue::S(serde_json::to_string(&entry).unwrap());
        let with = |list: Vec<AttributeValue>| {
            HashMap::from([
                ("PK".to_string(), AttributeValue::S(chain_head_pk("t", 3))),
                ("undigested".to_string(), AttributeValue::L(list)),
            ])
        };
        assert_eq!(parse_head(&with(vec![good.clone()])).unwrap().undigested, vec![entry]);
        let err = parse_head(&with(vec![good.clone(), AttributeValue::S("not json".into())])).unwrap_err();
        assert!(err.contains("undigested[1]") && err.contains("not json"), "{err}");
        let err = parse_head(&with(vec![AttributeValue::N("1".into()), good])).unwrap_err();
        assert!(err.contains("undigested[0] is not a string"), "{err}");
    }
}
