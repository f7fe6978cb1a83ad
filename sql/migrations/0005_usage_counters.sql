-- 0005_usage_counters: periodic questions answered at the cost of the changes, not of
-- the table.
--
-- The watchdog (every minute, every replica) and `status` asked "how many users still
-- carry last period's usage" with a sequential scan of user_tokens: 0.3-0.5 s at 1M
-- users, 4-7 s at 10M, its 10 s timeout reached near 13M.  Now the writes that change
-- the answer record it, as deltas:
--
--   users(period)         users whose row is in `period` (last_monthly_reset in it);
--   active_users(period)  those of them with usage > 0;
--   resets(period)        reset rows written in `period`.
--
-- "Users carrying a previous period's usage" is the sum of active_users over periods
-- before the current one; "active this period" is active_users of the current one.
-- Deltas are appended (no counter row that every writer must lock, so no contention
-- at the start of a month) and folded together by token_reset_compact_counters(),
-- which the watchdog runs before it reads: a read costs the rows written since the
-- last fold.  Every write is counted by a row trigger whose WHEN clause lets the
-- common deduction (usage already > 0, row not moving period) through untouched;
-- the reset chain counts its own batch in one statement instead of once per row.
-- Loading data with triggers off (session_replication_role = replica) bypasses the
-- count: run token_reset_recount_usage() afterwards (README).

SET LOCAL search_path = pg_catalog, pg_temp;

CREATE TABLE public.token_reset_usage_deltas (
    period text NOT NULL,
    users bigint NOT NULL DEFAULT 0,
    active_users bigint NOT NULL DEFAULT 0,
    resets bigint NOT NULL DEFAULT 0,
    CONSTRAINT token_reset_usage_deltas_period_format CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$')
);

-- The current answer, one row per period: what the watchdog and `status` read.
CREATE VIEW public.token_reset_usage AS
SELECT period, sum(users)::bigint AS users, sum(active_users)::bigint AS active_users,
       sum(resets)::bigint AS resets
  FROM public.token_reset_usage_deltas
 GROUP BY period;

-- Folds the deltas into one row per period.  Rows appended by transactions that
-- commit after this statement began are left for the next fold: exact either way.
CREATE FUNCTION public.token_reset_compact_counters() RETURNS integer
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
WITH gone AS (
    DELETE FROM public.token_reset_usage_deltas RETURNING *
), folded AS (
    INSERT INTO public.token_reset_usage_deltas (period, users, active_users, resets)
    SELECT period, sum(users), sum(active_users), sum(resets)
      FROM gone
     GROUP BY period
    HAVING sum(users) <> 0 OR sum(active_users) <> 0 OR sum(resets) <> 0
    RETURNING 1
)
SELECT count(*)::integer FROM gone
$$;

-- Rebuilds the counts from the tables (a full scan): after loading data with the
-- triggers off, or to prove the counts (the tests compare the two).  Owner only.
CREATE FUNCTION public.token_reset_recount_usage() RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    LOCK TABLE public.token_reset_usage_deltas IN EXCLUSIVE MODE;
    DELETE FROM public.token_reset_usage_deltas;
    INSERT INTO public.token_reset_usage_deltas (period, users, active_users, resets)
    SELECT coalesce(u.period, r.period), coalesce(u.users, 0), coalesce(u.active_users, 0),
           coalesce(r.resets, 0)
      FROM (SELECT public.token_reset_period_label(last_monthly_reset) AS period,
                   count(*) AS users,
                   count(*) FILTER (WHERE monthly_tokens_used > 0) AS active_users
              FROM public.user_tokens GROUP BY 1) u
      FULL JOIN (SELECT metadata ->> 'period' AS period, count(*) AS resets
                   FROM public.token_transactions WHERE operation = 'reset' GROUP BY 1) r
        ON r.period = u.period;
END
$$;

-- The row trigger: one delta row per counted change.  Our reset chain sets
-- token_reset.counting = 'self' around its own UPDATEs and counts them itself; the
-- functions that write user_tokens directly reset the setting first (below), so a
-- session cannot switch counting off for the functions it calls.
CREATE FUNCTION public.token_reset_count_usage() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO public.token_reset_usage_deltas (period, users, active_users)
        VALUES (public.token_reset_period_label(OLD.last_monthly_reset), -1,
                CASE WHEN OLD.monthly_tokens_used > 0 THEN -1 ELSE 0 END);
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO public.token_reset_usage_deltas (period, users, active_users)
        VALUES (public.token_reset_period_label(NEW.last_monthly_reset), 1,
                CASE WHEN NEW.monthly_tokens_used > 0 THEN 1 ELSE 0 END);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER user_tokens_count_insert
    AFTER INSERT ON public.user_tokens
    FOR EACH ROW EXECUTE FUNCTION public.token_reset_count_usage();
