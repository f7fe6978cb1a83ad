-- Queries of `token-reset demo` (listener/demo/run.py).  Each block starts with
-- "-- name: <name>" and takes its values as $n parameters.  The demo owns its
-- embedded server and, on it, the database token_reset_demo, rebuilt every run so
-- reruns tell the same story.

-- name: demo_drop_database
-- FORCE: a previous demo killed mid-run may have left sessions behind.
DROP DATABASE IF EXISTS token_reset_demo WITH (FORCE)

-- name: demo_create_database
CREATE DATABASE token_reset_demo

-- name: demo_seed_users
-- One statement for every user.  Stale users were last reset on the 28th of last
-- month (period start - 1 month + 27 days): they carry last month's usage until a
-- write, deduct_tokens() or the bulk reset clears it.  The INSERT names
-- last_monthly_reset itself, which the insert trigger leaves alone.  (Multi-array
-- unnest is FROM-clause syntax, so it cannot be schema-qualified.)
INSERT INTO public.user_tokens (user_id, monthly_token_limit, monthly_tokens_used,
                                last_monthly_reset)
SELECT u.user_id,
       500,
       u.used,
       CASE WHEN u.stale
            THEN public.token_reset_period_start() - interval '1 month' + interval '27 days'
            ELSE pg_catalog.now()
       END
  FROM unnest($1::uuid[], $2::integer[], $3::boolean[]) AS u(user_id, used, stale)

-- name: demo_deduct
-- The application's call: resets a stale row first (ledger source 'function').
SELECT public.deduct_tokens($1, $2, 'demo_chat')

-- name: demo_app_write
-- The owner writing the row directly (a data fix; the application role may not): the
-- BEFORE UPDATE trigger resets a stale row first (ledger source 'trigger'), so the
-- result is $2 used, not old + $2.
UPDATE public.user_tokens
   SET monthly_tokens_used = monthly_tokens_used + $2, updated_at = pg_catalog.now()
 WHERE user_id = $1
