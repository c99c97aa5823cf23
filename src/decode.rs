//! Decode and validate one Kafka record value against `schemas/decision-event.schema.json`.
//!
//! Decoding is a pure function of (payload bytes, Kafka timestamp, validation config): the same
//! record always gets the same verdict, on replay and on recovery of an interrupted flush. That is
//! why "too far in the future/past" is measured against the record's Kafka timestamp, never the
//! wall clock.

use std::borrow::Cow;

use bytes::Bytes;
use bytestring::ByteString;

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::ValidationConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Decision,
    Override,
    SafetyFlag,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Decision => "decision",
            EventType::Override => "override",
            EventType::SafetyFlag => "safety_flag",
        }
    }
}

/// A validated event. Its strings are byte ranges of the record's payload (`text`, which shares
/// the payload's buffer): a buffered event holds one reference to the payload, not one per field,
/// and costs no allocation. Only a string whose JSON had escapes to decode, or `metadata` that
/// had whitespace to drop, is copied, into `unescaped`.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionEvent {
    text: ByteString,
    unescaped: String,
    pub event_type: EventType,
    pub occurred_at: DateTime<Utc>,
    pub confidence_score: Option<f64>,
    decision_id: Span,
    environment: Span,
    user_id: Span,
    session_id: Span,
    action: Span,
    policy_version: Span,
    model_version: Span,
    request_id: Span,
    reviewer_id: Option<Span>,
    override_reason: Option<Span>,
    original_action: Option<Span>,
    safety_category: Option<Span>,
    severity: Option<Span>,
    /// The `metadata` object's JSON text as sent, minus insignificant whitespace.
    metadata: Option<Span>,
}

/// Where one field's text is: a byte range of the payload, or of the event's `unescaped` copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    len: u32,
    copied: bool,
}

macro_rules! text_fields {
    ($($name:ident),*) => {$(
        pub fn $name(&self) -> &str {
            self.get(self.$name)
        }
    )*};
}

macro_rules! optional_text_fields {
    ($($name:ident),*) => {$(
        pub fn $name(&self) -> Option<&str> {
            self.$name.map(|span| self.get(span))
        }
    )*};
}

impl DecisionEvent {
    text_fields!(decision_id, environment, user_id, session_id, action, policy_version, model_version, request_id);
    optional_text_fields!(reviewer_id, override_reason, original_action, safety_category, severity, metadata);

    /// The byte lengths of the text fields with a Parquet column of their own (0 for an absent
    /// field), in this order: decision_id, user_id, session_id, action, policy_version,
    /// model_version, request_id, reviewer_id, override_reason, original_action,
    /// safety_category, severity, metadata. What a flush sizes its Arrow builders with.
    pub fn text_lengths(&self) -> [usize; 13] {
        let optional = |span: Option<Span>| span.map_or(0, |s| s.len as usize);
        [
            self.decision_id.len as usize,
            self.user_id.len as usize,
            self.session_id.len as usize,
            self.action.len as usize,
            self.policy_version.len as usize,
            self.model_version.len as usize,
            self.request_id.len as usize,
            optional(self.reviewer_id),
            optional(self.override_reason),
            optional(self.original_action),
            optional(self.safety_category),
            optional(self.severity),
            optional(self.metadata),
        ]
    }

    /// `environment` as a string sharing the payload's buffer (a segment's placement key).
    pub fn environment_shared(&self) -> ByteString {
        match self.environment.copied {
            false => self.text.slice_ref(self.environment()),
            true => ByteString::from(self.environment()),
        }
    }

    fn get(&self, span: Span) -> &str {
        let source = if span.copied { self.unescaped.as_str() } else { &self.text };
        &source[span.start as usize..(span.start + span.len) as usize]
    }