CREATE TRIGGER user_tokens_count_delete
    AFTER DELETE ON public.user_tokens
    FOR EACH ROW EXECUTE FUNCTION public.token_reset_count_usage();
-- Fires only when a row starts or stops having usage, or moves period; a deduction
-- on a row already in use pays two comparisons.
CREATE TRIGGER user_tokens_count_update
    AFTER UPDATE ON public.user_tokens
    FOR EACH ROW
    WHEN (((OLD.monthly_tokens_used > 0) <> (NEW.monthly_tokens_used > 0)
           OR OLD.last_monthly_reset <> NEW.last_monthly_reset)
          AND pg_catalog.current_setting('token_reset.counting', true) IS DISTINCT FROM 'self')
    EXECUTE FUNCTION public.token_reset_count_usage();

-- The reset chain again (0004), now counting its own batch in one statement: every
-- user it touches leaves its old period and joins this one; cleared users stop being
-- active, kept users (already reset this period) stay active; each ledger row is a
-- reset.  The old periods are read before the UPDATEs (the rows are locked), so no
-- join is needed to see old values.
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
    INSERT INTO public.token_reset_usage_deltas (period, users, active_users, resets)
    SELECT public.token_reset_period_label(o.last_monthly_reset), -count(*),
           -count(*) FILTER (WHERE o.monthly_tokens_used > 0), 0
      FROM public.user_tokens o
     WHERE o.user_id = ANY (p_ids)
     GROUP BY 1
    UNION ALL
    SELECT v_period, cardinality(p_ids), v_active - reset_count, reset_count;
    -- Counted above: the row trigger lets these UPDATEs through uncounted.
    PERFORM set_config('token_reset.counting', 'self', true);
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
    PERFORM set_config('token_reset.counting', '', true);
    IF p_source = 'bulk' AND reset_count > 0 THEN
        PERFORM pg_notify('token_resets', json_build_object(
            'v', 1, 'first_id', first_id, 'last_id', last_id, 'count', reset_count)::text);
    END IF;
END
$$;

-- The owner's writes reset through the row trigger, which writes its own ledger row:
-- it counts that reset (the row's move between periods is counted by the AFTER
-- trigger like any write).
CREATE OR REPLACE FUNCTION public.check_and_reset_monthly_tokens() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_logged integer;
    v_period text;
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
            v_period := public.token_reset_period_label(now());
            WITH logged AS (
                INSERT INTO public.token_transactions (user_id, operation, feature, amount, metadata)
                VALUES (OLD.user_id, 'reset', 'monthly_rollover', OLD.monthly_tokens_used,
                        public.token_reset_reset_metadata(v_period, OLD.monthly_tokens_used,
                                                          'trigger'))
                ON CONFLICT DO NOTHING
                RETURNING 1
            )
            SELECT count(*) INTO v_logged FROM logged;
            IF v_logged > 0 THEN
                NEW.monthly_tokens_used := greatest(NEW.monthly_tokens_used - OLD.monthly_tokens_used, 0);
                INSERT INTO public.token_reset_usage_deltas (period, resets) VALUES (v_period, 1);
            END IF;
        END IF;
        NEW.last_monthly_reset := now();
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

-- deduct_tokens, grant_tokens and set_token_limit write user_tokens themselves (every
-- other path writes through the reset chain, which counts itself).  All three check
-- their amount first, so that check also turns the counting switch back off: a
-- session that set it could otherwise hide its own first deduction of a period.  (A
-- per-function SET clause would do it too, but a role without superuser may not put a
-- custom setting there, and managed PostgreSQL gives none.)
CREATE OR REPLACE FUNCTION public.token_reset_checked_amount(p_amount bigint, p_allow_zero boolean)
RETURNS integer
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM set_config('token_reset.counting', '', true);
    IF p_amount IS NULL OR p_amount < 0 OR (p_amount = 0 AND NOT p_allow_zero) THEN
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

-- Privileges: the listener folds and reads the counters; 0006 declares those grants
-- (token_reset_declared_privileges) with every other one.

SELECT public.token_reset_recount_usage();
