-- 010: PRE hooks hardened against code that changes pgfire's settings while a statement runs,
-- and procedures that commit (README, PRE hooks).
--
-- * A session comes through the proxy when its startup packet defined pgfire.proxied. Code in
--   the session (any function, a superuser's or not) can change a setting's value, and restore
--   it, but never undefine it; so the trigger asks whether it is defined, not what it says.
-- * With the setting defined and no PRE run of the proxy's own under way (pgfire.pre_mode), both
--   row triggers refuse the write: an AFTER ROW trigger firing after code flipped the mode no
--   longer lets a row go unreported.
-- * Every row report checks client_min_messages (code run by the statement may raise it after the
--   statement trigger looked).
-- * pgfire.pre_mode = 'commits': a statement whose procedure or DO block commits, run by the
--   proxy outside a transaction block; any write to a watched table fails precisely (0A000).
-- * A PRE run is armed: pgfire.pre_mode carries the number of the run the proxy started
--   (pgfire.pre_arm, which takes pgfire's key, unreadable by the session's roles), and the trigger
--   accepts the mode only while that number is the session's current run (the session's last
--   value of a pgfire sequence nobody else may advance; the proxy burns it when the run ends). So
--   a mode set by code in the session (a view's set_config, a copy kept from an earlier run) is
--   refused, not obeyed.
-- * An event trigger (installed by a superuser) refuses, in a session through the proxy, DDL
--   that leaves pgfire's triggers on a watched table dropped, renamed or not ENABLE ALWAYS, even
--   when a function runs it with EXECUTE.

CREATE TABLE pgfire.pre_key (key text NOT NULL);
INSERT INTO pgfire.pre_key VALUES (md5(random()::text || clock_timestamp()::text) || md5(random()::text || pg_backend_pid()::text));
REVOKE ALL ON pgfire.pre_key FROM PUBLIC;
CREATE SEQUENCE pgfire.pre_runs;
REVOKE ALL ON SEQUENCE pgfire.pre_runs FROM PUBLIC;

-- Start a PRE run of the proxy's (`mode`: record:<limit> or apply:<limit>), for the rest of the
-- transaction or until the proxy ends it.
CREATE FUNCTION pgfire.pre_arm(key text, mode text) RETURNS text LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF key IS DISTINCT FROM (SELECT k.key FROM pgfire.pre_key k) THEN
        RAISE EXCEPTION 'pgfire: only the pgfire proxy starts PRE runs' USING ERRCODE = '42501';
    END IF;
    RETURN set_config('pgfire.pre_mode', mode || ':' || nextval('pgfire.pre_runs'), true);
END $$;

-- End the session's PRE run: its number is no longer current.
CREATE FUNCTION pgfire.pre_disarm() RETURNS void LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM nextval('pgfire.pre_runs');
END $$;

-- The session's current PRE run (an error before its first).
CREATE FUNCTION pgfire.pre_run() RETURNS bigint LANGUAGE sql SECURITY DEFINER
AS $$ SELECT pg_catalog.currval('pgfire.pre_runs'::pg_catalog.regclass) $$;

CREATE OR REPLACE FUNCTION pgfire.pre_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mode text := coalesce(current_setting('pgfire.pre_mode', true), '');
    n integer;
    lim integer;
    overlay jsonb;
    k text;
    forged boolean;
BEGIN
    IF mode NOT LIKE 'record:%' AND mode NOT LIKE 'apply:%' THEN
        IF current_setting('pgfire.proxied', true) IS NULL THEN
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
    -- The run the mode was armed for must be the session's current one.
    forged := split_part(mode, ':', 3) = '';
    IF NOT forged THEN
        forged := split_part(mode, ':', 3) <> pgfire.pre_run()::text;
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
    IF current_setting('client_min_messages') IN ('warning', 'error') THEN
        RAISE EXCEPTION 'pgfire: client_min_messages = % hides writes from PRE hooks', current_setting('client_min_messages')
            USING ERRCODE = '42501', HINT = 'write tables with PRE hooks with client_min_messages at notice or below';
    END IF;
    RAISE NOTICE USING MESSAGE = 'pgfire:pre', ERRCODE = 'PGF01',
        DETAIL = translate(encode(convert_to(jsonb_build_object(
            'mode', left(mode, 1), 'op', TG_OP, 'oid', TG_RELID::bigint,
            'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
            'new', CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
            'old', CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END)::text, 'UTF8'), 'base64'), E'\n', '');
    RETURN NULL;
END $$;

-- In a session through the proxy, pgfire's triggers on every watched table stay as pgfire made
-- them, whoever runs the DDL and however (a function's EXECUTE included).
CREATE FUNCTION pgfire.pre_guard() RETURNS event_trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t regclass;
BEGIN
    IF current_setting('pgfire.proxied', true) IS NULL THEN
        RETURN;
    END IF;
    FOR t IN SELECT pgfire.pre_tables() LOOP
        IF (SELECT count(*) FROM pg_trigger
             WHERE tgrelid = t AND tgenabled = 'A'
               AND tgname IN ('pgfire_pre_before', 'pgfire_pre_after', 'pgfire_pre_statement')) < 3 THEN
            RAISE EXCEPTION 'pgfire: pgfire''s triggers on % cannot be dropped, renamed or disabled through the pgfire proxy', t
                USING ERRCODE = '42501';
        END IF;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgfire.pre_guard() FROM PUBLIC;

DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        CREATE EVENT TRIGGER pgfire_pre_guard ON ddl_command_end
            WHEN TAG IN ('ALTER TABLE', 'DROP TRIGGER', 'ALTER TRIGGER')
            EXECUTE FUNCTION pgfire.pre_guard();
    ELSE
        RAISE NOTICE 'pgfire: not a superuser, so the owner of a table with PRE hooks can disable pgfire''s triggers on it from a function run through the proxy (statements that do it themselves are refused)';
    END IF;
END $$;
