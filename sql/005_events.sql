-- pgfire 005: custom events, datahub events, auth role columns checked, presets.
-- Runs inside one transaction; `pgfire install` records it in pgfire.migrations.
--
-- * Custom events: a custom event type is a row of pgfire.event_types with custom = true (an
--   INSERT, or subscribing a function to a new name, declares it); pgfire.emit(type, data) writes
--   a transactional logical message (prefix pgfire.emit) the consumer turns into the event.
-- * Datahub events: event triggers (ddl_command_end, sql_drop) on the tables of the schemas in
--   setting datahub_schemas (never pgfire) write transactional messages (prefix pgfire.ddl):
--   created, updated (what changed, against the columns and constraints pgfire.datahub_tables
--   recorded), deleted. Event triggers do not fire for TRUNCATE, so every datahub table gets a
--   statement-level TRUNCATE trigger (pgfire_emptied) that writes the emptied message. Event
--   triggers need a superuser: without one all of this stays off, and a superuser can turn it
--   on later with SELECT pgfire.track_datahub().
-- * Sources: the auth role columns must exist and fit the source's kind; reset_sent_at_column
--   (user sources) and revoked_column (session sources) are new.
-- * Presets: pgfire.use_preset('generic' | 'supabase').

-- Custom event types ---------------------------------------------------------------------------

ALTER TABLE pgfire.event_types ALTER COLUMN description SET DEFAULT 'Custom event emitted with pgfire.emit',
                                ALTER COLUMN phase SET DEFAULT 'post';

-- A new row is a custom event type: a valid name without a built-in prefix, phase post. Only
-- pgfire's migrations (`pgfire install` sets pgfire.migrating) add built-in ones.
CREATE FUNCTION pgfire.check_event_type() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NOT OLD.custom THEN
        IF NEW.name <> OLD.name OR NEW.phase <> OLD.phase OR NEW.custom THEN
            RAISE EXCEPTION 'event type "%" is built in: only its description can change', OLD.name
                USING ERRCODE = '42501';
        END IF;
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' AND NOT NEW.custom AND current_setting('pgfire.migrating', true) = 'on' THEN
        RETURN NEW;
    END IF;
    IF NEW.name ~ '^(PRE_|POST_|auth\.|api\.)' THEN
        RAISE EXCEPTION 'event type "%" uses a prefix reserved for built-in events', NEW.name
            USING ERRCODE = '22023', HINT = 'custom event types may not start with PRE_, POST_, auth. or api.; SELECT name FROM pgfire.events lists the built-in ones';
    END IF;
    IF NEW.name !~ '^[A-Za-z][A-Za-z0-9_.:-]{0,127}$' THEN
        RAISE EXCEPTION 'invalid custom event type "%"', NEW.name
            USING ERRCODE = '22023', HINT = 'use letters, digits, _ . : - (at most 128 characters), starting with a letter, for example ORDER_SHIPPED';
    END IF;
    IF NEW.phase <> 'post' THEN
        RAISE EXCEPTION 'custom event type "%" must have phase post, not %', NEW.name, NEW.phase
            USING ERRCODE = '22023', HINT = 'custom events are emitted once committed, with pgfire.emit; there are no custom PRE events';
    END IF;
    NEW.custom := true;
    RETURN NEW;
END $$;

CREATE TRIGGER check_event_type BEFORE INSERT OR UPDATE ON pgfire.event_types
    FOR EACH ROW EXECUTE FUNCTION pgfire.check_event_type();

