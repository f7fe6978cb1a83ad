-- 0005_rollover_notices: a message to people when a period's rollover is done (or late).
--
-- When no user carries last period's usage any more, every replica of the listener
-- notices; one message per configured destination must go out, once, whoever sends it
-- and however often replicas restart.  So the database keeps:
--
-- * token_reset_notices: one row per (period, kind), with the facts the message
--   states, frozen when the first replica saw the notice was due, so every
--   destination and every retry says the same numbers;
-- * token_reset_notice_deliveries: one row per (period, kind, destination).  A
--   replica claims a delivery with INSERT ... ON CONFLICT DO UPDATE (only a failed
--   delivery whose retry time has come, or a claim whose lease ran out because its
--   replica died), sends, then marks it sent only if its claim still stands (same
--   claimer, same attempt).  The destination is a SHA-256 of its URL, never the URL:
--   URLs carry tokens and passwords.
--
-- kind: 'complete' (the rollover is done) or 'overdue' (still incomplete at the
-- grace deadline, RESET_GRACE_SECONDS).  Both at most once per period.
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE TABLE public.token_reset_notices (
    period text NOT NULL,
    kind text NOT NULL,
    -- The numbers the message states (listener/notices.py renders them).
    facts jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (period, kind),
    CONSTRAINT token_reset_notices_period_label CHECK (period ~ '^[0-9]{4}-[0-9]{2}$'),
    CONSTRAINT token_reset_notices_kind_known CHECK (kind IN ('complete', 'overdue')),
    CONSTRAINT token_reset_notices_facts_object CHECK (pg_catalog.jsonb_typeof(facts) = 'object')
);

CREATE TABLE public.token_reset_notice_deliveries (
    period text NOT NULL,
    kind text NOT NULL,
    -- SHA-256 (hex) of the destination URL: it identifies, and reveals nothing.
    destination text NOT NULL,
    -- What the logs call it: position, service and a prefix of the hash; no secret.
    label text NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL DEFAULT 1,
    -- The replica (LISTENER_NAME) holding or last holding the claim.
    claimed_by text NOT NULL,
    -- While 'sending': after this instant the claim is considered dead and may be
    -- taken by another replica.
    lease_until timestamptz,
    -- While 'failed': the next attempt may start at this instant (backoff).
    next_attempt_at timestamptz,
    sent_at timestamptz,
    -- The destination's answer (scrubbed of every part of the URL); never a secret.
    last_error text,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (period, kind, destination),
    FOREIGN KEY (period, kind) REFERENCES public.token_reset_notices (period, kind),
    CONSTRAINT token_reset_notice_deliveries_hash CHECK (destination ~ '^[0-9a-f]{64}$'),
    CONSTRAINT token_reset_notice_deliveries_state_known
        CHECK (state IN ('sending', 'failed', 'sent')),
    CONSTRAINT token_reset_notice_deliveries_leased_while_sending
        CHECK ((state = 'sending') = (lease_until IS NOT NULL)),
    CONSTRAINT token_reset_notice_deliveries_retry_when_failed
        CHECK ((state = 'failed') = (next_attempt_at IS NOT NULL)),
    CONSTRAINT token_reset_notice_deliveries_sent_at_when_sent
        CHECK ((state = 'sent') = (sent_at IS NOT NULL)),
    CONSTRAINT token_reset_notice_deliveries_attempts_positive CHECK (attempts >= 1),
    CONSTRAINT token_reset_notice_deliveries_label_length CHECK (length(label) BETWEEN 1 AND 200),
    CONSTRAINT token_reset_notice_deliveries_error_length CHECK (length(last_error) <= 500)
);

-- The declared privileges (0004), re-created with the notice tables: only the
-- listener role reads and writes them.  Everything else is as 0004 left it.
CREATE OR REPLACE FUNCTION public.token_reset_apply_privileges() RETURNS text[]
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
                'token_reset_period_start', 'token_reset_period_label', 'token_reset_zone',
                'token_reset_next_period_start', 'token_reset_month_start'])
    LOOP
        EXECUTE format('REVOKE ALL ON ROUTINE %s FROM PUBLIC', v_fn);
    END LOOP;
    REVOKE ALL ON public.user_tokens, public.token_transactions, public.token_reset_settings,
                  public.user_tokens_with_auto_reset, public.token_reset_listener_cursors,
                  public.token_reset_bulk_runs, public.token_reset_bulk_lock,
                  public.token_reset_notices, public.token_reset_notice_deliveries FROM PUBLIC;

    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'token_reset_app') THEN
        REVOKE ALL ON public.user_tokens, public.token_transactions, public.token_reset_settings,
                      public.user_tokens_with_auto_reset, public.token_reset_listener_cursors,
                      public.token_reset_bulk_runs, public.token_reset_bulk_lock,
                      public.token_reset_notices, public.token_reset_notice_deliveries
                 FROM token_reset_app;
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
        -- Rollover notices: facts frozen once per (period, kind), deliveries claimed.
        GRANT SELECT, INSERT, UPDATE ON public.token_reset_notices,
                                        public.token_reset_notice_deliveries
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

SELECT public.token_reset_apply_privileges();
