-- 0009_listener_compat: old and new listeners overlap during a deploy.
--
-- A rolling upgrade runs the new migration while replicas of the previous release
-- still run.  Those call the bulk functions with the signatures they shipped with:
-- token_reset_bulk_batch(uuid, integer, text) and token_reset_bulk_final_pass(text),
-- which 0004 replaced (the free-text source went: the ledger's source is a closed set).
-- The old signatures stay, for one release, as thin shims over the new functions, so
-- an old replica's scheduled run still works mid-deploy.  The rule for every function
-- the running listener calls (README, "Upgrading"): its signature never changes in
-- place; a new one is added beside it and the old one is dropped a release later.
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE FUNCTION public.token_reset_bulk_batch(
    p_after uuid, p_limit integer, p_source text, OUT last_key uuid, OUT reset_count integer)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_source IS DISTINCT FROM 'bulk' THEN
        RAISE EXCEPTION 'the bulk source is ''bulk'', got %', p_source
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT b.last_key, b.reset_count INTO last_key, reset_count
      FROM public.token_reset_bulk_batch(p_after, p_limit) b;
END
$$;

CREATE FUNCTION public.token_reset_bulk_final_pass(p_source text) RETURNS integer
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_source IS DISTINCT FROM 'bulk' THEN
        RAISE EXCEPTION 'the bulk source is ''bulk'', got %', p_source
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN public.token_reset_bulk_final_pass();
END
$$;

INSERT INTO public.token_reset_declared_privileges (grantee, kind, object, privilege) VALUES
    ('token_reset_listener', 'routine', 'public.token_reset_bulk_batch(uuid, integer, text)', 'EXECUTE'),
    ('token_reset_listener', 'routine', 'public.token_reset_bulk_final_pass(text)', 'EXECUTE');

SELECT public.token_reset_apply_privileges();