-- Emit a custom event: delivered once the calling transaction commits, never if it rolls back.
-- Runs with pgfire's rights, so a role granted EXECUTE on it need not be granted anything else.
CREATE FUNCTION pgfire.emit(event_type text, data jsonb DEFAULT '{}') RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    declared record;
BEGIN
    IF event_type IS NULL OR event_type !~ '^[A-Za-z][A-Za-z0-9_.:-]{0,127}$' THEN
        RAISE EXCEPTION 'invalid event type %', coalesce('"' || event_type || '"', 'NULL')
            USING ERRCODE = '22023', HINT = 'use letters, digits, _ . : -, starting with a letter: SELECT pgfire.emit(''ORDER_SHIPPED'', ''{"id": 1}'')';
    END IF;
    SELECT t.name, t.custom INTO declared FROM pgfire.event_types t WHERE t.name = event_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'event type "%" is not declared', event_type
            USING ERRCODE = '42704',
                  HINT = format('declare it first: INSERT INTO pgfire.event_types (name, description) VALUES (%L, ''what it means''); subscribing a function to it declares it too', event_type);
    END IF;
    IF NOT declared.custom THEN
        RAISE EXCEPTION '"%" is a built-in event type: pgfire.emit sends custom events only', event_type
            USING ERRCODE = '22023', HINT = 'pgfire emits built-in events itself from committed changes; declare a custom event type with a name of its own';
    END IF;
    data := coalesce(data, '{}');
    IF jsonb_typeof(data) <> 'object' THEN
        RAISE EXCEPTION 'the data of event "%" must be a JSON object, not %', event_type, jsonb_typeof(data)
            USING ERRCODE = '22023', HINT = 'it becomes event_data: wrap the value, for example jsonb_build_object(''value'', ...)';
    END IF;
    PERFORM pg_logical_emit_message(true, 'pgfire.emit',
        json_build_object('event_type', event_type, 'data', data)::text);
END $$;
REVOKE ALL ON FUNCTION pgfire.emit(text, jsonb) FROM PUBLIC;

-- Datahub events -------------------------------------------------------------------------------

-- The datahub tables as pgfire last saw them: what an ALTER TABLE changed is the difference.
CREATE TABLE pgfire.datahub_tables (
    table_oid   oid PRIMARY KEY,
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    columns     jsonb NOT NULL,
    constraints jsonb NOT NULL
);
COMMENT ON TABLE pgfire.datahub_tables IS
    'tables of the datahub schemas as pgfire last described them (api.dataTable_updated says what changed since)';

-- The schemas of setting datahub_schemas, never pgfire.
CREATE FUNCTION pgfire.datahub_schemas() RETURNS text[] LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(btrim(s)) FILTER (WHERE btrim(s) NOT IN ('', 'pgfire')), '{}')
      FROM unnest(string_to_array(pgfire.setting('datahub_schemas', 'public'), ',')) s
$$;

-- A table's columns as events describe them (attnum kept here to tell renames, dropped when sent).
CREATE FUNCTION pgfire.table_columns(t oid) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'attnum', a.attnum, 'name', a.attname, 'type', format_type(a.atttypid, a.atttypmod),
               'nullable', NOT a.attnotnull, 'default', pg_get_expr(d.adbin, d.adrelid))
             ORDER BY a.attnum), '[]')
      FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE a.attrelid = t AND a.attnum > 0 AND NOT a.attisdropped
$$;

CREATE FUNCTION pgfire.table_constraints(t oid) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'name', c.conname,
               'type', CASE c.contype WHEN 'p' THEN 'primary key' WHEN 'u' THEN 'unique'
                                      WHEN 'f' THEN 'foreign key' WHEN 'c' THEN 'check' ELSE 'exclusion' END,
               'definition', pg_get_constraintdef(c.oid))
             ORDER BY c.conname), '[]')
      FROM pg_constraint c WHERE c.conrelid = t AND c.contype IN ('p', 'u', 'f', 'c', 'x')
$$;

CREATE FUNCTION pgfire.without_attnum(columns jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_agg(c - 'attnum' ORDER BY (c->>'attnum')::int), '[]')
      FROM jsonb_array_elements(columns) c
$$;

