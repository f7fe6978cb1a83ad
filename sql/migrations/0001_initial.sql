-- 0001_initial: tables, ledger, period arithmetic, reset functions, triggers, view.
--
-- Public names (user_tokens, token_transactions, deduct_tokens, ... ) are the
-- contract README.md states ("The SQL contract").  Internal helpers share the prefix
-- token_reset_.  Every function that runs with its owner's rights pins
-- search_path with pg_catalog first, so no schema on the caller's path can
-- shadow a built-in.  (Not enough where PUBLIC may CREATE in public: an exact-type
-- look-alike there still wins; 0004 takes public off the path.)

-- ---------------------------------------------------------------- roles ----
-- The application role gets EXECUTE on the public functions and may read and
-- write user_tokens; it may only read the ledger, which it writes through the
-- SECURITY DEFINER functions and the trigger.  Roles are cluster-wide, so they
-- are created only when the migrating role is allowed to.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'token_reset_app') THEN
        IF (SELECT rolsuper OR rolcreaterole FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
            CREATE ROLE token_reset_app NOLOGIN;
        ELSE
            RAISE NOTICE 'role token_reset_app missing and % may not create it: grants skipped', current_user;
        END IF;
    END IF;
END
$roles$;

-- -------------------------------------------------------------- settings ---
-- One row.  The zone that defines "the month" lives here, never in the
-- session's TimeZone; token_reset_configure() rewrites the period function so
-- the hot path reads no table.
CREATE TABLE public.token_reset_settings (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    timezone text NOT NULL DEFAULT 'UTC',
    notify_per_write boolean NOT NULL DEFAULT true
);
INSERT INTO public.token_reset_settings DEFAULT VALUES;

-- ---------------------------------------------------------------- tables ---
CREATE TABLE public.user_tokens (
    user_id uuid PRIMARY KEY,
    monthly_token_limit integer NOT NULL DEFAULT 500,
    monthly_tokens_used integer NOT NULL DEFAULT 0,
    last_monthly_reset timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT user_tokens_used_non_negative CHECK (monthly_tokens_used >= 0),
    CONSTRAINT user_tokens_limit_non_negative CHECK (monthly_token_limit >= 0)
)
-- Room on each page for HOT updates: a reset rewrites no indexed column, so
-- with free space on the page the new row version needs no index entries.
WITH (fillfactor = 80);

CREATE TABLE public.token_transactions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id uuid NOT NULL,
    operation text NOT NULL,
    feature text,
    amount integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    metadata jsonb,
    CONSTRAINT token_transactions_operation_known
        CHECK (operation IN ('deduct', 'reset', 'grant')),
    CONSTRAINT token_transactions_amount_non_negative CHECK (amount >= 0),
    CONSTRAINT token_transactions_reset_has_period CHECK (
        operation <> 'reset'
        OR coalesce(metadata ->> 'period', '') ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'
    )
);

-- At most one reset per user per period, enforced here and not only by code.
-- Leading with the period also serves "how many resets this period".
CREATE UNIQUE INDEX token_transactions_one_reset_per_period
    ON public.token_transactions ((metadata ->> 'period'), user_id)
    WHERE operation = 'reset';
-- The listener's catch-up reads reset rows by id; deductions are skipped cheaply.
CREATE INDEX token_transactions_reset_id
    ON public.token_transactions (id)
    WHERE operation = 'reset';
CREATE INDEX token_transactions_user_id
    ON public.token_transactions (user_id, id);
-- Rows arrive in created_at order, so a BRIN index answers time ranges for a
-- few pages of index however long the ledger grows.
CREATE INDEX token_transactions_created_at_brin
    ON public.token_transactions USING brin (created_at);

-- ---------------------------------------------------------------- period ---
-- Start of the current period, as an absolute instant: the 3-argument
-- date_trunc truncates in the given zone whatever the session's TimeZone.  A
-- plain SQL expression so the planner inlines it into the view and queries;
-- token_reset_configure() regenerates it (and the trigger's WHEN clause, which
-- spells the same expression out) when the zone changes.
CREATE FUNCTION public.token_reset_period_start() RETURNS timestamptz
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT pg_catalog.date_trunc('month', pg_catalog.now(), 'UTC') $$;

