-- Queries of `token-reset status` (listener/status.py).  Each block starts with
-- "-- name: <name>" and takes its values as $n parameters.

-- name: status_summary
-- One snapshot.  Words as in the metrics: stale_users is the watchdog's number
-- (token_reset_stale_users, the same predicate as sql/queries/watchdog.sql): users
-- still carrying a previous period's usage.  untouched_this_period also counts users
-- last reset before this period at 0 used, who need no reset.  The user counts are one sequential scan of user_tokens (the reset
-- columns are deliberately unindexed so a reset stays a HOT update); the period's
-- resets go through the unique index leading with (metadata ->> 'period'); the last
-- reset is the newest reset row by id (partial index), ids being handed out in the
-- order rows are written.
WITH bounds AS (
    SELECT pg_catalog.now() AS database_now,
           public.token_reset_period_start() AS period_start,
           public.token_reset_period_label(pg_catalog.now()) AS period
), users AS (
    SELECT count(*) AS users_total,
           count(*) FILTER (WHERE u.last_monthly_reset < b.period_start
                              AND u.monthly_tokens_used > 0) AS stale_users,
           count(*) FILTER (WHERE u.last_monthly_reset < b.period_start)
               AS untouched_this_period
      FROM public.user_tokens u CROSS JOIN bounds b
)
SELECT b.database_now,
       b.period,
       b.period_start,
       u.users_total,
       u.stale_users,
       u.untouched_this_period,
       (SELECT count(*)
          FROM public.token_transactions t
         WHERE t.operation = 'reset'
           AND (t.metadata ->> 'period') = b.period) AS period_resets,
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
