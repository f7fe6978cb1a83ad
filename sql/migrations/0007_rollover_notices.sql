-- 0007_rollover_notices: a message to people when a period's rollover is done (or late).
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

-- Only the listener role reads and writes them (the declared privileges, 0006).
INSERT INTO public.token_reset_declared_privileges (grantee, kind, object, privilege) VALUES
    ('token_reset_listener', 'table', 'public.token_reset_notices', 'SELECT'),
    ('token_reset_listener', 'table', 'public.token_reset_notices', 'INSERT'),
    ('token_reset_listener', 'table', 'public.token_reset_notices', 'UPDATE'),
    ('token_reset_listener', 'table', 'public.token_reset_notice_deliveries', 'SELECT'),
    ('token_reset_listener', 'table', 'public.token_reset_notice_deliveries', 'INSERT'),
    ('token_reset_listener', 'table', 'public.token_reset_notice_deliveries', 'UPDATE');

SELECT public.token_reset_apply_privileges();