CREATE FUNCTION public.token_reset_zone() RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT 'UTC'::text $$;

-- 'YYYY-MM' of the period containing p_at, in the configured zone.
CREATE FUNCTION public.token_reset_period_label(p_at timestamptz) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT pg_catalog.to_char(pg_catalog.timezone(public.token_reset_zone(), p_at), 'YYYY-MM') $$;

-- Start of the period after the current one (what users see as "resets at").
CREATE FUNCTION public.token_reset_next_period_start() RETURNS timestamptz
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT pg_catalog.timezone(public.token_reset_zone(),
                 pg_catalog.timezone(public.token_reset_zone(), public.token_reset_period_start())
                 + interval '1 month') $$;

CREATE FUNCTION public.token_reset_configure(
    p_timezone text DEFAULT NULL,
    p_notify_per_write boolean DEFAULT NULL
) RETURNS jsonb
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_zone text;
BEGIN
    IF p_timezone IS NOT NULL THEN
        -- Rejects unknown zones with PostgreSQL's own error before anything changes.
        PERFORM pg_catalog.timezone(p_timezone, pg_catalog.now());
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_names WHERE name = p_timezone)
           AND upper(p_timezone) <> 'UTC' THEN
            RAISE EXCEPTION 'unknown time zone: %', p_timezone
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'use a name from pg_timezone_names, e.g. UTC or Europe/Berlin';
        END IF;
        UPDATE public.token_reset_settings SET timezone = p_timezone;
        EXECUTE pg_catalog.format(
            'CREATE OR REPLACE FUNCTION public.token_reset_period_start() RETURNS timestamptz '
            'LANGUAGE sql STABLE PARALLEL SAFE AS $f$ SELECT pg_catalog.date_trunc(''month'', '
            'pg_catalog.now(), %L) $f$',
            p_timezone);
        EXECUTE pg_catalog.format(
            'CREATE OR REPLACE FUNCTION public.token_reset_zone() RETURNS text '
            'LANGUAGE sql STABLE PARALLEL SAFE AS $f$ SELECT %L::text $f$', p_timezone);
        -- The trigger's WHEN clause carries the zone itself (see its comment below).
        EXECUTE pg_catalog.format(
            'CREATE OR REPLACE TRIGGER user_tokens_reset_on_write '
            'BEFORE UPDATE ON public.user_tokens FOR EACH ROW '
            'WHEN ((OLD.last_monthly_reset < pg_catalog.date_trunc(''month'', pg_catalog.now(), %L) '
            'AND NEW.last_monthly_reset = OLD.last_monthly_reset) '
            'OR NEW.last_monthly_reset > pg_catalog.now()) '
            'EXECUTE FUNCTION public.check_and_reset_monthly_tokens()',
            p_timezone);
    END IF;
    IF p_notify_per_write IS NOT NULL THEN
        UPDATE public.token_reset_settings SET notify_per_write = p_notify_per_write;
    END IF;
    SELECT timezone INTO v_zone FROM public.token_reset_settings;
    RETURN pg_catalog.jsonb_build_object(
        'timezone', v_zone,
        'notify_per_write', (SELECT notify_per_write FROM public.token_reset_settings),
        'period_start', public.token_reset_period_start());
END
$$;

-- ----------------------------------------------------------- append-only ---
CREATE FUNCTION public.token_reset_ledger_is_append_only() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'token_transactions is an append-only ledger: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'record a correcting grant instead of changing history';
END
$$;

CREATE TRIGGER token_transactions_append_only
    BEFORE UPDATE OR DELETE ON public.token_transactions
    FOR EACH ROW EXECUTE FUNCTION public.token_reset_ledger_is_append_only();
CREATE TRIGGER token_transactions_no_truncate
    BEFORE TRUNCATE ON public.token_transactions
    FOR EACH STATEMENT EXECUTE FUNCTION public.token_reset_ledger_is_append_only();

