-- 0006_partitioned_ledger: the ledger partitioned by period, with retention, erasure,
-- and the privileges declared as data.
--
-- * token_transactions is partitioned by RANGE (period), period being 'YYYY-MM' in the
--   configured zone (a column now; its default is the period of the writing
--   transaction).  One partition per period, created ahead by
--   token_reset_ensure_partitions() (run by `token-reset migrate` and by the listener's
--   watchdog), and a DEFAULT partition so no insert can fail at a boundary if they did
--   not run.  The one-reset-per-period index leads with the partition key, so it stays
--   a global guarantee; ids keep coming from one sequence, so the listener's cursor
--   and its horizon work across partitions unchanged.
-- * Retention: token_reset_drop_periods(keep, archive) detaches (and drops, unless
--   archive) whole periods older than `keep`; owner only.  The append-only guarantee
--   holds for every row that stays: UPDATE, DELETE and TRUNCATE are still refused.
-- * Erasure: token_reset_erase_user(user) deletes one user's rows and ledger history
--   (e.g. a GDPR request); owner only.  The append-only trigger lets exactly that
--   user's rows go, inside that function.
-- * Indexes that did not pay: the BRIN on created_at (its one reader, the watchdog's
--   "did last period have usage" probe, now reads last period's partition) is gone.
-- * token_reset_declared_privileges holds the privilege matrix as rows;
--   token_reset_apply_privileges() applies exactly those, so a later migration adds a
--   grant with one INSERT.
--
-- The ledger is rewritten once, in this migration's transaction.

SET LOCAL search_path = pg_catalog, pg_temp;

-- ---------------------------------------------------------- the new table ---
ALTER TABLE public.token_transactions RENAME TO token_transactions_unpartitioned;
ALTER INDEX public.token_transactions_pkey RENAME TO token_transactions_unpartitioned_pkey;
ALTER INDEX public.token_transactions_one_reset_per_period
    RENAME TO token_transactions_unpartitioned_one_reset;
ALTER INDEX public.token_transactions_reset_id RENAME TO token_transactions_unpartitioned_reset_id;
ALTER INDEX public.token_transactions_user_id RENAME TO token_transactions_unpartitioned_user_id;

CREATE TABLE public.token_transactions (
    id bigint NOT NULL,
    user_id uuid NOT NULL,
    operation text NOT NULL,
    feature text,
    amount integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    metadata jsonb,
    period text NOT NULL DEFAULT public.token_reset_period_label(now()),
    CONSTRAINT token_transactions_pkey PRIMARY KEY (id, period),
    CONSTRAINT token_transactions_operation_known
        CHECK (operation IN ('deduct', 'reset', 'grant', 'limit')),
    CONSTRAINT token_transactions_amount_non_negative CHECK (amount >= 0),
    CONSTRAINT token_transactions_period_format
        CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    CONSTRAINT token_transactions_reset_has_period CHECK (
        operation <> 'reset'
        OR coalesce(metadata ->> 'period', '') ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    CONSTRAINT token_transactions_reset_source_known CHECK (
        operation <> 'reset'
        OR coalesce(metadata ->> 'source', '') IN ('trigger', 'function', 'bulk'))
) PARTITION BY RANGE (period);

CREATE TABLE public.token_transactions_default
    PARTITION OF public.token_transactions DEFAULT;

-- At most one reset per user per period: the partition key leads, so the index is
-- unique across partitions.  Also serves "this period's resets".
CREATE UNIQUE INDEX token_transactions_one_reset_per_period
    ON public.token_transactions (period, user_id)
    WHERE operation = 'reset';
-- The listener's catch-up reads reset rows by id; deductions are skipped cheaply.
CREATE INDEX token_transactions_reset_id
    ON public.token_transactions (id)
    WHERE operation = 'reset';
-- One user's history (support, erasure, the ledger equation).
CREATE INDEX token_transactions_user_id
    ON public.token_transactions (user_id, id);

-- Creates the partitions of the current period and the next p_ahead; a period whose
-- rows already landed in the DEFAULT partition (nobody ran this for months) is left
-- there and reported.  Each partition is built on its own and then attached, which
-- takes only SHARE UPDATE EXCLUSIVE on the ledger (writes go on); the lock timeout
-- keeps a long transaction on the ledger from queueing everyone behind this DDL (the
-- next watchdog check tries again, months ahead of need).  Returns what it created.
CREATE FUNCTION public.token_reset_ensure_partitions(p_ahead integer DEFAULT 3)
RETURNS text[]
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    SET lock_timeout = '2s'
AS $$
DECLARE
    v_first date := to_date(public.token_reset_period_label(now()) || '-01', 'YYYY-MM-DD');
    v_month date;
    v_from text;
    v_to text;
    v_name text;
    v_created text[] := '{}';
BEGIN
    IF p_ahead IS NULL OR p_ahead < 0 OR p_ahead > 120 THEN
        RAISE EXCEPTION 'p_ahead must be between 0 and 120, got %', p_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR k IN 0 .. p_ahead LOOP
        v_month := (v_first + make_interval(months => k))::date;
        v_from := to_char(v_month, 'YYYY-MM');
        v_to := to_char(v_month + interval '1 month', 'YYYY-MM');
        v_name := 'token_transactions_' || to_char(v_month, 'YYYY_MM');
        CONTINUE WHEN to_regclass('public.' || v_name) IS NOT NULL;
        IF EXISTS (SELECT 1 FROM public.token_transactions_default
                    WHERE period >= v_from AND period < v_to) THEN
            RAISE NOTICE 'period % has rows in token_transactions_default: partition % not created',
                v_from, v_name;
            CONTINUE;
        END IF;
        BEGIN
            EXECUTE format('CREATE TABLE public.%I (LIKE public.token_transactions '
                           'INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', v_name);
            -- Proves the bound, so ATTACH need not scan (the table is empty anyway).
            EXECUTE format('ALTER TABLE public.%I ADD CONSTRAINT %I '
                           'CHECK (period >= %L AND period < %L)',
                           v_name, v_name || '_bound', v_from, v_to);
            EXECUTE format('ALTER TABLE public.token_transactions ATTACH PARTITION public.%I '
                           'FOR VALUES FROM (%L) TO (%L)', v_name, v_from, v_to);
            v_created := v_created || v_name;
        EXCEPTION WHEN duplicate_table OR unique_violation THEN
            -- Another session (a replica's watchdog, a migrate) created it first.
            NULL;
        END;
    END LOOP;
    RETURN v_created;
END
$$;

-- ---------------------------------------------------------------- the move ---
-- Partitions for every period the old ledger holds, then its rows (ids kept).
DO $move$
DECLARE
    v_month date;
    v_name text;
BEGIN
    FOR v_month IN
        SELECT DISTINCT to_date(p || '-01', 'YYYY-MM-DD')
          FROM (SELECT coalesce(metadata ->> 'period',
                                public.token_reset_period_label(created_at)) AS p
                  FROM public.token_transactions_unpartitioned) s
         WHERE p ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'
    LOOP
        v_name := 'token_transactions_' || to_char(v_month, 'YYYY_MM');
        IF to_regclass('public.' || v_name) IS NULL THEN
            EXECUTE format('CREATE TABLE public.%I PARTITION OF public.token_transactions '
                           'FOR VALUES FROM (%L) TO (%L)', v_name, to_char(v_month, 'YYYY-MM'),
                           to_char(v_month + interval '1 month', 'YYYY-MM'));
        END IF;
    END LOOP;
END
$move$;
SELECT public.token_reset_ensure_partitions();

INSERT INTO public.token_transactions
       (id, user_id, operation, feature, amount, created_at, metadata, period)
SELECT id, user_id, operation, feature, amount, created_at, metadata,
       CASE WHEN metadata ->> 'period' ~ '^[0-9]{4}-(0[1-9]|1[0-2])$' THEN metadata ->> 'period'
            ELSE public.token_reset_period_label(created_at) END
  FROM public.token_transactions_unpartitioned;

-- One id sequence for every partition, continuing where the old one stopped.
DO $sequence$
DECLARE
    v_next bigint;
BEGIN
    EXECUTE format('SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM %s',
                   pg_get_serial_sequence('public.token_transactions_unpartitioned', 'id'))
       INTO v_next;
    DROP TABLE public.token_transactions_unpartitioned;
    EXECUTE format('CREATE SEQUENCE public.token_transactions_id_seq AS bigint START %s',
                   greatest(v_next, 1));
END
$sequence$;
ALTER SEQUENCE public.token_transactions_id_seq OWNED BY public.token_transactions.id;
ALTER TABLE public.token_transactions
    ALTER COLUMN id SET DEFAULT nextval('public.token_transactions_id_seq'::regclass);

-- ------------------------------------------------------ append-only, erasure ---
-- Refuses UPDATE, DELETE and TRUNCATE, except the rows of the one user that
-- token_reset_erase_user() is erasing (only the owner may DELETE at all).
CREATE OR REPLACE FUNCTION public.token_reset_ledger_is_append_only() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND OLD.user_id::text = current_setting('token_reset.erasing_user', true) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'token_transactions is an append-only ledger: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'correct usage with grant_tokens(); the owner erases a user with '
                     'token_reset_erase_user() and old periods with token_reset_drop_periods()';
END
$$;

CREATE TRIGGER token_transactions_append_only
    BEFORE UPDATE OR DELETE ON public.token_transactions
    FOR EACH ROW EXECUTE FUNCTION public.token_reset_ledger_is_append_only();
CREATE TRIGGER token_transactions_no_truncate
    BEFORE TRUNCATE ON public.token_transactions
    FOR EACH STATEMENT EXECUTE FUNCTION public.token_reset_ledger_is_append_only();
CREATE TRIGGER token_transactions_notify_resets
    AFTER INSERT ON public.token_transactions
    FOR EACH ROW
    WHEN (NEW.operation = 'reset' AND (NEW.metadata ->> 'source') <> 'bulk')
    EXECUTE FUNCTION public.token_reset_notify_single();

-- Erases one user: its ledger rows in every period and its user_tokens row; the usage
-- counters follow.  Owner only; returns what it removed.
CREATE FUNCTION public.token_reset_erase_user(p_user_id uuid) RETURNS jsonb
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_rows bigint;
    v_user bigint;
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM set_config('token_reset.erasing_user', p_user_id::text, true);
    INSERT INTO public.token_reset_usage_deltas (period, resets)
    SELECT period, -count(*) FROM public.token_transactions
     WHERE user_id = p_user_id AND operation = 'reset' GROUP BY period;
    DELETE FROM public.token_transactions WHERE user_id = p_user_id;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    PERFORM set_config('token_reset.erasing_user', '', true);
    DELETE FROM public.user_tokens WHERE user_id = p_user_id;
    GET DIAGNOSTICS v_user = ROW_COUNT;
    RETURN jsonb_build_object('user_id', p_user_id, 'ledger_rows', v_rows, 'user_rows', v_user);
END
$$;

-- ---------------------------------------------------------------- retention ---
-- Detaches the partitions of periods before the last p_keep (the current one
-- counted), and drops them unless p_archive (then they stay as plain tables named
-- token_transactions_YYYY_MM, for pg_dump, and the owner drops them).  Refuses while
-- any user's current usage is recorded in a period it would remove (that user's
-- deductions after its latest reset must stay: the ledger equation).  Owner only.
CREATE FUNCTION public.token_reset_drop_periods(p_keep integer, p_archive boolean DEFAULT false)
RETURNS text[]
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cutoff text;
    v_part record;
    v_blocking bigint;
    v_done text[] := '{}';
BEGIN
    IF p_keep IS NULL OR p_keep < 2 THEN
        RAISE EXCEPTION 'keep at least the current and the previous period (p_keep >= 2), got %',
                p_keep
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_cutoff := to_char(to_date(public.token_reset_period_label(now()) || '-01', 'YYYY-MM-DD')
                        - make_interval(months => p_keep - 1), 'YYYY-MM');
    SELECT count(*) INTO v_blocking FROM public.user_tokens
     WHERE monthly_tokens_used > 0
       AND public.token_reset_period_label(last_monthly_reset) < v_cutoff;
    IF v_blocking > 0 THEN
        RAISE EXCEPTION '% users still carry usage from before %: run the bulk reset first',
                v_blocking, v_cutoff
            USING ERRCODE = 'object_in_use';
    END IF;
    FOR v_part IN
        SELECT c.oid::regclass AS part, c.relname,
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([0-9-]+)''\)'))[1] AS upper
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'public.token_transactions'::regclass
         ORDER BY c.relname
    LOOP
        CONTINUE WHEN v_part.upper IS NULL OR v_part.upper > v_cutoff;
        EXECUTE format('INSERT INTO public.token_reset_usage_deltas (period, resets) '
                       'SELECT period, -count(*) FROM %s WHERE operation = ''reset'' '
                       'GROUP BY period', v_part.part);
        EXECUTE format('ALTER TABLE public.token_transactions DETACH PARTITION %s', v_part.part);
        IF NOT p_archive THEN
            EXECUTE format('DROP TABLE %s', v_part.part);
        END IF;
        v_done := v_done || v_part.relname::text;
    END LOOP;
    RETURN v_done;
END
$$;

-- ------------------------------------------------------- the watchdog probe ---
-- "Did last period have usage?": any deduction in last period's partition.
CREATE FUNCTION public.token_reset_previous_period_had_usage() RETURNS boolean
    LANGUAGE sql STABLE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
SELECT EXISTS (
    SELECT 1 FROM public.token_transactions t
     WHERE t.period = to_char(to_date(public.token_reset_period_label(now()) || '-01',
                                      'YYYY-MM-DD') - interval '1 month', 'YYYY-MM')
       AND t.operation = 'deduct')
$$;

-- --------------------------------------------------------------- privileges ---
-- The privilege matrix as data: (grantee, kind, object, privilege).  kind is 'table'
-- (privilege SELECT/INSERT/UPDATE, or INSERT(col, ...)) or 'routine'.  PUBLIC gets
-- EXECUTE on nothing but the routines listed for it; every other token_reset routine
-- and every listed table is revoked from PUBLIC first.
CREATE TABLE public.token_reset_declared_privileges (
    grantee text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('table', 'routine')),
    object text NOT NULL,
    privilege text NOT NULL,
    PRIMARY KEY (grantee, kind, object, privilege)
);
INSERT INTO public.token_reset_declared_privileges (grantee, kind, object, privilege) VALUES
    ('token_reset_app', 'table', 'public.user_tokens', 'SELECT'),
    ('token_reset_app', 'table', 'public.user_tokens', 'INSERT (user_id, monthly_token_limit)'),
    ('token_reset_app', 'table', 'public.user_tokens_with_auto_reset', 'SELECT'),
    ('token_reset_app', 'table', 'public.token_transactions', 'SELECT'),
    ('token_reset_app', 'table', 'public.token_reset_bulk_runs', 'SELECT'),
    ('token_reset_app', 'routine', 'public.deduct_tokens(uuid, bigint, text)', 'EXECUTE'),
    ('token_reset_app', 'routine', 'public.grant_tokens(uuid, bigint, text)', 'EXECUTE'),
    ('token_reset_app', 'routine', 'public.set_token_limit(uuid, bigint)', 'EXECUTE'),
    ('token_reset_app', 'routine', 'public.check_user_tokens(uuid)', 'EXECUTE'),
    ('token_reset_app', 'routine', 'public.check_token_rate_limit(uuid, bigint)', 'EXECUTE'),
    ('token_reset_app', 'routine', 'public.reset_user_tokens_if_needed(uuid)', 'EXECUTE'),
    ('token_reset_app', 'routine', 'public.reset_monthly_tokens_for_all_users()', 'EXECUTE'),
    ('token_reset_app', 'routine', 'public.auto_reset_monthly_tokens()', 'EXECUTE'),
    ('token_reset_listener', 'table', 'public.user_tokens', 'SELECT'),
    ('token_reset_listener', 'table', 'public.token_transactions', 'SELECT'),
    ('token_reset_listener', 'table', 'public.token_reset_settings', 'SELECT'),
    ('token_reset_listener', 'table', 'public.token_reset_usage', 'SELECT'),
    ('token_reset_listener', 'table', 'public.token_reset_listener_cursors', 'SELECT'),
    ('token_reset_listener', 'table', 'public.token_reset_listener_cursors', 'INSERT'),
    ('token_reset_listener', 'table', 'public.token_reset_listener_cursors', 'UPDATE'),
    ('token_reset_listener', 'table', 'public.token_reset_bulk_runs', 'SELECT'),
    ('token_reset_listener', 'table', 'public.token_reset_bulk_runs', 'INSERT'),
    ('token_reset_listener', 'table', 'public.token_reset_bulk_runs', 'UPDATE'),
    ('token_reset_listener', 'routine', 'public.token_reset_listener_horizon(text[])', 'EXECUTE'),
    ('token_reset_listener', 'routine', 'public.token_reset_bulk_batch(uuid, integer)', 'EXECUTE'),
    ('token_reset_listener', 'routine', 'public.token_reset_bulk_final_pass()', 'EXECUTE'),
    ('token_reset_listener', 'routine', 'public.token_reset_bulk_pending()', 'EXECUTE'),
    ('token_reset_listener', 'routine', 'public.token_reset_sql_run_source(text)', 'EXECUTE'),
    ('token_reset_listener', 'routine', 'public.token_reset_compact_counters()', 'EXECUTE'),
    ('token_reset_listener', 'routine', 'public.token_reset_ensure_partitions(integer)', 'EXECUTE'),
    ('token_reset_listener', 'routine', 'public.token_reset_previous_period_had_usage()', 'EXECUTE'),
    ('token_reset_listener', 'routine', 'public.reset_monthly_tokens_for_all_users()', 'EXECUTE'),
    ('token_reset_listener', 'routine', 'public.token_reset_bulk_committing(integer)', 'EXECUTE'),
    ('PUBLIC', 'routine', 'public.token_reset_period_start()', 'EXECUTE'),
    ('PUBLIC', 'routine', 'public.token_reset_period_bound()', 'EXECUTE'),
    ('PUBLIC', 'routine', 'public.token_reset_period_label(timestamptz)', 'EXECUTE'),
    ('PUBLIC', 'routine', 'public.token_reset_next_period_start()', 'EXECUTE'),
    ('PUBLIC', 'routine', 'public.token_reset_zone()', 'EXECUTE'),
    ('PUBLIC', 'routine', 'public.token_reset_month_start(timestamptz, text)', 'EXECUTE');

