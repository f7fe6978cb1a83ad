-- Queries of the bulk backup runner (listener/bulk.py) and the built-in schedule
-- (listener/schedule.py).  Each block starts with "-- name: <name>" and takes its
-- values as $n parameters.

-- name: bulk_lock_try
-- Transaction-level, taken in the lock connection's open transaction and held until
-- that transaction ends (the run finished) or its connection goes (the process died).
-- An open transaction keeps its server connection in every PgBouncer pool mode; a
-- session-level lock would stay behind on a pooled server connection.  Same key as
-- the session-level lock of earlier releases: the two kinds conflict, so old and
-- new replicas still exclude each other during a rolling upgrade.
SELECT pg_try_advisory_xact_lock(hashtext('token_reset.bulk'))

-- name: bulk_lock_hold
-- Simple protocol, right after the lock (see listener/bulk.py): the held transaction
-- waits idle for the whole run, so a server-side idle_in_transaction_session_timeout
-- must not end it (and with it the lock) under a running run.
SET LOCAL idle_in_transaction_session_timeout = 0

-- name: bulk_work_settings
-- First statement of every work transaction.  The final pass waits for rows a
-- writer holds; a writer that never lets go fails the run (recorded, retried)
-- instead of holding the bulk lock forever; the writer's own update resets its row
-- through the trigger anyway.  SET LOCAL, not a startup parameter (PgBouncer
-- refuses those) nor a session SET (a transaction pool would leak it to others).
SET LOCAL lock_timeout = '60s'

-- name: bulk_abandon_running
-- Only called while holding the lock: a row still 'running' whose backend is gone
-- belongs to a process that died mid-run (a runner's lock went with its connection).
-- A committing procedure still running in its own session is left alone.
UPDATE public.token_reset_bulk_runs r
   SET outcome = 'failure', finished_at = now(),
       error = 'abandoned: the process running it stopped before it finished'
 WHERE r.outcome = 'running'
   AND (r.pid IS NULL
        OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = r.pid))
RETURNING run_id

-- name: bulk_lock_holder
-- Who holds the bulk lock (any role can take an advisory lock), and whether that
-- backend is a recorded, running bulk run.  A holder that is not is a failure, never
-- a "skipped: success": a role squatting the key must not switch the backup off.
SELECT l.pid,
       (SELECT r.run_id FROM public.token_reset_bulk_runs r
         WHERE r.outcome = 'running' AND r.pid = l.pid
         ORDER BY r.started_at DESC LIMIT 1) AS run_id
  FROM pg_catalog.pg_locks l
 WHERE l.locktype = 'advisory'
   AND l.granted
   AND l.database = (SELECT oid FROM pg_catalog.pg_database
                      WHERE datname = pg_catalog.current_database())
   AND l.classid = ((hashtext('token_reset.bulk')::bigint >> 32) & 4294967295)::oid
   AND l.objid = (hashtext('token_reset.bulk')::bigint & 4294967295)::oid
   AND l.objsubid = 1
 LIMIT 1

-- name: bulk_slot_done
-- A successful scheduled run already served this slot (or a later one).
SELECT run_id
  FROM public.token_reset_bulk_runs
 WHERE outcome = 'success' AND source = 'schedule' AND slot >= $1
 ORDER BY slot DESC
 LIMIT 1

-- name: bulk_lock_pid
-- The lock connection's backend (through PgBouncer the protocol's own pid is not it).
SELECT pg_catalog.pg_backend_pid()

-- name: bulk_run_start
-- pid: the backend holding the run's lock, alive exactly as long as the run.
INSERT INTO public.token_reset_bulk_runs (run_id, source, slot, pid)
VALUES ($1, $2, $3, $4)

-- name: bulk_pending
-- One scan that stops at the first user still carrying last period's usage: a run
-- with nothing to do walks no batches.
SELECT public.token_reset_bulk_pending()

-- name: bulk_batch
-- One keyset batch; the ledger's source is always 'bulk' (the run's source is
-- recorded in token_reset_bulk_runs).
SELECT last_key, reset_count FROM public.token_reset_bulk_batch($1, $2)

-- name: bulk_run_progress
-- In the same transaction as the batch it counts: the row says what was committed.
UPDATE public.token_reset_bulk_runs
   SET reset_count = reset_count + $2, batches = batches + 1
 WHERE run_id = $1

-- name: bulk_run_retried
-- A batch was rolled back by a serialization failure or deadlock and is tried again.
UPDATE public.token_reset_bulk_runs SET retries = retries + 1 WHERE run_id = $1

-- name: bulk_final_pass
SELECT public.token_reset_bulk_final_pass()

-- name: bulk_run_success
-- Dates come from the database, in the zone that defines the period.
UPDATE public.token_reset_bulk_runs
   SET outcome = 'success', finished_at = now(), reset_count = reset_count + $2
 WHERE run_id = $1
RETURNING reset_count, batches,
          extract(epoch FROM finished_at)::float8 AS finished_epoch,
          public.token_reset_period_label(now()) AS period,
          pg_catalog.to_char(pg_catalog.timezone(public.token_reset_zone(), now()),
                             'YYYY-MM-DD') AS reset_date

-- name: bulk_run_failure
UPDATE public.token_reset_bulk_runs
   SET outcome = 'failure', finished_at = now(), error = $2
 WHERE run_id = $1 AND outcome = 'running'

-- name: bulk_run_skipped
INSERT INTO public.token_reset_bulk_runs
       (run_id, source, slot, outcome, finished_at, error)
VALUES ($1, $2, $3, 'skipped', now(), $4)

-- name: bulk_run_refused
-- The lock is held by something that is not a recorded run: nothing ran, and that is
-- a failure, never a skip.
INSERT INTO public.token_reset_bulk_runs
       (run_id, source, slot, outcome, finished_at, error)
VALUES ($1, $2, $3, 'failure', now(), $4)

-- name: bulk_period
SELECT public.token_reset_period_label(now()) AS period,
       pg_catalog.to_char(pg_catalog.timezone(public.token_reset_zone(), now()),
                          'YYYY-MM-DD') AS reset_date

-- name: bulk_schedule_state
-- What a starting scheduler needs: the newest slot a scheduled run served, and
-- when any bulk run last succeeded (to restore the gauge after a restart).
SELECT (SELECT max(slot) FROM public.token_reset_bulk_runs
         WHERE outcome = 'success' AND source = 'schedule') AS last_slot,
       (SELECT extract(epoch FROM max(finished_at))::float8 FROM public.token_reset_bulk_runs
         WHERE outcome = 'success') AS last_success_epoch

-- name: schedule_zones
-- The zone the built-in schedule reads its cron expression in: the period zone in
-- force now, and a pending change with the instant it takes effect (NULL: none), so
-- the first slot of the next period is already read in the new zone.
SELECT public.token_reset_zone() AS zone_now,
       s.previous_timezone,
       s.timezone,
       NULLIF(s.timezone_effective_at, '-infinity') AS effective_at
  FROM public.token_reset_settings s
