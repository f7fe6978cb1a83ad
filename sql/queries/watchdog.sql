-- Queries of the missed-reset watchdog (listener/watchdog.py).  Each block starts
-- with "-- name: <name>" and takes its values as $n parameters.

-- name: watchdog_partitions
-- The ledger's partitions for this period and the next three (0006): cheap when they
-- exist, which is every check but the one after a month begins.
SELECT public.token_reset_ensure_partitions()

-- name: watchdog_compact
-- Folds the usage counters' deltas (0005) so the snapshot reads one row per period:
-- its cost is the writes since the last fold, not the number of users.
SELECT public.token_reset_compact_counters()

-- name: watchdog_fold_deductions
-- Adds the deductions written since the last fold to the per-period, per-feature
-- totals (0010), at most $1 ledger ids: its cost is the deductions since the last
-- check, not the ledger.  Runs in a READ COMMITTED transaction of its own.
SELECT public.token_reset_fold_deductions($1)

-- name: watchdog_snapshot
-- Everything the watchdog judges, in one statement (one snapshot, one round trip).
-- The period boundaries come from the database's clock and configured zone; how far
-- into the period "now" is, the listener decides with its own (injectable) clock.
-- The usage counters are read in one pass: every count below is a FILTER over the
-- view's rows (one per period), as in `status`.
--   stale_users:  users still carrying a previous period's usage: the usage
--                 counters (0005) of every period before this one, kept by the writes
--                 themselves, so the cost does not grow with the number of users.
--   month_resets: reset rows of this period, from the same counters.
--   last_reset_at: the newest reset row, from the partial index on reset ids.
--   last_bulk_success_at: the newest successful bulk run, whoever ran it (the
--                 built-in schedule, the endpoint, or `token-reset reset` in a cron).
--   near_limit_users, at_limit_users: users of this period at or above 80 % and
--                 100 % of their limit, from the same counters (0011).
--   tokens_by_feature: this period's deducted tokens (0010's totals, folded just
--                 before) per feature, the 10 largest by name and the rest as one
--                 `other` entry (bounded cardinality, whatever the application
--                 names its features): [[feature, tokens], ...], largest first.
--   refused_deductions: deductions refused for being over the allowance, ever (0011's
--                 sequence; a counter).
--   previous_period_had_usage: a reset this period or a stale user proves it for
--                 free; only when neither exists (the quiet or the broken case) is
--                 the probe for a deduction in last period's ledger partition run.
-- MATERIALIZED: the CASE reads the counts twice; without it they would be computed
-- twice.
WITH counts AS MATERIALIZED (
    SELECT coalesce(sum(c.active_users) FILTER (WHERE c.period < p.label), 0)::bigint
               AS stale_users,
           coalesce(sum(c.resets) FILTER (WHERE c.period = p.label), 0)::bigint AS month_resets,
           coalesce(sum(c.active_users) FILTER (WHERE c.period = p.label), 0)::bigint
               AS active_users,
           coalesce(sum(c.near_limit_users) FILTER (WHERE c.period = p.label), 0)::bigint
               AS near_limit_users,
           coalesce(sum(c.at_limit_users) FILTER (WHERE c.period = p.label), 0)::bigint
               AS at_limit_users,
           (SELECT t.created_at
              FROM public.token_transactions t
             WHERE t.operation = 'reset'
             ORDER BY t.id DESC
             LIMIT 1) AS last_reset_at
      FROM public.token_reset_usage c
     CROSS JOIN (SELECT public.token_reset_period_label(pg_catalog.now()) AS label) p
)
SELECT pg_catalog.now() AS database_now,
       public.token_reset_period_start() AS period_start,
       public.token_reset_period_label(pg_catalog.now()) AS period_label,
       c.stale_users,
       c.month_resets,
       c.active_users,
       c.last_reset_at,
       (SELECT max(r.finished_at) FROM public.token_reset_bulk_runs r
         WHERE r.outcome = 'success') AS last_bulk_success_at,
       c.near_limit_users,
       c.at_limit_users,
       (SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_array(f.feature, f.tokens)
                                             ORDER BY f.rank), '[]')
          FROM (SELECT CASE WHEN r.rank <= 10 THEN r.feature ELSE 'other' END AS feature,
                       sum(r.tokens)::bigint AS tokens, min(r.rank) AS rank
                  FROM (SELECT d.feature, d.tokens,
                               pg_catalog.row_number() OVER (ORDER BY d.tokens DESC, d.feature) AS rank
                          FROM public.token_reset_deduction_totals d
                         WHERE d.period = public.token_reset_period_label(pg_catalog.now())) r
                 GROUP BY 1) f) AS tokens_by_feature,
       (SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END
          FROM public.token_reset_refused_deductions s) AS refused_deductions,
       CASE
           WHEN c.stale_users > 0 OR c.month_resets > 0 THEN true
           ELSE public.token_reset_previous_period_had_usage()
       END AS previous_period_had_usage
  FROM counts c

-- name: watchdog_lease
-- Take or renew the watchdog lease ($1 = this replica's LISTENER_NAME, $2 = seconds it
-- lasts); a row comes back only to the holder.
INSERT INTO public.token_reset_leases AS l (name, holder, expires_at)
VALUES ('watchdog', $1, pg_catalog.now() + pg_catalog.make_interval(secs => $2))
ON CONFLICT (name) DO UPDATE
   SET holder = excluded.holder, expires_at = excluded.expires_at
 WHERE l.holder = excluded.holder OR l.expires_at < pg_catalog.now()
RETURNING l.holder

-- name: watchdog_share
-- The holder's snapshot, for the other replicas.
UPDATE public.token_reset_leases
   SET state = $2::jsonb, state_at = pg_catalog.now()
 WHERE name = 'watchdog' AND holder = $1

-- name: watchdog_shared
-- The holder's last snapshot, while it is no older than $1 seconds.
SELECT l.holder, l.state
  FROM public.token_reset_leases l
 WHERE l.name = 'watchdog' AND l.state IS NOT NULL
   AND l.state_at > pg_catalog.now() - pg_catalog.make_interval(secs => $1)
