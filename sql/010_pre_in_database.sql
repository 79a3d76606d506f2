-- 010: PRE chains of `sql` and `log` functions decided inside the statement (README, PRE hooks).
--
-- When every PRE subscription runs a `sql` or `log` function, the proxy arms a held statement
-- in `fast` mode and sends, in one round trip, the savepoint, the statement and the release.
-- pgfire's AFTER ROW trigger then runs the row's chain itself, on the row as stored (defaults,
-- sequences, generated columns and other triggers applied), in priority order, each function in
-- its own subtransaction, and:
-- * allows: the row stays; one NOTICE (SQLSTATE PGF03, base64 JSON) per run tells the proxy
--   what to write to pgfire.executions (the proxy takes it out of the stream);
-- * blocks: the run NOTICEs, then the P0001 error the client gets, raised by the trigger, so the
--   session is as PostgreSQL leaves it after any error; a NOTICE is sent at once, so the history
--   of a blocked write survives its rollback;
-- * wants a rewrite, or meets a function of another kind: fails with SQLSTATE PGF04, and the
--   proxy runs the statement again the long way (record, decide, apply).
-- The proxy's release checks that the statement left the run as armed (pgfire.pre_end), so code
-- in the statement that changes pgfire.pre_mode fails the write instead of slipping past.
-- Run numbers carry the mode they were armed for (their remainder by 4), so a mode string
-- copied from this run with another kind (`record`) is refused as forged.

-- The chain each operation on each user or record table runs, kept up to date by triggers on
-- pgfire's configuration, so the row trigger reads it with one index lookup: the source's kind
-- and id column, the event type, whether a function of a kind only the proxy runs (webhook,
-- nats) is in it, and, when not, its active functions in run order. Readable by every role
-- (it holds no webhook target); written only by pgfire.
CREATE TABLE pgfire.pre_chains (
    rel   oid  NOT NULL,
    op    text NOT NULL,
    chain jsonb NOT NULL,
    PRIMARY KEY (rel, op)
);
GRANT SELECT ON pgfire.pre_chains TO PUBLIC;

CREATE FUNCTION pgfire.refresh_pre_chains() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    DELETE FROM pgfire.pre_chains;
    INSERT INTO pgfire.pre_chains (rel, op, chain)
    SELECT s.table_name::oid, o.op, jsonb_build_object(
        'kind', s.kind, 'id_column', s.id_column, 'event_type', e.t,
        'held', coalesce(bool_or(f.kind NOT IN ('sql', 'log')), false),
        'fns', CASE WHEN coalesce(bool_or(f.kind NOT IN ('sql', 'log')), false) THEN '[]'::jsonb
               ELSE coalesce(jsonb_agg(jsonb_build_object(
                   'name', f.name, 'kind', f.kind, 'target', f.target,
                   'callable', CASE WHEN f.kind = 'sql' THEN (
                       SELECT format('%I.%I', n.nspname, p.proname)
                         FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                        WHERE p.oid = to_regprocedure(f.target || '(jsonb)')) END,
                   'timeout_ms', least(greatest(f.timeout_ms, 1), lim.ms),
                   'blocks', f.on_error = 'block', 'shadow', sub.shadow)
                 ORDER BY sub.priority, f.name) FILTER (WHERE f.name IS NOT NULL), '[]'::jsonb) END)
      FROM pgfire.sources s
     CROSS JOIN (VALUES ('INSERT', 'CREATE'), ('UPDATE', 'UPDATE'), ('DELETE', 'DELETE')) o (op, verb)
     CROSS JOIN LATERAL (SELECT 'PRE_' || upper(s.kind) || '_' || o.verb AS t) e
     CROSS JOIN LATERAL (SELECT coalesce((SELECT btrim(value)::integer FROM pgfire.settings
                                           WHERE key = 'limits.timeout_ms' AND btrim(value) ~ '^[0-9]{1,9}$'), 10000) AS ms) lim
      LEFT JOIN pgfire.subscriptions sub ON sub.event_type = e.t AND sub.active
      LEFT JOIN pgfire.functions f ON f.name = sub.function_name AND f.active
     WHERE s.kind IN ('user', 'record')
     GROUP BY s.table_name, o.op, s.kind, s.id_column, e.t;
