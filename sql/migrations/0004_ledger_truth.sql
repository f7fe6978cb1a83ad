-- 0004_ledger_truth: the ledger is the truth, and nobody but the owner can say otherwise.
--
-- What changes, and why (README, "The SQL contract", states the resulting rules):
--
-- * The application role no longer writes user_tokens: it may INSERT a new user
--   (user_id and monthly_token_limit only) and change usage and limits only through
--   functions that write the matching ledger row (deduct_tokens, grant_tokens,
--   set_token_limit).  So for every user, monthly_tokens_used = the deductions minus
--   the grants recorded after its latest reset row.
-- * Usage is cleared only together with its reset row: every path inserts the
--   ledger row first and clears only the users whose row went in.  A user already
--   reset in this period (data moved back by the owner) is made current with its
--   usage kept, never cleared a second time without a trace.
-- * The period is the month in the configured zone, starting at the first instant
--   whose local date is the 1st (a DST fall-back at midnight starts it at the first
--   midnight, not the second).  The zone has one source of truth, the settings row;
--   the inlined period functions and the trigger's WHEN clause are generated from it
--   by token_reset_apply_settings(), which `token-reset migrate` runs after every
--   migration.  A new zone takes effect at the next period boundary once users exist,
--   so a change never re-judges (and clears) usage of the current period.
-- * No write moves last_monthly_reset backwards: the future-date clamp compares with
--   the clock, not with the start of the writing transaction (which may have begun
--   before another transaction's reset, or before midnight).
-- * Functions that run with the owner's rights resolve names only in pg_catalog (and
--   never functions or operators in pg_temp): an object planted in schema public by
--   a role that may CREATE there can no longer capture a call.
-- * Privileges are one declared set, applied by token_reset_apply_privileges(): the
--   application role calls the public contract only; the listener has its own role.
-- * Bulk batches clear users by key array (no join the planner can misjudge above a
--   million users), serialise final passes on a table only the owner can lock, and
--   every bulk run, whoever starts it, leaves a row in token_reset_bulk_runs.

-- Tables and our own functions are schema-qualified below, and this migration resolves
-- every other name in pg_catalog: a trigger's WHEN clause or a view is bound when it
-- is created.  Functions with SET search_path = pg_catalog, pg_temp write operators
-- plainly, since they can resolve nowhere else (pg_temp is never searched for
-- functions or operators); SQL functions without it (inlined into their caller)
-- qualify theirs with OPERATOR(pg_catalog.x).
SET LOCAL search_path = pg_catalog, pg_temp;

-- ---------------------------------------------------------------- roles ----
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'token_reset_listener') THEN
        IF (SELECT rolsuper OR rolcreaterole FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
            CREATE ROLE token_reset_listener NOLOGIN;
        ELSE
            RAISE NOTICE 'role token_reset_listener missing and % may not create it: its grants wait until it exists (README: managed PostgreSQL)', current_user;
        END IF;
    END IF;
END
$roles$;

-- -------------------------------------------------------------- settings ---
-- The zone in force before and after a change, and when the change takes effect.
ALTER TABLE public.token_reset_settings
    ADD COLUMN previous_timezone text NOT NULL DEFAULT 'UTC',
    ADD COLUMN timezone_effective_at timestamptz NOT NULL DEFAULT '-infinity';
UPDATE public.token_reset_settings SET previous_timezone = timezone;

-- --------------------------------------------------------------- ledger ----
ALTER TABLE public.token_transactions
    DROP CONSTRAINT token_transactions_operation_known,
    ADD CONSTRAINT token_transactions_operation_known
        CHECK (operation IN ('deduct', 'reset', 'grant', 'limit')),
    -- A closed set: the listener labels metrics with it.
    ADD CONSTRAINT token_transactions_reset_source_known CHECK (
        operation <> 'reset'
        OR coalesce(metadata ->> 'source', '') IN ('trigger', 'function', 'bulk'));

-- Only the owner may lock this table (nobody else has any privilege on it): final
-- passes and one-transaction bulk runs queue on it.  An advisory lock any role can
-- take would let a role with no grants stall or switch off the bulk backup.
CREATE TABLE public.token_reset_bulk_lock (singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton));

-- ------------------------------------------------------------- bulk runs ---
ALTER TABLE public.token_reset_bulk_runs
    ADD COLUMN pid integer,
    ADD COLUMN retries integer NOT NULL DEFAULT 0,
    DROP CONSTRAINT token_reset_bulk_runs_source_known,
    ADD CONSTRAINT token_reset_bulk_runs_source_known
        CHECK (source IN ('endpoint', 'cli', 'schedule', 'sql', 'procedure', 'pg_cron'));

-- ---------------------------------------------------------------- period ---
-- The first instant whose local date (in p_zone) is the 1st of the month containing
-- p_at.  date_trunc alone picks the second midnight when a DST fall-back repeats
-- midnight on the 1st (America/Havana, 2026-11-01): the local midnight interpreted
-- with the offset in force three hours earlier is that first midnight whenever its
-- local date is still the 1st.  One expression without FROM, so it is inlined.
CREATE FUNCTION public.token_reset_month_start(p_at timestamptz, p_zone text)
RETURNS timestamptz
    LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT CASE
    WHEN pg_catalog.date_trunc('day', pg_catalog.timezone(p_zone,
             pg_catalog.timezone(p_zone, pg_catalog.date_trunc('month', pg_catalog.timezone(p_zone, p_at))
                                         OPERATOR(pg_catalog.-) interval '3 hours')
             OPERATOR(pg_catalog.+) interval '3 hours'))
         OPERATOR(pg_catalog.=) pg_catalog.date_trunc('month', pg_catalog.timezone(p_zone, p_at))
     AND pg_catalog.timezone(p_zone, pg_catalog.date_trunc('month', pg_catalog.timezone(p_zone, p_at))
                                     OPERATOR(pg_catalog.-) interval '3 hours')
         OPERATOR(pg_catalog.+) interval '3 hours'
         OPERATOR(pg_catalog.<) pg_catalog.timezone(p_zone, pg_catalog.date_trunc('month', pg_catalog.timezone(p_zone, p_at)))
    THEN pg_catalog.timezone(p_zone, pg_catalog.date_trunc('month', pg_catalog.timezone(p_zone, p_at))
                                     OPERATOR(pg_catalog.-) interval '3 hours')
         OPERATOR(pg_catalog.+) interval '3 hours'
    ELSE pg_catalog.timezone(p_zone, pg_catalog.date_trunc('month', pg_catalog.timezone(p_zone, p_at)))
