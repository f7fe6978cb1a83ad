-- 0011_limit_counters: users near their limit, and refused deductions, counted as they
-- happen.
--
-- Two more numbers for the dashboard, at the cost of the changes, not of the table:
--
-- * near_limit_users / at_limit_users (per period, in the usage counters of 0005):
--   users with usage who have used at least 80 % / 100 % of their limit.  The row
--   trigger counts a user who starts or stops having usage, crosses one of the two
--   lines or moves period; the reset chain counts its own batch as before, and now
--   deduct_tokens counts its own write too (below: the hot path pays no trigger).
-- * token_reset_refused_deductions: a sequence, stepped by deduct_tokens when it
--   refuses a deduction for being over the allowance.  The refusal raises, which rolls
--   back everything the transaction wrote; a sequence's step is the one thing that
--   survives a rollback, so the count is kept without writing a row.  Exact, except
--   that after a database crash (or on a standby) a sequence may read up to 32 ahead.
SET LOCAL search_path = pg_catalog, pg_temp;

-- The one definition of "at or above p_percent % of the limit" (usage > 0: a user who
-- has used nothing is near no limit, even a limit of 0).  BEGIN ATOMIC: resolved now,
-- under this file's search_path, never at call time.
CREATE FUNCTION public.token_reset_limit_reached(p_used integer, p_limit integer, p_percent integer)
RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT p_used > 0 AND p_used::bigint * 100 >= p_limit::bigint * p_percent;
END;

CREATE SEQUENCE public.token_reset_refused_deductions AS bigint NO CYCLE;

ALTER TABLE public.token_reset_usage_deltas
    ADD COLUMN near_limit_users bigint NOT NULL DEFAULT 0,
    ADD COLUMN at_limit_users bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE VIEW public.token_reset_usage AS
SELECT period, sum(users)::bigint AS users, sum(active_users)::bigint AS active_users,
       sum(resets)::bigint AS resets, sum(near_limit_users)::bigint AS near_limit_users,
       sum(at_limit_users)::bigint AS at_limit_users
  FROM public.token_reset_usage_deltas
 GROUP BY period;

CREATE OR REPLACE FUNCTION public.token_reset_compact_counters() RETURNS integer
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
WITH gone AS (
    DELETE FROM public.token_reset_usage_deltas RETURNING *
), folded AS (
    INSERT INTO public.token_reset_usage_deltas
           (period, users, active_users, resets, near_limit_users, at_limit_users)
    SELECT period, sum(users), sum(active_users), sum(resets), sum(near_limit_users),
           sum(at_limit_users)
      FROM gone
     GROUP BY period
    HAVING sum(users) <> 0 OR sum(active_users) <> 0 OR sum(resets) <> 0
        OR sum(near_limit_users) <> 0 OR sum(at_limit_users) <> 0
    RETURNING 1
)
SELECT count(*)::integer FROM gone
$$;

CREATE OR REPLACE FUNCTION public.token_reset_recount_usage() RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    LOCK TABLE public.token_reset_usage_deltas IN EXCLUSIVE MODE;
    DELETE FROM public.token_reset_usage_deltas;
    INSERT INTO public.token_reset_usage_deltas
           (period, users, active_users, resets, near_limit_users, at_limit_users)
    SELECT coalesce(u.period, r.period), coalesce(u.users, 0), coalesce(u.active_users, 0),
           coalesce(r.resets, 0), coalesce(u.near_limit_users, 0), coalesce(u.at_limit_users, 0)
      FROM (SELECT public.token_reset_period_label(last_monthly_reset) AS period,
                   count(*) AS users,
                   count(*) FILTER (WHERE monthly_tokens_used > 0) AS active_users,
                   count(*) FILTER (WHERE public.token_reset_limit_reached(
                       monthly_tokens_used, monthly_token_limit, 80)) AS near_limit_users,
                   count(*) FILTER (WHERE public.token_reset_limit_reached(
                       monthly_tokens_used, monthly_token_limit, 100)) AS at_limit_users
              FROM public.user_tokens GROUP BY 1) u
      FULL JOIN (SELECT metadata ->> 'period' AS period, count(*) AS resets
                   FROM public.token_transactions WHERE operation = 'reset' GROUP BY 1) r
        ON r.period = u.period;
END
$$;