    /// `occurred_at` as fixed-width RFC 3339 UTC (microseconds, `Z`), so it sorts as text.
    pub fn occurred_at_key(&self) -> String {
        self.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    pub fn date(&self) -> (i32, u32, u32) {
        // One calendar conversion, not one per component: this runs per record per flush.
        let date = self.occurred_at.date_naive();
        (date.year(), date.month(), date.day())
    }
}

/// Why a record was rejected. `code()` is stable (metrics label, dead-letter header); the
/// Display text is for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("record has no value (null payload)")]
    NullPayload,
    #[error("record is {size} bytes, over validation.max_record_bytes = {limit}")]
    Oversize { size: usize, limit: usize },
    #[error("payload is not valid UTF-8 (first bad byte at {position})")]
    NotUtf8 { position: usize },
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    #[error("payload does not match the event schema: {0}")]
    Schema(String),
    #[error("unknown event_type {0:?} (expected decision, override or safety_flag)")]
    UnknownEventType(String),
    #[error("field `{field}` is invalid: {message}")]
    InvalidField { field: &'static str, message: String },
    #[error("occurred_at {value:?} is not an RFC 3339 timestamp: {message}")]
    BadTimestamp { value: String, message: String },
    #[error("occurred_at {value} is more than {max_days} days from the record's Kafka timestamp {reference}")]
    TimestampOutOfRange { value: String, reference: String, max_days: u32 },
    #[error("environment {value:?} is not a safe partition token (1-32 chars of [a-z0-9_-], starting with [a-z0-9])")]
    BadEnvironment { value: String },
}

impl RejectReason {
    pub fn code(&self) -> &'static str {
        match self {
            RejectReason::NullPayload => "null_payload",
            RejectReason::Oversize { .. } => "oversize",
            RejectReason::NotUtf8 { .. } => "not_utf8",
            RejectReason::NotJson(_) => "not_json",
            RejectReason::Schema(_) => "schema",
            RejectReason::UnknownEventType(_) => "unknown_event_type",
            RejectReason::InvalidField { .. } => "invalid_field",
            RejectReason::BadTimestamp { .. } => "bad_timestamp",
            RejectReason::TimestampOutOfRange { .. } => "timestamp_out_of_range",
            RejectReason::BadEnvironment { .. } => "bad_environment",
        }
    }
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    decision_id: Cow<'a, str>,
    #[serde(borrow)]
    event_type: Cow<'a, str>,
    #[serde(borrow)]
    occurred_at: Cow<'a, str>,
    #[serde(borrow)]
    environment: Cow<'a, str>,
    #[serde(borrow)]
    user_id: Cow<'a, str>,
    #[serde(borrow)]
    session_id: Cow<'a, str>,
    #[serde(borrow)]
    action: Cow<'a, str>,
    #[serde(default)]
    confidence_score: Option<f64>,
    #[serde(borrow)]
    policy_version: Cow<'a, str>,
    #[serde(borrow)]
    model_version: Cow<'a, str>,
    #[serde(borrow)]
    request_id: Cow<'a, str>,
    #[serde(default, borrow)]
    reviewer_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    override_reason: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    original_action: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    safety_category: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    severity: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    metadata: Option<&'a RawValue>,
}

const MAX_ID_LEN: usize = 256;
const SEVERITIES: [&str; 4] = ["low", "medium", "high", "critical"];
/// Outside this range a timestamp is absurd whatever the Kafka timestamp says.
const MIN_YEAR: i32 = 2000;
const MAX_YEAR: i32 = 2200;