END
$$;

-- Generates, from the settings row alone, everything that spells the zone out: the
-- inlined period functions (the hot path reads no table) and the row trigger's WHEN
-- clause (a function call there is re-inlined on every statement).  Run by
-- token_reset_configure() and by `token-reset migrate` after every run, so a later
-- migration that re-creates one of these from an old text is put right at once.
CREATE FUNCTION public.token_reset_apply_settings() RETURNS jsonb
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s public.token_reset_settings%ROWTYPE;
    v_in_force text;       -- zone in force at the instant `%s` (a SQL expression)
    v_start text;          -- exact period start at now()
    v_bound text;          -- cheap upper bound of the period start (WHEN clause)
    v_next text;           -- start of the next period
BEGIN
    SELECT * INTO STRICT s FROM public.token_reset_settings;
    IF s.timezone_effective_at = '-infinity' OR s.previous_timezone = s.timezone THEN
        v_in_force := format('%L::text', s.timezone);
        v_start := format('public.token_reset_month_start(pg_catalog.now(), %L)', s.timezone);
        v_bound := format('pg_catalog.date_trunc(''month'', pg_catalog.now(), %L)', s.timezone);
    ELSE
        v_in_force := format('CASE WHEN %%s OPERATOR(pg_catalog.>=) %L::timestamptz THEN %L::text ELSE %L::text END',
                             s.timezone_effective_at, s.timezone, s.previous_timezone);
        v_start := format('CASE WHEN pg_catalog.now() OPERATOR(pg_catalog.>=) %1$L::timestamptz'
                          ' THEN public.token_reset_month_start(pg_catalog.now(), %2$L)'
                          ' ELSE public.token_reset_month_start(pg_catalog.now(), %3$L) END',
                          s.timezone_effective_at, s.timezone, s.previous_timezone);
        v_bound := format('CASE WHEN pg_catalog.now() OPERATOR(pg_catalog.>=) %1$L::timestamptz'
                          ' THEN pg_catalog.date_trunc(''month'', pg_catalog.now(), %2$L)'
                          ' ELSE pg_catalog.date_trunc(''month'', pg_catalog.now(), %3$L) END',
                          s.timezone_effective_at, s.timezone, s.previous_timezone);
    END IF;
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION public.token_reset_period_start() RETURNS timestamptz '
        'LANGUAGE sql STABLE PARALLEL SAFE AS $f$ SELECT %s $f$', v_start);
    -- Never before the exact start, and one time-zone conversion instead of several: a
    -- row reset at or after it is current for sure (deduct_tokens' fast path); the
    -- rare row between the two (a DST change at midnight) takes the exact slow path.
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION public.token_reset_period_bound() RETURNS timestamptz '
        'LANGUAGE sql STABLE PARALLEL SAFE AS $f$ SELECT %s $f$', v_bound);
    -- Start of the period after the current one (what users see as "resets at"); a
    -- pending zone change takes effect exactly there.
    v_next := format('public.token_reset_month_start(pg_catalog.timezone(%1$L, '
                     'pg_catalog.date_trunc(''month'', pg_catalog.timezone(%1$L, pg_catalog.now())) '
                     'OPERATOR(pg_catalog.+) interval ''1 month 1 day''), %1$L)', s.timezone);
    IF s.timezone_effective_at <> '-infinity' AND s.previous_timezone <> s.timezone THEN
        v_next := format('CASE WHEN pg_catalog.now() OPERATOR(pg_catalog.<) %L::timestamptz '
                         'THEN %L::timestamptz ELSE %s END',
                         s.timezone_effective_at, s.timezone_effective_at, v_next);
    END IF;
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION public.token_reset_next_period_start() RETURNS timestamptz '
        'LANGUAGE sql STABLE PARALLEL SAFE AS $f$ SELECT %s $f$', v_next);
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION public.token_reset_zone() RETURNS text '
        'LANGUAGE sql STABLE PARALLEL SAFE AS $f$ SELECT %s $f$',
        format(v_in_force, 'pg_catalog.now()'));
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION public.token_reset_period_label(p_at timestamptz) RETURNS text '
        'LANGUAGE sql STABLE PARALLEL SAFE AS $f$ SELECT pg_catalog.to_char('
        'pg_catalog.timezone(%s, p_at), ''YYYY-MM'') $f$',
        format(v_in_force, 'p_at'));
    -- Fires for every write to a row that may be stale (the bound is never before
    -- the exact start; the function decides exactly), and for a claimed reset time
    -- later than the clock.  Writes naming last_monthly_reset themselves (the reset
    -- functions, the owner moving data) are left alone.
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER user_tokens_reset_on_write '
        'BEFORE UPDATE ON public.user_tokens FOR EACH ROW '
        'WHEN ((OLD.last_monthly_reset OPERATOR(pg_catalog.<) %s '
        'AND NEW.last_monthly_reset OPERATOR(pg_catalog.=) OLD.last_monthly_reset) '
        'OR NEW.last_monthly_reset OPERATOR(pg_catalog.>) pg_catalog.clock_timestamp()) '
        'EXECUTE FUNCTION public.check_and_reset_monthly_tokens()', v_bound);
    RETURN pg_catalog.jsonb_build_object(
        'timezone', s.timezone,
        'previous_timezone', s.previous_timezone,
        'effective_at', s.timezone_effective_at,
        'notify_per_write', s.notify_per_write,
        'period_start', public.token_reset_period_start(),
        'period', public.token_reset_period_label(pg_catalog.now()));
