-- sql/schema.sql: GENERATED from a fresh `token-reset migrate` by
-- `python -m tests.schema_snapshot`; tests fail when it differs.  Do not edit: change
-- the schema with a new migration in sql/migrations/, then regenerate this file.
-- Objects in schema public, grouped by kind, each group in name order.
-- Rendered on PostgreSQL 16 (other versions print views differently).

-- ------------------------------------------------------------- tables ---
CREATE TABLE public.token_reset_bulk_lock (
    singleton boolean DEFAULT true NOT NULL,
    CONSTRAINT token_reset_bulk_lock_pkey PRIMARY KEY (singleton),
    CONSTRAINT token_reset_bulk_lock_singleton_check CHECK (singleton)
);
CREATE TABLE public.token_reset_bulk_runs (
    id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
    run_id uuid NOT NULL,
    source text NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    finished_at timestamp with time zone,
    reset_count integer DEFAULT 0 NOT NULL,
    batches integer DEFAULT 0 NOT NULL,
    outcome text DEFAULT 'running'::text NOT NULL,
    error text,
    slot timestamp with time zone,
    pid integer,
    retries integer DEFAULT 0 NOT NULL,
    CONSTRAINT token_reset_bulk_runs_counts_non_negative CHECK (((reset_count >= 0) AND (batches >= 0))),
    CONSTRAINT token_reset_bulk_runs_finished_when_done CHECK (((outcome = 'running'::text) = (finished_at IS NULL))),
    CONSTRAINT token_reset_bulk_runs_outcome_known CHECK ((outcome = ANY (ARRAY['running'::text, 'success'::text, 'failure'::text, 'skipped'::text]))),
    CONSTRAINT token_reset_bulk_runs_pkey PRIMARY KEY (id),
    CONSTRAINT token_reset_bulk_runs_run_id_key UNIQUE (run_id),
    CONSTRAINT token_reset_bulk_runs_slot_only_for_schedule CHECK (((slot IS NULL) OR (source = 'schedule'::text))),
    CONSTRAINT token_reset_bulk_runs_source_known CHECK ((source = ANY (ARRAY['endpoint'::text, 'cli'::text, 'schedule'::text, 'sql'::text, 'procedure'::text, 'pg_cron'::text])))
);
CREATE TABLE public.token_reset_declared_privileges (
    grantee text NOT NULL,
    kind text NOT NULL,
    object text NOT NULL,
    privilege text NOT NULL,
    CONSTRAINT token_reset_declared_privileges_kind_check CHECK ((kind = ANY (ARRAY['table'::text, 'routine'::text]))),
    CONSTRAINT token_reset_declared_privileges_pkey PRIMARY KEY (grantee, kind, object, privilege)
);
CREATE TABLE public.token_reset_deduction_cursor (
    singleton boolean DEFAULT true NOT NULL,
    last_id bigint NOT NULL,
    pending_id bigint,
    pending_writers text[] DEFAULT '{}'::text[] NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT token_reset_deduction_cursor_last_id_non_negative CHECK ((last_id >= 0)),
    CONSTRAINT token_reset_deduction_cursor_one_row CHECK (singleton),
    CONSTRAINT token_reset_deduction_cursor_pkey PRIMARY KEY (singleton)
);
CREATE TABLE public.token_reset_deduction_totals (
    period text NOT NULL,
    feature text NOT NULL,
    tokens bigint DEFAULT 0 NOT NULL,
    deductions bigint DEFAULT 0 NOT NULL,
    CONSTRAINT token_reset_deduction_totals_period_format CHECK ((period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'::text)),
    CONSTRAINT token_reset_deduction_totals_pkey PRIMARY KEY (period, feature)
);
CREATE TABLE public.token_reset_leases (
    name text NOT NULL,
    holder text NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    state jsonb,
    state_at timestamp with time zone,
    CONSTRAINT token_reset_leases_holder_length CHECK (((length(holder) >= 1) AND (length(holder) <= 200))),
    CONSTRAINT token_reset_leases_name_known CHECK ((name = 'watchdog'::text)),
    CONSTRAINT token_reset_leases_pkey PRIMARY KEY (name)
);
CREATE TABLE public.token_reset_listener_cursors (
    consumer text NOT NULL,
    last_id bigint NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT token_reset_listener_cursors_consumer_length CHECK (((length(consumer) >= 1) AND (length(consumer) <= 200))),
    CONSTRAINT token_reset_listener_cursors_last_id_non_negative CHECK ((last_id >= 0)),
    CONSTRAINT token_reset_listener_cursors_pkey PRIMARY KEY (consumer)
);
CREATE TABLE public.token_reset_migrations (
    version integer NOT NULL,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT token_reset_migrations_pkey PRIMARY KEY (version)
);
CREATE TABLE public.token_reset_notice_deliveries (
    period text NOT NULL,
    kind text NOT NULL,
    destination text NOT NULL,
    label text NOT NULL,
    state text NOT NULL,
    attempts integer DEFAULT 1 NOT NULL,
    claimed_by text NOT NULL,
    lease_until timestamp with time zone,
    next_attempt_at timestamp with time zone,
    sent_at timestamp with time zone,
    last_error text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT token_reset_notice_deliveries_attempts_positive CHECK ((attempts >= 1)),
    CONSTRAINT token_reset_notice_deliveries_error_length CHECK ((length(last_error) <= 500)),
    CONSTRAINT token_reset_notice_deliveries_hash CHECK ((destination ~ '^[0-9a-f]{64}$'::text)),
    CONSTRAINT token_reset_notice_deliveries_label_length CHECK (((length(label) >= 1) AND (length(label) <= 200))),
    CONSTRAINT token_reset_notice_deliveries_leased_while_sending CHECK (((state = 'sending'::text) = (lease_until IS NOT NULL))),
    CONSTRAINT token_reset_notice_deliveries_period_kind_fkey FOREIGN KEY (period, kind) REFERENCES token_reset_notices(period, kind),
    CONSTRAINT token_reset_notice_deliveries_pkey PRIMARY KEY (period, kind, destination),
    CONSTRAINT token_reset_notice_deliveries_retry_when_failed CHECK (((state = 'failed'::text) = (next_attempt_at IS NOT NULL))),
    CONSTRAINT token_reset_notice_deliveries_sent_at_when_sent CHECK (((state = 'sent'::text) = (sent_at IS NOT NULL))),
    CONSTRAINT token_reset_notice_deliveries_state_known CHECK ((state = ANY (ARRAY['sending'::text, 'failed'::text, 'sent'::text])))
);
CREATE TABLE public.token_reset_notices (
    period text NOT NULL,
    kind text NOT NULL,
    facts jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT token_reset_notices_facts_object CHECK ((jsonb_typeof(facts) = 'object'::text)),
    CONSTRAINT token_reset_notices_kind_known CHECK ((kind = ANY (ARRAY['complete'::text, 'overdue'::text]))),
    CONSTRAINT token_reset_notices_period_label CHECK ((period ~ '^[0-9]{4}-[0-9]{2}$'::text)),
    CONSTRAINT token_reset_notices_pkey PRIMARY KEY (period, kind)
);
CREATE TABLE public.token_reset_settings (
    singleton boolean DEFAULT true NOT NULL,
    timezone text DEFAULT 'UTC'::text NOT NULL,
    notify_per_write boolean DEFAULT true NOT NULL,
    previous_timezone text DEFAULT 'UTC'::text NOT NULL,
    timezone_effective_at timestamp with time zone DEFAULT '-infinity'::timestamp with time zone NOT NULL,
    CONSTRAINT token_reset_settings_pkey PRIMARY KEY (singleton),
    CONSTRAINT token_reset_settings_singleton_check CHECK (singleton)
);
CREATE TABLE public.token_reset_usage_deltas (
    period text NOT NULL,
    users bigint DEFAULT 0 NOT NULL,
    active_users bigint DEFAULT 0 NOT NULL,
    resets bigint DEFAULT 0 NOT NULL,
    near_limit_users bigint DEFAULT 0 NOT NULL,
    at_limit_users bigint DEFAULT 0 NOT NULL,
    CONSTRAINT token_reset_usage_deltas_period_format CHECK ((period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'::text))
);
CREATE TABLE public.token_transactions (
    id bigint DEFAULT nextval('token_transactions_id_seq'::regclass) NOT NULL,
    user_id uuid NOT NULL,
    operation text NOT NULL,
    feature text,
    amount integer NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    metadata jsonb,
    period text DEFAULT token_reset_period_label(now()) NOT NULL,
    CONSTRAINT token_transactions_amount_non_negative CHECK ((amount >= 0)),
    CONSTRAINT token_transactions_operation_known CHECK ((operation = ANY (ARRAY['deduct'::text, 'reset'::text, 'grant'::text, 'limit'::text]))),
    CONSTRAINT token_transactions_period_format CHECK ((period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'::text)),
    CONSTRAINT token_transactions_pkey PRIMARY KEY (id, period),
    CONSTRAINT token_transactions_reset_has_period CHECK (((operation <> 'reset'::text) OR (COALESCE((metadata ->> 'period'::text), ''::text) ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'::text))),
    CONSTRAINT token_transactions_reset_source_known CHECK (((operation <> 'reset'::text) OR (COALESCE((metadata ->> 'source'::text), ''::text) = ANY (ARRAY['trigger'::text, 'function'::text, 'bulk'::text]))))
) PARTITION BY RANGE (period);
CREATE TABLE public.token_transactions_default PARTITION OF public.token_transactions DEFAULT;
CREATE TABLE public.user_tokens (
    user_id uuid NOT NULL,
    monthly_token_limit integer DEFAULT 500 NOT NULL,
    monthly_tokens_used integer DEFAULT 0 NOT NULL,
    last_monthly_reset timestamp with time zone DEFAULT now() NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT user_tokens_limit_non_negative CHECK ((monthly_token_limit >= 0)),
    CONSTRAINT user_tokens_pkey PRIMARY KEY (user_id),
    CONSTRAINT user_tokens_used_non_negative CHECK ((monthly_tokens_used >= 0))
) WITH (fillfactor=80);

-- ------------------------------------------------------------ indexes ---
CREATE INDEX token_reset_bulk_runs_last_success ON public.token_reset_bulk_runs USING btree (finished_at DESC) WHERE (outcome = 'success'::text);
CREATE INDEX token_reset_bulk_runs_running ON public.token_reset_bulk_runs USING btree (started_at DESC) WHERE (outcome = 'running'::text);
CREATE INDEX token_reset_bulk_runs_schedule_slot ON public.token_reset_bulk_runs USING btree (slot DESC) WHERE ((outcome = 'success'::text) AND (source = 'schedule'::text));
CREATE INDEX token_reset_bulk_runs_started ON public.token_reset_bulk_runs USING btree (started_at DESC, id DESC);
CREATE UNIQUE INDEX token_transactions_one_reset_per_period ON ONLY public.token_transactions USING btree (period, user_id) WHERE (operation = 'reset'::text);
CREATE INDEX token_transactions_reset_id ON ONLY public.token_transactions USING btree (id) WHERE (operation = 'reset'::text);
CREATE INDEX token_transactions_user_id ON ONLY public.token_transactions USING btree (user_id, id);

-- -------------------------------------------------------------- views ---
CREATE VIEW public.token_reset_usage AS
 SELECT period,
    sum(users)::bigint AS users,
    sum(active_users)::bigint AS active_users,
    sum(resets)::bigint AS resets,
    sum(near_limit_users)::bigint AS near_limit_users,
    sum(at_limit_users)::bigint AS at_limit_users
   FROM token_reset_usage_deltas
  GROUP BY period;
CREATE VIEW public.user_tokens_with_auto_reset AS
 SELECT user_id,
    monthly_token_limit,
        CASE
            WHEN last_monthly_reset < (( SELECT token_reset_period_start() AS token_reset_period_start)) THEN 0
            ELSE monthly_tokens_used
        END AS monthly_tokens_used,
    last_monthly_reset,
    created_at,
    updated_at
   FROM user_tokens;

-- ----------------------------------------------------------- routines ---
CREATE OR REPLACE FUNCTION public.auto_reset_monthly_tokens()
 RETURNS jsonb
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$ SELECT public.token_reset_bulk_all() $function$;

CREATE OR REPLACE FUNCTION public.check_and_reset_monthly_tokens()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.check_token_rate_limit(p_user_id uuid, p_amount bigint)
 RETURNS jsonb
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$ SELECT public.token_reset_answer(p_user_id, public.token_reset_checked_amount(p_amount, false)) $function$;

CREATE OR REPLACE FUNCTION public.check_user_tokens(p_user_id uuid)
 RETURNS jsonb
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$ SELECT public.token_reset_answer(p_user_id, 0) - 'requested' $function$;

CREATE OR REPLACE FUNCTION public.deduct_tokens(p_user_id uuid, p_amount bigint, p_feature text)
 RETURNS jsonb
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.grant_tokens(p_user_id uuid, p_amount bigint, p_reason text)
 RETURNS jsonb
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.reset_monthly_tokens_for_all_users()
 RETURNS jsonb
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$ SELECT public.token_reset_bulk_all() $function$;

CREATE OR REPLACE FUNCTION public.reset_user_tokens_if_needed(p_user_id uuid)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.set_token_limit(p_user_id uuid, p_limit bigint)
 RETURNS jsonb
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_add_deductions(p_after bigint, p_upto bigint, p_since text DEFAULT NULL::text)
 RETURNS bigint
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_answer(p_user_id uuid, p_amount integer)
 RETURNS jsonb
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_apply_privileges()
 RETURNS text[]
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_apply_settings()
 RETURNS jsonb
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_bulk_all(p_batch_size integer DEFAULT 10000)
 RETURNS jsonb
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_bulk_batch(p_after uuid, p_limit integer, OUT last_key uuid, OUT reset_count integer)
 RETURNS record
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_bulk_batch(p_after uuid, p_limit integer, p_source text, OUT last_key uuid, OUT reset_count integer)
 RETURNS record
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF p_source IS DISTINCT FROM 'bulk' THEN
        RAISE EXCEPTION 'the bulk source is ''bulk'', got %', p_source
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT b.last_key, b.reset_count INTO last_key, reset_count
      FROM public.token_reset_bulk_batch(p_after, p_limit) b;
END
$function$;

CREATE OR REPLACE PROCEDURE public.token_reset_bulk_committing(IN p_batch_size integer DEFAULT 10000)
 LANGUAGE plpgsql
AS $procedure$
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
$procedure$;

CREATE OR REPLACE FUNCTION public.token_reset_bulk_final_pass()
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_bulk_final_pass(p_source text)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF p_source IS DISTINCT FROM 'bulk' THEN
        RAISE EXCEPTION 'the bulk source is ''bulk'', got %', p_source
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN public.token_reset_bulk_final_pass();
END
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_bulk_pending()
 RETURNS boolean
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
SELECT EXISTS (
    SELECT 1 FROM public.user_tokens u
     WHERE u.last_monthly_reset < (SELECT public.token_reset_period_start())
       AND u.monthly_tokens_used > 0)
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_checked_amount(p_amount bigint, p_allow_zero boolean)
 RETURNS integer
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_clear(p_ids uuid[], p_used integer[], p_source text, OUT reset_count integer, OUT first_id bigint, OUT last_id bigint)
 RETURNS record
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_compact_counters()
 RETURNS integer
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_configure(p_timezone text DEFAULT NULL::text, p_notify_per_write boolean DEFAULT NULL::boolean)
 RETURNS jsonb
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_count_usage()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_drop_periods(p_keep integer, p_archive boolean DEFAULT false)
 RETURNS text[]
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_ensure_partitions(p_ahead integer DEFAULT 3)
 RETURNS text[]
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET lock_timeout TO '2s'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_erase_user(p_user_id uuid)
 RETURNS jsonb
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_fold_deductions(p_max_ids bigint DEFAULT 5000000)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET lock_timeout TO '2s'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_ledger_is_append_only()
 RETURNS trigger
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_limit_reached(p_used integer, p_limit integer, p_percent integer)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
 SELECT ((p_used > 0) AND (((p_used)::bigint * 100) >= ((p_limit)::bigint * p_percent)));
END;

CREATE OR REPLACE FUNCTION public.token_reset_listener_horizon(p_waiting text[] DEFAULT '{}'::text[])
 RETURNS TABLE(allocated bigint, writers text[], waiting boolean)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_month_start(p_at timestamp with time zone, p_zone text)
 RETURNS timestamp with time zone
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_next_period_start()
 RETURNS timestamp with time zone
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT public.token_reset_month_start(pg_catalog.timezone('UTC', pg_catalog.date_trunc('month', pg_catalog.timezone('UTC', pg_catalog.now())) OPERATOR(pg_catalog.+) interval '1 month 1 day'), 'UTC') $function$;

CREATE OR REPLACE FUNCTION public.token_reset_notify_single()
 RETURNS trigger
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_one_user(p_user_id uuid, p_source text)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_period_bound()
 RETURNS timestamp with time zone
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT pg_catalog.date_trunc('month', pg_catalog.now(), 'UTC') $function$;

CREATE OR REPLACE FUNCTION public.token_reset_period_label(p_at timestamp with time zone)
 RETURNS text
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT pg_catalog.to_char(pg_catalog.timezone('UTC'::text, p_at), 'YYYY-MM') $function$;

CREATE OR REPLACE FUNCTION public.token_reset_period_start()
 RETURNS timestamp with time zone
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT public.token_reset_month_start(pg_catalog.now(), 'UTC') $function$;

CREATE OR REPLACE FUNCTION public.token_reset_previous_period_had_usage()
 RETURNS boolean
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
SELECT EXISTS (
    SELECT 1 FROM public.token_transactions t
     WHERE t.period = to_char(to_date(public.token_reset_period_label(now()) || '-01',
                                      'YYYY-MM-DD') - interval '1 month', 'YYYY-MM')
       AND t.operation = 'deduct')
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_recount_deductions(p_periods integer DEFAULT 2, p_wait_seconds double precision DEFAULT 60)
 RETURNS bigint
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_recount_usage()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_require_read_committed(p_what text)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION '% runs in READ COMMITTED, not %', p_what,
                current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
END
$function$;

CREATE OR REPLACE FUNCTION public.token_reset_reset_metadata(p_period text, p_previous_used integer, p_source text)
 RETURNS jsonb
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT pg_catalog.jsonb_build_object('period', p_period, 'previous_used', p_previous_used,
                                           'source', p_source) $function$;

CREATE OR REPLACE FUNCTION public.token_reset_sql_run_source(p_default text)
 RETURNS text
 LANGUAGE sql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$ SELECT CASE WHEN pg_catalog.current_setting('application_name', true) = 'pg_cron'
                  THEN 'pg_cron' ELSE p_default END $function$;

CREATE OR REPLACE FUNCTION public.token_reset_zone()
 RETURNS text
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT 'UTC'::text $function$;

-- ----------------------------------------------------------- triggers ---
CREATE TRIGGER token_transactions_append_only BEFORE DELETE OR UPDATE ON token_transactions FOR EACH ROW EXECUTE FUNCTION token_reset_ledger_is_append_only();
CREATE TRIGGER token_transactions_no_truncate BEFORE TRUNCATE ON token_transactions FOR EACH STATEMENT EXECUTE FUNCTION token_reset_ledger_is_append_only();
CREATE TRIGGER token_transactions_notify_resets AFTER INSERT ON token_transactions FOR EACH ROW WHEN (new.operation = 'reset'::text AND (new.metadata ->> 'source'::text) <> 'bulk'::text) EXECUTE FUNCTION token_reset_notify_single();
CREATE TRIGGER user_tokens_count_delete AFTER DELETE ON user_tokens FOR EACH ROW EXECUTE FUNCTION token_reset_count_usage();
CREATE TRIGGER user_tokens_count_insert AFTER INSERT ON user_tokens FOR EACH ROW EXECUTE FUNCTION token_reset_count_usage();
CREATE TRIGGER user_tokens_count_update AFTER UPDATE ON user_tokens FOR EACH ROW WHEN (current_setting('token_reset.counting'::text, true) IS DISTINCT FROM 'self'::text AND (old.monthly_tokens_used <> new.monthly_tokens_used OR old.monthly_token_limit <> new.monthly_token_limit OR old.last_monthly_reset <> new.last_monthly_reset)) EXECUTE FUNCTION token_reset_count_usage();
CREATE TRIGGER user_tokens_no_future_reset BEFORE INSERT ON user_tokens FOR EACH ROW WHEN (new.last_monthly_reset IS NULL OR new.last_monthly_reset > clock_timestamp()) EXECUTE FUNCTION check_and_reset_monthly_tokens();
CREATE TRIGGER user_tokens_reset_on_write BEFORE UPDATE ON user_tokens FOR EACH ROW WHEN (old.last_monthly_reset < date_trunc('month'::text, now(), 'UTC'::text) AND new.last_monthly_reset = old.last_monthly_reset OR new.last_monthly_reset > clock_timestamp()) EXECUTE FUNCTION check_and_reset_monthly_tokens();

-- ------------------------------------------------ declared privileges ---
-- (grantee, kind, object, privilege): token_reset_declared_privileges
-- PUBLIC | routine | public.token_reset_month_start(timestamptz, text) | EXECUTE
-- PUBLIC | routine | public.token_reset_next_period_start() | EXECUTE
-- PUBLIC | routine | public.token_reset_period_bound() | EXECUTE
-- PUBLIC | routine | public.token_reset_period_label(timestamptz) | EXECUTE
-- PUBLIC | routine | public.token_reset_period_start() | EXECUTE
-- PUBLIC | routine | public.token_reset_zone() | EXECUTE
-- token_reset_app | routine | public.auto_reset_monthly_tokens() | EXECUTE
-- token_reset_app | routine | public.check_token_rate_limit(uuid, bigint) | EXECUTE
-- token_reset_app | routine | public.check_user_tokens(uuid) | EXECUTE
-- token_reset_app | routine | public.deduct_tokens(uuid, bigint, text) | EXECUTE
-- token_reset_app | routine | public.grant_tokens(uuid, bigint, text) | EXECUTE
-- token_reset_app | routine | public.reset_monthly_tokens_for_all_users() | EXECUTE
-- token_reset_app | routine | public.reset_user_tokens_if_needed(uuid) | EXECUTE
-- token_reset_app | routine | public.set_token_limit(uuid, bigint) | EXECUTE
-- token_reset_app | table | public.token_reset_bulk_runs | SELECT
-- token_reset_app | table | public.token_transactions | SELECT
-- token_reset_app | table | public.user_tokens | INSERT (user_id, monthly_token_limit)
-- token_reset_app | table | public.user_tokens | SELECT
-- token_reset_app | table | public.user_tokens_with_auto_reset | SELECT
-- token_reset_listener | routine | public.reset_monthly_tokens_for_all_users() | EXECUTE
-- token_reset_listener | routine | public.token_reset_bulk_batch(uuid, integer) | EXECUTE
-- token_reset_listener | routine | public.token_reset_bulk_batch(uuid, integer, text) | EXECUTE
-- token_reset_listener | routine | public.token_reset_bulk_committing(integer) | EXECUTE
-- token_reset_listener | routine | public.token_reset_bulk_final_pass() | EXECUTE
-- token_reset_listener | routine | public.token_reset_bulk_final_pass(text) | EXECUTE
-- token_reset_listener | routine | public.token_reset_bulk_pending() | EXECUTE
-- token_reset_listener | routine | public.token_reset_compact_counters() | EXECUTE
-- token_reset_listener | routine | public.token_reset_ensure_partitions(integer) | EXECUTE
-- token_reset_listener | routine | public.token_reset_fold_deductions(bigint) | EXECUTE
-- token_reset_listener | routine | public.token_reset_listener_horizon(text[]) | EXECUTE
-- token_reset_listener | routine | public.token_reset_previous_period_had_usage() | EXECUTE
-- token_reset_listener | routine | public.token_reset_sql_run_source(text) | EXECUTE
-- token_reset_listener | table | public.token_reset_bulk_runs | INSERT
-- token_reset_listener | table | public.token_reset_bulk_runs | SELECT
-- token_reset_listener | table | public.token_reset_bulk_runs | UPDATE
-- token_reset_listener | table | public.token_reset_deduction_totals | SELECT
-- token_reset_listener | table | public.token_reset_leases | INSERT
-- token_reset_listener | table | public.token_reset_leases | SELECT
-- token_reset_listener | table | public.token_reset_leases | UPDATE
-- token_reset_listener | table | public.token_reset_listener_cursors | INSERT
-- token_reset_listener | table | public.token_reset_listener_cursors | SELECT
-- token_reset_listener | table | public.token_reset_listener_cursors | UPDATE
-- token_reset_listener | table | public.token_reset_notice_deliveries | INSERT
-- token_reset_listener | table | public.token_reset_notice_deliveries | SELECT
-- token_reset_listener | table | public.token_reset_notice_deliveries | UPDATE
-- token_reset_listener | table | public.token_reset_notices | INSERT
-- token_reset_listener | table | public.token_reset_notices | SELECT
-- token_reset_listener | table | public.token_reset_notices | UPDATE
-- token_reset_listener | table | public.token_reset_refused_deductions | SELECT
-- token_reset_listener | table | public.token_reset_settings | SELECT
-- token_reset_listener | table | public.token_reset_usage | SELECT
-- token_reset_listener | table | public.token_transactions | SELECT
-- token_reset_listener | table | public.user_tokens | SELECT