END $$;
REVOKE ALL ON FUNCTION pgfire.refresh_pre_chains() FROM PUBLIC;

CREATE FUNCTION pgfire.pre_chains_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgfire.refresh_pre_chains();
    RETURN NULL;
END $$;
CREATE TRIGGER pre_chains_changed AFTER INSERT OR UPDATE OR DELETE ON pgfire.functions
    FOR EACH STATEMENT EXECUTE FUNCTION pgfire.pre_chains_changed();
CREATE TRIGGER pre_chains_changed AFTER INSERT OR UPDATE OR DELETE ON pgfire.subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION pgfire.pre_chains_changed();
CREATE TRIGGER pre_chains_changed AFTER INSERT OR UPDATE OR DELETE ON pgfire.sources
    FOR EACH STATEMENT EXECUTE FUNCTION pgfire.pre_chains_changed();
CREATE TRIGGER pre_chains_changed AFTER INSERT OR UPDATE OR DELETE ON pgfire.settings
    FOR EACH STATEMENT EXECUTE FUNCTION pgfire.pre_chains_changed();
SELECT pgfire.refresh_pre_chains();

-- The chain of `op` on `rel` (null when it is no user or record table).
CREATE FUNCTION pgfire.pre_chain(rel oid, op text) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT c.chain FROM pgfire.pre_chains c WHERE c.rel = $1 AND c.op = $2
$$;