END
$$;

-- The zone that defines "the month".  On a database without users it takes effect at
-- once.  Otherwise at the next period boundary: the later of the next period's start
-- in the zone in force now and in the new zone, so the current period is never cut
-- short, no row current now becomes stale, and the label runs on without a gap or a
-- repeat.  Calling it again before then replaces the pending change.
DROP FUNCTION public.token_reset_configure(text, boolean);
CREATE FUNCTION public.token_reset_configure(
    p_timezone text DEFAULT NULL,
    p_notify_per_write boolean DEFAULT NULL
) RETURNS jsonb
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s public.token_reset_settings%ROWTYPE;
    v_in_force text;
    v_next_label text;
    v_effective timestamptz;
BEGIN
    SELECT * INTO STRICT s FROM public.token_reset_settings FOR UPDATE;
    IF p_timezone IS NOT NULL THEN
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_names WHERE name = p_timezone)
           AND upper(p_timezone) <> 'UTC' THEN
            RAISE EXCEPTION 'unknown time zone: %', p_timezone
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'use a name from pg_timezone_names, e.g. UTC or Europe/Berlin';
        END IF;
        v_in_force := public.token_reset_zone();
        IF NOT EXISTS (SELECT 1 FROM public.user_tokens) THEN
            v_effective := '-infinity';
        ELSE
            -- Start of the next period in the zone in force, and of that same month
            -- in the new zone; the later one.
            v_effective := public.token_reset_next_period_start();
            v_next_label := public.token_reset_period_label(v_effective);
            v_effective := greatest(v_effective, public.token_reset_month_start(
                timezone(p_timezone, to_date(v_next_label || '-02', 'YYYY-MM-DD')::timestamp),
                p_timezone));
        END IF;
        IF p_timezone = v_in_force AND s.timezone = v_in_force THEN
            v_effective := '-infinity';
        END IF;
        UPDATE public.token_reset_settings
           SET previous_timezone = v_in_force, timezone = p_timezone,
               timezone_effective_at = v_effective;
    END IF;
    IF p_notify_per_write IS NOT NULL THEN
        UPDATE public.token_reset_settings SET notify_per_write = p_notify_per_write;
    END IF;
    RETURN public.token_reset_apply_settings();
END
$$;

-- ----------------------------------------------------------- append-only ---
CREATE OR REPLACE FUNCTION public.token_reset_ledger_is_append_only() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'token_transactions is an append-only ledger: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'correct usage with grant_tokens() instead of changing history';
END
$$;

-- ---------------------------------------------------------------- notify ---
-- Doorbells.  Deductions, grants and limit changes ring nothing and pay nothing: the
-- trigger below fires only for reset rows (its WHEN is checked without entering
-- plpgsql), and bulk batches ring once per batch themselves.  Single resets (the row
-- trigger, deduct_tokens, reset_user_tokens_if_needed) ring once per transaction:
-- the payload names the transaction's first such id and is the same for every row,
-- and PostgreSQL delivers identical payloads of one transaction once.
DROP TRIGGER token_transactions_notify_resets ON public.token_transactions;
DROP FUNCTION public.token_reset_notify_batch();