-- One delta row per counted change: the row leaves its old period's counts and joins
-- its new period's.  A write that changes none of the counted facts writes nothing.
CREATE OR REPLACE FUNCTION public.token_reset_count_usage() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- Per row version: period label, has usage, at 80 %, at 100 % (NULL: no version).
    o_period text;
    o_active boolean;
    o_near boolean;
    o_at boolean;
    n_period text;
    n_active boolean;
    n_near boolean;
    n_at boolean;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        o_period := public.token_reset_period_label(OLD.last_monthly_reset);
        o_active := OLD.monthly_tokens_used > 0;
        o_near := public.token_reset_limit_reached(OLD.monthly_tokens_used, OLD.monthly_token_limit, 80);
        o_at := public.token_reset_limit_reached(OLD.monthly_tokens_used, OLD.monthly_token_limit, 100);
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        n_period := public.token_reset_period_label(NEW.last_monthly_reset);
        n_active := NEW.monthly_tokens_used > 0;
        n_near := public.token_reset_limit_reached(NEW.monthly_tokens_used, NEW.monthly_token_limit, 80);
        n_at := public.token_reset_limit_reached(NEW.monthly_tokens_used, NEW.monthly_token_limit, 100);
    END IF;
    IF (o_period, o_active, o_near, o_at) IS NOT DISTINCT FROM (n_period, n_active, n_near, n_at) THEN
        RETURN NULL;
    END IF;
    INSERT INTO public.token_reset_usage_deltas
           (period, users, active_users, near_limit_users, at_limit_users)
    SELECT v.period, v.sign, v.sign * v.active::integer, v.sign * v.near::integer,
           v.sign * v.at_limit::integer
      FROM (VALUES (o_period, -1, o_active, o_near, o_at),
                   (n_period, 1, n_active, n_near, n_at)) AS v(period, sign, active, near, at_limit)
     WHERE v.period IS NOT NULL;
    RETURN NULL;
END
$$;

-- Fires on a write to a counted column by anyone but the writers that count their
-- own (the reset chain, deduct_tokens: token_reset.counting = 'self').  Kept short on
-- purpose: PostgreSQL rebuilds a trigger's WHEN clause for every statement, so its
-- length is paid by every write, and a function call in it is not inlined (the lines
-- as calls of token_reset_limit_reached() made every deduction 40-60 % slower;
-- written out, 10 %).  The function above returns early when nothing counted moved.
DROP TRIGGER user_tokens_count_update ON public.user_tokens;
CREATE TRIGGER user_tokens_count_update
    AFTER UPDATE ON public.user_tokens
    FOR EACH ROW
    WHEN (pg_catalog.current_setting('token_reset.counting', true) IS DISTINCT FROM 'self'
          AND (OLD.monthly_tokens_used <> NEW.monthly_tokens_used
               OR OLD.monthly_token_limit <> NEW.monthly_token_limit
               OR OLD.last_monthly_reset <> NEW.last_monthly_reset))
    EXECUTE FUNCTION public.token_reset_count_usage();

-- The reset chain (0005) counts its own batch, now with the two lines.
CREATE OR REPLACE FUNCTION public.token_reset_clear(
    p_ids uuid[], p_used integer[], p_source text,
    OUT reset_count integer, OUT first_id bigint, OUT last_id bigint)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_period text := public.token_reset_period_label(now());
    v_logged uuid[];
    v_kept uuid[];
    v_active integer;
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
    SELECT count(*) FILTER (WHERE u > 0) INTO v_active FROM unnest(p_used) AS u;
    INSERT INTO public.token_reset_usage_deltas
           (period, users, active_users, resets, near_limit_users, at_limit_users)
    SELECT public.token_reset_period_label(o.last_monthly_reset), -count(*),
           -count(*) FILTER (WHERE o.monthly_tokens_used > 0), 0,
           -count(*) FILTER (WHERE public.token_reset_limit_reached(
                                 o.monthly_tokens_used, o.monthly_token_limit, 80)),
           -count(*) FILTER (WHERE public.token_reset_limit_reached(
                                 o.monthly_tokens_used, o.monthly_token_limit, 100))
      FROM public.user_tokens o
     WHERE o.user_id = ANY (p_ids)
     GROUP BY 1
    UNION ALL
    SELECT v_period, cardinality(p_ids), v_active - reset_count, reset_count, 0, 0;
    -- Counted above: the row trigger lets these UPDATEs through uncounted.
    PERFORM set_config('token_reset.counting', 'self', true);
    UPDATE public.user_tokens
       SET monthly_tokens_used = 0, last_monthly_reset = now(), updated_at = now()
     WHERE user_id = ANY (v_logged);
    IF reset_count < cardinality(p_ids) THEN
        SELECT coalesce(array_agg(k.id), '{}') INTO v_kept
          FROM (SELECT unnest(p_ids) EXCEPT SELECT unnest(v_logged)) AS k(id);
        -- Kept users (reset already this period) keep their usage, so they stay
        -- near their limit in this period if they were.
        WITH kept AS (
            UPDATE public.user_tokens
               SET last_monthly_reset = now(), updated_at = now()
             WHERE user_id = ANY (v_kept)
            RETURNING monthly_tokens_used AS used, monthly_token_limit AS lim
        )
        INSERT INTO public.token_reset_usage_deltas (period, near_limit_users, at_limit_users)
        SELECT v_period,
               count(*) FILTER (WHERE public.token_reset_limit_reached(used, lim, 80)),
               count(*) FILTER (WHERE public.token_reset_limit_reached(used, lim, 100))
          FROM kept;
    END IF;
    PERFORM set_config('token_reset.counting', '', true);
    IF p_source = 'bulk' AND reset_count > 0 THEN
        PERFORM pg_notify('token_resets', json_build_object(
            'v', 1, 'first_id', first_id, 'last_id', last_id, 'count', reset_count)::text);
    END IF;
