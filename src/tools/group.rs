//! `status` and `replay`: a consumer group's position per partition, and rewinding it.
//!
//! Both use a plain librdkafka client with the group's id that never subscribes, so it reads
//! and commits the group's offsets without joining it.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::Config;
use crate::sinks::dynamodb::DynamoStore;
use crate::sinks::{ChainHead, HeadStore, SinkError};

const TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("kafka ({what}): {source}")]
    Kafka { what: String, source: rdkafka::error::KafkaError },
    #[error("topic {0}: not found on the brokers (kafka.topic)")]
    NoTopic(String),
    #[error("group {group} has {count} live member(s) ({members}); stop them first (a running consumer would overwrite the reset), or pass --force")]
    LiveMembers { group: String, count: usize, members: String },
    #[error("--to-offsets {0:?}: expected comma-separated partition:offset pairs, e.g. 0:100,3:42")]
    BadOffsets(String),
    #[error("--to-offsets names partition {0}, which the topic does not have")]
    UnknownPartition(i32),
    #[error("--to-offsets names partition {0} more than once")]
    RepeatedPartition(i32),
    #[error("the broker's group list has no entry for group {0}")]
    GroupNotListed(String),
    #[error("--to-offsets {partition}:{offset} is past the end of partition {partition} (its next offset is {end})")]
    PastTheEnd { partition: i32, offset: i64, end: i64 },
    #[error(transparent)]
    Sink(#[from] SinkError),
}