CREATE FUNCTION public.token_reset_notify_single() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_txn_first text;
BEGIN
    IF NOT (SELECT notify_per_write FROM public.token_reset_settings) THEN
        RETURN NULL;
    END IF;
    v_txn_first := current_setting('token_reset.txn_first_id', true);
    IF coalesce(v_txn_first, '') = '' THEN
        v_txn_first := NEW.id::text;
        PERFORM set_config('token_reset.txn_first_id', v_txn_first, true);
    END IF;
    PERFORM pg_notify('token_resets', json_build_object(
        'v', 1, 'first_id', v_txn_first::bigint, 'last_id', v_txn_first::bigint,
        'count', 1, 'coalesced', true)::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER token_transactions_notify_resets
    AFTER INSERT ON public.token_transactions
    FOR EACH ROW
    WHEN (NEW.operation = 'reset'
          AND (NEW.metadata ->> 'source') <> 'bulk')
    EXECUTE FUNCTION public.token_reset_notify_single();

-- ----------------------------------------------------------------- reset ---
-- The one place a reset row's metadata is spelled.  STABLE like jsonb_build_object:
-- declared IMMUTABLE it would never be inlined and would run as a SQL function once per
-- reset row (+60 % on the bulk statement, measured).
CREATE FUNCTION public.token_reset_reset_metadata(p_period text, p_previous_used integer, p_source text)
RETURNS jsonb
    LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT pg_catalog.jsonb_build_object('period', p_period, 'previous_used', p_previous_used,
                                           'source', p_source) $$;

-- The reset chain for a set of locked users: ledger rows first, then clear exactly
-- the users whose row went in.  A user already reset in this period (the owner moved
-- its data back) gets no second row and keeps its usage; it is only made current.
-- Callers hold the rows' locks.  Rings one doorbell for a bulk chain.
CREATE FUNCTION public.token_reset_clear(
    p_ids uuid[], p_used integer[], p_source text,
    OUT reset_count integer, OUT first_id bigint, OUT last_id bigint)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_period text := public.token_reset_period_label(now());
    v_logged uuid[];
    v_kept uuid[];
BEGIN
    WITH logged AS (
        INSERT INTO public.token_transactions (user_id, operation, feature, amount, metadata)
        SELECT c.user_id, 'reset', 'monthly_rollover', c.used,
               public.token_reset_reset_metadata(v_period, c.used, p_source)
          FROM unnest(p_ids, p_used) AS c(user_id, used)
         WHERE c.used > 0
        ON CONFLICT DO NOTHING
        RETURNING user_id, id
    )
    SELECT coalesce(array_agg(user_id), '{}'), count(*)::integer, min(id), max(id)
      INTO v_logged, reset_count, first_id, last_id
      FROM logged;
    UPDATE public.user_tokens
       SET monthly_tokens_used = 0, last_monthly_reset = now(), updated_at = now()
     WHERE user_id = ANY (v_logged);
    IF reset_count < cardinality(p_ids) THEN
        SELECT coalesce(array_agg(k.id), '{}') INTO v_kept
          FROM (SELECT unnest(p_ids) EXCEPT SELECT unnest(v_logged)) AS k(id);
        UPDATE public.user_tokens
           SET last_monthly_reset = now(), updated_at = now()
         WHERE user_id = ANY (v_kept);
    END IF;
    IF p_source = 'bulk' AND reset_count > 0 THEN
        PERFORM pg_notify('token_resets', json_build_object(
            'v', 1, 'first_id', first_id, 'last_id', last_id, 'count', reset_count)::text);
    END IF;
END
$$;

-- Shared by every path that resets one user: locks the row and, when stale, resets
-- it.  Returns the usage it cleared (with its ledger row), 0 when it made the row
-- current without clearing anything, NULL when the row was current or is unknown.
CREATE OR REPLACE FUNCTION public.token_reset_one_user(p_user_id uuid, p_source text) RETURNS integer
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_used integer;
    v_done record;
BEGIN
    SELECT monthly_tokens_used INTO v_used
      FROM public.user_tokens
     WHERE user_id = p_user_id
       AND last_monthly_reset < public.token_reset_period_start()
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_done := public.token_reset_clear(ARRAY[p_user_id], ARRAY[v_used], p_source);
    RETURN CASE WHEN v_done.reset_count > 0 THEN v_used ELSE 0 END;
END
$$;

CREATE OR REPLACE FUNCTION public.reset_user_tokens_if_needed(p_user_id uuid) RETURNS boolean
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cleared integer;
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_cleared := public.token_reset_one_user(p_user_id, 'function');
    IF v_cleared IS NULL AND NOT EXISTS (
        SELECT 1 FROM public.user_tokens WHERE user_id = p_user_id) THEN
        RAISE EXCEPTION 'unknown user: %', p_user_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN coalesce(v_cleared > 0, false);
END
$$;

-- ------------------------------------------------------------ row trigger --
-- For writes by the owner (the application role cannot UPDATE user_tokens): a write
-- to a stale row that does not itself set last_monthly_reset first resets it through
-- the same chain as every other path, keeping the write's own delta (77 + 5 becomes
-- 5, never 82, never 0; a user already reset this period keeps 82).  A reset time
-- later than the clock is clamped to the clock: never to now(), the start of a
-- transaction that may have begun before another one reset the row.
CREATE OR REPLACE FUNCTION public.check_and_reset_monthly_tokens() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_logged integer;
BEGIN
    IF NEW.last_monthly_reset IS NULL OR NEW.last_monthly_reset > clock_timestamp() THEN
        NEW.last_monthly_reset := clock_timestamp();
    END IF;
    IF TG_OP = 'UPDATE'
       AND OLD.last_monthly_reset < public.token_reset_period_start()
       AND NEW.last_monthly_reset = OLD.last_monthly_reset THEN
        IF OLD.monthly_tokens_used > 0 THEN
            -- The same ledger row token_reset_clear() writes; the row itself cannot be
            -- updated again from its own BEFORE trigger, so NEW carries the change.
            WITH logged AS (
                INSERT INTO public.token_transactions (user_id, operation, feature, amount, metadata)
                VALUES (OLD.user_id, 'reset', 'monthly_rollover', OLD.monthly_tokens_used,
                        public.token_reset_reset_metadata(public.token_reset_period_label(now()),
                                                          OLD.monthly_tokens_used, 'trigger'))
                ON CONFLICT DO NOTHING
                RETURNING 1
            )
            SELECT count(*) INTO v_logged FROM logged;
            IF v_logged > 0 THEN
                NEW.monthly_tokens_used := greatest(NEW.monthly_tokens_used - OLD.monthly_tokens_used, 0);
            END IF;
        END IF;
        NEW.last_monthly_reset := now();
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER user_tokens_no_future_reset ON public.user_tokens;
CREATE TRIGGER user_tokens_no_future_reset
    BEFORE INSERT ON public.user_tokens
    FOR EACH ROW
    WHEN (NEW.last_monthly_reset IS NULL
          OR NEW.last_monthly_reset > pg_catalog.clock_timestamp())
    EXECUTE FUNCTION public.check_and_reset_monthly_tokens();

-- ------------------------------------------------------------------ view ---
-- Readers are right before any write: a stale row shows 0 used.  The period start is
-- a scalar subquery, computed once per query rather than once per row.
CREATE OR REPLACE VIEW public.user_tokens_with_auto_reset AS
SELECT user_id,
       monthly_token_limit,
       CASE WHEN last_monthly_reset < (SELECT public.token_reset_period_start())
            THEN 0 ELSE monthly_tokens_used END AS monthly_tokens_used,
       last_monthly_reset,
       created_at,
       updated_at
  FROM public.user_tokens;