END
$$;

-- deduct_tokens (0004) counts its own common write, with the row trigger switched off
-- around it (on its fast path a deduction only adds usage, in the row's own period, so
-- it can only start the user's usage or cross a line upwards: three comparisons instead
-- of the trigger), and counts what it refuses for being over the allowance.
CREATE OR REPLACE FUNCTION public.deduct_tokens(p_user_id uuid, p_amount bigint, p_feature text)
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
    v_fast boolean;
    v_near boolean;   -- this deduction took the user to 80 % of the limit
    v_at boolean;     -- ... to 100 %
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_amount := public.token_reset_checked_amount(p_amount, false);
    -- Fast path: one statement takes the row lock, checks period and room, and adds.
    -- Written as limit - used so no sum can overflow integer.  Only a row of this
    -- period whose reset time is not in the future (the BEFORE trigger would move
    -- it) takes it, so the write stays in the row's period and the count trigger can
    -- be off: this function counts it below.
    PERFORM set_config('token_reset.counting', 'self', true);
    UPDATE public.user_tokens
       SET monthly_tokens_used = monthly_tokens_used + v_amount, updated_at = now()
     WHERE user_id = p_user_id
       AND last_monthly_reset >= public.token_reset_period_bound()
       AND last_monthly_reset <= clock_timestamp()
       AND v_amount <= monthly_token_limit - monthly_tokens_used
    RETURNING monthly_tokens_used, monthly_token_limit, last_monthly_reset INTO v_used, v_limit, v_reset_at;
    v_fast := FOUND;
    PERFORM set_config('token_reset.counting', '', true);
    IF v_fast THEN
        -- A deduction only adds: it can start the user's usage or cross a line upwards.
        v_near := public.token_reset_limit_reached(v_used, v_limit, 80)
                  AND NOT public.token_reset_limit_reached(v_used - v_amount, v_limit, 80);
        v_at := public.token_reset_limit_reached(v_used, v_limit, 100)
                AND NOT public.token_reset_limit_reached(v_used - v_amount, v_limit, 100);
        IF v_used = v_amount OR v_near OR v_at THEN
            INSERT INTO public.token_reset_usage_deltas
                   (period, active_users, near_limit_users, at_limit_users)
            VALUES (public.token_reset_period_label(v_reset_at),
                    CASE WHEN v_used = v_amount THEN 1 ELSE 0 END, v_near::integer, v_at::integer);
        END IF;
    ELSE
        -- Slow path: stale (reset first), unknown, over the allowance, or moved by
        -- another transaction meanwhile; rare, so the row trigger counts it.  The row
        -- is locked before the staleness check, so the check, the room and the write
        -- all see the version this deduction writes over (another transaction may have
        -- moved it back a period while this one waited).
        PERFORM 1 FROM public.user_tokens WHERE user_id = p_user_id FOR NO KEY UPDATE;
        v_cleared := public.token_reset_one_user(p_user_id, 'function');
        SELECT * INTO v_row FROM public.user_tokens
         WHERE user_id = p_user_id FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'unknown user: %', p_user_id USING ERRCODE = 'no_data_found';
        END IF;
        IF v_amount > v_row.monthly_token_limit - v_row.monthly_tokens_used THEN
            -- Raising rolls back the reset above as well: nothing is written, but the
            -- refusal is counted (a sequence's step survives the rollback).
            PERFORM nextval('public.token_reset_refused_deductions'::regclass);
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

INSERT INTO public.token_reset_declared_privileges (grantee, kind, object, privilege) VALUES
    ('token_reset_listener', 'table', 'public.token_reset_refused_deductions', 'SELECT');

SELECT public.token_reset_apply_privileges();

-- The two new counts as they stand.  DROP TRIGGER above holds user_tokens' lock until
-- this migration commits, so no write falls between this scan and the new trigger;
-- the writes wait for one scan of user_tokens (not a full recount, which would also
-- read every reset row of the ledger).
INSERT INTO public.token_reset_usage_deltas (period, near_limit_users, at_limit_users)
SELECT public.token_reset_period_label(last_monthly_reset),
       count(*) FILTER (WHERE public.token_reset_limit_reached(
                            monthly_tokens_used, monthly_token_limit, 80)),
       count(*) FILTER (WHERE public.token_reset_limit_reached(
                            monthly_tokens_used, monthly_token_limit, 100))
  FROM public.user_tokens
 GROUP BY 1;