-- ---------------------------------------------------------------- notify ---
-- One doorbell per INSERT statement that wrote reset rows: the id range and
-- the count, never the rows themselves.  The listener reads the ledger; the
-- payload only says "look".  Resets written by the row trigger on user_tokens
-- (one INSERT per row, at trigger depth > 1) ring once per transaction
-- instead: their payload names the transaction's first such id and is the same
-- for every row, and PostgreSQL delivers identical payloads of one transaction
-- once.  With notify_per_write off, only bulk batches ring, and the listener's
-- timer finds the rest.
CREATE FUNCTION public.token_reset_notify_batch() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_first bigint;
    v_last bigint;
    v_count integer;
    v_bulk boolean;
    v_txn_first text;
BEGIN
    SELECT min(id), max(id), count(*), bool_or(metadata ->> 'source' = 'bulk')
      INTO v_first, v_last, v_count, v_bulk
      FROM new_rows
     WHERE operation = 'reset';
    IF v_count = 0 THEN
        RETURN NULL;
    END IF;
    IF NOT v_bulk AND NOT (SELECT notify_per_write FROM public.token_reset_settings) THEN
        RETURN NULL;
    END IF;
    IF pg_catalog.pg_trigger_depth() > 1 THEN
        v_txn_first := pg_catalog.current_setting('token_reset.txn_first_id', true);
        IF coalesce(v_txn_first, '') = '' THEN
            v_txn_first := v_first::text;
            PERFORM pg_catalog.set_config('token_reset.txn_first_id', v_txn_first, true);
        END IF;
        PERFORM pg_catalog.pg_notify('token_resets', pg_catalog.json_build_object(
            'v', 1, 'first_id', v_txn_first::bigint, 'last_id', v_txn_first::bigint,
            'count', 1, 'coalesced', true)::text);
        RETURN NULL;
    END IF;
    PERFORM pg_catalog.pg_notify('token_resets', pg_catalog.json_build_object(
        'v', 1, 'first_id', v_first, 'last_id', v_last, 'count', v_count)::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER token_transactions_notify_resets
    AFTER INSERT ON public.token_transactions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION public.token_reset_notify_batch();

-- ----------------------------------------------------------------- reset ---
-- Shared by every path that clears one user: locks the row, clears it only if
-- stale, records the ledger row only if there was usage.  Returns the usage it
-- cleared, or NULL when the row was already current (or unknown).
CREATE FUNCTION public.token_reset_one_user(p_user_id uuid, p_source text) RETURNS integer
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_used integer;
BEGIN
    SELECT monthly_tokens_used INTO v_used
      FROM public.user_tokens
     WHERE user_id = p_user_id
       AND last_monthly_reset < public.token_reset_period_start()
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- Setting last_monthly_reset ourselves keeps the row trigger out of it.
    UPDATE public.user_tokens
       SET monthly_tokens_used = 0, last_monthly_reset = now(), updated_at = now()
     WHERE user_id = p_user_id;
    IF v_used > 0 THEN
        INSERT INTO public.token_transactions (user_id, operation, feature, amount, metadata)
        VALUES (p_user_id, 'reset', 'monthly_rollover', v_used,
                pg_catalog.jsonb_build_object(
                    'period', public.token_reset_period_label(now()),
                    'previous_used', v_used,
                    'source', p_source))
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN v_used;
END
$$;

CREATE FUNCTION public.reset_user_tokens_if_needed(p_user_id uuid) RETURNS boolean
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN coalesce(public.token_reset_one_user(p_user_id, 'function') > 0, false);
END
$$;

-- ------------------------------------------------------------ row trigger --
-- BEFORE UPDATE: a write to a stale row that does not itself set
-- last_monthly_reset first clears last period's usage, keeping the delta of
-- the write that woke it (77 + 5 becomes 5, never 82, never 0).  Writes that
-- set last_monthly_reset (the reset functions, data loads) are left alone.
-- BEFORE INSERT/UPDATE: no row may claim a reset in the future, which would
-- dodge every later reset.  WHEN clauses keep plpgsql out of ordinary writes.
CREATE FUNCTION public.check_and_reset_monthly_tokens() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_period_start timestamptz := public.token_reset_period_start();
BEGIN
    IF NEW.last_monthly_reset IS NULL OR NEW.last_monthly_reset > now() THEN
        NEW.last_monthly_reset := now();
    END IF;
    IF TG_OP = 'UPDATE'
       AND OLD.last_monthly_reset < v_period_start
       AND NEW.last_monthly_reset = OLD.last_monthly_reset THEN
        IF OLD.monthly_tokens_used > 0 THEN
            INSERT INTO public.token_transactions (user_id, operation, feature, amount, metadata)
            VALUES (OLD.user_id, 'reset', 'monthly_rollover', OLD.monthly_tokens_used,
                    pg_catalog.jsonb_build_object(
                        'period', public.token_reset_period_label(now()),
                        'previous_used', OLD.monthly_tokens_used,
                        'source', 'trigger'))
            ON CONFLICT DO NOTHING;
        END IF;
        NEW.monthly_tokens_used := greatest(NEW.monthly_tokens_used - OLD.monthly_tokens_used, 0);
        NEW.last_monthly_reset := now();
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

-- The WHEN clause spells the period start out: a SQL function call there is
-- inlined again (its body parsed) on every statement, ~15 us per UPDATE.
CREATE TRIGGER user_tokens_reset_on_write
    BEFORE UPDATE ON public.user_tokens
    FOR EACH ROW
    WHEN ((OLD.last_monthly_reset < pg_catalog.date_trunc('month', pg_catalog.now(), 'UTC')
           AND NEW.last_monthly_reset = OLD.last_monthly_reset)
          OR NEW.last_monthly_reset > pg_catalog.now())
    EXECUTE FUNCTION public.check_and_reset_monthly_tokens();

CREATE TRIGGER user_tokens_no_future_reset
    BEFORE INSERT ON public.user_tokens
    FOR EACH ROW
    WHEN (NEW.last_monthly_reset IS NULL OR NEW.last_monthly_reset > now())
    EXECUTE FUNCTION public.check_and_reset_monthly_tokens();

-- ------------------------------------------------------------------ view ---
-- Readers are right before any write: a stale row shows 0 used.
CREATE VIEW public.user_tokens_with_auto_reset AS
SELECT user_id,
       monthly_token_limit,
       CASE WHEN last_monthly_reset < public.token_reset_period_start() THEN 0
            ELSE monthly_tokens_used END AS monthly_tokens_used,
       last_monthly_reset,
       created_at,
       updated_at
  FROM public.user_tokens;

-- ----------------------------------------------------------- read answers --
CREATE FUNCTION public.token_reset_answer(p_user_id uuid, p_amount integer) RETURNS jsonb
    LANGUAGE plpgsql STABLE
    SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
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
    SELECT * INTO v_row FROM public.user_tokens_with_auto_reset WHERE user_id = p_user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown user: %', p_user_id USING ERRCODE = 'no_data_found';
    END IF;
    v_remaining := greatest(v_row.monthly_token_limit - v_row.monthly_tokens_used, 0);
    RETURN pg_catalog.jsonb_build_object(
        'user_id', p_user_id,
        'used', v_row.monthly_tokens_used,
        'limit', v_row.monthly_token_limit,
        'remaining', v_remaining,
        'requested', p_amount,
        'allowed', CASE WHEN p_amount = 0 THEN v_remaining > 0 ELSE p_amount <= v_remaining END,
        'period', public.token_reset_period_label(now()),
        'resets_at', public.token_reset_next_period_start());
END
$$;

CREATE FUNCTION public.check_user_tokens(p_user_id uuid) RETURNS jsonb
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, public, pg_temp
AS $$ SELECT public.token_reset_answer(p_user_id, 0) - 'requested' $$;

CREATE FUNCTION public.check_token_rate_limit(p_user_id uuid, p_amount integer) RETURNS jsonb
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'amount must be a positive integer, got %', p_amount
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN public.token_reset_answer(p_user_id, p_amount);
END
$$;

-- ---------------------------------------------------------------- deduct ---
CREATE FUNCTION public.deduct_tokens(p_user_id uuid, p_amount integer, p_feature text)
RETURNS jsonb
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_row public.user_tokens%ROWTYPE;
    v_used integer;
    v_limit integer;
    v_cleared integer;
    v_id bigint;
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'amount must be a positive integer, got %', p_amount
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Fast path: one statement takes the row lock, checks period and room, and adds.
    -- Written as limit - used so no sum can overflow integer.
    UPDATE public.user_tokens
       SET monthly_tokens_used = monthly_tokens_used + p_amount, updated_at = now()
     WHERE user_id = p_user_id
       AND last_monthly_reset >= public.token_reset_period_start()
       AND p_amount <= monthly_token_limit - monthly_tokens_used
    RETURNING monthly_tokens_used, monthly_token_limit INTO v_used, v_limit;
    IF NOT FOUND THEN
        -- Slow path: stale (reset first), unknown, or over the allowance.
        v_cleared := public.token_reset_one_user(p_user_id, 'function');
        SELECT * INTO v_row FROM public.user_tokens WHERE user_id = p_user_id FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'unknown user: %', p_user_id USING ERRCODE = 'no_data_found';
        END IF;
        IF p_amount > v_row.monthly_token_limit - v_row.monthly_tokens_used THEN
            -- Raising rolls back the reset above as well: nothing is written.
            RAISE EXCEPTION 'token allowance exceeded: % used + % requested > limit %',
                    v_row.monthly_tokens_used, p_amount, v_row.monthly_token_limit
                USING ERRCODE = 'check_violation',
                      DETAIL = pg_catalog.jsonb_build_object(
                          'used', v_row.monthly_tokens_used, 'limit', v_row.monthly_token_limit,
                          'requested', p_amount,
                          'resets_at', public.token_reset_next_period_start())::text;
        END IF;
        UPDATE public.user_tokens
           SET monthly_tokens_used = monthly_tokens_used + p_amount, updated_at = now()
         WHERE user_id = p_user_id
        RETURNING monthly_tokens_used, monthly_token_limit INTO v_used, v_limit;
    END IF;
    INSERT INTO public.token_transactions (user_id, operation, feature, amount, metadata)
    VALUES (p_user_id, 'deduct', p_feature, p_amount,
            pg_catalog.jsonb_build_object('period', public.token_reset_period_label(now())))
    RETURNING id INTO v_id;
    RETURN pg_catalog.jsonb_build_object(
        'success', true,
        'user_id', p_user_id,
        'amount', p_amount,
        'feature', p_feature,
        'used', v_used,
        'limit', v_limit,
        'remaining', v_limit - v_used,
        'reset', coalesce(v_cleared > 0, false),
        'transaction_id', v_id,
        'resets_at', public.token_reset_next_period_start());
END
$$;

-- ------------------------------------------------------------------ bulk ---
-- One batch of the bulk reset: walks the primary key from p_after (keyset, so
-- each batch costs the same however far in), resets the stale rows with usage
-- among the next p_limit keys, and writes their ledger rows in one INSERT
-- (one doorbell per batch).  Rows locked by someone else are skipped: a
-- writer holding the lock resets the row itself through the trigger or
-- deduct_tokens, and the final pass waits for the rest.  Returns the key to
-- continue after (NULL when the walk is over) and how many rows it reset.
CREATE FUNCTION public.token_reset_bulk_batch(
    p_after uuid, p_limit integer, p_source text DEFAULT 'bulk',
    OUT last_key uuid, OUT reset_count integer)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_period_start timestamptz := public.token_reset_period_start();
    v_period text := public.token_reset_period_label(now());
    -- Bounds that stay indexable in a generic plan (an OR with IS NULL does not).
    v_low uuid := coalesce(p_after, '00000000-0000-0000-0000-000000000000');
    v_high uuid;
BEGIN
    IF p_limit IS NULL OR p_limit <= 0 THEN
        RAISE EXCEPTION 'batch size must be positive, got %', p_limit
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The batch's upper key; NULL when fewer than p_limit keys remain (last batch).
    SELECT user_id INTO last_key
      FROM public.user_tokens
     WHERE user_id >= v_low AND (p_after IS NULL OR user_id <> p_after)
     ORDER BY user_id
    OFFSET p_limit - 1 LIMIT 1;
    v_high := coalesce(last_key, 'ffffffff-ffff-ffff-ffff-ffffffffffff');
    WITH candidates AS (
        SELECT u.user_id, u.monthly_tokens_used AS previous_used
          FROM public.user_tokens u
         WHERE u.user_id >= v_low AND u.user_id <= v_high
           AND (p_after IS NULL OR u.user_id <> p_after)
           AND u.last_monthly_reset < v_period_start
           AND u.monthly_tokens_used > 0
           FOR NO KEY UPDATE SKIP LOCKED
    ), cleared AS (
        UPDATE public.user_tokens u
           SET monthly_tokens_used = 0, last_monthly_reset = now(), updated_at = now()
          FROM candidates c
         WHERE u.user_id = c.user_id
           -- The same key range again: the planner then joins two batch-sized
           -- sides instead of hashing the whole table once per batch.
           AND u.user_id >= v_low AND u.user_id <= v_high
        RETURNING u.user_id, c.previous_used
    ), logged AS (
        INSERT INTO public.token_transactions (user_id, operation, feature, amount, metadata)
        SELECT user_id, 'reset', 'monthly_rollover', previous_used,
               pg_catalog.jsonb_build_object('period', v_period,
                                             'previous_used', previous_used,
                                             'source', p_source)
          FROM cleared
        ON CONFLICT DO NOTHING
        RETURNING 1
    )
    SELECT count(*)::integer INTO reset_count FROM cleared;
END
$$;

-- The final pass: waits for row locks the batches skipped.  It scans the
-- table once; after the batches it finds almost nothing to do.  Final passes
-- (and whole one-transaction bulk runs) take a transaction advisory lock
-- first: two of them each holding rows the other waits for would deadlock.
CREATE FUNCTION public.token_reset_bulk_final_pass(p_source text DEFAULT 'bulk')
RETURNS integer
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_count integer;
    v_period_start timestamptz := public.token_reset_period_start();
    v_period text := public.token_reset_period_label(now());
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('token_reset.bulk_final_pass'));
    WITH candidates AS (
        SELECT u.user_id, u.monthly_tokens_used AS previous_used
          FROM public.user_tokens u
         WHERE u.last_monthly_reset < v_period_start AND u.monthly_tokens_used > 0
           FOR NO KEY UPDATE
    ), cleared AS (
        UPDATE public.user_tokens u
           SET monthly_tokens_used = 0, last_monthly_reset = now(), updated_at = now()
          FROM candidates c
         WHERE u.user_id = c.user_id
        RETURNING u.user_id, c.previous_used
    ), logged AS (
        INSERT INTO public.token_transactions (user_id, operation, feature, amount, metadata)
        SELECT user_id, 'reset', 'monthly_rollover', previous_used,
               pg_catalog.jsonb_build_object('period', v_period,
                                             'previous_used', previous_used,
                                             'source', p_source)
          FROM cleared
        ON CONFLICT DO NOTHING
        RETURNING 1
    )
    SELECT count(*)::integer INTO v_count FROM cleared;
    RETURN v_count;