-- What changed between two descriptions of a table; only the keys with something in them.
CREATE FUNCTION pgfire.table_changes(prev pgfire.datahub_tables, cur pgfire.datahub_tables)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    WITH o AS (SELECT c FROM jsonb_array_elements(prev.columns) c),
         n AS (SELECT c FROM jsonb_array_elements(cur.columns) c),
         pairs AS (SELECT o.c AS oc, n.c AS nc FROM o JOIN n ON o.c->'attnum' = n.c->'attnum'),
         altered AS (
             SELECT nc->>'attnum' AS attnum, jsonb_build_object('name', nc->'name')
                    || (SELECT coalesce(jsonb_object_agg(k, jsonb_build_object('old', oc->k, 'new', nc->k)), '{}')
                          FROM unnest(ARRAY['type', 'nullable', 'default']) k WHERE oc->k IS DISTINCT FROM nc->k) AS change
               FROM pairs
              WHERE (oc - 'name') <> (nc - 'name')),
         changes(key, value) AS (VALUES
             ('renamed', CASE WHEN prev.table_name <> cur.table_name
                              THEN jsonb_build_object('old', prev.table_name, 'new', cur.table_name) END),
             ('moved', CASE WHEN prev.schema_name <> cur.schema_name
                            THEN jsonb_build_object('old', prev.schema_name, 'new', cur.schema_name) END),
             ('columns_added', (SELECT jsonb_agg(n.c - 'attnum' ORDER BY (n.c->>'attnum')::int) FROM n
                                 WHERE NOT EXISTS (SELECT FROM o WHERE o.c->'attnum' = n.c->'attnum'))),
             ('columns_dropped', (SELECT jsonb_agg(o.c - 'attnum' ORDER BY (o.c->>'attnum')::int) FROM o
                                   WHERE NOT EXISTS (SELECT FROM n WHERE o.c->'attnum' = n.c->'attnum'))),
             ('columns_renamed', (SELECT jsonb_agg(jsonb_build_object('old', oc->'name', 'new', nc->'name')
                                                   ORDER BY (nc->>'attnum')::int)
                                    FROM pairs WHERE oc->'name' <> nc->'name')),
             ('columns_altered', (SELECT jsonb_agg(change ORDER BY attnum::int) FROM altered)),
             ('constraints_added', (SELECT jsonb_agg(c ORDER BY c->>'name') FROM jsonb_array_elements(cur.constraints) c
                                     WHERE NOT prev.constraints @> jsonb_build_array(c))),
             ('constraints_dropped', (SELECT jsonb_agg(c ORDER BY c->>'name') FROM jsonb_array_elements(prev.constraints) c
                                       WHERE NOT cur.constraints @> jsonb_build_array(c))))
    SELECT coalesce(jsonb_object_agg(key, value), '{}') FROM changes WHERE value IS NOT NULL
$$;

-- Write one datahub message, in the transaction of the statement that caused it.
CREATE FUNCTION pgfire.datahub_message(op text, t pgfire.datahub_tables, changes jsonb DEFAULT NULL)
RETURNS void LANGUAGE sql AS $$
    SELECT pg_logical_emit_message(true, 'pgfire.ddl', json_build_object(
        'op', op, 'schema', t.schema_name, 'table', t.table_name,
        'columns', pgfire.without_attnum(t.columns), 'constraints', t.constraints,
        'changes', changes)::text)
$$;

CREATE FUNCTION pgfire.datahub_truncated() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_logical_emit_message(true, 'pgfire.ddl',
        json_build_object('op', 'emptied', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME)::text);
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION pgfire.datahub_truncated() FROM PUBLIC;

-- Start or stop following a table: its row of pgfire.datahub_tables and its TRUNCATE trigger.
CREATE FUNCTION pgfire.datahub_follow(t oid) RETURNS pgfire.datahub_tables
LANGUAGE plpgsql AS $$
DECLARE
    d pgfire.datahub_tables;
BEGIN
    SELECT c.oid, n.nspname, c.relname, pgfire.table_columns(c.oid), pgfire.table_constraints(c.oid)
      INTO d FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = t;
    INSERT INTO pgfire.datahub_tables VALUES (d.*)
        ON CONFLICT (table_oid) DO UPDATE SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name,
                                              columns = EXCLUDED.columns, constraints = EXCLUDED.constraints;
    IF NOT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = t AND tgname = 'pgfire_emptied') THEN
        BEGIN
            EXECUTE format('CREATE TRIGGER pgfire_emptied AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION pgfire.datahub_truncated()', t::regclass);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'pgfire: cannot place the TRUNCATE trigger of datahub table %: %', t::regclass, SQLERRM
                USING HINT = 'its TRUNCATE gives no api.dataTable_emptied until a superuser runs SELECT pgfire.track_datahub()';
        END;
    END IF;
    RETURN d;
END $$;

CREATE FUNCTION pgfire.datahub_unfollow(t oid) RETURNS pgfire.datahub_tables
LANGUAGE plpgsql AS $$
DECLARE
    d pgfire.datahub_tables;
BEGIN
    DELETE FROM pgfire.datahub_tables WHERE table_oid = t RETURNING * INTO d;
    IF EXISTS (SELECT FROM pg_trigger WHERE tgrelid = t AND tgname = 'pgfire_emptied') THEN
        EXECUTE format('DROP TRIGGER pgfire_emptied ON %s', t::regclass);
    END IF;
    RETURN d;
