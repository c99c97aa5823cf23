-- Human overrides per reviewer in a date range: how often each reviewer changed which action
-- into which (original_action -> action).
--
-- Parameters: replace these example literals in the query below (each appears there once).
--   ('prod', 'staging', 'dev')           environments to count. Required: the table projects
--                                        environment as injected, so list them explicitly.
--   2026-11-01 to 2026-11-30             the UTC days to count, both inclusive, written three ways:
--     year BETWEEN 2026 AND 2026           first and last year
--     BETWEEN 20261101 AND 20261130        first and last day as YYYYMMDD
--     TIMESTAMP '2026-11-01 00:00:00'      start of the first day (inclusive)
--     TIMESTAMP '2026-12-01 00:00:00'      start of the day after the last day (exclusive)
--   The year/month/day filters choose the S3 prefixes Athena reads (what you pay for); the
--   occurred_at filter gives the exact time bounds.
--
-- original_action is optional in the event schema; overrides without it form their own group
-- (original_action NULL), listed last for each reviewer.
-- Runs on Athena (Trino) and, with the table name replaced, on DuckDB (tests/py/test_athena.py).
SELECT
  reviewer_id,
  original_action,
  action,
  count(*) AS overrides,
  count(DISTINCT decision_id) AS decisions,
  min(occurred_at) AS first_at,
  max(occurred_at) AS last_at
FROM {{database}}.{{table}}
WHERE environment IN ('prod', 'staging', 'dev')
  AND year BETWEEN 2026 AND 2026
  AND year * 10000 + month * 100 + day BETWEEN 20261101 AND 20261130
  AND occurred_at >= TIMESTAMP '2026-11-01 00:00:00'
  AND occurred_at < TIMESTAMP '2026-12-01 00:00:00'
  AND event_type = 'override'
GROUP BY reviewer_id, original_action, action
ORDER BY reviewer_id, overrides DESC, original_action NULLS LAST, action
