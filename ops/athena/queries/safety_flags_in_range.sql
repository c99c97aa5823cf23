-- Safety flags raised in a time range, per environment, with their severity and category.
--
-- Parameters: replace these example literals in the query below (each appears there once).
--   ('prod', 'staging', 'dev')           environments to search. Required: the table projects
--                                        environment as injected, so list them explicitly.
--   2026-11-23 00:00 to 2026-11-24 12:00 the UTC time range, start inclusive, end exclusive:
--     TIMESTAMP '2026-11-23 00:00:00'      start
--     TIMESTAMP '2026-11-24 12:00:00'      end
--     year BETWEEN 2026 AND 2026           years of the start and of the end
--     BETWEEN 20261123 AND 20261124        days (YYYYMMDD) of the start and of the end
--   ('medium', 'high', 'critical')       severities to report (all four: low, medium, high, critical)
--   The year/month/day filters choose the S3 prefixes Athena reads (what you pay for); the
--   occurred_at filter gives the exact time bounds.
--
-- Runs on Athena (Trino) and, with the table name replaced, on DuckDB (tests/py/test_athena.py).
SELECT
  environment,
  occurred_at,
  severity,
  safety_category,
  decision_id,
  user_id,
  session_id,
  action,
  model_version,
  policy_version
FROM {{database}}.{{table}}
WHERE environment IN ('prod', 'staging', 'dev')
  AND year BETWEEN 2026 AND 2026
  AND year * 10000 + month * 100 + day BETWEEN 20261123 AND 20261124
  AND occurred_at >= TIMESTAMP '2026-11-23 00:00:00'
  AND occurred_at < TIMESTAMP '2026-11-24 12:00:00'
  AND event_type = 'safety_flag'
  AND severity IN ('medium', 'high', 'critical')
ORDER BY environment, occurred_at, kafka_partition, kafka_offset