END
$$;

-- The bulk backup in one call (one transaction, batches bound the work each
-- statement holds in memory).  Callers that can commit between batches use
-- the procedure below or the listener's runner, which commit every batch.
CREATE FUNCTION public.token_reset_bulk_all(p_source text, p_batch_size integer DEFAULT 10000)
RETURNS jsonb
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_after uuid := NULL;
    v_total integer := 0;
    v_batches integer := 0;
    v_batch record;
    v_final integer;
BEGIN
    -- Concurrent one-transaction runs queue here; the second then resets 0.
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('token_reset.bulk_final_pass'));
    LOOP
        SELECT * INTO v_batch FROM public.token_reset_bulk_batch(v_after, p_batch_size, p_source);
        v_batches := v_batches + 1;
        v_total := v_total + v_batch.reset_count;
        EXIT WHEN v_batch.last_key IS NULL;
        v_after := v_batch.last_key;
    END LOOP;
    v_final := public.token_reset_bulk_final_pass(p_source);
    RETURN pg_catalog.jsonb_build_object(
        'success', true,
        'reset_count', v_total + v_final,
        'reset_date', pg_catalog.to_char(pg_catalog.timezone(public.token_reset_zone(), now()), 'YYYY-MM-DD'),
        'period', public.token_reset_period_label(now()),
        'batches', v_batches,
        'batch_size', p_batch_size);
