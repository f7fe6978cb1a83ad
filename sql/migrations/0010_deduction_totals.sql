-- 0010_deduction_totals: tokens deducted per period and feature, for the dashboard.
--
-- "How many tokens went out this month, and on what" is a sum over the ledger's
-- deduct rows: a scan of a whole period's partition, which grows all month.  The
-- deductions are not counted where they are written (deduct_tokens is the hot path;
-- one more row per deduction would double its writes).  Instead the listener's
-- watchdog folds the ledger rows written since its last fold into one total per
-- (period, feature): token_reset_fold_deductions() reads the ids above a cursor, so a
-- fold costs the deductions since the last one, whatever the size of the ledger.
--
-- Ids become visible in commit order, not in id order, so the cursor only passes ids
-- that are settled, by the rule the listener's own reader follows (0002,
-- token_reset_listener_horizon): every id up to the sequence's high-water mark, once
-- the transactions writing the ledger at that moment have ended.  The cursor, the
-- writers it waits for and the totals live in one row and one table, written in the
-- fold's transaction: a fold that fails changes nothing, two replicas folding at once
-- take turns on the cursor row, and a restart starts from what the database holds.
--
-- A deduction counts in the period its ledger row names (metadata.period: the period
-- of the usage it adds to), its feature as written (NULL as '(none)').
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE TABLE public.token_reset_deduction_totals (
    period text NOT NULL,
    feature text NOT NULL,
    tokens bigint NOT NULL DEFAULT 0,
    deductions bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (period, feature),
    CONSTRAINT token_reset_deduction_totals_period_format
        CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$')
);

