-- 0003_bulk_runs: one row per bulk backup run (endpoint, CLI or built-in schedule).
--
-- The runner (listener/bulk.py) takes a session advisory lock, so at most one run
-- is 'running' at a time; a caller that finds the lock taken records a 'skipped'
-- row.  A row left 'running' by a process that died is marked 'failure'
-- (abandoned) by the next run that takes the lock.  Progress (reset_count,
-- batches) is written in the same transaction as each batch, so the row always
-- says exactly what was committed.

CREATE TABLE public.token_reset_bulk_runs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id uuid NOT NULL UNIQUE,
    source text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    reset_count integer NOT NULL DEFAULT 0,
    batches integer NOT NULL DEFAULT 0,
    outcome text NOT NULL DEFAULT 'running',
    -- Why it failed (failure) or what it found (skipped); never a secret.
    error text,
    -- The schedule slot (listener's clock, UTC) a scheduled run serves: replicas
    -- and restarts agree on "this slot is done" without comparing two clocks.
    slot timestamptz,
    CONSTRAINT token_reset_bulk_runs_source_known
        CHECK (source IN ('endpoint', 'cli', 'schedule')),
    CONSTRAINT token_reset_bulk_runs_outcome_known
        CHECK (outcome IN ('running', 'success', 'failure', 'skipped')),
    CONSTRAINT token_reset_bulk_runs_finished_when_done
        CHECK ((outcome = 'running') = (finished_at IS NULL)),
    CONSTRAINT token_reset_bulk_runs_counts_non_negative
        CHECK (reset_count >= 0 AND batches >= 0),
    CONSTRAINT token_reset_bulk_runs_slot_only_for_schedule
        CHECK (slot IS NULL OR source = 'schedule')
);

-- "Last run" (status) and "is one running" (a skipped caller names it).
CREATE INDEX token_reset_bulk_runs_started
    ON public.token_reset_bulk_runs (started_at DESC, id DESC);
CREATE INDEX token_reset_bulk_runs_running
    ON public.token_reset_bulk_runs (started_at DESC)
    WHERE outcome = 'running';
-- "Last success" (status, the gauge after a restart).
CREATE INDEX token_reset_bulk_runs_last_success
    ON public.token_reset_bulk_runs (finished_at DESC)
    WHERE outcome = 'success';
-- "Is this schedule slot done" (every replica asks once per slot).
CREATE INDEX token_reset_bulk_runs_schedule_slot
    ON public.token_reset_bulk_runs (slot DESC)
    WHERE outcome = 'success' AND source = 'schedule';

-- The application role may read run history (dashboards, support tooling);
-- only the listener's own role writes it.
DO $grants$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'token_reset_app') THEN
        GRANT SELECT ON public.token_reset_bulk_runs TO token_reset_app;
    END IF;
END
$grants$;