END $$;

-- The tables that are datahub tables now: ordinary and partitioned tables (not partitions, not
-- temporary, not of an extension) of the datahub schemas.
CREATE FUNCTION pgfire.datahub_candidates() RETURNS SETOF oid LANGUAGE sql STABLE AS $$
    SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence <> 't'
       AND n.nspname = ANY (pgfire.datahub_schemas())
       AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
$$;

-- Follow exactly the datahub tables of today's setting (no events: nothing was created or
-- dropped). Runs at install, when datahub_schemas changes, and from pgfire.track_datahub().
CREATE FUNCTION pgfire.datahub_sync() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t oid;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'pgfire_datahub_ddl') THEN
        RETURN;
    END IF;
    FOR t IN SELECT table_oid FROM pgfire.datahub_tables
              WHERE table_oid NOT IN (SELECT pgfire.datahub_candidates()) LOOP
        PERFORM pgfire.datahub_unfollow(t);
    END LOOP;
    FOR t IN SELECT pgfire.datahub_candidates() LOOP
        PERFORM pgfire.datahub_follow(t);
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgfire.datahub_sync() FROM PUBLIC;

CREATE FUNCTION pgfire.datahub_setting_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (TG_OP <> 'DELETE' AND NEW.key = 'datahub_schemas') OR (TG_OP <> 'INSERT' AND OLD.key = 'datahub_schemas') THEN
        PERFORM pgfire.datahub_sync();
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER datahub_setting_changed AFTER INSERT OR UPDATE OR DELETE ON pgfire.settings
    FOR EACH ROW EXECUTE FUNCTION pgfire.datahub_setting_changed();

-- CREATE TABLE and ALTER TABLE of every role, with the installing role's rights. A failure here
-- is a warning, never the user's command failing.
CREATE FUNCTION pgfire.datahub_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t oid;
    old pgfire.datahub_tables;
    new pgfire.datahub_tables;
    changes jsonb;
BEGIN
    IF to_regclass('pgfire.datahub_tables') IS NULL THEN
        RETURN;
    END IF;
    FOR t IN
        SELECT DISTINCT d.objid FROM pg_event_trigger_ddl_commands() d
         WHERE d.classid = 'pg_class'::regclass AND NOT d.in_extension
           AND EXISTS (SELECT FROM pg_class c WHERE c.oid = d.objid AND c.relkind IN ('r', 'p'))
    LOOP
        BEGIN
            SELECT * INTO old FROM pgfire.datahub_tables WHERE table_oid = t;
            IF t IN (SELECT pgfire.datahub_candidates()) THEN
                new := pgfire.datahub_follow(t);
                IF old.table_oid IS NULL THEN
                    PERFORM pgfire.datahub_message('created', new);
                ELSE
                    changes := pgfire.table_changes(old, new);
                    IF changes <> '{}' THEN
                        PERFORM pgfire.datahub_message('updated', new, changes);
                    END IF;
                END IF;
            ELSIF old.table_oid IS NOT NULL THEN
                -- Moved out of the datahub schemas (or became a partition): gone from the datahub.
                PERFORM pgfire.datahub_unfollow(t);
                PERFORM pgfire.datahub_message('deleted', old);
            END IF;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'pgfire: no datahub event for table %: %', t, SQLERRM;
        END;
    END LOOP;
    -- Tables whose standing changed without the command naming them: a table attached as a
    -- partition leaves the datahub, one detached joins it.
    BEGIN
        FOR t IN SELECT c FROM pgfire.datahub_candidates() c
                  WHERE c NOT IN (SELECT table_oid FROM pgfire.datahub_tables) LOOP
            PERFORM pgfire.datahub_message('created', pgfire.datahub_follow(t));
        END LOOP;
        FOR t IN SELECT table_oid FROM pgfire.datahub_tables
                  WHERE table_oid NOT IN (SELECT pgfire.datahub_candidates()) LOOP
            PERFORM pgfire.datahub_message('deleted', pgfire.datahub_unfollow(t));
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pgfire: datahub tables not reconciled: %', SQLERRM;
    END;
END $$;
REVOKE ALL ON FUNCTION pgfire.datahub_ddl() FROM PUBLIC;

