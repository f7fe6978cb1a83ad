-- Queries of the listener (listener/ledger.py, listener/connection.py).  Each
-- block starts with "-- name: <name>" and takes its values as $n parameters.

-- name: listener_cursor_open
-- The consumer's cursor; on its first start, created at the newest ledger id, so
-- history written before this consumer existed is not counted as new resets.
-- The INSERT's row is invisible to the second SELECT (same snapshot), so exactly
-- one branch answers.
WITH created AS (
    INSERT INTO public.token_reset_listener_cursors (consumer, last_id)
    SELECT $1, coalesce(max(t.id), 0) FROM public.token_transactions t
    ON CONFLICT (consumer) DO NOTHING
    RETURNING last_id
)
SELECT last_id, true AS created FROM created
UNION ALL
SELECT last_id, false AS created FROM public.token_reset_listener_cursors WHERE consumer = $1

-- name: listener_cursor_rewind
-- The ledger is behind the cursor (restored from a backup, failed over with loss):
-- continue from what the ledger has actually handed out.
UPDATE public.token_reset_listener_cursors
   SET last_id = $2, updated_at = pg_catalog.now()
 WHERE consumer = $1

-- name: ledger_horizon
SELECT allocated, writers, waiting FROM public.token_reset_listener_horizon($1::text[])

-- name: ledger_horizon_holders
-- The sessions of the transactions (virtual ids from token_reset_listener_horizon)
-- that wrote the ledger and still hold the horizon back.  Any role sees pid, user
-- and application_name; state and the transaction's age only for its own sessions
-- or with pg_read_all_stats (NULL otherwise).  A prepared transaction has no pid.
-- One row per transaction (it holds many locks); now() is this statement's start.
SELECT DISTINCT l.virtualtransaction, l.pid, a.usename, a.application_name, a.state,
       extract(epoch FROM pg_catalog.now() - a.xact_start)::float8 AS transaction_seconds
  FROM pg_catalog.pg_locks l
  LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
 WHERE l.virtualtransaction = ANY ($1::text[])
 ORDER BY l.virtualtransaction

-- name: ledger_window
-- One window (ids $2 < id <= $3) of reset rows, aggregated per (source, period)
-- through the partial index on reset ids, and the consumer's cursor moved to $3:
-- one statement, so one snapshot, one round trip, and the read and the cursor
-- commit together.  The cursor never moves backwards here (two processes
-- misconfigured with one name must not undo each other's progress).
-- lag_seconds is the oldest row's age at read time, on the database's clock (row
-- times are the writing transaction's start).
-- The cursor write need not wait for a WAL flush (a crash of this process loses
-- nothing committed; after a database crash the process keeps its own cursor, see
-- Ledger.open), and flushing per window tripled the lag under load.  So `local_async`
-- is SET LOCAL synchronous_commit = off for this statement's own transaction: the
-- commit obeys the value in effect when it happens.  Not a startup parameter
-- (PgBouncer refuses those) nor a session SET (a transaction pool would leak it to
-- other clients).  The INSERT reads it, so it is evaluated before the commit.
WITH local_async AS (
    SELECT pg_catalog.set_config('synchronous_commit', 'off', true) AS synchronous_commit
), saved AS (
    INSERT INTO public.token_reset_listener_cursors AS c (consumer, last_id)
    SELECT $1, $3 FROM local_async
    ON CONFLICT (consumer) DO UPDATE
       SET last_id = greatest(c.last_id, excluded.last_id), updated_at = pg_catalog.now()
)
SELECT t.metadata ->> 'source' AS source,
       t.metadata ->> 'period' AS period,
       count(*) AS resets,
       min(t.id) AS first_id,
       max(t.id) AS last_id,
       extract(epoch FROM max(t.created_at))::float8 AS newest_at,
       extract(epoch FROM pg_catalog.clock_timestamp() - min(t.created_at))::float8 AS lag_seconds
  FROM public.token_transactions t
 WHERE t.operation = 'reset' AND t.id > $2 AND t.id <= $3
 GROUP BY 1, 2
 ORDER BY min(t.id)

-- name: ledger_last_reset
-- Ledger time of the newest reset, for the gauge at start (partial index, backwards).
SELECT extract(epoch FROM t.created_at)::float8
  FROM public.token_transactions t
 WHERE t.operation = 'reset'
 ORDER BY t.id DESC
 LIMIT 1

-- name: ledger_sequence_cache
-- The horizon assumes the id sequence hands out one id at a time (CACHE 1).
SELECT s.seqcache
  FROM pg_catalog.pg_sequence s
 WHERE s.seqrelid = pg_catalog.pg_get_serial_sequence('public.token_transactions', 'id')::regclass

-- name: listener_probe
-- The liveness probe, sent from the probe's own connection: the echo has to travel
-- the path every doorbell takes (another session's NOTIFY reaching our idle LISTEN
-- session), which a NOTIFY on the LISTEN connection itself never tests (it comes
-- back inside its own statement, even through a transaction-mode pooler).
SELECT pg_catalog.pg_notify('token_resets', $1)

-- name: listener_backend_pid
-- Run in the transaction that LISTENs: the server process that holds the LISTEN.
SELECT pg_catalog.pg_backend_pid()

-- name: listener_diagnose
-- A probe went unanswered: which server process answers our statements now, and
-- does it listen on our channel?
SELECT pg_catalog.pg_backend_pid() AS backend_pid,
       'token_resets' = ANY (ARRAY(SELECT pg_catalog.pg_listening_channels())) AS listening