/// Decodes and validates `payload`. `kafka_timestamp_ms` is the record's Kafka timestamp, the
/// reference for the clock-skew check (absent on very old message formats).
pub fn decode(
    payload: Option<&Bytes>,
    kafka_timestamp_ms: Option<i64>,
    rules: &ValidationConfig,
) -> Result<DecisionEvent, RejectReason> {
    let bytes = payload.ok_or(RejectReason::NullPayload)?;
    if bytes.len() > rules.max_record_bytes {
        return Err(RejectReason::Oversize { size: bytes.len(), limit: rules.max_record_bytes });
    }
    let text = ByteString::try_from(bytes.clone()).map_err(|_| RejectReason::NotUtf8 {
        position: std::str::from_utf8(bytes).err().map_or(0, |e| e.valid_up_to()),
    })?;
    let wire: Wire<'_> = serde_json::from_str(&text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => RejectReason::Schema(bounded_message(&e)),
        // `"\ud800"` is JSON, but no UTF-8 text: the event cannot be stored, not "not JSON".
        // JSON all the same if it parses with those escapes replaced.
        _ if without_lone_surrogates(&text).is_some_and(|fixed| {
            serde_json::from_str::<Wire<'_>>(&fixed)
                .map_or_else(|e| e.classify() == serde_json::error::Category::Data, |_| true)
        }) =>
        {
            RejectReason::Schema(format!("{} (a lone UTF-16 surrogate cannot be stored as text)", bounded_message(&e)))
        }
        _ => RejectReason::NotJson(bounded_message(&e)),
    })?;
    // serde fills a struct from a JSON array too (fields in order); an event is an object.
    if !text.trim_start_matches([' ', '\t', '\n', '\r']).starts_with('{') {
        return Err(RejectReason::Schema("an event is a JSON object, not an array".into()));
    }

    let event_type = match wire.event_type.as_ref() {
        "decision" => EventType::Decision,
        "override" => EventType::Override,
        "safety_flag" => EventType::SafetyFlag,
        other => return Err(RejectReason::UnknownEventType(truncate(other, 64))),
    };
    let occurred_at = parse_occurred_at(&wire.occurred_at, kafka_timestamp_ms, rules)?;
    if !is_partition_token(&wire.environment) {
        return Err(RejectReason::BadEnvironment { value: truncate(&wire.environment, 64) });
    }
    for (field, value) in [
        ("decision_id", &wire.decision_id),
        ("user_id", &wire.user_id),
        ("session_id", &wire.session_id),
        ("request_id", &wire.request_id),
        ("action", &wire.action),
        ("policy_version", &wire.policy_version),
        ("model_version", &wire.model_version),
    ] {
        check_id(field, value)?;
    }
    match (event_type, wire.confidence_score) {
        (_, Some(score)) if !(0.0..=1.0).contains(&score) => {
            return Err(RejectReason::InvalidField {
                field: "confidence_score",
                message: format!("{score} is outside [0, 1]"),
            })
        }
        (EventType::Decision, None) => {
            return Err(RejectReason::InvalidField {
                field: "confidence_score",
                message: "is required for a decision".into(),
            })
        }
        _ => {}
    }
    // The optional fields' rules hold whenever they are present, as in the schema; the event
    // type only decides which must be present.
    for (field, value) in [
        ("reviewer_id", &wire.reviewer_id),
        ("override_reason", &wire.override_reason),
        ("safety_category", &wire.safety_category),
    ] {
        if let Some(value) = value {
            check_id(field, value)?;
        }
    }
    if let Some(value) = &wire.original_action {
        check_text("original_action", value)?;
    }
    if let Some(severity) = &wire.severity {
        if !SEVERITIES.contains(&severity.as_ref()) {
            return Err(RejectReason::InvalidField {
                field: "severity",
                message: format!("{:?} is not one of low, medium, high, critical", truncate(severity, 32)),
            });
        }
    }
    if event_type == EventType::Override {
        require("reviewer_id", &wire.reviewer_id, "an override")?;
        require("override_reason", &wire.override_reason, "an override")?;
    }
    if event_type == EventType::SafetyFlag {
        require("safety_category", &wire.safety_category, "a safety_flag")?;
        require("severity", &wire.severity, "a safety_flag")?;
    }
    let metadata = match wire.metadata.map(|raw| (raw, stored_metadata(raw.get()))) {
        None => None,
        Some((_, Some(text))) => Some(text),
        Some((raw, None)) if raw.get() == "null" => None,
        Some(_) => {
            return Err(RejectReason::InvalidField { field: "metadata", message: "must be a JSON object".into() })
        }
    };

    // Borrowed strings are ranges of `text`; decoded ones are copied into `unescaped`.
    let mut unescaped = String::new();
    let base = text.as_ptr() as usize;
    let mut span = |c: Cow<'_, str>| match c {
        Cow::Borrowed(s) if (s.as_ptr() as usize) >= base && s.as_ptr() as usize + s.len() <= base + text.len() => {
            Span { start: (s.as_ptr() as usize - base) as u32, len: s.len() as u32, copied: false }
        }
        other => {
            let start = unescaped.len() as u32;
            unescaped.push_str(&other);
            Span { start, len: other.len() as u32, copied: true }
        }
    };
    let metadata = metadata.map(&mut span);
    Ok(DecisionEvent {
        decision_id: span(wire.decision_id),
        event_type,
        occurred_at,
        environment: span(wire.environment),
        user_id: span(wire.user_id),
        session_id: span(wire.session_id),
        action: span(wire.action),
        confidence_score: wire.confidence_score,
        policy_version: span(wire.policy_version),
        model_version: span(wire.model_version),
        request_id: span(wire.request_id),
        reviewer_id: wire.reviewer_id.map(&mut span),
        override_reason: wire.override_reason.map(&mut span),
        original_action: wire.original_action.map(&mut span),
        safety_category: wire.safety_category.map(&mut span),
        severity: wire.severity.map(&mut span),
        metadata,
        text,
        unescaped,
    })
}