-- ----------------------------------------------------------- read answers --
CREATE OR REPLACE FUNCTION public.token_reset_answer(p_user_id uuid, p_amount integer) RETURNS jsonb
    LANGUAGE plpgsql STABLE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_row public.user_tokens_with_auto_reset%ROWTYPE;
    v_remaining integer;
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF p_amount IS NULL OR p_amount < 0 THEN
        RAISE EXCEPTION 'amount must be a non-negative integer, got %', p_amount
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_row FROM public.user_tokens_with_auto_reset
     WHERE user_id = p_user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown user: %', p_user_id USING ERRCODE = 'no_data_found';
    END IF;
    v_remaining := greatest(v_row.monthly_token_limit - v_row.monthly_tokens_used, 0);
    RETURN jsonb_build_object(
        'user_id', p_user_id,
        'used', v_row.monthly_tokens_used,
        'limit', v_row.monthly_token_limit,
        'remaining', v_remaining,
        'requested', p_amount,
        'allowed', CASE WHEN p_amount = 0 THEN v_remaining > 0
                        ELSE p_amount <= v_remaining END,
        'period', public.token_reset_period_label(now()),
        'resets_at', public.token_reset_next_period_start());
END
$$;

-- Amounts are bigint in every signature so a value beyond int32 gets a range error
-- (22003) instead of "function does not exist".
CREATE FUNCTION public.token_reset_checked_amount(p_amount bigint, p_allow_zero boolean)
RETURNS integer
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_amount IS NULL OR p_amount < 0
       OR (p_amount = 0 AND NOT p_allow_zero) THEN
        RAISE EXCEPTION 'amount must be a % integer, got %',
                CASE WHEN p_allow_zero THEN 'non-negative' ELSE 'positive' END, p_amount
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_amount > 2147483647 THEN
        RAISE EXCEPTION 'amount % is out of range (at most 2147483647)', p_amount
            USING ERRCODE = 'numeric_value_out_of_range';
    END IF;
    RETURN p_amount::integer;
END
$$;

DROP FUNCTION public.check_user_tokens(uuid);
CREATE FUNCTION public.check_user_tokens(p_user_id uuid) RETURNS jsonb
    LANGUAGE sql STABLE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT public.token_reset_answer(p_user_id, 0) - 'requested' $$;

DROP FUNCTION public.check_token_rate_limit(uuid, integer);
CREATE FUNCTION public.check_token_rate_limit(p_user_id uuid, p_amount bigint) RETURNS jsonb
    LANGUAGE sql STABLE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT public.token_reset_answer(p_user_id, public.token_reset_checked_amount(p_amount, false)) $$;

-- ---------------------------------------------------------------- deduct ---
DROP FUNCTION public.deduct_tokens(uuid, integer, text);
CREATE FUNCTION public.deduct_tokens(p_user_id uuid, p_amount bigint, p_feature text)
RETURNS jsonb
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_amount integer;
    v_row public.user_tokens%ROWTYPE;
    v_used integer;
    v_limit integer;
    v_reset_at timestamptz;
    v_cleared integer;
    v_id bigint;
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_amount := public.token_reset_checked_amount(p_amount, false);
    -- Fast path: one statement takes the row lock, checks period and room, and adds.
    -- Written as limit - used so no sum can overflow integer.
    UPDATE public.user_tokens
       SET monthly_tokens_used = monthly_tokens_used + v_amount, updated_at = now()
     WHERE user_id = p_user_id
       AND last_monthly_reset >= public.token_reset_period_bound()
       AND v_amount <= monthly_token_limit - monthly_tokens_used
    RETURNING monthly_tokens_used, monthly_token_limit, last_monthly_reset INTO v_used, v_limit, v_reset_at;
    IF NOT FOUND THEN
        -- Slow path: stale (reset first), unknown, or over the allowance.
        v_cleared := public.token_reset_one_user(p_user_id, 'function');
        SELECT * INTO v_row FROM public.user_tokens
         WHERE user_id = p_user_id FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'unknown user: %', p_user_id USING ERRCODE = 'no_data_found';
        END IF;
        IF v_amount > v_row.monthly_token_limit - v_row.monthly_tokens_used THEN
            -- Raising rolls back the reset above as well: nothing is written.
            RAISE EXCEPTION 'token allowance exceeded: % used + % requested > limit %',
                    v_row.monthly_tokens_used, v_amount, v_row.monthly_token_limit
                USING ERRCODE = 'check_violation',
                      DETAIL = jsonb_build_object(
                          'used', v_row.monthly_tokens_used, 'limit', v_row.monthly_token_limit,
                          'requested', v_amount,
                          'resets_at', public.token_reset_next_period_start())::text;
        END IF;
        UPDATE public.user_tokens
           SET monthly_tokens_used = monthly_tokens_used + v_amount, updated_at = now()
         WHERE user_id = p_user_id
        RETURNING monthly_tokens_used, monthly_token_limit, last_monthly_reset INTO v_used, v_limit, v_reset_at;
    END IF;
    -- The period the usage belongs to: a transaction that began before midnight and
    -- writes to a row another transaction already reset counts in the new period.
    INSERT INTO public.token_transactions (user_id, operation, feature, amount, metadata)
    VALUES (p_user_id, 'deduct', p_feature, v_amount,
            jsonb_build_object('period', public.token_reset_period_label(greatest(now(), v_reset_at))))
    RETURNING id INTO v_id;
    RETURN jsonb_build_object(
        'success', true,
        'user_id', p_user_id,
        'amount', v_amount,
        'feature', p_feature,
        'used', v_used,
        'limit', v_limit,
        'remaining', v_limit - v_used,
        'reset', coalesce(v_cleared > 0, false),
        'transaction_id', v_id,
        'resets_at', public.token_reset_next_period_start());
END
$$;

