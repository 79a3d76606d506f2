-- 007: PRE hooks (DESIGN sections 2, 3, 5 and 6).
--
-- The proxy holds a statement that may write a watched table and runs it in a savepoint with
-- pgfire.pre_mode set; pgfire's row triggers on every table with active PRE subscriptions then
-- report each row exactly as it would be stored (AFTER ROW: defaults, sequences, generated
-- columns applied; the old row for UPDATE and DELETE) as a NOTICE the proxy takes out of the
-- stream, and, when the statement runs again with the handlers' decisions, overlay the rewritten
-- values (BEFORE ROW). A write to a watched table through the proxy that was not held (a view, a
-- rule, a trigger of another table) finds pgfire.pre_mode unset in a proxied session and is
-- refused: detected, never a silent bypass. Both triggers are ENABLE ALWAYS, so
-- session_replication_role does not silence them.

-- The seed's advice: a failing handler allows unless the function says otherwise.
ALTER TABLE pgfire.functions ALTER COLUMN on_error SET DEFAULT 'allow';

-- Shadow mode: the function runs and its decision is recorded, but it never blocks or rewrites.
ALTER TABLE pgfire.subscriptions ADD COLUMN shadow boolean NOT NULL DEFAULT false;

INSERT INTO pgfire.settings (key, value, description) VALUES
    ('limits.pre_rows_per_statement', '1000', 'most rows of watched tables one statement through the proxy may write (each is one PRE event)'),
    ('pre.allow_truncate', 'false', 'true lets TRUNCATE of a table with PRE subscriptions through the proxy (PRE functions do not see it)')
ON CONFLICT (key) DO NOTHING;

-- The rows of one held statement, as the proxy reads them: base64 of the UTF-8 JSON (so any
-- client_encoding carries it unchanged).
CREATE FUNCTION pgfire.pre_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mode text := coalesce(current_setting('pgfire.pre_mode', true), '');
    n integer;
    lim integer;
    overlay jsonb;
    k text;
BEGIN
    IF mode NOT LIKE 'record:%' AND mode NOT LIKE 'apply:%' THEN
        IF TG_WHEN = 'BEFORE' AND coalesce(current_setting('pgfire.proxied', true), '') = 'on' THEN
            RAISE EXCEPTION 'pgfire: this write to %.% was not seen by PRE hooks', TG_TABLE_SCHEMA, TG_TABLE_NAME
                USING ERRCODE = '42501',
                      HINT = 'write the table itself (INSERT, UPDATE, DELETE, MERGE, COPY) or through a function call; writes the proxy cannot see coming (views, rules, other tables'' triggers) are refused';
        END IF;
        RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF TG_WHEN = 'BEFORE' THEN
        n := coalesce(nullif(current_setting('pgfire.pre_n', true), ''), '0')::integer + 1;
        PERFORM set_config('pgfire.pre_n', n::text, true);
        lim := split_part(mode, ':', 2)::integer;
        IF n > lim THEN
            RAISE EXCEPTION 'pgfire: this statement writes more than % rows of tables with PRE hooks', lim
                USING ERRCODE = '54000', HINT = 'write fewer rows per statement, or raise setting limits.pre_rows_per_statement';
        END IF;
        IF mode LIKE 'apply:%' AND TG_OP <> 'DELETE' THEN
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
    RAISE NOTICE USING MESSAGE = 'pgfire:pre', ERRCODE = 'PGF01',
        DETAIL = translate(encode(convert_to(jsonb_build_object(
            'mode', left(mode, 1), 'op', TG_OP, 'oid', TG_RELID::bigint,
            'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
            'new', CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
            'old', CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END)::text, 'UTF8'), 'base64'), E'\n', '');
    RETURN NULL;
END $$;

-- Client messages above NOTICE would hide the rows from the proxy: such a session cannot write a
-- watched table through it.
CREATE FUNCTION pgfire.pre_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('pgfire.pre_mode', true), '') LIKE 'record:%'
       AND current_setting('client_min_messages') IN ('warning', 'error') THEN
        RAISE EXCEPTION 'pgfire: client_min_messages = % hides writes from PRE hooks', current_setting('client_min_messages')
            USING ERRCODE = '42501', HINT = 'write tables with PRE hooks with client_min_messages at notice or below';
    END IF;
    RETURN NULL;
END $$;