CREATE FUNCTION pgfire.datahub_dropped() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    old pgfire.datahub_tables;
BEGIN
    IF to_regclass('pgfire.datahub_tables') IS NULL THEN
        RETURN; -- schema pgfire itself is being dropped
    END IF;
    FOR old IN
        DELETE FROM pgfire.datahub_tables t USING pg_event_trigger_dropped_objects() d
         WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND d.objid = t.table_oid
        RETURNING t.*
    LOOP
        PERFORM pgfire.datahub_message('deleted', old);
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgfire.datahub_dropped() FROM PUBLIC;

-- Install the event triggers when the current role may (a superuser); true when they are in place.
CREATE FUNCTION pgfire.track_datahub() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'pgfire_datahub_ddl') THEN
        IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            RAISE WARNING 'role % is not a superuser, so pgfire cannot create the event triggers of the datahub events (api.dataTable_*): they stay off; everything else works', current_user
                USING HINT = 'have a superuser run SELECT pgfire.track_datahub()';
            RETURN false;
        END IF;
        CREATE EVENT TRIGGER pgfire_datahub_ddl ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
            EXECUTE FUNCTION pgfire.datahub_ddl();
        CREATE EVENT TRIGGER pgfire_datahub_dropped ON sql_drop EXECUTE FUNCTION pgfire.datahub_dropped();
    END IF;
    PERFORM pgfire.datahub_sync();
    RETURN true;
END $$;

SELECT pgfire.track_datahub();

-- Sources: auth role columns -------------------------------------------------------------------

ALTER TABLE pgfire.sources ADD COLUMN reset_sent_at_column text, ADD COLUMN revoked_column text;
COMMENT ON COLUMN pgfire.sources.reset_sent_at_column IS
    'user sources: when the reset was requested, for schemas that clear the reset token when its link is followed (GoTrue recovery_sent_at)';
COMMENT ON COLUMN pgfire.sources.revoked_column IS
    'session sources: a flag or timestamp set when the session is revoked (POST_LOGOUT), for schemas that revoke rather than delete';

-- The role columns must exist, and fit the kind: user sources have the user's columns, session
-- sources the column naming their user, record sources none. Runs before register_source.
CREATE FUNCTION pgfire.check_source_roles() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    user_roles jsonb := jsonb_strip_nulls(jsonb_build_object(
        'password_column', NEW.password_column, 'email_verified_column', NEW.email_verified_column,
        'verification_token_column', NEW.verification_token_column, 'reset_token_column', NEW.reset_token_column,
        'reset_sent_at_column', NEW.reset_sent_at_column, 'last_sign_in_column', NEW.last_sign_in_column));
    session_roles jsonb := jsonb_strip_nulls(jsonb_build_object(
        'user_id_column', NEW.user_id_column, 'revoked_column', NEW.revoked_column));
    r record;
    known text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_class WHERE oid = NEW.table_name) THEN
        RETURN NEW; -- register_source says what is wrong
    END IF;
    IF NEW.kind = 'record' AND (user_roles || session_roles) <> '{}' THEN
        RAISE EXCEPTION 'source % is of kind record, which has no auth role columns (% set)', NEW.table_name,
                (SELECT string_agg(k, ', ') FROM jsonb_object_keys(user_roles || session_roles) k)
            USING ERRCODE = '22023',
                  HINT = 'auth events come from a users table of kind ''user'' (password, email-verified, token and last sign-in columns) and a sessions table of kind ''session'' (user_id_column): set kind, or set those columns to NULL';
    END IF;
    IF NEW.kind = 'user' AND session_roles <> '{}' THEN
        RAISE EXCEPTION 'source % is of kind user, which has no % (columns of a sessions table)', NEW.table_name,
                (SELECT string_agg(k, ', ') FROM jsonb_object_keys(session_roles) k)
            USING ERRCODE = '22023',
                  HINT = 'a user source names its users with id_column; user_id_column is for a sessions table of kind ''session'', naming the user of each session';
    END IF;
    IF NEW.kind = 'session' THEN
        IF user_roles <> '{}' THEN
            RAISE EXCEPTION 'source % is of kind session, which has no % (columns of the users table)', NEW.table_name,
                    (SELECT string_agg(k, ', ') FROM jsonb_object_keys(user_roles) k)
                USING ERRCODE = '22023',
                      HINT = 'set them on the users table''s source (kind ''user''); a session source takes user_id_column only';
        END IF;
        IF NEW.user_id_column IS NULL THEN
            IF EXISTS (SELECT FROM pg_attribute WHERE attrelid = NEW.table_name AND attname = 'user_id' AND attnum > 0 AND NOT attisdropped) THEN
                NEW.user_id_column := 'user_id';
            ELSE
                RAISE EXCEPTION 'session source % needs user_id_column, the column naming each session''s user', NEW.table_name
                    USING ERRCODE = '23502',
                          HINT = format('for example INSERT INTO pgfire.sources (table_name, kind, user_id_column) VALUES (%L, ''session'', ''owner_id'')', NEW.table_name::text);
            END IF;
        END IF;
    END IF;
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO known
      FROM pg_attribute WHERE attrelid = NEW.table_name AND attnum > 0 AND NOT attisdropped;
    FOR r IN SELECT key, value #>> '{}' AS col
               FROM jsonb_each(user_roles || jsonb_strip_nulls(jsonb_build_object(
                        'user_id_column', NEW.user_id_column, 'revoked_column', NEW.revoked_column))) LOOP
        IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = NEW.table_name AND attname = r.col AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION '% "%" is not a column of %', r.key, r.col, NEW.table_name
                USING ERRCODE = '42703',
                      HINT = format('its columns are %s: set %s to one of them, or to NULL', known, r.key);
        END IF;
    END LOOP;
    RETURN NEW;
