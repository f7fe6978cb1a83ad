-- Queries of `token-reset migrate`.  Each block starts with
-- "-- name: <name>" and takes its values as $n parameters.
--
-- Migrations serialise on a lock of the history table itself, taken in each
-- migration's transaction: EXCLUSIVE mode conflicts with every lock but SELECT's
-- ACCESS SHARE, and LOCK TABLE in that mode needs UPDATE/DELETE/TRUNCATE on the table,
-- which nobody but the owner has (PUBLIC is revoked).  An advisory lock, which any
-- role that can connect may take, would let anyone stall `migrate` forever.

-- name: migration_history_create
CREATE TABLE IF NOT EXISTS public.token_reset_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: migration_history_trusted
-- The history table is written by the migrating role: it must be owned by that role,
-- the database's owner or a superuser, and carry no trigger.  Where PUBLIC may CREATE
-- in schema public, any role could have created it first (CREATE TABLE IF NOT EXISTS
-- accepts theirs) with a trigger that runs as whoever inserts the history rows.
SELECT pg_catalog.pg_get_userbyid(c.relowner) AS owner,
       (c.relowner = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = current_user)
        OR c.relowner = (SELECT d.datdba FROM pg_catalog.pg_database d
                          WHERE d.datname = pg_catalog.current_database())
        OR (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = c.relowner))
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                        WHERE t.tgrelid = c.oid AND NOT t.tgisinternal) AS trusted
  FROM pg_catalog.pg_class c
 WHERE c.oid = 'public.token_reset_migrations'::pg_catalog.regclass

-- name: migration_lock_nowait
LOCK TABLE public.token_reset_migrations IN EXCLUSIVE MODE NOWAIT

-- name: migration_lock
LOCK TABLE public.token_reset_migrations IN EXCLUSIVE MODE

-- name: migration_lock_timeout_get
SELECT current_setting('lock_timeout')

-- name: migration_lock_timeout_set
-- Transaction-local (SET LOCAL): not a startup parameter, which PgBouncer refuses.
SELECT set_config('lock_timeout', $1, true)

-- name: migration_lock_holders
-- Who holds a lock that conflicts with ours (pid, application_name and user are
-- visible to every role in pg_stat_activity).
SELECT l.pid, a.application_name, a.usename, l.mode
  FROM pg_catalog.pg_locks l
  LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'relation'
   AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
   AND l.relation = 'public.token_reset_migrations'::regclass
   AND l.granted
   AND l.mode <> 'AccessShareLock'
   AND l.pid <> pg_backend_pid()
 ORDER BY l.pid

-- name: migration_history_public
-- True when PUBLIC holds any privilege on the history (one would let anyone lock it).
SELECT EXISTS (
    SELECT 1
      FROM pg_catalog.pg_class c,
           aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) AS acl
     WHERE c.oid = 'public.token_reset_migrations'::regclass
       AND acl.grantee = 0
)

-- name: migration_history_revoke
REVOKE ALL ON public.token_reset_migrations FROM PUBLIC

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

-- name: migration_ensure_partitions
-- The ledger's partitions for this period and the next three (0006).
SELECT public.token_reset_ensure_partitions()
