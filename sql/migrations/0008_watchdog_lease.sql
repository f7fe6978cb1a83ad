-- 0008_watchdog_lease: one replica checks, every replica answers.
--
-- The watchdog runs on every listener replica.  Its check is cheap now (0005), but N
-- replicas still asked the same question N times a minute, and all of them created
-- partitions and folded counters.  A lease elects one: the holder checks and stores
-- its snapshot here; the others read the stored snapshot and judge it with their own
-- clock, so every replica exports the same gauges and raises the same alert.  A
-- holder that stops renewing (crashed, partitioned away) loses the lease when it
-- expires, and the next replica to ask takes it over.  Only the listener role writes
-- it: the application role and roles without grants cannot hold the lease.
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE TABLE public.token_reset_leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    expires_at timestamptz NOT NULL,
    -- What the holder last found (the watchdog's snapshot), and when.
    state jsonb,
    state_at timestamptz,
    CONSTRAINT token_reset_leases_name_known CHECK (name IN ('watchdog')),
    CONSTRAINT token_reset_leases_holder_length CHECK (length(holder) BETWEEN 1 AND 200)
);

INSERT INTO public.token_reset_declared_privileges (grantee, kind, object, privilege) VALUES
    ('token_reset_listener', 'table', 'public.token_reset_leases', 'SELECT'),
    ('token_reset_listener', 'table', 'public.token_reset_leases', 'INSERT'),
    ('token_reset_listener', 'table', 'public.token_reset_leases', 'UPDATE');

SELECT public.token_reset_apply_privileges();