END $$;

CREATE TRIGGER check_source_roles BEFORE INSERT OR UPDATE ON pgfire.sources
    FOR EACH ROW EXECUTE FUNCTION pgfire.check_source_roles();

-- Presets --------------------------------------------------------------------------------------

-- Register (or re-register) a source with its roles.
CREATE FUNCTION pgfire.preset_source(t regclass, kind text, roles jsonb) RETURNS void LANGUAGE sql AS $$
    INSERT INTO pgfire.sources (table_name, kind, id_column, password_column, email_verified_column,
                                verification_token_column, reset_token_column, reset_sent_at_column,
                                last_sign_in_column, user_id_column, revoked_column)
    VALUES (t, kind, roles->>'id_column', roles->>'password_column', roles->>'email_verified_column',
            roles->>'verification_token_column', roles->>'reset_token_column', roles->>'reset_sent_at_column',
            roles->>'last_sign_in_column', roles->>'user_id_column', roles->>'revoked_column')
    ON CONFLICT (table_name) DO UPDATE SET
        kind = EXCLUDED.kind, id_column = EXCLUDED.id_column, password_column = EXCLUDED.password_column,
        email_verified_column = EXCLUDED.email_verified_column,
        verification_token_column = EXCLUDED.verification_token_column,
        reset_token_column = EXCLUDED.reset_token_column, reset_sent_at_column = EXCLUDED.reset_sent_at_column,
        last_sign_in_column = EXCLUDED.last_sign_in_column, user_id_column = EXCLUDED.user_id_column,
        revoked_column = EXCLUDED.revoked_column
$$;

