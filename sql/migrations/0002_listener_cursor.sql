-- 0002_listener_cursor: where each listener has read the ledger up to, and the
-- horizon below which the ledger can no longer change.
--
-- The listener counts every reset row exactly once, across restarts and
-- reconnects.  It keeps a cursor (the highest ledger id it has processed, with
-- every id below it processed too) per consumer name (LISTENER_NAME, default
-- the host name) and writes it in the same transaction as each window it reads.

CREATE TABLE public.token_reset_listener_cursors (
    consumer text PRIMARY KEY,
    last_id bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT token_reset_listener_cursors_last_id_non_negative CHECK (last_id >= 0),
    CONSTRAINT token_reset_listener_cursors_consumer_length
        CHECK (length(consumer) BETWEEN 1 AND 200)
);

-- Ledger ids are handed out in INSERT order but become visible in COMMIT order:
-- a transaction holding id 100 may commit after the one holding 101.  A reader
-- that moved its cursor past 101 when it saw it would never see 100.  So the
-- listener only reads up to a horizon below which every id is settled
-- (committed, rolled back, or never used).
--
-- This returns, in this order (plpgsql runs the statements one after the other):
--   allocated: the highest id the ledger's sequence has handed out;
--   writers:   the transactions that may still hold an id up to `allocated`:
--              every INSERT takes RowExclusiveLock on the table before it draws
--              an id and holds it until its transaction ends, so reading the
--              locks after the sequence catches every such transaction (also
--              those that have an id but no transaction id yet, and rows
--              written in subtransactions, which xid-based checks miss);
--   waiting:   whether any transaction of p_waiting (writers returned by an
--              earlier call) still runs.
-- When `writers` is empty, every id up to `allocated` is settled now; otherwise
-- they are once `waiting` turns false for that list.  Assumes the sequence's
-- CACHE is 1 (the default): cached ids would be used after the horizon passed them.
CREATE FUNCTION public.token_reset_listener_horizon(p_waiting text[] DEFAULT '{}')
RETURNS TABLE (allocated bigint, writers text[], waiting boolean)
    LANGUAGE plpgsql
    VOLATILE
    SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_database oid := (SELECT oid FROM pg_catalog.pg_database
                        WHERE datname = pg_catalog.current_database());
BEGIN
    -- Read the sequence itself: pg_sequence_last_value() is NULL after
    -- setval(..., false), which would look like an empty ledger.
    EXECUTE pg_catalog.format(
        'SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM %s',
        pg_catalog.pg_get_serial_sequence('public.token_transactions', 'id'))
       INTO allocated;
    -- One scan of the lock table answers both questions.
    SELECT coalesce(array_agg(DISTINCT l.virtualtransaction) FILTER (
               WHERE l.locktype = 'relation'
                 AND l.database = v_database
                 AND l.relation = 'public.token_transactions'::regclass
                 AND l.mode = 'RowExclusiveLock'
                 AND l.pid IS DISTINCT FROM pg_catalog.pg_backend_pid()), '{}'),
           coalesce(bool_or(l.virtualtransaction = ANY (p_waiting)), false)
      INTO writers, waiting
      FROM pg_catalog.pg_locks l;
    RETURN NEXT;
END
$$;

REVOKE ALL ON FUNCTION public.token_reset_listener_horizon(text[]) FROM PUBLIC;

DO $grants$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'token_reset_app') THEN
        GRANT EXECUTE ON FUNCTION public.token_reset_listener_horizon(text[]) TO token_reset_app;
        GRANT SELECT, INSERT, UPDATE ON public.token_reset_listener_cursors TO token_reset_app;
    END IF;
END
$grants$;