-- A sql PRE function, run in the writer's transaction: its answer, or what went wrong (its own
-- subtransaction is rolled back then).
CREATE FUNCTION pgfire.pre_call(fn text, event jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    answer jsonb;
BEGIN
    EXECUTE format('SELECT %s($1)', fn) INTO answer USING event;
    RETURN jsonb_build_object('answer', answer);
EXCEPTION
    WHEN query_canceled THEN
        RETURN jsonb_build_object('timeout', true);
    WHEN OTHERS THEN
        RETURN jsonb_build_object('error', SQLERRM, 'sqlstate', SQLSTATE);
END $$;

-- A blocked or refused write: the server raises the error itself, so the session is in the
-- state PostgreSQL leaves it in (message and detail are JSON strings: ASCII whatever the
-- client_encoding).
CREATE FUNCTION pgfire.pre_block(message jsonb, detail jsonb, code text DEFAULT 'P0001') RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF detail IS NULL OR jsonb_typeof(detail) = 'null' THEN
        RAISE EXCEPTION USING MESSAGE = message #>> '{}', ERRCODE = code;
    END IF;
    RAISE EXCEPTION USING MESSAGE = message #>> '{}', DETAIL = detail #>> '{}', ERRCODE = code;
END $$;

-- The tables with PRE hooks: user and record sources whose kind has an active PRE subscription
-- of an active function.
CREATE FUNCTION pgfire.pre_tables() RETURNS SETOF regclass LANGUAGE sql STABLE AS $$
    SELECT s.table_name FROM pgfire.sources s
     WHERE EXISTS (SELECT 1 FROM pgfire.subscriptions sub JOIN pgfire.functions f ON f.name = sub.function_name
                    WHERE sub.active AND f.active
                      AND sub.event_type LIKE 'PRE\_' || upper(s.kind) || '\_%')
$$;

-- Each table with PRE hooks has pgfire's triggers, and no other table has them.
CREATE FUNCTION pgfire.sync_pre_triggers() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    t regclass;
BEGIN
    FOR t IN SELECT DISTINCT tg.tgrelid::regclass FROM pg_trigger tg
              WHERE tg.tgname IN ('pgfire_pre_before', 'pgfire_pre_after', 'pgfire_pre_statement')
                AND tg.tgrelid NOT IN (SELECT pgfire.pre_tables()) LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS pgfire_pre_before ON %s', t);
        EXECUTE format('DROP TRIGGER IF EXISTS pgfire_pre_after ON %s', t);
        EXECUTE format('DROP TRIGGER IF EXISTS pgfire_pre_statement ON %s', t);
    END LOOP;
    FOR t IN SELECT pgfire.pre_tables() LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = t AND tgname = 'pgfire_pre_before') THEN
            EXECUTE format('CREATE TRIGGER pgfire_pre_before BEFORE INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION pgfire.pre_row()', t);
            EXECUTE format('CREATE TRIGGER pgfire_pre_after AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION pgfire.pre_row()', t);
            EXECUTE format('CREATE TRIGGER pgfire_pre_statement BEFORE INSERT OR UPDATE OR DELETE ON %s FOR EACH STATEMENT EXECUTE FUNCTION pgfire.pre_statement()', t);
            EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER pgfire_pre_before', t);
            EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER pgfire_pre_after', t);
            EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER pgfire_pre_statement', t);
        END IF;
    END LOOP;
    RETURN NULL;
END $$;

CREATE TRIGGER sync_pre_triggers AFTER INSERT OR UPDATE OR DELETE ON pgfire.functions
    FOR EACH STATEMENT EXECUTE FUNCTION pgfire.sync_pre_triggers();
CREATE TRIGGER sync_pre_triggers AFTER INSERT OR UPDATE OR DELETE ON pgfire.subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION pgfire.sync_pre_triggers();
CREATE TRIGGER sync_pre_triggers AFTER INSERT OR UPDATE OR DELETE ON pgfire.sources
    FOR EACH STATEMENT EXECUTE FUNCTION pgfire.sync_pre_triggers();

-- The tables the proxy holds statements for, as the catalog names them.
CREATE FUNCTION pgfire.pre_snapshot() RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'tables', coalesce((SELECT jsonb_agg(jsonb_build_object('oid', c.oid::bigint, 'schema', n.nspname, 'name', c.relname))
                              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE c.oid IN (SELECT pgfire.pre_tables())), '[]'::jsonb))
$$;

-- The last sql function of a chain, sent together with the release of the savepoint: a plain
-- allow returns, anything else aborts the savepoint's subtransaction (SQLSTATE PGF02, the result
-- as base64 JSON in the detail), so the release that follows fails and the proxy decides from
-- the detail. One round trip fewer for the common case.
CREATE FUNCTION pgfire.pre_call_last(fn text, event jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    r jsonb := pgfire.pre_call(fn, event);
BEGIN
    IF r = '{"answer": {"allow": true}}'::jsonb THEN
        RETURN r;
    END IF;
    RAISE EXCEPTION USING MESSAGE = 'pgfire:pre-decided', ERRCODE = 'PGF02',
        DETAIL = translate(encode(convert_to(r::text, 'UTF8'), 'base64'), E'\n', '');
END $$;