-- The columns a preset needs that an existing table lacks, as one error naming them.
CREATE FUNCTION pgfire.preset_needs(preset text, t regclass, columns text[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    missing text;
BEGIN
    SELECT string_agg(c, ', ') INTO missing FROM unnest(columns) c
     WHERE NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = t AND attname = c AND attnum > 0 AND NOT attisdropped);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'table % lacks column(s) % that the % preset uses', t, missing, preset
            USING ERRCODE = '42703',
                  HINT = format('add them (the README documents the %s schema), or register the table yourself: INSERT INTO pgfire.sources (table_name, kind, ...) with your column names', preset);
    END IF;
END $$;

CREATE FUNCTION pgfire.use_preset(preset text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    missing text;
BEGIN
    CASE preset
    WHEN 'generic' THEN
        CREATE TABLE IF NOT EXISTS public.users (
            id                 bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            email              text NOT NULL UNIQUE,
            password_hash      text,
            email_verified_at  timestamptz,
            verification_token text,
            reset_token        text,
            last_sign_in_at    timestamptz,
            created_at         timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE IF NOT EXISTS public.sessions (
            id         bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            user_id    bigint NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
            created_at timestamptz NOT NULL DEFAULT now(),
            user_agent text,
            ip         inet,
            revoked_at timestamptz
        );
        PERFORM pgfire.preset_needs('generic', 'public.users',
            ARRAY['id', 'email', 'password_hash', 'email_verified_at', 'verification_token', 'reset_token', 'last_sign_in_at']);
        PERFORM pgfire.preset_needs('generic', 'public.sessions', ARRAY['user_id', 'revoked_at']);
        PERFORM pgfire.preset_source('public.users', 'user', jsonb_build_object(
            'id_column', 'id', 'password_column', 'password_hash', 'email_verified_column', 'email_verified_at',
            'verification_token_column', 'verification_token', 'reset_token_column', 'reset_token',
            'last_sign_in_column', 'last_sign_in_at'));
        PERFORM pgfire.preset_source('public.sessions', 'session',
            jsonb_build_object('user_id_column', 'user_id', 'revoked_column', 'revoked_at'));
        RETURN 'generic preset: public.users (user) and public.sessions (session) registered';
    WHEN 'supabase' THEN
        SELECT string_agg(t, ' and ') INTO missing FROM unnest(ARRAY['auth.users', 'auth.sessions']) t
         WHERE to_regclass(t) IS NULL;
        IF missing IS NOT NULL THEN
            RAISE EXCEPTION 'the supabase preset needs the Supabase Auth (GoTrue) tables auth.users and auth.sessions; this database lacks %', missing
                USING ERRCODE = '42P01',
                      HINT = 'run it on a database where Supabase Auth has run its migrations, or use SELECT pgfire.use_preset(''generic'') for tables of your own';
        END IF;
        PERFORM pgfire.preset_needs('supabase', 'auth.users',
            ARRAY['id', 'encrypted_password', 'email_confirmed_at', 'confirmation_token', 'recovery_token',
                  'recovery_sent_at', 'last_sign_in_at']);
        PERFORM pgfire.preset_needs('supabase', 'auth.sessions', ARRAY['user_id']);
        PERFORM pgfire.preset_source('auth.users', 'user', jsonb_build_object(
            'id_column', 'id', 'password_column', 'encrypted_password', 'email_verified_column', 'email_confirmed_at',
            'verification_token_column', 'confirmation_token', 'reset_token_column', 'recovery_token',
            'reset_sent_at_column', 'recovery_sent_at', 'last_sign_in_column', 'last_sign_in_at'));
        PERFORM pgfire.preset_source('auth.sessions', 'session', jsonb_build_object('user_id_column', 'user_id'));
        RETURN 'supabase preset: auth.users (user) and auth.sessions (session) registered';
    ELSE
        RAISE EXCEPTION 'unknown preset %', coalesce('"' || preset || '"', 'NULL')
            USING ERRCODE = '22023', HINT = 'the presets are generic (tables public.users and public.sessions, created if absent) and supabase (Supabase Auth''s auth.users and auth.sessions)';
    END CASE;
END $$;

-- What `pgfire events` says of the events this migration makes fire.
UPDATE pgfire.event_types AS t SET description = d.description FROM (VALUES
    ('api.dataTable_created', 'A table was created in a datahub schema (setting datahub_schemas); carries its columns and constraints'),
    ('api.dataTable_updated', 'A datahub table was altered (columns added, dropped, renamed or retyped, constraints, the table renamed); carries what changed'),
    ('api.dataTable_emptied', 'A datahub table was emptied (TRUNCATE)'),
    ('api.dataTable_deleted', 'A datahub table was dropped (or moved out of the datahub schemas)'),
    ('POST_LOGIN', 'After successful login: a session row inserted, or the last sign-in column advanced (once per user and transaction)'),
    ('POST_LOGOUT', 'After user logout: a session row deleted'),
    ('POST_PASSWORD_RESET', 'After password reset: the password changed while a reset was pending (an admin setting it is none)'),
    ('auth.user_loggedIn', 'Emitted whenever a user logs in (with POST_LOGIN)'),
    ('auth.user_signedUp', 'Emitted whenever a user signs up: a user row inserted'),
    ('auth.email_verificationRequested', 'Emitted whenever the email verification is requested (a verification token set); carries token, link and expires_at (one day)'),
    ('auth.email_verified', 'Emitted whenever the email verification is successful (the verified flag or timestamp set)'),
    ('auth.password_resetRequested', 'Emitted whenever the password reset was requested (a reset token set); carries token, link and expires_at (one hour)'),
    ('auth.password_reset', 'Emitted whenever the password reset was successful; changing the password as an admin does not trigger it')
) AS d (name, description)
WHERE t.name = d.name;
