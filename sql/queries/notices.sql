-- Queries of the rollover notifier (listener/notices.py).  Each block starts with
-- "-- name: <name>" and takes its values as $n parameters.  Destinations are SHA-256
-- hashes of their URLs (text, hex): no URL ever reaches the database.

-- name: notice_state
-- Cheap, every check: the current period and how many of the configured destinations
-- ($1) already got each kind of notice.  When every destination has its 'complete'
-- notice, the notifier does nothing more this period.
SELECT public.token_reset_period_label(pg_catalog.now()) AS period,
       public.token_reset_period_start() AS period_start,
       (SELECT count(*) FROM public.token_reset_notice_deliveries d
         WHERE d.period = public.token_reset_period_label(pg_catalog.now())
           AND d.kind = 'complete' AND d.state = 'sent'
           AND d.destination = ANY ($1::text[])) AS complete_sent,
       (SELECT count(*) FROM public.token_reset_notice_deliveries d
         WHERE d.period = public.token_reset_period_label(pg_catalog.now())
           AND d.kind = 'overdue' AND d.state = 'sent'
           AND d.destination = ANY ($1::text[])) AS overdue_sent

-- name: notice_facts
-- What a notice says, in one statement.  stale_users is the watchdog's number (users
-- still carrying last period's usage); resets are this period's ledger reset rows by
-- their source; bulk runs are those started since the period start.  bulk_running
-- counts runs still in flight (their backend alive): a rollover whose last batches
-- are committed but whose run has not recorded success yet is announced a moment
-- later, with the run's final numbers.
WITH p AS MATERIALIZED (
    SELECT public.token_reset_period_start() AS period_start,
           public.token_reset_period_label(pg_catalog.now()) AS period,
           public.token_reset_zone() AS zone,
           pg_catalog.now() AS observed_at
)
SELECT p.period,
       p.period_start,
       p.zone,
       p.observed_at,
       (SELECT count(*)
          FROM public.user_tokens u
         WHERE u.last_monthly_reset < p.period_start
           AND u.monthly_tokens_used > 0) AS stale_users,
       (SELECT coalesce(pg_catalog.jsonb_object_agg(r.source, r.users), '{}'::jsonb)
          FROM (SELECT t.metadata ->> 'source' AS source, count(*) AS users
                  FROM public.token_transactions t
                 WHERE t.operation = 'reset'
                   AND (t.metadata ->> 'period') = public.token_reset_period_label(pg_catalog.now())
                 GROUP BY 1) r)::text AS resets_by_source,
       (SELECT max(t.created_at)
          FROM public.token_transactions t
         WHERE t.operation = 'reset'
           AND (t.metadata ->> 'period') = public.token_reset_period_label(pg_catalog.now()))
           AS last_reset_at,
       (SELECT coalesce(pg_catalog.jsonb_object_agg(b.outcome, b.runs), '{}'::jsonb)
          FROM (SELECT r.outcome, count(*) AS runs
                  FROM public.token_reset_bulk_runs r
                 WHERE r.started_at >= p.period_start
                 GROUP BY 1) b)::text AS bulk_runs,
       (SELECT coalesce(sum(r.batches), 0)
          FROM public.token_reset_bulk_runs r
         WHERE r.started_at >= p.period_start) AS bulk_batches,
       (SELECT count(*)
          FROM public.token_reset_bulk_runs r
         WHERE r.outcome = 'running'
           AND EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = r.pid))
           AS bulk_running
  FROM p

-- name: notice_freeze
-- The first replica to find a notice due records its facts; later ones keep them.
INSERT INTO public.token_reset_notices (period, kind, facts)
VALUES ($1, $2, $3::jsonb)
ON CONFLICT (period, kind) DO NOTHING

-- name: notice_frozen_facts
SELECT facts::text AS facts FROM public.token_reset_notices WHERE period = $1 AND kind = $2

-- name: notice_claim
-- Atomically take one delivery: a new one, a failed one whose retry time has come,
-- or one whose claimer's lease ran out (it died mid-send).  A row that is sent, or
-- leased to a live replica, is left alone and nothing is returned.  The claim's
-- (claimed_by, attempts) is the fence the outcome is written under.
INSERT INTO public.token_reset_notice_deliveries AS d
       (period, kind, destination, label, state, attempts, claimed_by, lease_until)
VALUES ($1, $2, $3, $4, 'sending', 1, $5,
        pg_catalog.now() + pg_catalog.make_interval(secs => $6::float8))
ON CONFLICT (period, kind, destination) DO UPDATE
   SET state = 'sending',
       attempts = d.attempts + 1,
       label = EXCLUDED.label,
       claimed_by = EXCLUDED.claimed_by,
       lease_until = EXCLUDED.lease_until,
       next_attempt_at = NULL,
       updated_at = pg_catalog.now()
 WHERE (d.state = 'failed' AND d.next_attempt_at <= pg_catalog.now())
    OR (d.state = 'sending' AND d.lease_until < pg_catalog.now())
RETURNING d.attempts

-- name: notice_sent
-- Only under the claim that sent it: a claim that outlived its lease and was taken
-- over is not overwritten (the return value says whether it was ours).
UPDATE public.token_reset_notice_deliveries
   SET state = 'sent', sent_at = pg_catalog.now(), lease_until = NULL, last_error = NULL,
       updated_at = pg_catalog.now()
 WHERE period = $1 AND kind = $2 AND destination = $3
   AND claimed_by = $4 AND attempts = $5 AND state = 'sending'
RETURNING sent_at

-- name: notice_failed
UPDATE public.token_reset_notice_deliveries
   SET state = 'failed', lease_until = NULL, last_error = $6,
       next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => $7::float8),
       updated_at = pg_catalog.now()
 WHERE period = $1 AND kind = $2 AND destination = $3
   AND claimed_by = $4 AND attempts = $5 AND state = 'sending'
RETURNING next_attempt_at