-- ----------------------------------------------------------------- grant ---
-- Gives tokens back (a refund, a goodwill credit): usage goes down by the amount and
-- a 'grant' ledger row says so.  A grant larger than this period's usage is refused
-- (check_violation) with nothing written: usage never goes below zero unrecorded.
CREATE FUNCTION public.grant_tokens(p_user_id uuid, p_amount bigint, p_reason text)
RETURNS jsonb
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_amount integer;
    v_cleared integer;
    v_row public.user_tokens%ROWTYPE;
    v_id bigint;
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_amount := public.token_reset_checked_amount(p_amount, false);
    v_cleared := public.token_reset_one_user(p_user_id, 'function');
    SELECT * INTO v_row FROM public.user_tokens
     WHERE user_id = p_user_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown user: %', p_user_id USING ERRCODE = 'no_data_found';
    END IF;
    IF v_amount > v_row.monthly_tokens_used THEN
        RAISE EXCEPTION 'grant of % exceeds this period''s usage of %', v_amount, v_row.monthly_tokens_used
            USING ERRCODE = 'check_violation',
                  DETAIL = jsonb_build_object('used', v_row.monthly_tokens_used,
                                              'requested', v_amount)::text;
    END IF;
    UPDATE public.user_tokens
       SET monthly_tokens_used = monthly_tokens_used - v_amount, updated_at = now()
     WHERE user_id = p_user_id;
    INSERT INTO public.token_transactions (user_id, operation, feature, amount, metadata)
    VALUES (p_user_id, 'grant', p_reason, v_amount,
            jsonb_build_object('period', public.token_reset_period_label(greatest(now(), v_row.last_monthly_reset))))
    RETURNING id INTO v_id;
    -- The read answer (check_user_tokens) after the write, and what the write did.
    RETURN public.check_user_tokens(p_user_id) || jsonb_build_object(
               'success', true, 'amount', v_amount, 'transaction_id', v_id,
               'reset', coalesce(v_cleared > 0, false));
END
$$;

-- ----------------------------------------------------------------- limit ---
-- Sets a user's monthly limit; a 'limit' ledger row (amount = the new limit,
-- metadata.previous_limit) is the audit trail.  Like every write, it first resets a
-- stale row ("reset" in the answer); this period's usage is otherwise untouched, and
-- a limit below it only refuses further deductions.
CREATE FUNCTION public.set_token_limit(p_user_id uuid, p_limit bigint)
RETURNS jsonb
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_limit integer;
    v_cleared integer;
    v_previous integer;
    v_id bigint;
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_limit := public.token_reset_checked_amount(p_limit, true);
    v_cleared := public.token_reset_one_user(p_user_id, 'function');
    SELECT monthly_token_limit INTO v_previous FROM public.user_tokens
     WHERE user_id = p_user_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown user: %', p_user_id USING ERRCODE = 'no_data_found';
    END IF;
    UPDATE public.user_tokens
       SET monthly_token_limit = v_limit, updated_at = now()
     WHERE user_id = p_user_id;
    INSERT INTO public.token_transactions (user_id, operation, feature, amount, metadata)
    VALUES (p_user_id, 'limit', NULL, v_limit,
            jsonb_build_object('period', public.token_reset_period_label(now()),
                               'previous_limit', v_previous))
    RETURNING id INTO v_id;
    -- The read answer (check_user_tokens) after the write, and what the write did.
    RETURN public.check_user_tokens(p_user_id) || jsonb_build_object(
               'success', true, 'previous_limit', v_previous, 'transaction_id', v_id,
               'reset', coalesce(v_cleared > 0, false));
END
$$;

-- ------------------------------------------------------------------ bulk ---
-- True when some user still carries a previous period's usage: one scan that stops
-- at the first such row, so a run with nothing to do costs this and nothing more.
CREATE FUNCTION public.token_reset_bulk_pending() RETURNS boolean
    LANGUAGE sql STABLE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
SELECT EXISTS (
    SELECT 1 FROM public.user_tokens u
     WHERE u.last_monthly_reset < (SELECT public.token_reset_period_start())
       AND u.monthly_tokens_used > 0)
$$;

-- One batch: walks the primary key from p_after (keyset, so each batch costs the same
-- however far in), locks the stale users with usage among the next p_limit keys
-- (skipping rows a writer holds: its own write resets the row, and the final pass
-- waits for the rest) and resets them.  The users are handed on as a key array: an
-- UPDATE joined to the candidates was planned with a one-row estimate for ranges
-- inside one statistics bucket and compared every pair (17-32 s per batch above 1M
-- users); `= ANY(array)` on the primary key has no such plan.
DROP FUNCTION public.token_reset_bulk_batch(uuid, integer, text);
CREATE FUNCTION public.token_reset_bulk_batch(
    p_after uuid, p_limit integer, OUT last_key uuid, OUT reset_count integer)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_period_start timestamptz := public.token_reset_period_start();
    -- Bounds that stay indexable in a generic plan (an OR with IS NULL does not).
    v_low uuid := coalesce(p_after, '00000000-0000-0000-0000-000000000000');
    v_high uuid;
    v_ids uuid[];
    v_used integer[];
BEGIN
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 1000000 THEN
        RAISE EXCEPTION 'batch size must be between 1 and 1000000, got %', p_limit
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The batch's upper key; NULL when fewer than p_limit keys remain (last batch).
    SELECT user_id INTO last_key
      FROM public.user_tokens
     WHERE user_id >= v_low
       AND (p_after IS NULL OR user_id <> p_after)
     ORDER BY user_id
    OFFSET p_limit - 1 LIMIT 1;
    v_high := coalesce(last_key, 'ffffffff-ffff-ffff-ffff-ffffffffffff');
    SELECT coalesce(array_agg(c.user_id), '{}'), coalesce(array_agg(c.used), '{}')
      INTO v_ids, v_used
      FROM (SELECT u.user_id, u.monthly_tokens_used AS used
              FROM public.user_tokens u
             WHERE u.user_id >= v_low
               AND u.user_id <= v_high
               AND (p_after IS NULL OR u.user_id <> p_after)
               AND u.last_monthly_reset < v_period_start
               AND u.monthly_tokens_used > 0
               FOR NO KEY UPDATE SKIP LOCKED) c;
    reset_count := 0;
    IF cardinality(v_ids) > 0 THEN
        reset_count := (public.token_reset_clear(v_ids, v_used, 'bulk')).reset_count;
    END IF;
END
$$;