END
$$;

CREATE FUNCTION public.reset_monthly_tokens_for_all_users() RETURNS jsonb
    LANGUAGE sql
    SET search_path = pg_catalog, public, pg_temp
AS $$ SELECT public.token_reset_bulk_all('bulk') $$;

CREATE FUNCTION public.auto_reset_monthly_tokens() RETURNS jsonb
    LANGUAGE sql
    SET search_path = pg_catalog, public, pg_temp
AS $$ SELECT public.token_reset_bulk_all('bulk') $$;

-- For pg_cron and psql users: commits after every batch, so no transaction
-- holds more than one batch of row locks.  CALL it outside a transaction block.
CREATE PROCEDURE public.token_reset_bulk_committing(p_batch_size integer DEFAULT 10000)
    LANGUAGE plpgsql
AS $$
DECLARE
    v_after uuid := NULL;
    v_batch record;
BEGIN
    LOOP
        SELECT * INTO v_batch FROM public.token_reset_bulk_batch(v_after, p_batch_size, 'bulk');
        COMMIT;
        EXIT WHEN v_batch.last_key IS NULL;
        v_after := v_batch.last_key;
    END LOOP;
    PERFORM public.token_reset_bulk_final_pass('bulk');
    COMMIT;
END
$$;

-- ------------------------------------------------------------ privileges ---
REVOKE ALL ON FUNCTION
    public.token_reset_one_user(uuid, text),
    public.token_reset_bulk_batch(uuid, integer, text),
    public.token_reset_bulk_final_pass(text),
    public.token_reset_bulk_all(text, integer),
    public.token_reset_answer(uuid, integer),
    public.token_reset_configure(text, boolean),
    public.reset_user_tokens_if_needed(uuid),
    public.deduct_tokens(uuid, integer, text),
    public.check_user_tokens(uuid),
    public.check_token_rate_limit(uuid, integer),
    public.reset_monthly_tokens_for_all_users(),
    public.auto_reset_monthly_tokens(),
    public.check_and_reset_monthly_tokens()
FROM PUBLIC;
REVOKE ALL ON PROCEDURE public.token_reset_bulk_committing(integer) FROM PUBLIC;

DO $grants$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'token_reset_app') THEN
        GRANT EXECUTE ON FUNCTION
            public.reset_user_tokens_if_needed(uuid),
            public.deduct_tokens(uuid, integer, text),
            public.check_user_tokens(uuid),
            public.check_token_rate_limit(uuid, integer),
            public.reset_monthly_tokens_for_all_users(),
            public.auto_reset_monthly_tokens(),
            public.token_reset_answer(uuid, integer),
            public.token_reset_bulk_all(text, integer),
            public.token_reset_bulk_batch(uuid, integer, text),
            public.token_reset_bulk_final_pass(text)
        TO token_reset_app;
        GRANT EXECUTE ON PROCEDURE public.token_reset_bulk_committing(integer) TO token_reset_app;
        GRANT SELECT, INSERT, UPDATE ON public.user_tokens TO token_reset_app;
        GRANT SELECT ON public.token_transactions, public.user_tokens_with_auto_reset,
                        public.token_reset_settings TO token_reset_app;
    END IF;
END
$grants$;