CREATE TABLE public.token_reset_deduction_cursor (
    singleton boolean PRIMARY KEY DEFAULT true,
    -- Every ledger id up to this one is in the totals.
    last_id bigint NOT NULL,
    -- Ids up to pending_id are settled once the transactions in pending_writers (the
    -- ledger's writers when pending_id was the high-water mark) have ended.
    pending_id bigint,
    pending_writers text[] NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT token_reset_deduction_cursor_one_row CHECK (singleton),
    CONSTRAINT token_reset_deduction_cursor_last_id_non_negative CHECK (last_id >= 0)
);
INSERT INTO public.token_reset_deduction_cursor (last_id) VALUES (0);

-- Adds the deductions of ledger ids in (p_after, p_upto] to the totals: the one
-- aggregation both the fold and the recount run.  With p_since, only deductions of
-- that period and later count, and only the partitions they can be in are read (a
-- deduction's row is in its own period's partition or, for a transaction that began
-- before the boundary, the one before).  Returns the deductions added.
-- No ledger row can make it fail: a feature is kept to its first 200 characters (the
-- totals' index could not hold a longer one, and the application writes features), a
-- metadata period that is not a 'YYYY-MM' label gives way to the row's partition.
CREATE FUNCTION public.token_reset_add_deductions(
    p_after bigint, p_upto bigint, p_since text DEFAULT NULL) RETURNS bigint
    LANGUAGE sql
    SET search_path = pg_catalog, pg_temp
AS $$
WITH raw AS (
    -- Grouped by the row's own values first: the checks below then run once a group,
    -- not once a row.
    SELECT t.metadata ->> 'period' AS labelled, t.period AS partition_period, t.feature,
           sum(t.amount) AS tokens, count(*) AS deductions
      FROM public.token_transactions t
     WHERE t.id > p_after AND t.id <= p_upto AND t.operation = 'deduct'
       AND t.period >= coalesce(to_char(to_date(p_since || '-01', 'YYYY-MM-DD')
                                        - interval '1 month', 'YYYY-MM'), '')
     GROUP BY 1, 2, 3
), keyed AS (
    SELECT CASE WHEN labelled ~ '^[0-9]{4}-(0[1-9]|1[0-2])$' THEN labelled
                ELSE partition_period END AS period,
           left(coalesce(feature, '(none)'), 200) AS feature, tokens, deductions
      FROM raw
), found AS (
    SELECT period, feature, sum(tokens) AS tokens, sum(deductions) AS deductions
      FROM keyed
     WHERE period >= coalesce(p_since, '')
     GROUP BY 1, 2
), added AS (
    INSERT INTO public.token_reset_deduction_totals AS d (period, feature, tokens, deductions)
    SELECT period, feature, tokens, deductions FROM found
    ON CONFLICT (period, feature) DO UPDATE
       SET tokens = d.tokens + excluded.tokens, deductions = d.deductions + excluded.deductions
)
SELECT coalesce(sum(deductions), 0)::bigint FROM found
$$;

-- The fold and the recount rely on each statement seeing what committed before it (the
-- horizon's promise is about now, not about a snapshot taken earlier).
CREATE FUNCTION public.token_reset_require_read_committed(p_what text) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION '% runs in READ COMMITTED, not %', p_what,
                current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
END
$$;

-- The fold the watchdog runs before it reads (the listener role's).  Returns the
-- deductions folded.  At most p_max_ids ids a call, so a backlog after an outage is
-- bounded work per check; a fold waits at most 2 s for the cursor (a recount holds it).
CREATE FUNCTION public.token_reset_fold_deductions(p_max_ids bigint DEFAULT 5000000)
RETURNS bigint
    LANGUAGE plpgsql
    VOLATILE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    SET lock_timeout = '2s'
AS $$
DECLARE
    c public.token_reset_deduction_cursor%ROWTYPE;
    h record;
    v_settled bigint;
    v_target bigint;
    v_folded bigint := 0;
BEGIN
    PERFORM public.token_reset_require_read_committed('token_reset_fold_deductions()');
    IF p_max_ids IS NULL OR p_max_ids < 1 THEN
        RAISE EXCEPTION 'p_max_ids must be a positive integer, got %', p_max_ids
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO STRICT c FROM public.token_reset_deduction_cursor FOR UPDATE;
    SELECT * INTO STRICT h FROM public.token_reset_listener_horizon(c.pending_writers);
    IF h.allocated < c.last_id THEN
        RAISE EXCEPTION 'the ledger''s ids went back (% handed out, % already folded): restored '
                        'from a backup? the owner runs SELECT token_reset_recount_deductions()',
                h.allocated, c.last_id
            USING ERRCODE = 'data_corrupted';
    END IF;
    v_settled := c.last_id;
    IF c.pending_id IS NOT NULL AND NOT h.waiting THEN
        v_settled := greatest(v_settled, c.pending_id);
        c.pending_id := NULL;
        c.pending_writers := '{}';
    END IF;
    IF cardinality(h.writers) = 0 THEN
        v_settled := greatest(v_settled, h.allocated);
        c.pending_id := NULL;
        c.pending_writers := '{}';
    ELSIF c.pending_id IS NULL THEN
        c.pending_id := h.allocated;
        c.pending_writers := h.writers;
    END IF;
    IF v_settled - c.last_id > p_max_ids THEN
        v_target := c.last_id + p_max_ids;
        IF c.pending_id IS NULL THEN
            -- Settled already: the next fold goes on without waiting for anyone.
            c.pending_id := v_settled;
            c.pending_writers := '{}';
        END IF;
    ELSE
        v_target := v_settled;
    END IF;
    IF v_target > c.last_id THEN
        v_folded := public.token_reset_add_deductions(c.last_id, v_target);
    END IF;
    UPDATE public.token_reset_deduction_cursor
       SET last_id = greatest(last_id, v_target), pending_id = c.pending_id,
           pending_writers = c.pending_writers, updated_at = now();
    RETURN v_folded;
END
$$;

-- Rebuilds the totals of the last p_periods periods (this one included) from the
-- ledger: once here, and by hand after loading ledger rows with the triggers off.
-- Owner only.  It waits (at most p_wait_seconds) for the transactions writing the
-- ledger when it starts, so every id it counts up to is settled; it blocks no writer.
CREATE FUNCTION public.token_reset_recount_deductions(
    p_periods integer DEFAULT 2, p_wait_seconds double precision DEFAULT 60)
RETURNS bigint
    LANGUAGE plpgsql
    VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    h record;
    v_waiting boolean;
    v_deadline timestamptz := clock_timestamp() + make_interval(secs => p_wait_seconds);
    v_since text;
BEGIN
    PERFORM public.token_reset_require_read_committed('token_reset_recount_deductions()');
    IF p_periods IS NULL OR p_periods < 1 THEN
        RAISE EXCEPTION 'p_periods must be a positive integer, got %', p_periods
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM 1 FROM public.token_reset_deduction_cursor FOR UPDATE;  -- no fold meanwhile
    LOCK TABLE public.token_reset_deduction_totals IN EXCLUSIVE MODE;
    SELECT * INTO STRICT h FROM public.token_reset_listener_horizon('{}');
    v_waiting := cardinality(h.writers) > 0;
    WHILE v_waiting LOOP
        IF clock_timestamp() > v_deadline THEN
            RAISE EXCEPTION 'transactions that write token_transactions stayed open for % s: %',
                    p_wait_seconds, h.writers
                USING ERRCODE = 'lock_not_available',
                      HINT = 'end them (pg_locks names their sessions) and run this again';
        END IF;
        PERFORM pg_sleep(0.01);
        SELECT w.waiting INTO v_waiting FROM public.token_reset_listener_horizon(h.writers) w;
    END LOOP;
    v_since := to_char(to_date(public.token_reset_period_label(now()) || '-01', 'YYYY-MM-DD')
                       - make_interval(months => p_periods - 1), 'YYYY-MM');
    -- Earlier periods keep the totals they have (their ledger may be gone already).
    DELETE FROM public.token_reset_deduction_totals WHERE period >= v_since;
    PERFORM public.token_reset_add_deductions(0, h.allocated, v_since);
    UPDATE public.token_reset_deduction_cursor
       SET last_id = h.allocated, pending_id = NULL, pending_writers = '{}', updated_at = now();
    RETURN h.allocated;
END
$$;

INSERT INTO public.token_reset_declared_privileges (grantee, kind, object, privilege) VALUES
    ('token_reset_listener', 'table', 'public.token_reset_deduction_totals', 'SELECT'),
    ('token_reset_listener', 'routine', 'public.token_reset_fold_deductions(bigint)', 'EXECUTE');

SELECT public.token_reset_apply_privileges();

SELECT public.token_reset_recount_deductions();
