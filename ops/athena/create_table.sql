CREATE EXTERNAL TABLE IF NOT EXISTS `{{database}}`.`{{table}}` (
  -- aegis-audit trail, accepted rows only. `aegis-audit athena-ddl` prints this template with
  -- its four placeholders filled from the configuration (see ops/athena/README.md). Nothing may
  -- precede CREATE: Athena picks the engine for a statement from its first word, so the notes
  -- live inside the statement. They avoid quote characters on purpose.
  --
  -- Data columns: exactly those of schemas/parquet-columns.md, in file order (Athena matches
  -- Parquet columns by name). Utf8 is string, Int32 int, Int64 bigint, Float64 double, Binary
  -- binary, Timestamp(ms or us, UTC) timestamp. Timestamps are stored adjusted to UTC. Athena
  -- shows them as UTC wall-clock time with millisecond precision (occurred_at has microseconds
  -- in the files, which DuckDB and pyarrow show).
  `kafka_topic`      string    COMMENT 'source topic',
  `kafka_partition`  int       COMMENT 'source partition',
  `kafka_offset`     bigint    COMMENT 'source offset, unique per kafka_topic and kafka_partition',
  `kafka_timestamp`  timestamp COMMENT 'Kafka record timestamp, UTC',
  `status`           string    COMMENT 'always accepted in this table',
  `reject_code`      string    COMMENT 'null in this table, rejected rows are in quarantine',
  `reject_reason`    string    COMMENT 'null in this table',
  `decision_id`      string    COMMENT 'id of the AI decision, repeated by its overrides and safety flags',
  `event_type`       string    COMMENT 'decision, override or safety_flag',
  `occurred_at`      timestamp COMMENT 'time of the event itself, UTC, also gives year, month and day',
  `user_id`          string,
  `session_id`       string,
  `action`           string    COMMENT 'for overrides the action after the override',
  `confidence_score` double,
  `policy_version`   string,
  `model_version`    string,
  `request_id`       string,
  `reviewer_id`      string    COMMENT 'overrides only',
  `override_reason`  string    COMMENT 'overrides only',
  `original_action`  string    COMMENT 'overrides only, the action before the override',
  `safety_category`  string    COMMENT 'safety flags only',
  `severity`         string    COMMENT 'safety flags only, one of low, medium, high, critical',
  `metadata`         string    COMMENT 'metadata object of the event as compact JSON text',
  `payload`          binary    COMMENT 'exact Kafka record value bytes, what the chain hashes',
  `prev_hash`        string    COMMENT 'previous entry hash, 64 hex, see schemas/CHAIN.md',
  `entry_hash`       string    COMMENT 'hash of this entry, 64 hex'
)
COMMENT 'aegis-audit trail: AI decisions, human overrides and safety flags'
-- Partition keys come from the object key, not from the files:
--   LOCATION + year=YYYY/month=MM/day=DD/environment=ENV/TOPIC-pPPPP-FIRST-LAST.parquet
-- year, month and day are int, projected as integer ranges, with digits = 2 for month and day:
-- Athena writes month 1 as 01 when it builds the S3 path from storage.location.template, while
-- queries compare plain numbers (month = 1, year * 10000 + month * 100 + day >= 20261101) rather
-- than zero-padded strings. environment is not a data column (Athena forbids a data column with
-- the name of a partition key). The environment of an event is also inside payload.
PARTITIONED BY (
  `year`        int    COMMENT 'UTC year of occurred_at',
  `month`       int    COMMENT 'UTC month of occurred_at, 1 to 12, directory month=01 to 12',
  `day`         int    COMMENT 'UTC day of occurred_at, 1 to 31, directory day=01 to 31',
  `environment` string COMMENT 'environment of the event, every query must filter it'
)
STORED AS PARQUET
LOCATION '{{location}}'
TBLPROPERTIES (
  -- Partition projection: Athena computes the partitions from these properties, so there is
  -- nothing to register (no crawler, no MSCK REPAIR TABLE) and new days appear by themselves.
  -- The year range ends at 2200, the last year decode.rs accepts for occurred_at. It must start
  -- no later than the oldest occurred_at in the trail (rows of earlier years would be invisible),
  -- and 2000, the first year decode.rs accepts, is always safe. Queries filter on year anyway, so
  -- a wide range costs nothing. Days 1 to 31 in every month are fine: a missing day is an empty
  -- partition.
  'projection.enabled'          = 'true',
  'projection.year.type'        = 'integer',
  'projection.year.range'       = '{{projection_start_year}},2200',
  'projection.month.type'       = 'integer',
  'projection.month.range'      = '1,12',
  'projection.month.digits'     = '2',
  'projection.day.type'         = 'integer',
  'projection.day.range'        = '1,31',
  'projection.day.digits'       = '2',
  -- environment is injected: Athena takes its values from the query, so the table needs no list
  -- of environments (a new environment is queryable as soon as its first row lands) and every
  -- query must name its environments with a static equality or IN list. A query without one
  -- fails with CONSTRAINT_VIOLATION instead of listing every environment of every day. An enum
  -- would need this table altered for each new environment, and rows of an environment missing
  -- from the list would be invisible to every query, which an audit table must not allow.
  'projection.environment.type' = 'injected',
  -- Athena reads only the directories this template produces. So the other objects under
  -- LOCATION are not part of the table: quarantine/year=/month=/day=/ (rejected records, which
  -- have no environment directory) and _digests/ (signed digests).
  'storage.location.template'   = '{{location}}year=${year}/month=${month}/day=${day}/environment=${environment}/',
  -- Only used by Athena writes (CTAS, INSERT INTO). aegis-audit writes ZSTD Parquet too.
  'parquet.compression'         = 'ZSTD',
  'classification'              = 'parquet'
)