-- Applies exactly the declared rows: revokes everything from PUBLIC and our roles on
-- every table in schema public and every routine of ours, then grants the rows.
-- Idempotent; `token-reset migrate` runs it after every run, so roles a DBA creates
-- later get their grants on the next migrate.  Returns the roles it could not find.
CREATE OR REPLACE FUNCTION public.token_reset_apply_privileges() RETURNS text[]
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_missing text[] := '{}';
    v_grantee text;
    v_object regclass;
    v_routine regprocedure;
    v_row public.token_reset_declared_privileges%ROWTYPE;
    v_present text[];
BEGIN
    SELECT array_agg(DISTINCT d.grantee) FILTER (
               WHERE d.grantee = 'PUBLIC'
                  OR EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = d.grantee)),
           array_agg(DISTINCT d.grantee) FILTER (
               WHERE d.grantee <> 'PUBLIC'
                 AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = d.grantee))
      INTO v_present, v_missing
      FROM public.token_reset_declared_privileges d;
    v_present := coalesce(v_present, '{}') || 'PUBLIC'::text;
    FOREACH v_grantee IN ARRAY v_present LOOP
        FOR v_object IN
            SELECT c.oid::regclass FROM pg_class c
             WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'v', 'p')
               AND (c.relname ~ '^(token_reset_|token_transactions)'
                    OR c.relname IN ('user_tokens', 'user_tokens_with_auto_reset'))
        LOOP
            EXECUTE format('REVOKE ALL ON %s FROM %s', v_object,
                           CASE WHEN v_grantee = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(v_grantee) END);
        END LOOP;
        FOR v_routine IN
            SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.pronamespace = 'public'::regnamespace
               AND (p.proname ~ '^token_reset_' OR p.proname = ANY (ARRAY[
                    'deduct_tokens', 'grant_tokens', 'set_token_limit', 'check_user_tokens',
                    'check_token_rate_limit', 'reset_user_tokens_if_needed',
                    'reset_monthly_tokens_for_all_users', 'auto_reset_monthly_tokens',
                    'check_and_reset_monthly_tokens']))
        LOOP
            EXECUTE format('REVOKE ALL ON ROUTINE %s FROM %s', v_routine,
                           CASE WHEN v_grantee = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(v_grantee) END);
        END LOOP;
    END LOOP;
    FOR v_row IN
        SELECT * FROM public.token_reset_declared_privileges d
         WHERE d.grantee = ANY (v_present)
    LOOP
        EXECUTE format('GRANT %s ON %s %s TO %s',
                       v_row.privilege,
                       CASE v_row.kind WHEN 'table' THEN 'TABLE' ELSE 'ROUTINE' END,
                       CASE v_row.kind WHEN 'table' THEN v_row.object::regclass::text
                                       ELSE v_row.object::regprocedure::text END,
                       CASE WHEN v_row.grantee = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(v_row.grantee) END);
    END LOOP;
    RETURN coalesce(v_missing, '{}');
END
$$;

SELECT public.token_reset_apply_privileges();
SELECT public.token_reset_recount_usage();