fn parse_occurred_at(
    value: &str,
    kafka_timestamp_ms: Option<i64>,
    rules: &ValidationConfig,
) -> Result<DateTime<Utc>, RejectReason> {
    let parsed = parse_rfc3339_utc(value)
        .map_err(|e| RejectReason::BadTimestamp { value: truncate(value, 64), message: e.to_string() })?;
    if !(MIN_YEAR..=MAX_YEAR).contains(&parsed.year()) {
        return Err(RejectReason::BadTimestamp {
            value: truncate(value, 64),
            message: format!("year outside {MIN_YEAR}-{MAX_YEAR}"),
        });
    }
    if let Some(reference_ms) = kafka_timestamp_ms {
        // In i128 nanoseconds, not chrono: a Kafka timestamp beyond chrono's range (year
        // ±262,000) is still a reference, and is out of range. Whole seconds, truncated toward
        // zero, as chrono's `num_seconds` did: records judged before keep their verdict.
        let parsed_ns = i128::from(parsed.timestamp()) * 1_000_000_000 + i128::from(parsed.timestamp_subsec_nanos());
        let skew_seconds = ((parsed_ns - i128::from(reference_ms) * 1_000_000) / 1_000_000_000).unsigned_abs();
        if skew_seconds > u128::from(rules.max_clock_skew_days) * 86_400 {
            let reference = DateTime::<Utc>::from_timestamp_millis(reference_ms).map_or_else(
                || format!("{reference_ms} ms since the Unix epoch"),
                |reference| reference.to_rfc3339_opts(SecondsFormat::Millis, true),
            );
            return Err(RejectReason::TimestampOutOfRange {
                value: truncate(value, 64),
                reference,
                max_days: rules.max_clock_skew_days,
            });
        }
    }
    Ok(parsed)
}

/// A value that may become one path segment of an S3 key (`environment=<token>/`).
/// Only this validated token ever reaches a key: never raw record text.
pub fn is_partition_token(value: &str) -> bool {
    let bytes = value.as_bytes();
    (1..=32).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn check_id(field: &'static str, value: &str) -> Result<(), RejectReason> {
    if value.is_empty() {
        return Err(RejectReason::InvalidField { field, message: "must not be empty".into() });
    }
    check_text(field, value)
}

/// At most `MAX_ID_LEN` bytes (not characters: ids become DynamoDB key parts, which are capped
/// in bytes), and no control characters.
fn check_text(field: &'static str, value: &str) -> Result<(), RejectReason> {
    if value.len() > MAX_ID_LEN {
        return Err(RejectReason::InvalidField {
            field,
            message: format!("is {} bytes, over {MAX_ID_LEN}", value.len()),
        });
    }
    // Ids become DynamoDB key parts; control characters there only cause grief downstream.
    if has_control(value) {
        return Err(RejectReason::InvalidField { field, message: "contains control characters".into() });
    }
    Ok(())
}

/// `value.chars().any(char::is_control)`. One branch-free pass settles the usual id, all
/// printable ASCII; only text with a control or non-ASCII byte is decoded to chars.
fn has_control(value: &str) -> bool {
    let printable_ascii = value.bytes().fold(true, |all, b| all & (0x20..0x7f).contains(&b));
    !printable_ascii && value.chars().any(char::is_control)
}

/// Presence only: what a present field holds is checked whatever the event type.
fn require(field: &'static str, value: &Option<Cow<'_, str>>, what: &str) -> Result<(), RejectReason> {
    match value {
        Some(_) => Ok(()),
        None => Err(RejectReason::InvalidField { field, message: format!("is required for {what}") }),
    }
}

/// Drops the whitespace between JSON tokens of already-validated JSON text, keeping everything
/// else (key order, escapes, number spelling) byte for byte. A scan, not a re-parse: re-building a
/// `serde_json::Value` for every record cost a tenth of the hot path.
/// A JSON object's members as raw text, read as [`decode`] reads a payload: no limits on what
/// it never parses (nesting, number range), the last of a repeated name. For the tools that
/// re-derive fields from a stored payload (`verify`, `verify-proof`).
pub type JsonMembers<'a> = std::collections::BTreeMap<Cow<'a, str>, &'a RawValue>;

/// `payload`'s members, or `None` if it is not a JSON object.
pub fn json_members(payload: &[u8]) -> Option<JsonMembers<'_>> {
    serde_json::from_slice(payload).ok()
}

/// Member `name` when it is a JSON string.
pub fn member_str(members: &JsonMembers, name: &str) -> Option<String> {
    members.get(name).and_then(|raw| serde_json::from_str(raw.get()).ok())
}

/// `occurred_at` as the event's time: RFC 3339 (chrono's reading), in UTC.
pub fn parse_rfc3339_utc(text: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    DateTime::parse_from_rfc3339(text).map(|at| at.with_timezone(&Utc))
}

/// The `metadata` column's text for a member's raw JSON: an object's text minus whitespace
/// between tokens; `None` for anything else.
pub fn stored_metadata(raw: &str) -> Option<Cow<'_, str>> {
    raw.trim_start().starts_with('{').then(|| compact_json(raw))
}