-- The final pass: waits for the row locks the batches skipped.  Final passes (and
-- whole one-transaction runs) queue on token_reset_bulk_lock first: two of them each
-- holding rows the other waits for would deadlock.
DROP FUNCTION public.token_reset_bulk_final_pass(text);
CREATE FUNCTION public.token_reset_bulk_final_pass() RETURNS integer
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_period_start timestamptz := public.token_reset_period_start();
    v_ids uuid[];
    v_used integer[];
BEGIN
    LOCK TABLE public.token_reset_bulk_lock IN EXCLUSIVE MODE;
    SELECT coalesce(array_agg(c.user_id), '{}'), coalesce(array_agg(c.used), '{}')
      INTO v_ids, v_used
      FROM (SELECT u.user_id, u.monthly_tokens_used AS used
              FROM public.user_tokens u
             WHERE u.last_monthly_reset < v_period_start
               AND u.monthly_tokens_used > 0
               FOR NO KEY UPDATE) c;
    IF cardinality(v_ids) = 0 THEN
        RETURN 0;
    END IF;
    RETURN (public.token_reset_clear(v_ids, v_used, 'bulk')).reset_count;
END
$$;

-- Who started a run that SQL started: pg_cron's jobs identify themselves.
CREATE FUNCTION public.token_reset_sql_run_source(p_default text) RETURNS text
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT CASE WHEN pg_catalog.current_setting('application_name', true) = 'pg_cron'
                  THEN 'pg_cron' ELSE p_default END $$;

