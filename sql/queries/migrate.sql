-- Queries of `token-reset migrate`.  Each block starts with
-- "-- name: <name>" and takes its values as $n parameters.

-- name: migration_lock
-- Serialises concurrent `token-reset migrate` runs (session-level advisory lock).
SELECT pg_advisory_lock(hashtext('token_reset.migrate'))

-- name: migration_unlock
SELECT pg_advisory_unlock(hashtext('token_reset.migrate'))

-- name: migration_history_create
CREATE TABLE IF NOT EXISTS public.token_reset_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: migration_history
SELECT version, name, checksum FROM public.token_reset_migrations ORDER BY version

-- name: migration_record
INSERT INTO public.token_reset_migrations (version, name, checksum) VALUES ($1, $2, $3)

-- name: migration_apply_settings
-- The zone-bearing functions and trigger, regenerated from the settings row.
SELECT public.token_reset_apply_settings()

-- name: migration_apply_privileges
-- The declared privileges, applied again; returns the roles that do not exist.
SELECT public.token_reset_apply_privileges()