pub(crate) fn compact_json(raw: &str) -> Cow<'_, str> {
    let bytes = raw.as_bytes();
    // Whitespace nowhere, not even inside strings: compact, and this scan vectorises.
    if !bytes.iter().any(|&b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
        return Cow::Borrowed(raw);
    }
    let mut gaps = TokenGaps::default();
    let Some(first) = bytes.iter().position(|&b| gaps.is_gap(b)) else {
        return Cow::Borrowed(raw); // already compact: the usual case for machine-written JSON
    };
    let mut out = Vec::with_capacity(raw.len());
    out.extend_from_slice(&bytes[..first]);
    out.extend(bytes[first + 1..].iter().copied().filter(|&b| !gaps.is_gap(b)));
    // Only ASCII whitespace outside strings was removed, so the text is still valid UTF-8.
    Cow::Owned(String::from_utf8(out).unwrap_or_else(|_| raw.to_string()))
}

/// Follows JSON text byte by byte, knowing whether it is inside a string.
#[derive(Default)]
struct TokenGaps {
    in_string: bool,
    escaped: bool,
}

impl TokenGaps {
    /// Whether `b`, the next byte, is whitespace between tokens.
    fn is_gap(&mut self, b: u8) -> bool {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            false
        } else if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            true
        } else {
            self.in_string = b == b'"';
            false
        }
    }
}

/// The text with every `\uD800`-`\uDFFF` escape that is not half of a pair replaced by
/// `\uFFFD`, when it has any: valid JSON text that no UTF-8 string can hold.
fn without_lone_surrogates(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let unit_at = |at: usize| {
        let digits = bytes.get(at..at + 4)?;
        if bytes.get(at - 1) != Some(&b'u') || !digits.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    // Byte offsets of the lone escapes' backslashes.
    let mut lone = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        let Some(unit) = unit_at(i + 2) else {
            i += 2; // another escape: skip the escaped character
            continue;
        };
        let trail = |at: usize| {
            bytes.get(at) == Some(&b'\\') && unit_at(at + 2).is_some_and(|u| (0xDC00..=0xDFFF).contains(&u))
        };
        match unit {
            0xD800..=0xDBFF if trail(i + 6) => i += 12,
            0xD800..=0xDFFF => {
                lone.push(i);
                i += 6;
            }
            _ => i += 6,
        }
    }
    if lone.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    for at in lone {
        out.push_str(&text[from..at]);
        out.push_str("\\uFFFD");
        from = at + 6;
    }
    out.push_str(&text[from..]);
    Some(out)
}

/// serde_json's message quotes the offending value in full (a 300 KB string comes back as up to
/// 1 MB of escapes): kept whole, the reason would not fit a dead-letter header, whose refusal
/// stops the partition, nor a log line. The value is cut; where it is (line, column) is kept.
fn bounded_message(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let location = format!(" at line {} column {}", error.line(), error.column());
    let (what, location) = match text.strip_suffix(&location) {
        Some(what) => (what, location.as_str()),
        None => (text.as_str(), ""),
    };
    let chars = what.chars().count();
    if chars <= 200 {
        return text;
    }
    // The quoted value sits between what went wrong and what was expected: both ends stay.
    let head: String = what.chars().take(120).collect();
    let tail: String = what.chars().skip(chars - 60).collect();
    format!("{head}…{tail}{location}")
}

fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_string()
    } else {
        let mut out: String = text.chars().take(max_chars).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules() -> ValidationConfig {
        ValidationConfig::default()
    }

    const TS: i64 = 1_795_000_000_000; // 2026-11-18

    /// `environment`'s pattern in schemas/decision-event.schema.json.
    pub(crate) fn schema_environment_pattern() -> regex::Regex {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../schemas/decision-event.schema.json")).unwrap();
        regex::Regex::new(schema["properties"]["environment"]["pattern"].as_str().unwrap()).unwrap()
    }

    /// Environments at the edge of that pattern: tokens (some too long), tokens with one character
    /// put in anywhere, and arbitrary strings (which are almost never tokens).
    pub(crate) fn environment_candidates() -> impl Strategy<Value = String> {
        const TOKEN: &str = "[a-z0-9][a-z0-9_-]{0,34}";
        let odd = prop::sample::select(vec!['.', '/', '_', '-', '0', 'A', ' ', '\\', 'é', '\0', '\n']);
        prop_oneof![
            TOKEN,
            (TOKEN, any::<prop::sample::Index>(), odd).prop_map(|(mut token, at, c)| {
                token.insert(at.index(token.len() + 1), c);
                token
            }),
            ".{0,40}",
        ]
    }

    fn good() -> serde_json::Value {
        serde_json::json!({
            "decision_id": "d-1", "event_type": "decision", "occurred_at": "2026-11-18T10:00:00.5+01:00",
            "environment": "prod", "user_id": "u-1", "session_id": "s-1", "action": "approve_loan",
            "confidence_score": 0.91, "policy_version": "p-3", "model_version": "m-7", "request_id": "r-1",
            "metadata": {"region": "eu", "tags": ["a"]}
        })
    }

    fn decode_value(v: &serde_json::Value) -> Result<DecisionEvent, RejectReason> {
        decode(Some(&Bytes::from(v.to_string())), Some(TS), &rules())
    }

    #[test]
    fn good_decision_decodes_with_utc_time() {
        let e = decode_value(&good()).unwrap();
        assert_eq!(e.event_type, EventType::Decision);
        assert_eq!(e.occurred_at_key(), "2026-11-18T09:00:00.500000Z");
        assert_eq!(e.date(), (2026, 11, 18));
        assert_eq!(e.metadata(), Some(r#"{"region":"eu","tags":["a"]}"#));
    }

    #[test]
    fn escaped_strings_and_spaced_metadata_are_copied_the_rest_read_in_place() {
        let payload = r#"{"decision_id": "d-\u0031", "event_type": "override", "occurred_at": "2026-11-18T10:00:00Z",
            "environment": "prod", "user_id": "u-\"q\"", "session_id": "s-1", "action": "deny",
            "policy_version": "p-3", "model_version": "m-7", "request_id": "r-1", "reviewer_id": "rev-\u00e9",
            "override_reason": "plain", "metadata": { "a" : [1, "x y"] }}"#;
        let e = decode(Some(&Bytes::from(payload)), Some(TS), &rules()).unwrap();
        assert_eq!(e.decision_id(), "d-1");
        assert_eq!(e.user_id(), "u-\"q\"");
        assert_eq!(e.reviewer_id(), Some("rev-é"));
        assert_eq!(e.metadata(), Some(r#"{"a":[1,"x y"]}"#));
        // Interleaved with the copies, in-place fields still read their own bytes.
        assert_eq!((e.environment(), e.session_id(), e.override_reason()), ("prod", "s-1", Some("plain")));
        assert_eq!(e.environment_shared(), "prod");
        assert_eq!(e.severity(), None);
        let texts = [
            Some(e.decision_id()),
            Some(e.user_id()),
            Some(e.session_id()),
            Some(e.action()),
            Some(e.policy_version()),
            Some(e.model_version()),
            Some(e.request_id()),
            e.reviewer_id(),
            e.override_reason(),
            e.original_action(),
            e.safety_category(),
            e.severity(),
            e.metadata(),
        ];
        assert_eq!(e.text_lengths(), texts.map(|t| t.map_or(0, str::len)));
    }

    #[test]
    fn each_bad_input_gets_its_reason() {
        let mut cases: Vec<(serde_json::Value, &str)> = Vec::new();
        let with = |k: &str, v: serde_json::Value| {
            let mut g = good();
            g[k] = v;
            g
        };
        let without = |k: &str| {
            let mut g = good();
            g.as_object_mut().unwrap().remove(k);
            g
        };
        cases.push((with("confidence_score", "high".into()), "schema"));
        cases.push((without("user_id"), "schema"));
        cases.push((with("event_type", "vote".into()), "unknown_event_type"));
        cases.push((with("occurred_at", "yesterday".into()), "bad_timestamp"));
        cases.push((with("occurred_at", "1970-01-01T00:00:00Z".into()), "bad_timestamp"));
        cases.push((with("occurred_at", "2024-01-01T00:00:00Z".into()), "timestamp_out_of_range"));
        for env in ["../x", "a/b", "", "Prod", "prøve", &"x".repeat(33)] {
            cases.push((with("environment", env.into()), "bad_environment"));
        }
        cases.push((with("confidence_score", 1.5.into()), "invalid_field"));
        cases.push((without("confidence_score"), "invalid_field"));
        cases.push((with("decision_id", "".into()), "invalid_field"));
        cases.push((with("metadata", "str".into()), "invalid_field"));
        let mut ov = with("event_type", "override".into());
        ov.as_object_mut().unwrap().remove("confidence_score");
        cases.push((ov, "invalid_field"));
        let mut sf = with("event_type", "safety_flag".into());
        sf["safety_category"] = "self_harm".into();
        sf["severity"] = "extreme".into();
        cases.push((sf, "invalid_field"));
        // The optional fields' rules hold on every event type, as in the schema.
        cases.push((with("severity", "extreme".into()), "invalid_field"));
        cases.push((with("reviewer_id", "".into()), "invalid_field"));
        cases.push((with("safety_category", "x".repeat(257).into()), "invalid_field"));
        cases.push((with("original_action", "a\u{7}b".into()), "invalid_field"));
        cases.push((with("original_action", "x".repeat(257).into()), "invalid_field"));
        // An array holding the fields in order is not an event.
        let g = good();
        let in_wire_order = ["decision_id", "event_type", "occurred_at", "environment", "user_id", "session_id"]
            .into_iter()
            .chain(["action", "confidence_score", "policy_version", "model_version", "request_id"]);
        cases.push((serde_json::Value::Array(in_wire_order.map(|k| g[k].clone()).collect()), "schema"));
        for (value, code) in cases {
            let got = decode_value(&value).unwrap_err();
            assert_eq!(got.code(), code, "{value} -> {got}");
        }
        assert_eq!(decode(None, None, &rules()).unwrap_err().code(), "null_payload");
        assert_eq!(decode(Some(&Bytes::from_static(b"{\"a\":")), None, &rules()).unwrap_err().code(), "not_json");
        assert_eq!(decode(Some(&Bytes::from_static(b"\xff\xfe")), None, &rules()).unwrap_err().code(), "not_utf8");
        for lone in [
            r#"{"user_id":"\ud800"}"#,
            r#"{"user_id":"\udc00"}"#,
            r#"{"user_id":"\ud800x"}"#,
            r#"{"a":"\uD800\u0041"}"#,
        ] {
            let reason = decode(Some(&Bytes::from_static(lone.as_bytes())), None, &rules()).unwrap_err();
            assert_eq!(reason.code(), "schema", "{lone}: {reason}");
        }
        // A pair is one character; an escaped backslash before `ud800` is no escape; a cut
        // escape is not JSON.
        assert_eq!(without_lone_surrogates(r#""\ud83d\ude00""#), None);
        assert_eq!(without_lone_surrogates(r#""\\ud800""#), None);
        assert_eq!(without_lone_surrogates(r#""a\ud800\ud800\udc00b""#).as_deref(), Some(r#""a\uFFFD\ud800\udc00b""#));
        // Not JSON around the lone escape: not JSON.
        for bad in [r#"{"a":"\u12"}"#, r#"{"a":"\\ud800"#, r#"{oops "a":"\ud800"}"#, r#"\ud800"#, r#"{"a":"\ud800"#] {
            assert_eq!(
                decode(Some(&Bytes::from_static(bad.as_bytes())), None, &rules()).unwrap_err().code(),
                "not_json",
                "{bad}"
            );
        }
        let big = vec![b' '; rules().max_record_bytes + 1];
        assert_eq!(decode(Some(&Bytes::from(big)), None, &rules()).unwrap_err().code(), "oversize");
    }

    #[test]
    fn a_huge_value_in_a_parse_error_is_cut_and_its_place_kept() {
        // U+0085 is 2 bytes in the payload and 6 in serde's quote (`\u{85}`): whole, this reason
        // came to ~1 MB, over a dead-letter header's limit.
        let mut g = good();
        g["confidence_score"] = "\u{85}".repeat(170_000).into();
        let payload = Bytes::from(g.to_string());
        let rules = ValidationConfig { max_record_bytes: 358_400, ..rules() };
        let reason = decode(Some(&payload), Some(TS), &rules).unwrap_err();
        assert_eq!(reason.code(), "schema");
        let text = reason.to_string();
        assert!(text.len() < 1024, "{} bytes", text.len());
        assert!(text.contains("expected f64") && text.contains(" at line 1 column "), "{text}");
    }

    #[test]
    fn clock_skew_counts_whole_seconds_and_any_kafka_timestamp_is_a_reference() {
        let at = |occurred_at: &str, kafka_ms: i64, max_days: u32| {
            let mut g = good();
            g["occurred_at"] = occurred_at.into();
            let rules = ValidationConfig { max_clock_skew_days: max_days, ..rules() };
            decode(Some(&Bytes::from(g.to_string())), Some(kafka_ms), &rules).map(|_| ()).map_err(|e| e.to_string())
        };
        let day_ms = 86_400_000;
        // 2026-11-18T00:00:00Z; one day of skew allowed.
        let midnight = 1_794_960_000_000;
        assert_eq!(at("2026-11-19T00:00:00.999Z", midnight, 1), Ok(()), "one day and 0.999 s is one day");
        assert_eq!(at("2026-11-16T23:59:59.001Z", midnight, 1), Ok(()), "the same toward the past");
        assert!(at("2026-11-19T00:00:01Z", midnight, 1).is_err());
        assert!(at("2026-11-16T23:59:59Z", midnight, 1).is_err());
        assert_eq!(at("2026-11-19T00:00:00Z", midnight + day_ms, 0), Ok(()));
        // Beyond chrono's range (before, the check was skipped and the record accepted).
        for kafka_ms in [i64::MAX, i64::MIN + 1] {
            let message = at("2026-11-18T00:00:00Z", kafka_ms, 365).unwrap_err();
            assert!(message.contains(&format!("{kafka_ms} ms since the Unix epoch")), "{message}");
        }
        let message = at("2026-11-18T00:00:00Z", midnight + 400 * day_ms, 365).unwrap_err();
        assert!(message.contains("2027-12-23T00:00:00.000Z"), "{message}");
    }

    #[test]
    fn override_and_safety_flag_decode() {
        let mut ov = good();
        ov["event_type"] = "override".into();
        ov["reviewer_id"] = "rev-9".into();
        ov["override_reason"] = "manual check".into();
        ov["original_action"] = "approve_loan".into();
        let e = decode_value(&ov).unwrap();
        assert_eq!(e.reviewer_id(), Some("rev-9"));
        let mut sf = good();
        sf["event_type"] = "safety_flag".into();
        sf["safety_category"] = "pii_leak".into();
        sf["severity"] = "high".into();
        assert_eq!(decode_value(&sf).unwrap().severity(), Some("high"));
        // Optional fields a decision may carry, or spell as null.
        let mut d = good();
        d["original_action"] = "".into();
        d["severity"] = serde_json::Value::Null;
        d["reviewer_id"] = serde_json::Value::Null;
        assert_eq!(decode_value(&d).unwrap().original_action(), Some(""));
        let padded = format!("  \n{}", serde_json::to_string(&good()).unwrap());
        assert!(decode(Some(&Bytes::from(padded)), None, &rules()).is_ok(), "whitespace before the object");
        // A field the schema defines appears once; other keys, and those in metadata, as sent.
        let text = serde_json::to_string(&good()).unwrap();
        let twice = |extra: &str| decode(Some(&Bytes::from(text.replacen('{', extra, 1))), None, &rules());
        assert_eq!(twice(r#"{"user_id":"u-0","#).unwrap_err().code(), "schema");
        assert!(twice(r#"{"x":1,"x":2,"#).is_ok());
    }

    #[test]
    fn metadata_keeps_the_text_as_sent_minus_whitespace() {
        let raw = r#"{ "b" : "x  \" y", "a":[1 , 2.50e1],
            "c" : { } }"#;
        assert_eq!(compact_json(raw), r#"{"b":"x  \" y","a":[1,2.50e1],"c":{}}"#);
    }

    #[test]
    fn verdict_ignores_wall_clock() {
        // An old record replayed years later gets the same verdict: the reference is its Kafka time.
        let mut old = good();
        old["occurred_at"] = "2001-05-05T00:00:00Z".into();
        let ts_2001 = 989_020_800_000;
        assert!(decode(Some(&Bytes::from(old.to_string())), Some(ts_2001), &rules()).is_ok());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), ts in proptest::option::of(any::<i64>())) {
            match decode(Some(&Bytes::from(bytes)), ts, &rules()) {
                Ok(e) => prop_assert!(is_partition_token(e.environment())),
                Err(reason) => prop_assert!(!reason.code().is_empty() && !reason.to_string().is_empty()),
            }
        }

        #[test]
        fn has_control_agrees_with_char_is_control(value in any::<String>(), ascii in "[\\x00-\\x7f]{0,40}") {
            prop_assert_eq!(has_control(&value), value.chars().any(char::is_control));
            prop_assert_eq!(has_control(&ascii), ascii.chars().any(char::is_control));
        }

        #[test]
        fn compact_json_only_drops_whitespace_between_tokens(
            keys in proptest::collection::vec("[a-z \\\\\"\\t]{0,6}", 0..6),
            texts in proptest::collection::vec("[ -~\\t\\n\\u{e9}\\u{1F600}]{0,12}", 0..6),
        ) {
            let object: serde_json::Map<String, serde_json::Value> = keys.into_iter()
                .zip(texts.iter().map(|t| serde_json::json!([t, {"n": t.len()}, null, 1.5])))
                .collect();
            let value = serde_json::Value::Object(object);
            // Pretty-printed input compacts to exactly the compact serialisation (same key order).
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            prop_assert_eq!(compact_json(&pretty), serde_json::to_string(&value).unwrap());
            let compact = serde_json::to_string(&value).unwrap();
            prop_assert!(matches!(compact_json(&compact), Cow::Borrowed(_)), "compact input is not copied");
        }

        // Judged by the published schema's own pattern, not by the code under test.
        #[test]
        fn environment_is_accepted_exactly_when_the_schema_pattern_matches(env in environment_candidates()) {
            let mut v = good();
            v["environment"] = env.clone().into();
            let accepted = decode_value(&v).is_ok();
            prop_assert_eq!(accepted, schema_environment_pattern().is_match(&env), "{:?}", env);
            if accepted {
                prop_assert!(!env.contains('/') && !env.contains(".."));
            }
        }
    }
}