-- The bulk backup in one call and one transaction, recorded in token_reset_bulk_runs
-- like every other run (a failure rolls its row back with it; the alert on "no
-- successful bulk run for hours" sees that).  Callers that can commit between
-- batches use the procedure below or the listener's runner.
DROP FUNCTION public.reset_monthly_tokens_for_all_users();
DROP FUNCTION public.auto_reset_monthly_tokens();
DROP FUNCTION public.token_reset_bulk_all(text, integer);
CREATE FUNCTION public.token_reset_bulk_all(p_batch_size integer DEFAULT 10000)
RETURNS jsonb
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_run uuid := gen_random_uuid();
    v_after uuid := NULL;
    v_total integer := 0;
    v_batches integer := 0;
    v_batch record;
BEGIN
    -- Concurrent one-transaction runs queue here; the second then resets 0.
    LOCK TABLE public.token_reset_bulk_lock IN EXCLUSIVE MODE;
    INSERT INTO public.token_reset_bulk_runs (run_id, source, pid)
    VALUES (v_run, public.token_reset_sql_run_source('sql'), pg_backend_pid());
    IF public.token_reset_bulk_pending() THEN
        LOOP
            v_batch := public.token_reset_bulk_batch(v_after, p_batch_size);
            v_batches := v_batches + 1;
            v_total := v_total + v_batch.reset_count;
            EXIT WHEN v_batch.last_key IS NULL;
            v_after := v_batch.last_key;
        END LOOP;
        v_total := v_total + public.token_reset_bulk_final_pass();
    END IF;
    UPDATE public.token_reset_bulk_runs
       SET outcome = 'success', finished_at = now(), reset_count = v_total, batches = v_batches
     WHERE run_id = v_run;
    RETURN jsonb_build_object(
        'success', true,
        'reset_count', v_total,
        'reset_date', to_char(timezone(public.token_reset_zone(), now()), 'YYYY-MM-DD'),
        'period', public.token_reset_period_label(now()),
        'batches', v_batches,
        'batch_size', p_batch_size,
        'run_id', v_run);
END
$$;

CREATE FUNCTION public.reset_monthly_tokens_for_all_users() RETURNS jsonb
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT public.token_reset_bulk_all() $$;

CREATE FUNCTION public.auto_reset_monthly_tokens() RETURNS jsonb
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT public.token_reset_bulk_all() $$;

-- For pg_cron and psql: commits after every batch, so no transaction holds more than
-- one batch of row locks; its run row says 'running' meanwhile and is marked
-- abandoned by a later run if this session dies mid-way.  A procedure that commits
-- can be neither SECURITY DEFINER nor SET search_path: it runs as its caller (the
-- owner, pg_cron as the owner, or the listener role) on the caller's search_path, so
-- every name and operator in it is qualified.  CALL it outside a transaction block.
DROP PROCEDURE public.token_reset_bulk_committing(integer);
CREATE PROCEDURE public.token_reset_bulk_committing(p_batch_size integer DEFAULT 10000)
    LANGUAGE plpgsql
AS $$
DECLARE
    v_run uuid := pg_catalog.gen_random_uuid();
    v_after uuid := NULL;
    v_batch record;
    v_final integer;
BEGIN
    INSERT INTO public.token_reset_bulk_runs (run_id, source, pid)
    VALUES (v_run, public.token_reset_sql_run_source('procedure'), pg_catalog.pg_backend_pid());
    COMMIT;
    IF public.token_reset_bulk_pending() THEN
        LOOP
            v_batch := public.token_reset_bulk_batch(v_after, p_batch_size);
            UPDATE public.token_reset_bulk_runs
               SET reset_count = reset_count OPERATOR(pg_catalog.+) v_batch.reset_count,
                   batches = batches OPERATOR(pg_catalog.+) 1
             WHERE run_id OPERATOR(pg_catalog.=) v_run;
            COMMIT;
            EXIT WHEN v_batch.last_key IS NULL;
            v_after := v_batch.last_key;
        END LOOP;
    END IF;
    v_final := public.token_reset_bulk_final_pass();
    UPDATE public.token_reset_bulk_runs
       SET outcome = 'success', finished_at = pg_catalog.now(),
           reset_count = reset_count OPERATOR(pg_catalog.+) v_final
     WHERE run_id OPERATOR(pg_catalog.=) v_run;
    COMMIT;
END
$$;

-- ------------------------------------------------------------- listener ---
CREATE OR REPLACE FUNCTION public.token_reset_listener_horizon(p_waiting text[] DEFAULT '{}')
RETURNS TABLE (allocated bigint, writers text[], waiting boolean)
    LANGUAGE plpgsql
    VOLATILE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_database oid := (SELECT oid FROM pg_catalog.pg_database
                        WHERE datname = pg_catalog.current_database());
    v_ledger oid := 'public.token_transactions'::pg_catalog.regclass::pg_catalog.oid;
BEGIN
    -- Read the sequence itself: pg_sequence_last_value() is NULL after
    -- setval(..., false), which would look like an empty ledger.
    EXECUTE format(
        'SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM %s',
        pg_get_serial_sequence('public.token_transactions', 'id'))
       INTO allocated;
    -- One scan of the lock table answers both questions (see 0002 for why).
    SELECT coalesce(pg_catalog.array_agg(DISTINCT l.virtualtransaction) FILTER (
               WHERE l.locktype = 'relation'
                 AND l.database = v_database
                 AND l.relation = v_ledger
                 AND l.mode = 'RowExclusiveLock'
                 AND l.pid IS DISTINCT FROM pg_backend_pid()), '{}'),
           coalesce(pg_catalog.bool_or(l.virtualtransaction = ANY (p_waiting)), false)
      INTO writers, waiting
      FROM pg_catalog.pg_locks l;
    RETURN NEXT;
END
$$;

-- ------------------------------------------------------------ privileges ---
-- The declared privileges, in one place (README: "Roles"; a test compares the
-- catalog with this list).  Idempotent: `token-reset migrate` runs it after every
-- run, so roles a DBA creates later get their grants on the next migrate.  Returns
-- the roles it could not find.
CREATE FUNCTION public.token_reset_apply_privileges() RETURNS text[]
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_missing text[] := '{}';
    v_fn regprocedure;
BEGIN
    -- Nothing for PUBLIC but the read-only period helpers.
    FOR v_fn IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
         WHERE p.pronamespace = 'public'::regnamespace
           AND (p.proname ~ '^token_reset_' OR p.proname = ANY (ARRAY[
                'deduct_tokens', 'grant_tokens', 'set_token_limit', 'check_user_tokens',
                'check_token_rate_limit', 'reset_user_tokens_if_needed',
                'reset_monthly_tokens_for_all_users', 'auto_reset_monthly_tokens',
                'check_and_reset_monthly_tokens']))
           AND p.proname <> ALL (ARRAY[
                'token_reset_period_start', 'token_reset_period_bound', 'token_reset_period_label', 'token_reset_zone',
                'token_reset_next_period_start', 'token_reset_month_start'])
    LOOP
        EXECUTE format('REVOKE ALL ON ROUTINE %s FROM PUBLIC', v_fn);
    END LOOP;
    REVOKE ALL ON public.user_tokens, public.token_transactions, public.token_reset_settings,
                  public.user_tokens_with_auto_reset, public.token_reset_listener_cursors,
                  public.token_reset_bulk_runs, public.token_reset_bulk_lock FROM PUBLIC;

    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'token_reset_app') THEN
        REVOKE ALL ON public.user_tokens, public.token_transactions, public.token_reset_settings,
                      public.user_tokens_with_auto_reset, public.token_reset_listener_cursors,
                      public.token_reset_bulk_runs, public.token_reset_bulk_lock FROM token_reset_app;
        REVOKE ALL ON FUNCTION public.token_reset_one_user(uuid, text), public.token_reset_answer(uuid, integer),
                      public.token_reset_listener_horizon(text[]), public.token_reset_configure(text, boolean),
                      public.token_reset_bulk_batch(uuid, integer), public.token_reset_bulk_final_pass(),
                      public.token_reset_bulk_all(integer), public.token_reset_bulk_pending()
                 FROM token_reset_app;
        REVOKE ALL ON PROCEDURE public.token_reset_bulk_committing(integer) FROM token_reset_app;
        GRANT SELECT ON public.user_tokens, public.user_tokens_with_auto_reset,
                        public.token_transactions, public.token_reset_bulk_runs TO token_reset_app;
        -- A new user: its id and limit; usage starts at 0 in the current period.
        GRANT INSERT (user_id, monthly_token_limit) ON public.user_tokens TO token_reset_app;
        GRANT EXECUTE ON FUNCTION
            public.deduct_tokens(uuid, bigint, text),
            public.grant_tokens(uuid, bigint, text),
            public.set_token_limit(uuid, bigint),
            public.check_user_tokens(uuid),
            public.check_token_rate_limit(uuid, bigint),
            public.reset_user_tokens_if_needed(uuid),
            public.reset_monthly_tokens_for_all_users(),
            public.auto_reset_monthly_tokens()
        TO token_reset_app;
    ELSE
        v_missing := v_missing || 'token_reset_app'::text;
    END IF;

    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'token_reset_listener') THEN
        GRANT SELECT ON public.user_tokens, public.token_transactions, public.token_reset_settings
           TO token_reset_listener;
        GRANT SELECT, INSERT, UPDATE ON public.token_reset_listener_cursors, public.token_reset_bulk_runs
           TO token_reset_listener;
        GRANT EXECUTE ON FUNCTION
            public.token_reset_listener_horizon(text[]),
            public.token_reset_bulk_batch(uuid, integer),
            public.token_reset_bulk_final_pass(),
            public.token_reset_bulk_pending(),
            public.token_reset_sql_run_source(text),
            public.reset_monthly_tokens_for_all_users()
        TO token_reset_listener;
        GRANT EXECUTE ON PROCEDURE public.token_reset_bulk_committing(integer) TO token_reset_listener;
    ELSE
        v_missing := v_missing || 'token_reset_listener'::text;
    END IF;
    RETURN v_missing;
END
$$;

SELECT public.token_reset_apply_settings();
SELECT public.token_reset_apply_privileges();