fn kafka(what: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> GroupError {
    let what = what.into();
    move |source| GroupError::Kafka { what, source }
}

/// A client with the group's id, for reading and committing its offsets without joining it.
pub fn group_client(config: &Config, group: &str) -> Result<BaseConsumer, GroupError> {
    crate::source::client_config(
        config,
        [
            ("group.id", group.to_string()),
            ("enable.auto.commit", "false".into()),
            ("client.id", "aegis-audit-admin".into()),
        ],
    )
    .create()
    .map_err(kafka("create client"))
}

pub fn partitions(client: &BaseConsumer, topic: &str) -> Result<Vec<i32>, GroupError> {
    let metadata = client.fetch_metadata(Some(topic), TIMEOUT).map_err(kafka(format!("metadata of {topic}")))?;
    let t = metadata.topics().iter().find(|t| t.name() == topic).ok_or_else(|| GroupError::NoTopic(topic.into()))?;
    if t.partitions().is_empty() {
        return Err(GroupError::NoTopic(topic.into()));
    }
    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Committed offset per partition (`None`: nothing committed).
pub fn committed(client: &BaseConsumer, topic: &str, partitions: &[i32]) -> Result<Vec<Option<i64>>, GroupError> {
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        tpl.add_partition(topic, p);
    }
    let out = client.committed_offsets(tpl, TIMEOUT).map_err(kafka("committed offsets"))?;
    Ok(partitions
        .iter()
        .map(|&p| match out.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect())
}

/// Live members of the group (client ids and hosts). A group the broker does not list is not
/// known to be empty (librdkafka can answer Ok after one broker's failed reply): an error, so
/// the caller falls back to the heartbeats.
pub fn live_members(client: &BaseConsumer, group: &str) -> Result<Vec<String>, GroupError> {
    let list = client.fetch_group_list(Some(group), TIMEOUT).map_err(kafka(format!("describe group {group}")))?;
    let described =
        list.groups().iter().find(|g| g.name() == group).ok_or_else(|| GroupError::GroupNotListed(group.into()))?;
    Ok(described.members().iter().map(|m| format!("{}@{}", m.client_id(), m.client_host())).collect())
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub partition: i32,
    pub committed: Option<i64>,
    pub low_watermark: i64,
    pub end_offset: i64,
    /// Records not yet committed (end − committed, or end − low when nothing is committed).
    pub lag: i64,
    /// The chain head: last offset durable in S3 and the index, and its entry hash.
    pub chain_head_offset: Option<i64>,
    pub chain_head_hash: Option<String>,
    pub flush_pending: Option<String>,
    pub digest_seq: Option<u64>,
    pub undigested_segments: usize,
    /// Something about this partition an operator must look at (see [`crate::partition::head_past_end`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub topic: String,
    pub group: String,
    pub members: Vec<String>,
    pub partitions: Vec<PartitionStatus>,
    pub total_lag: i64,
}

/// The group's live members: from the broker (DescribeGroups), or, where the broker cannot
/// describe groups (tansu 0.6), from the heartbeats every running aegis-audit writes to the
/// chain table.
pub async fn members(config: &Config, group: &str, dynamo: &DynamoStore) -> Result<Vec<String>, GroupError> {
    let (config_c, group_c) = (config.clone(), group.to_string());
    let from_broker = tokio::task::spawn_blocking(move || live_members(&group_client(&config_c, &group_c)?, &group_c))
        .await
        .expect("describe task does not panic");
    match from_broker {
        Ok(members) => Ok(members),
        Err(e) => {
            tracing::warn!(error = %e, "the broker cannot describe the group; using aegis-audit member heartbeats");
            Ok(dynamo.live_members(group, MEMBER_STALE_AFTER).await?)
        }
    }
}

/// A member whose heartbeat is older than this is gone (heartbeats are every 5 s).
pub const MEMBER_STALE_AFTER: Duration = Duration::from_secs(20);

pub async fn status(config: &Config, dynamo: &DynamoStore) -> Result<GroupStatus, GroupError> {
    let heads: &dyn HeadStore = dynamo;
    let topic = config.kafka.topic.clone();
    let group = config.kafka.group_id.clone();
    let members = members(config, &group, dynamo).await?;
    let (ids, committed, watermarks) = {
        let config = config.clone();
        let (topic, group) = (topic.clone(), group.clone());
        tokio::task::spawn_blocking(move || -> Result<_, GroupError> {
            let client = group_client(&config, &group)?;
            let ids = partitions(&client, &topic)?;
            let committed = committed(&client, &topic, &ids)?;
            let watermarks = ids
                .iter()
                .map(|&p| {
                    client.fetch_watermarks(&topic, p, TIMEOUT).map_err(kafka(format!("watermarks of {topic}/{p}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((ids, committed, watermarks))
        })
        .await
        .expect("status task does not panic")?
    };
    // A damaged chain item is that partition's warning, not the end of the whole report: the
    // runbook reads `status` to find it.
    let mut chain_heads = Vec::with_capacity(ids.len());
    for loaded in concurrent_loads(heads, &topic, &ids).await {
        chain_heads.push(match loaded {
            Ok(head) => (head, None),
            Err(e @ SinkError::Fatal { operation: crate::sinks::dynamodb::READ_CHAIN_ITEM, .. }) => {
                (ChainHead::default(), Some(e.to_string()))
            }
            Err(e) => return Err(e.into()),
        });
    }
    let mut out = Vec::new();
    for (((&partition, committed), (low, high)), (head, damaged)) in
        ids.iter().zip(committed).zip(watermarks).zip(chain_heads)
    {
        out.push(PartitionStatus {
            partition,
            committed,
            low_watermark: low,
            end_offset: high,
            lag: (high - committed.unwrap_or(low)).max(0),
            chain_head_offset: head.committed.map(|h| h.last_offset),
            warning: damaged.or_else(|| crate::partition::head_past_end(head.committed.map(|h| h.last_offset), high)),
            chain_head_hash: head.committed.map(|h| hex::encode(h.last_hash)),
            flush_pending: head.pending.map(|p| format!("{}..={}", p.first_offset, p.last_offset)),
            digest_seq: head.digest.map(|d| d.seq),
            undigested_segments: head.undigested.len(),
        });
    }
    let total_lag = out.iter().map(|p| p.lag).sum();
    Ok(GroupStatus { topic, group, members, partitions: out, total_lag })
}

/// Each of `ids`' chain heads, in the same order.
async fn load_heads(heads: &dyn HeadStore, topic: &str, ids: &[i32]) -> Result<Vec<ChainHead>, GroupError> {
    Ok(concurrent_loads(heads, topic, ids).await.into_iter().collect::<Result<_, _>>()?)
}

/// Reads of `ids`' chain heads, in the same order, a few at a time: one round trip each, so a
/// topic of many partitions is not read one after the other.
async fn concurrent_loads(heads: &dyn HeadStore, topic: &str, ids: &[i32]) -> Vec<Result<ChainHead, SinkError>> {
    futures::stream::iter(ids).map(|&partition| heads.load(topic, partition)).buffered(16).collect().await
}

pub fn render_status(status: &GroupStatus) -> String {
    let mut s = format!(
        "topic {}  group {}  members {}  total lag {}\n",
        status.topic,
        status.group,
        if status.members.is_empty() { "none".to_string() } else { status.members.join(", ") },
        status.total_lag
    );
    s += &format!(
        "{:>9} {:>12} {:>12} {:>10} {:>12}  {:<16} {:>7} {:>10}  pending\n",
        "partition", "committed", "end", "lag", "chain head", "head hash", "digest", "unsigned"
    );
    let dash = || "-".to_string();
    for p in &status.partitions {
        s += &format!(
            "{:>9} {:>12} {:>12} {:>10} {:>12}  {:<16} {:>7} {:>10}  {}\n",
            p.partition,
            p.committed.map_or_else(dash, |o| o.to_string()),
            p.end_offset,
            p.lag,
            p.chain_head_offset.map_or_else(dash, |o| o.to_string()),
            p.chain_head_hash.as_deref().map_or_else(dash, |h| h[..16].to_string()),
            p.digest_seq.map_or_else(dash, |d| d.to_string()),
            p.undigested_segments,
            p.flush_pending.clone().unwrap_or_default(),
        );
        if let Some(warning) = &p.warning {
            s += &format!("{:>9} WARNING: {warning}\n", "");
        }
    }
    s
}

/// Where `replay` moves the group.
#[derive(Debug, Clone)]
pub enum ReplayTarget {
    Earliest,
    /// Milliseconds since the epoch: the first offset at or after it.
    Time(i64),
    Offsets(Vec<(i32, i64)>),
}

pub fn parse_offsets(text: &str) -> Result<Vec<(i32, i64)>, GroupError> {
    let pairs: Vec<(i32, i64)> = text
        .split(',')
        .map(|pair| {
            let (p, o) = pair.trim().split_once(':').ok_or_else(|| GroupError::BadOffsets(text.into()))?;
            let p: i32 = p.parse().map_err(|_| GroupError::BadOffsets(text.into()))?;
            let o: i64 = o.parse().map_err(|_| GroupError::BadOffsets(text.into()))?;
            if p < 0 || o < 0 {
                return Err(GroupError::BadOffsets(text.into()));
            }
            Ok((p, o))
        })
        .collect::<Result<_, _>>()?;
    let mut seen = std::collections::BTreeSet::new();
    if let Some(&(p, _)) = pairs.iter().find(|(p, _)| !seen.insert(*p)) {
        return Err(GroupError::RepeatedPartition(p));
    }
    Ok(pairs)
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplayStep {
    pub partition: i32,
    pub current: Option<i64>,
    pub target: i64,
    /// Records the group will read again (their chain entries are recognised and skipped).
    pub to_reprocess: i64,
    /// Why the target is not the one asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplayPlan {
    pub group: String,
    pub topic: String,
    /// The group's live members: a real run refuses while there are any (unless `--force`).
    pub members: Vec<String>,
    pub steps: Vec<ReplayStep>,
    pub applied: bool,
}

/// Where a partition must be read from whatever a replay asks, for the partitions of
/// `kafka.topic` whose chain has no durable head yet. A worker continues a chain from its head
/// whatever the group's offset says, but without a head the first record it reads is taken as
/// the chain's start: on a partition with no chain at all that must be the log's start (`None`:
/// a later offset would leave the records before it out for good), and where the chain's first
/// flush was interrupted, exactly that flush's first offset (any other would not reproduce it).
pub async fn headless_partitions(
    config: &Config,
    dynamo: &DynamoStore,
) -> Result<BTreeMap<i32, Option<i64>>, GroupError> {
    let heads: &dyn HeadStore = dynamo;
    let (config_c, topic) = (config.clone(), config.kafka.topic.clone());
    let ids = tokio::task::spawn_blocking(move || {
        partitions(&group_client(&config_c, &config_c.kafka.group_id)?, &config_c.kafka.topic)
    })
    .await
    .expect("metadata task does not panic")?;
    let chain_heads = load_heads(heads, &topic, &ids).await?;
    Ok(ids
        .into_iter()
        .zip(chain_heads)
        .filter(|(_, head)| head.committed.is_none())
        .map(|(partition, head)| (partition, head.pending.map(|p| p.first_offset)))
        .collect())
}

/// Refuses a reset while the group has live members, unless forced: a running consumer would
/// commit over it.
pub fn refuse_live_members(group: &str, members: &[String], force: bool) -> Result<(), GroupError> {
    if members.is_empty() || force {
        return Ok(());
    }
    Err(GroupError::LiveMembers { group: group.into(), count: members.len(), members: members.join(", ") })
}

/// Computes the plan (nothing is changed; [`apply`] commits it). `members` are the group's live
/// members (see [`members`]); `headless` the partitions whose start is fixed (see
/// [`headless_partitions`]).
pub fn plan(
    config: &Config,
    group: &str,
    members: &[String],
    headless: &BTreeMap<i32, Option<i64>>,
    target: &ReplayTarget,
) -> Result<ReplayPlan, GroupError> {
    let topic = &config.kafka.topic;
    let client = group_client(config, group)?;
    let ids = partitions(&client, topic)?;
    let current = committed(&client, topic, &ids)?;
    let mut steps = Vec::new();
    let targets: Vec<(i32, i64)> = match target {
        ReplayTarget::Earliest => ids
            .iter()
            .map(|&p| Ok((p, client.fetch_watermarks(topic, p, TIMEOUT).map_err(kafka("watermarks"))?.0)))
            .collect::<Result<_, GroupError>>()?,
        ReplayTarget::Time(ms) => {
            let mut tpl = TopicPartitionList::new();
            for &p in &ids {
                tpl.add_partition_offset(topic, p, Offset::Offset(*ms)).map_err(kafka("offsets for times"))?;
            }
            let found = client.offsets_for_times(tpl, TIMEOUT).map_err(kafka("offsets for times"))?;
            ids.iter()
                .map(|&p| {
                    let (low, high) = client.fetch_watermarks(topic, p, TIMEOUT).map_err(kafka("watermarks"))?;
                    // No record at or after the time: the end (nothing to replay).
                    let offset = match found.find_partition(topic, p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o.clamp(low, high),
                        _ => high,
                    };
                    Ok((p, offset))
                })
                .collect::<Result<_, GroupError>>()?
        }
        ReplayTarget::Offsets(pairs) => {
            for (p, _) in pairs {
                if !ids.contains(p) {
                    return Err(GroupError::UnknownPartition(*p));
                }
            }
            pairs.clone()
        }
    };
    for (partition, asked) in targets {
        let index = ids.iter().position(|&p| p == partition).expect("checked above");
        let cur = current[index];
        let (low, high) = client.fetch_watermarks(topic, partition, TIMEOUT).map_err(kafka("watermarks"))?;
        if asked > high {
            return Err(GroupError::PastTheEnd { partition, offset: asked, end: high });
        }
        let (target, note) = match headless.get(&partition) {
            Some(None) if asked != low => (
                low,
                Some(format!("no chain yet: from the start of the log ({low}), not {asked}, so no record is left out")),
            ),
            Some(&Some(first)) if asked != first => (
                first,
                Some(format!("the chain's first flush was interrupted: from its first offset ({first}), not {asked}")),
            ),
            _ if asked < low => (
                low,
                Some(format!(
                    "{asked} is before the start of the log (retention): from {low}, the first offset Kafka has"
                )),
            ),
            _ => (asked, None),
        };
        let to_reprocess = (cur.unwrap_or(high) - target).max(0);
        steps.push(ReplayStep { partition, current: cur, target, to_reprocess, note });
    }
    Ok(ReplayPlan { group: group.into(), topic: topic.clone(), members: members.to_vec(), steps, applied: false })
}

/// Commits the plan's targets for its group.
pub fn apply(config: &Config, plan: &mut ReplayPlan) -> Result<(), GroupError> {
    let client = group_client(config, &plan.group)?;
    let mut tpl = TopicPartitionList::new();
    for step in &plan.steps {
        tpl.add_partition_offset(&plan.topic, step.partition, Offset::Offset(step.target))
            .map_err(kafka("commit new offsets"))?;
    }
    client.commit(&tpl, CommitMode::Sync).map_err(kafka(format!("commit offsets for group {}", plan.group)))?;
    plan.applied = true;
    Ok(())
}

pub fn render_plan(plan: &ReplayPlan) -> String {
    let mut s = format!(
        "{} group {} on {}:\n",
        if plan.applied { "reset" } else { "plan (dry run) for" },
        plan.group,
        plan.topic
    );
    s += &format!("{:>9} {:>12} {:>12} {:>14}\n", "partition", "current", "target", "to reprocess");
    for step in &plan.steps {
        s += &format!(
            "{:>9} {:>12} {:>12} {:>14}\n",
            step.partition,
            step.current.map_or("-".to_string(), |o| o.to_string()),
            step.target,
            step.to_reprocess
        );
        if let Some(note) = &step.note {
            s += &format!("{:>9} {note}\n", "");
        }
    }
    s += "Replayed records already in the chain are recognised by offset and not written again.\n";
    if !plan.members.is_empty() && !plan.applied {
        s += &format!(
            "The group has {} live member(s) ({}): stop them first; a run without --force refuses.\n",
            plan.members.len(),
            plan.members.join(", ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse_or_name_the_flag() {
        assert_eq!(parse_offsets("0:100, 3:42").unwrap(), vec![(0, 100), (3, 42)]);
        for bad in ["0", "a:1", "0:-1", "0:1,", "0:5,1:2,0:7"] {
            assert!(parse_offsets(bad).unwrap_err().to_string().contains("--to-offsets"), "{bad}");
        }
    }
}
