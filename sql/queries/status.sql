-- Queries of `token-reset status` (listener/commands/status.py).  Each block starts with
-- "-- name: <name>" and takes its values as $n parameters.

-- name: status_summary
-- One snapshot.  Words as in the metrics: stale_users is the watchdog's number
-- (token_reset_stale_users): users still carrying a previous period's usage.
-- untouched_this_period also counts users last reset before this period at 0 used,
-- who need no reset; the near/at limit counts are token_reset_users_near_limit's
-- (threshold 0.8 and 1).  Every count comes from the usage counters (0005), kept by the
-- writes themselves, so status costs the same at 100k and 10M users; the last reset
-- is the newest reset row by id (partial index).
WITH bounds AS (
    SELECT pg_catalog.now() AS database_now,
           public.token_reset_period_start() AS period_start,
           public.token_reset_period_label(pg_catalog.now()) AS period
), users AS (
    SELECT coalesce(sum(c.users), 0)::bigint AS users_total,
           coalesce(sum(c.active_users) FILTER (WHERE c.period < b.period), 0)::bigint AS stale_users,
           coalesce(sum(c.users) FILTER (WHERE c.period < b.period), 0)::bigint
               AS untouched_this_period,
           coalesce(sum(c.active_users) FILTER (WHERE c.period = b.period), 0)::bigint
               AS active_this_period,
           coalesce(sum(c.resets) FILTER (WHERE c.period = b.period), 0)::bigint AS period_resets,
           coalesce(sum(c.near_limit_users) FILTER (WHERE c.period = b.period), 0)::bigint
               AS near_limit_this_period,
           coalesce(sum(c.at_limit_users) FILTER (WHERE c.period = b.period), 0)::bigint
               AS at_limit_this_period
      FROM public.token_reset_usage c CROSS JOIN bounds b
)
SELECT b.database_now,
       b.period,
       b.period_start,
       u.users_total,
       u.stale_users,
       u.untouched_this_period,
       u.active_this_period,
       u.period_resets,
       u.near_limit_this_period,
       u.at_limit_this_period,
       (SELECT t.created_at
          FROM public.token_transactions t
         WHERE t.operation = 'reset'
         ORDER BY t.id DESC
         LIMIT 1) AS last_reset_at
  FROM bounds b CROSS JOIN users u

-- name: status_last_run
-- The newest run that did (or is doing) work; "skipped" rows are other replicas and
-- callers stepping aside, so they are left out here.
SELECT run_id, source, started_at, finished_at, reset_count, batches, outcome, error
  FROM public.token_reset_bulk_runs
 WHERE outcome <> 'skipped'
 ORDER BY started_at DESC, id DESC
 LIMIT 1

-- name: status_last_success
SELECT run_id, source, started_at, finished_at, reset_count, batches, outcome, error
  FROM public.token_reset_bulk_runs
 WHERE outcome = 'success'
 ORDER BY finished_at DESC
 LIMIT 1
