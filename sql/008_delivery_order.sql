-- pgfire 008: delivery order across redelivery.
--
-- pgfire.redeliver(...) puts dead runs back in pgfire.parked. Later events of their rows must
-- wait behind them (as behind any parked run), so the revival is written into the stream too: a
-- transactional logical message 'pgfire.revived' with the [function, key] pairs revived, which
-- pgfire reads in commit order, before any event committed after the revival.

CREATE OR REPLACE FUNCTION pgfire.redeliver_where(cond text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
    revived jsonb;
BEGIN
    EXECUTE format('WITH r AS (UPDATE pgfire.parked SET status = ''parked'', attempt = 0, next_try = now(), parked_at = now()
                                WHERE status = ''dead'' AND (%s) RETURNING function_name, key)
                    SELECT count(*), jsonb_agg(DISTINCT jsonb_build_array(function_name, key)) FROM r', cond)
        INTO n, revived;
    IF n > 0 THEN
        PERFORM pg_logical_emit_message(true, 'pgfire.revived', revived::text);
        PERFORM pg_notify('pgfire_redeliver', '');
    END IF;
    RETURN n;
END $$;
REVOKE ALL ON FUNCTION pgfire.redeliver_where(text) FROM PUBLIC;