-- Whether a chain needs the proxy (a function of a kind the database cannot run).
CREATE FUNCTION pgfire.pre_needs_proxy(chain jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce((chain ->> 'held')::boolean, false)
$$;

-- `event_data` of a row, as the proxy and the consumer build it (DESIGN section 2): user_id or
-- record_id and table, the columns (reserved names under `columns`), `changes` and `old` on
-- updates, `old` on deletes.
CREATE FUNCTION pgfire.pre_event_data(kind text, id_column text, op text, tbl text, new_row jsonb, old_row jsonb)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    cols jsonb := CASE WHEN op = 'DELETE' THEN old_row ELSE new_row END;
    reserved text[];
    data jsonb;
    colliding jsonb;
BEGIN
    IF kind = 'user' THEN
        reserved := ARRAY['changes', 'old', 'columns', 'user_id'];
        data := jsonb_build_object('user_id', coalesce(cols -> id_column, 'null'));
    ELSE
        reserved := ARRAY['changes', 'old', 'columns', 'record_id', 'table'];
        data := jsonb_build_object('record_id', coalesce(cols -> id_column, 'null'), 'table', tbl);
    END IF;
    IF cols ?| reserved THEN
        SELECT jsonb_object_agg(key, value) INTO colliding FROM jsonb_each(cols) WHERE key = ANY (reserved);
        data := data || (cols - reserved) || jsonb_build_object('columns', colliding);
    ELSE
        data := data || cols;
    END IF;
    IF op = 'UPDATE' THEN
        data := data || jsonb_build_object('changes', coalesce((
            SELECT jsonb_object_agg(n.key, jsonb_build_object('old', coalesce(old_row -> n.key, 'null'), 'new', n.value))
              FROM jsonb_each(new_row) n WHERE (old_row -> n.key) IS DISTINCT FROM n.value), '{}'));
    END IF;
    IF op <> 'INSERT' THEN
        data := data || jsonb_build_object('old', old_row);
    END IF;
    RETURN data;
END $$;

-- Decide one row's chain in the database (`how`: fast, the proxy's one-round-trip run; commits,
-- a statement that commits by itself; unseen, a write the proxy did not hold). Allowed: returns
-- (run NOTICEs sent). Blocked: raises P0001. Where the database cannot decide (a webhook or nats
-- function, or a rewrite), fast raises PGF04 (the proxy decides instead), the others refuse.
CREATE FUNCTION pgfire.pre_decide(how text, op text, rel oid, sch text, tbl text, new_row jsonb, old_row jsonb, stmt bigint, pos integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    chain jsonb;
    callable text;
    et text;
    id_text text;
    data jsonb;
    event jsonb;
    f jsonb;
    answer jsonb;
    t0 timestamptz;
    took_us bigint;
    status text;
    err text;
    msg text;
    m jsonb;
    d jsonb;
    runs jsonb := '[]';
    blocked text;
    blocked_fn text;
    report text;
    kept text;
BEGIN
    SELECT c.chain INTO chain FROM pgfire.pre_chains c WHERE c.rel = pre_decide.rel AND c.op = pre_decide.op;
    IF chain IS NULL THEN
        RETURN;
    END IF;
    IF (chain ->> 'held')::boolean THEN
        IF how = 'fast' THEN
            RAISE EXCEPTION USING MESSAGE = 'pgfire:pre-held', ERRCODE = 'PGF04';
        ELSIF how = 'commits' THEN
            RAISE EXCEPTION 'pgfire: this statement commits by itself (COMMIT or ROLLBACK in a procedure or DO block) and writes %.%, whose PRE functions only the proxy can run', sch, tbl
                USING ERRCODE = '0A000',
                      DETAIL = 'PRE functions decide a write before it commits; a procedure''s own COMMIT would come first',
                      HINT = 'write tables with webhook or nats PRE functions outside procedures that commit, or without COMMIT inside them';
        END IF;
        RAISE EXCEPTION 'pgfire: this write to %.% was not seen by PRE hooks', sch, tbl
            USING ERRCODE = '42501',
                  HINT = 'write the table itself (INSERT, UPDATE, DELETE, MERGE, COPY) or through a function call; writes the proxy cannot see coming (views, rules, other tables'' triggers) are refused, and so are writes after pgfire.pre_mode was changed';
    END IF;
    IF jsonb_array_length(chain -> 'fns') = 0 THEN
        RETURN;
    END IF;
    et := chain ->> 'event_type';
    id_text := lpad(upper(to_hex(stmt)), 16, '0') || '-' || lpad(pos::text, 10, '0');
    data := pgfire.pre_event_data(chain ->> 'kind', chain ->> 'id_column', op, tbl, new_row, old_row);
    FOR f IN SELECT * FROM jsonb_array_elements(chain -> 'fns') LOOP
        event := jsonb_build_object(
            'id', id_text, 'event_type', et, 'event_data', data,
            'occurred_at', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            'source', jsonb_build_object('database', current_database(), 'schema', sch, 'table', tbl));
        t0 := clock_timestamp();
        status := NULL;
        err := NULL;
        answer := NULL;
        callable := f ->> 'callable';
        IF callable IS NULL AND f ->> 'kind' = 'sql' THEN
            -- Created after the configuration named it.
            SELECT format('%I.%I', n.nspname, p.proname) INTO callable
              FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE p.oid = to_regprocedure((f ->> 'target') || '(jsonb)');
        END IF;
        IF f ->> 'kind' = 'log' THEN
            status := 'ok';
        ELSIF callable IS NULL THEN
            status := 'error';
            err := format('SQL function %s(jsonb) does not exist', coalesce(f ->> 'target', ''));
        ELSE
            BEGIN
                EXECUTE 'SELECT ' || callable || '($1)' INTO answer USING event;
                IF clock_timestamp() - t0 > make_interval(secs => (f ->> 'timeout_ms')::integer / 1000.0) THEN
                    -- Timed after the fact: its effects are undone with its subtransaction.
                    RAISE EXCEPTION USING MESSAGE = 'pgfire:pre-timeout', ERRCODE = 'PGF05';
                END IF;
            EXCEPTION
                WHEN SQLSTATE 'PGF05' THEN
                    status := 'timeout';
                    err := format('timed out after %s ms', f ->> 'timeout_ms');
                WHEN OTHERS THEN
                    status := 'error';
                    err := format('%s (SQLSTATE %s)', SQLERRM, SQLSTATE);
            END;
        END IF;
        took_us := (extract(epoch FROM clock_timestamp() - t0) * 1000000)::bigint;
        msg := NULL;
        d := NULL;
        IF status IS NULL THEN
            -- The documented answers (src/proxy/pre/answer.rs reads them the same way).
            IF answer IS NULL OR jsonb_typeof(answer) <> 'object' THEN
                err := 'invalid answer: the answer is not a JSON object';
            ELSIF jsonb_typeof(answer -> 'allow') IS DISTINCT FROM 'boolean' THEN
                err := 'invalid answer: the answer has no boolean "allow"';
            ELSIF NOT (answer ->> 'allow')::boolean THEN
                m := answer -> 'message';
                IF m IS NULL OR jsonb_typeof(m) = 'null'
                   OR (jsonb_typeof(m) = 'string' AND btrim(m #>> '{}', E' \t\n\r') = '') THEN
                    msg := 'blocked by a PRE function';
                ELSIF jsonb_typeof(m) = 'string' THEN
                    msg := left(m #>> '{}', 1000);
                ELSE
                    err := 'invalid answer: "message" must be a string';
                END IF;
                IF err IS NULL THEN
                    status := 'blocked';
                    err := msg;
                END IF;
            ELSE
                d := answer -> 'data';
                IF d IS NULL OR jsonb_typeof(d) = 'null' OR d = '{}'::jsonb THEN
                    status := 'ok';
                    d := NULL;
                ELSIF jsonb_typeof(d) = 'object' THEN
                    status := 'modified';
                ELSE
                    err := 'invalid answer: "data" must be a JSON object of column values';
                    d := NULL;
                END IF;
            END IF;
            IF status IS NULL THEN
                status := 'error';
            END IF;
        END IF;
        runs := runs || jsonb_build_object(
            'fn', f ->> 'name', 'kind', f ->> 'kind', 'status', status, 'error', err,
            'shadow', (f ->> 'shadow')::boolean, 'at', (extract(epoch FROM t0) * 1000000)::bigint, 'us', took_us);
        IF (f ->> 'shadow')::boolean THEN
            CONTINUE;
        END IF;
        IF status = 'modified' THEN
            IF how = 'fast' THEN
                RAISE EXCEPTION USING MESSAGE = 'pgfire:pre-held', ERRCODE = 'PGF04';
            END IF;
            RAISE EXCEPTION 'pgfire: PRE function % rewrote a row of %.% written where the proxy cannot write it again', f ->> 'name', sch, tbl
                USING ERRCODE = '0A000',
                      HINT = 'rewriting PRE functions need the write made by a statement of its own, outside procedures that commit';
        END IF;
        IF status = 'blocked' THEN
            blocked := msg;
        ELSIF status IN ('error', 'timeout') AND (f ->> 'blocks')::boolean THEN
            blocked := format('PRE function %s failed: %s', f ->> 'name', err);
        END IF;
        IF blocked IS NOT NULL THEN
            blocked_fn := f ->> 'name';
            EXIT;
        END IF;
    END LOOP;
    report := jsonb_build_object('stmt', stmt, 'pos', pos, 'event_type', et, 'runs', runs)::text;
    kept := coalesce(current_setting('pgfire.pre_log', true), '');
    IF how = 'fast' AND blocked IS NULL AND length(kept) < 16384 THEN
        -- Kept for the release (pgfire.pre_end returns them): no message of its own per row.
        PERFORM set_config('pgfire.pre_log', kept || CASE WHEN kept = '' THEN '' ELSE ',' END || report, true);
    ELSE
        -- Sent at once (a NOTICE is flushed to the proxy), so it outlives the rollback of a block.
        IF how = 'fast' THEN
            PERFORM set_config('pgfire.pre_log', '', true);
        ELSE
            kept := '';
        END IF;
        RAISE NOTICE USING MESSAGE = 'pgfire:run', ERRCODE = 'PGF03',
            DETAIL = translate(encode(convert_to('[' || kept || CASE WHEN kept = '' THEN '' ELSE ',' END || report || ']',
                'UTF8'), 'base64'), E'\n', '');
    END IF;
    IF blocked IS NOT NULL THEN
        RAISE EXCEPTION USING MESSAGE = blocked, ERRCODE = 'P0001',
            DETAIL = format('event %s (id %s) on %s.%s, function %s', et, id_text, sch, tbl, blocked_fn);
    END IF;
END $$;

-- The session's current PRE run (an error before its first), and its end. PL/pgSQL, so the
-- plan is kept; no SET clause (switching search_path at every call costs more than the call),
-- every name qualified instead.
CREATE OR REPLACE FUNCTION pgfire.pre_run() RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    RETURN pg_catalog.currval('pgfire.pre_runs'::pg_catalog.regclass);
END $$;
-- Ending a run moves to a number no run is armed with (mod 4 = 0): anyone may end a run, but
-- only the proxy's key arms a record or apply run (mod 4 = 2, 3).
CREATE OR REPLACE FUNCTION pgfire.pre_disarm() RETURNS void LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    n bigint := pg_catalog.nextval('pgfire.pre_runs'::pg_catalog.regclass);
BEGIN
    WHILE (n OPERATOR(pg_catalog.%) 4::bigint) OPERATOR(pg_catalog.<>) 0::bigint LOOP
        n := pg_catalog.nextval('pgfire.pre_runs'::pg_catalog.regclass);
    END LOOP;
END $$;
ALTER FUNCTION pgfire.pre_run() RESET ALL;
ALTER FUNCTION pgfire.pre_disarm() RESET ALL;

-- Start a PRE run of the proxy's: pgfire.pre_mode = <mode>:<run>, where <run> mod 4 says the
-- kind of run it was armed for (fast 1, record 2, apply 3; 0 is an ended run).
CREATE OR REPLACE FUNCTION pgfire.pre_arm(key text, mode text) RETURNS text LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    want integer := CASE split_part(mode, ':', 1) WHEN 'fast' THEN 1 WHEN 'record' THEN 2 WHEN 'apply' THEN 3 ELSE 0 END;
    n bigint;
BEGIN
    IF key IS DISTINCT FROM (SELECT k.key FROM pgfire.pre_key k) THEN
        RAISE EXCEPTION 'pgfire: only the pgfire proxy starts PRE runs' USING ERRCODE = '42501';
    END IF;
    n := nextval('pgfire.pre_runs');
    WHILE n % 4 <> want LOOP
        n := nextval('pgfire.pre_runs');
    END LOOP;
    RETURN set_config('pgfire.pre_mode', mode || ':' || n, true);
END $$;

-- Start a fast run (`mode`: <limit>:<statement>): pgfire.pre_mode = fast:<mode>:<run>. No key:
-- a fast run only makes pgfire's trigger decide rows in the database, which any session may
-- ask for; the run number (mod 4 = 1) is what the release checks. No SET clause (it costs more
-- than the call): every name and operator is qualified.
CREATE FUNCTION pgfire.pre_arm_fast(mode text) RETURNS text LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    n bigint := pg_catalog.nextval('pgfire.pre_runs'::pg_catalog.regclass);
BEGIN
    WHILE (n OPERATOR(pg_catalog.%) 4::bigint) OPERATOR(pg_catalog.<>) 1::bigint LOOP
        n := pg_catalog.nextval('pgfire.pre_runs'::pg_catalog.regclass);
    END LOOP;
    RETURN pg_catalog.set_config('pgfire.pre_mode',
        pg_catalog.concat('fast:', mode, ':', n), true);
END $$;

-- The end of a fast run, sent with its release: the statement must have left the run as armed
-- (`expected`: the mode less its run number) in a session marked as proxied; otherwise the
-- release fails, and the write with it.
CREATE FUNCTION pgfire.pre_end(expected text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    mode text := coalesce(current_setting('pgfire.pre_mode', true), '');
BEGIN
    -- The run must still be the session's current one (code that ends it and starts a mode of
    -- its own, then puts the string back, is caught here).
    IF mode IS DISTINCT FROM expected || ':' || pgfire.pre_run()
       OR current_setting('pgfire.proxied', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'pgfire: the statement changed the settings PRE hooks run with (pgfire.pre_mode, pgfire.proxied)'
            USING ERRCODE = '42501';
    END IF;
    PERFORM set_config('pgfire.pre_mode', '', true);
    PERFORM pgfire.pre_disarm();
    -- Marks where the proxy's release begins in an answer it reads (src/proxy/pre/fast.rs),
    -- with the run reports kept by pgfire.pre_decide (base64 of a JSON array).
    RETURN 'pgfire:end:' || translate(encode(convert_to(
        '[' || coalesce(current_setting('pgfire.pre_log', true), '') || ']', 'UTF8'), 'base64'), E'\n', '');
END $$;

CREATE OR REPLACE FUNCTION pgfire.pre_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mode text := coalesce(current_setting('pgfire.pre_mode', true), '');
    kind text := split_part(mode, ':', 1);
    run text;
    n integer;
    lim integer;
    overlay jsonb;
    k text;
    forged boolean;
BEGIN
    IF kind = 'fast' AND TG_WHEN = 'BEFORE' THEN
        -- A fast run counts and decides its rows after them.
        RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF kind NOT IN ('record', 'apply', 'fast') THEN
        IF current_setting('pgfire.proxied', true) IS NULL THEN
            RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
        END IF;
        -- Not a run of the proxy's: the database decides chains it can run, after the row.
        IF TG_WHEN = 'AFTER' THEN
            PERFORM pgfire.pre_decide(CASE WHEN mode = 'commits' THEN 'commits' ELSE 'unseen' END,
                TG_OP, TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME,
                CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
                CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
                ((extract(epoch FROM clock_timestamp()) * 1000000)::bigint << 12) | (pg_backend_pid() & 4095), 0);
            RETURN NULL;
        END IF;
        IF NOT pgfire.pre_needs_proxy(pgfire.pre_chain(TG_RELID, TG_OP)) THEN
            RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
        END IF;
        IF mode = 'commits' THEN
            RAISE EXCEPTION 'pgfire: this statement commits by itself (COMMIT or ROLLBACK in a procedure or DO block) and writes %.%, which has PRE hooks', TG_TABLE_SCHEMA, TG_TABLE_NAME
                USING ERRCODE = '0A000',
                      DETAIL = 'PRE functions decide a write before it commits; a procedure''s own COMMIT would come first',
                      HINT = 'write tables with PRE hooks outside procedures that commit, or without COMMIT inside them';
        END IF;
        RAISE EXCEPTION 'pgfire: this write to %.% was not seen by PRE hooks', TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = '42501',
                  HINT = 'write the table itself (INSERT, UPDATE, DELETE, MERGE, COPY) or through a function call; writes the proxy cannot see coming (views, rules, other tables'' triggers) are refused, and so are writes after pgfire.pre_mode was changed';
    END IF;
    -- The run the mode was armed for must be the session's current one, armed for this kind.
    -- Not asked of a fast run: its trigger decides every row itself whatever the string says,
    -- and its release fails unless the string is still the one armed.
    run := substring(mode FROM ':([0-9]+)$');
    forged := run IS NULL OR split_part(mode, ':', CASE kind WHEN 'fast' THEN 4 ELSE 3 END) <> run;
    IF NOT forged AND kind <> 'fast' THEN
        forged := run <> pgfire.pre_run()::text
            OR run::bigint % 4 <> CASE kind WHEN 'fast' THEN 1 WHEN 'record' THEN 2 ELSE 3 END;
    END IF;
    IF forged THEN
        RAISE EXCEPTION 'pgfire: pgfire.pre_mode was not set by the pgfire proxy for this statement (write to %.%)', TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = '42501';
    END IF;
    IF TG_WHEN = 'BEFORE' THEN
        n := coalesce(nullif(current_setting('pgfire.pre_n', true), ''), '0')::integer + 1;
        PERFORM set_config('pgfire.pre_n', n::text, true);
        lim := split_part(mode, ':', 2)::integer;
        IF n > lim THEN
            RAISE EXCEPTION 'pgfire: this statement writes more than % rows of tables with PRE hooks', lim
                USING ERRCODE = '54000', HINT = 'write fewer rows per statement, or raise setting limits.pre_rows_per_statement';
        END IF;
        IF kind = 'apply' AND TG_OP <> 'DELETE' THEN
            overlay := current_setting('pgfire.pre_apply', true)::jsonb -> (n - 1);
            IF overlay IS NOT NULL AND jsonb_typeof(overlay) = 'object' THEN
                FOR k IN SELECT jsonb_object_keys(overlay) LOOP
                    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                                    WHERE attrelid = TG_RELID AND attname = k AND attnum > 0 AND NOT attisdropped) THEN
                        RAISE EXCEPTION 'column "%" of relation "%" does not exist', k, TG_TABLE_NAME
                            USING ERRCODE = '42703', DETAIL = 'a PRE function answered data for it';
                    END IF;
                END LOOP;
                NEW := jsonb_populate_record(NEW, overlay);
            END IF;
        END IF;
        RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF current_setting('client_min_messages') IN ('warning', 'error') THEN
        RAISE EXCEPTION 'pgfire: client_min_messages = % hides writes from PRE hooks', current_setting('client_min_messages')
            USING ERRCODE = '42501', HINT = 'write tables with PRE hooks with client_min_messages at notice or below';
    END IF;
    IF kind = 'fast' THEN
        n := coalesce(nullif(current_setting('pgfire.pre_k', true), ''), '0')::integer;
        PERFORM set_config('pgfire.pre_k', (n + 1)::text, true);
        lim := split_part(mode, ':', 2)::integer;
        IF n + 1 > lim THEN
            RAISE EXCEPTION 'pgfire: this statement writes more than % rows of tables with PRE hooks', lim
                USING ERRCODE = '54000', HINT = 'write fewer rows per statement, or raise setting limits.pre_rows_per_statement';
        END IF;
        PERFORM pgfire.pre_decide('fast', TG_OP, TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME,
            CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
            CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
            split_part(mode, ':', 3)::bigint, n);
        RETURN NULL;
    END IF;
    RAISE NOTICE USING MESSAGE = 'pgfire:pre', ERRCODE = 'PGF01',
        DETAIL = translate(encode(convert_to(jsonb_build_object(
            'mode', left(mode, 1), 'op', TG_OP, 'oid', TG_RELID::bigint,
            'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
            'new', CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
            'old', CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END)::text, 'UTF8'), 'base64'), E'\n', '');
    RETURN NULL;
END $$;

-- Client messages above NOTICE would hide the rows, and the runs, from the proxy.
CREATE OR REPLACE FUNCTION pgfire.pre_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF split_part(coalesce(current_setting('pgfire.pre_mode', true), ''), ':', 1) IN ('record', 'fast')
       AND current_setting('client_min_messages') IN ('warning', 'error') THEN
        RAISE EXCEPTION 'pgfire: client_min_messages = % hides writes from PRE hooks', current_setting('client_min_messages')
            USING ERRCODE = '42501', HINT = 'write tables with PRE hooks with client_min_messages at notice or below';
    END IF;
    RETURN NULL;
END $$;
