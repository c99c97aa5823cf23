-- Decisions of one user in a date range, newest first.
--
-- Parameters: replace these example literals in the query below (each appears there once).
--   'user-0042'                          user_id
--   'prod'                               environment; for several: environment IN ('prod', 'staging').
--                                        Required: the table projects environment as injected.
--   2026-11-01 to 2026-11-30             the UTC days to search, both inclusive, written three ways:
--     year BETWEEN 2026 AND 2026           first and last year
--     BETWEEN 20261101 AND 20261130        first and last day as YYYYMMDD
--     TIMESTAMP '2026-11-01 00:00:00'      start of the first day (inclusive)
--     TIMESTAMP '2026-12-01 00:00:00'      start of the day after the last day (exclusive)
--   The year/month/day filters choose the S3 prefixes Athena reads (what you pay for); the
--   occurred_at filter gives the exact time bounds, so it may also cut inside a day.
--
-- Drop the event_type line to see the overrides and safety flags of the user as well.
-- Runs on Athena (Trino) and, with the table name replaced, on DuckDB (tests/py/test_athena.py).
SELECT
  occurred_at,
  decision_id,
  environment,
  action,
  confidence_score,
  policy_version,
  model_version,
  session_id,
  request_id
FROM {{database}}.{{table}}
WHERE environment = 'prod'
  AND year BETWEEN 2026 AND 2026
  AND year * 10000 + month * 100 + day BETWEEN 20261101 AND 20261130
  AND occurred_at >= TIMESTAMP '2026-11-01 00:00:00'
  AND occurred_at < TIMESTAMP '2026-12-01 00:00:00'
  AND user_id = 'user-0042'
  AND event_type = 'decision'
ORDER BY occurred_at DESC, kafka_partition, kafka_offset
