-- pgfire 002: configuration validated when it is written, not found broken at run time.
-- Runs inside one transaction; `pgfire install` records it in pgfire.migrations.
--
-- * pgfire.settings: every numeric key pgfire knows has an allowed range; link templates contain
--   {token}; datahub_schemas is a list of schema names. Keys pgfire does not know are accepted as
--   they are (and ignored by pgfire). Lowering limits.timeout_ms below a function's timeout_ms is
--   refused, naming the function.
-- * pgfire.functions: a whsec_ secret must decode; a sql target must be a plain function.
-- * pgfire.sources: dropping a source table deletes its row (an event trigger, which needs a
--   superuser); without it, the row of a dropped table stays editable and deletable.

-- The range of each numeric setting; NULLs for a key without one. A later migration that adds a
-- numeric key replaces this function with its own list.
CREATE FUNCTION pgfire.setting_range(setting text, OUT min_value bigint, OUT max_value bigint,
                                     OUT default_value bigint, OUT unit text)
LANGUAGE sql IMMUTABLE AS $$
    SELECT r.min_value::bigint, r.max_value::bigint, r.default_value::bigint, r.unit FROM (VALUES
        ('limits.subscriptions_per_event', 1, 1000, 10, 'subscriptions'),
        ('limits.timeout_ms', 1, 300000, 10000, 'ms'),
        ('limits.payload_bytes', 1024, 104857600, 1048576, 'bytes'),
        ('delivery.max_attempts', 1, 100, 5, 'attempts'),
        ('delivery.retry_base_ms', 1, 3600000, 200, 'ms'),
        ('delivery.retry_max_ms', 1, 3600000, 10000, 'ms'),
        ('auth.verification_ttl_seconds', 60, 31536000, 86400, 's'),
        ('auth.reset_ttl_seconds', 60, 31536000, 3600, 's')
    ) AS r (key, min_value, max_value, default_value, unit)
    WHERE r.key = setting
$$;

-- Raise a clear error (SQLSTATE 22023, with a hint) when `value` is not valid for `setting`.
CREATE FUNCTION pgfire.check_setting(setting text, value text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    r record;
    schema_name text;
BEGIN
    SELECT * INTO r FROM pgfire.setting_range(setting);
    IF r.min_value IS NOT NULL THEN
        IF btrim(value) ~ '^[0-9]{1,18}$' THEN
            IF btrim(value)::bigint BETWEEN r.min_value AND r.max_value THEN
                RETURN;
            END IF;
        END IF;
        RAISE EXCEPTION 'setting % must be an integer from % to % (%), not "%"',
                setting, r.min_value, r.max_value, r.unit, value
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('the default is %s: UPDATE pgfire.settings SET value = %L WHERE key = %L',
                                r.default_value, r.default_value, setting);
    END IF;
    IF setting IN ('auth.verification_link', 'auth.reset_link') AND strpos(value, '{token}') = 0 THEN
        RAISE EXCEPTION 'setting % must contain {token}, not "%"', setting, value
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'pgfire replaces {token} with the token, for example https://app.example.com/verify?token={token}';
    END IF;
    IF setting = 'datahub_schemas' THEN
        FOREACH schema_name IN ARRAY string_to_array(value, ',') LOOP
            -- An unquoted identifier: ASCII letters, digits, _ and $, and any non-ASCII letter.
            IF btrim(schema_name) !~ '^[A-Za-z_\u0080-\U0010FFFF][A-Za-z0-9_$\u0080-\U0010FFFF]*$'
               OR octet_length(btrim(schema_name)) > 63 THEN
                RAISE EXCEPTION 'setting datahub_schemas must be a comma-separated list of schema names, not "%"', value
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'for example public, or public,app (unquoted names; empty for none)';
            END IF;
        END LOOP;
    END IF;
END $$;

CREATE FUNCTION pgfire.check_settings() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    limit_ms bigint;
    over text;
BEGIN
    IF TG_OP <> 'DELETE' THEN
        PERFORM pgfire.check_setting(NEW.key, NEW.value);
    END IF;
    -- The handler timeout limit must still admit every function's timeout_ms (a deleted limit
    -- falls back to its default).
    IF (TG_OP <> 'DELETE' AND NEW.key = 'limits.timeout_ms')
       OR (TG_OP <> 'INSERT' AND OLD.key = 'limits.timeout_ms') THEN
        IF TG_OP <> 'DELETE' AND NEW.key = 'limits.timeout_ms' THEN
            limit_ms := btrim(NEW.value)::bigint;
        ELSE
            limit_ms := (pgfire.setting_range('limits.timeout_ms')).default_value;
        END IF;
        SELECT string_agg(format('"%s" (%s ms)', name, timeout_ms), ', ' ORDER BY timeout_ms DESC, name)
          INTO over FROM pgfire.functions WHERE timeout_ms > limit_ms;
        IF over IS NOT NULL THEN
            RAISE EXCEPTION 'limits.timeout_ms % is below the timeout_ms of function %', limit_ms, over
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'lower the timeout_ms of those functions first (UPDATE pgfire.functions SET timeout_ms = ...), then the limit';
        END IF;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER check_settings BEFORE INSERT OR UPDATE OR DELETE ON pgfire.settings
    FOR EACH ROW EXECUTE FUNCTION pgfire.check_settings();

-- Settings written before this migration are checked now: an invalid one stops the upgrade with
-- the key and its allowed range (fix it, then run pgfire install again).
DO $$
DECLARE
    s record;
BEGIN
    FOR s IN SELECT key, value FROM pgfire.settings ORDER BY key LOOP
        PERFORM pgfire.check_setting(s.key, s.value);
    END LOOP;
END $$;

-- Functions: as in 001, plus a secret that must decode and a sql target that must be a function.
CREATE OR REPLACE FUNCTION pgfire.check_function() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    max_timeout integer := pgfire.setting('limits.timeout_ms', '10000')::integer;
    key bytea;
    fn regprocedure;
    fn_kind "char";
BEGIN
    IF NEW.name !~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid function name "%"', NEW.name
            USING ERRCODE = '22023', HINT = 'use letters, digits, _ . : - (at most 63 characters), starting with a letter or _';
    END IF;
    IF NEW.kind NOT IN ('webhook', 'sql', 'nats', 'log') THEN
        RAISE EXCEPTION 'unknown function kind "%"', NEW.kind
            USING ERRCODE = '22023', HINT = 'kind is one of webhook, sql, nats, log';
    END IF;
    IF NEW.timeout_ms < 1 OR NEW.timeout_ms > max_timeout THEN
        RAISE EXCEPTION 'timeout_ms % of function "%" is out of range', NEW.timeout_ms, NEW.name
            USING ERRCODE = '22023', HINT = format('a handler may run at most %s ms (setting limits.timeout_ms)', max_timeout);
    END IF;
    IF NEW.on_error NOT IN ('allow', 'block') THEN
        RAISE EXCEPTION 'on_error must be allow or block, not "%"', NEW.on_error USING ERRCODE = '22023';
    END IF;
    IF NEW.kind <> 'log' AND coalesce(NEW.target, '') = '' THEN
        RAISE EXCEPTION 'function "%" of kind % needs a target', NEW.name, NEW.kind
            USING ERRCODE = '23502', HINT = CASE NEW.kind WHEN 'webhook' THEN 'target is the URL to POST to'
                                                          WHEN 'sql' THEN 'target is the name of a SQL function taking jsonb'
                                                          ELSE 'target is the NATS subject prefix' END;
    END IF;
    IF NEW.kind = 'webhook' THEN
        IF NEW.target !~* '^https?://[^/\s]+' THEN
            RAISE EXCEPTION 'webhook target "%" is not an http(s) URL', NEW.target
                USING ERRCODE = '22023', HINT = 'for example https://example.com/hooks/pgfire';
        END IF;
        IF NEW.secret IS NULL THEN
            NEW.secret := 'whsec_' || encode(decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'), 'base64');
        END IF;
    END IF;
    IF NEW.secret IS NOT NULL THEN
        IF NEW.secret !~ '^whsec_[A-Za-z0-9+/]+={0,2}$' THEN
            RAISE EXCEPTION 'secret of function "%" must be whsec_ followed by base64', NEW.name
                USING ERRCODE = '22023', HINT = 'leave it NULL to have one generated';
        END IF;
        -- Standard base64 with its padding, as the webhook signer decodes it: it must decode, and
        -- encode back to the same text (no stray bits in the last character).
        BEGIN
            key := decode(substr(NEW.secret, 7), 'base64');
        EXCEPTION WHEN data_exception THEN
            key := NULL;
        END;
        IF key IS NULL OR replace(encode(key, 'base64'), E'\n', '') <> substr(NEW.secret, 7) THEN
            RAISE EXCEPTION 'secret of function "%" is not valid base64 after whsec_', NEW.name
                USING ERRCODE = '22023',
                      HINT = 'the part after whsec_ is standard base64 with = padding to a multiple of 4 characters; leave it NULL to have one generated';
        END IF;
    END IF;
    IF NEW.kind = 'sql' THEN
        fn := to_regprocedure(NEW.target || '(jsonb)');
        IF fn IS NULL THEN
            RAISE EXCEPTION 'SQL function %(jsonb) does not exist', NEW.target
                USING ERRCODE = '42883', HINT = 'create it first: CREATE FUNCTION ' || NEW.target || '(event jsonb) RETURNS jsonb ...';
        END IF;
        SELECT prokind INTO fn_kind FROM pg_proc WHERE oid = fn;
        IF fn_kind <> 'f' THEN
            RAISE EXCEPTION '% is % and cannot be the target of function "%"', fn,
                    CASE fn_kind WHEN 'p' THEN 'a procedure' WHEN 'a' THEN 'an aggregate' ELSE 'a window function' END,
                    NEW.name
                USING ERRCODE = '42809',
                      HINT = 'pgfire runs SELECT target($1::jsonb): the target is a plain function, CREATE FUNCTION ' || NEW.target || '(event jsonb) RETURNS jsonb ...';
        END IF;
    END IF;
    RETURN NEW;
END $$;

-- Sources: the row of a dropped table can still be updated (it is left as it is) and deleted; a
-- new row must name a table that exists.
CREATE OR REPLACE FUNCTION pgfire.register_source() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    rel record;
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        IF TG_OP = 'DELETE' OR OLD.table_name <> NEW.table_name THEN
            IF pgfire.published(OLD.table_name) THEN
                EXECUTE format('ALTER PUBLICATION pgfire DROP TABLE %s', OLD.table_name);
            END IF;
        END IF;
        IF TG_OP = 'DELETE' THEN
            RETURN OLD;
        END IF;
    END IF;
    SELECT c.relkind, c.relreplident, c.relnamespace, pg_get_userbyid(c.relowner) AS owner,
           pg_has_role(c.relowner, 'USAGE') AS owned
      INTO rel FROM pg_class c WHERE c.oid = NEW.table_name;
    IF NOT FOUND THEN
        IF TG_OP = 'UPDATE' AND OLD.table_name = NEW.table_name THEN
            RETURN NEW; -- its table was dropped: nothing to check, nothing to publish
        END IF;
        RAISE EXCEPTION 'table with OID % does not exist', NEW.table_name::oid
            USING ERRCODE = '42P01', HINT = 'name the table: INSERT INTO pgfire.sources (table_name, kind) VALUES (''public.users'', ''user'')';
    END IF;
    IF rel.relnamespace = 'pgfire'::regnamespace THEN
        RAISE EXCEPTION '% is one of pgfire''s own tables and cannot be a source', NEW.table_name
            USING ERRCODE = '42809', HINT = 'pgfire writes its history there: events about it would trigger themselves';
    END IF;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', NEW.table_name
            USING ERRCODE = '42809', HINT = 'sources are ordinary or partitioned tables';
    END IF;
    IF NOT rel.owned THEN
        RAISE EXCEPTION 'cannot register % as a source: it is owned by %', NEW.table_name, rel.owner
            USING ERRCODE = '42501',
                  HINT = format('adding it to the publication and setting REPLICA IDENTITY FULL (so updates carry old values) needs its owner: run this as %s, or GRANT %s TO %s', rel.owner, rel.owner, current_user);
    END IF;
    IF NEW.kind IN ('user', 'record') AND NEW.id_column IS NULL THEN
        SELECT a.attname INTO NEW.id_column
          FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = NEW.table_name AND i.indisprimary AND i.indnatts = 1;
    END IF;
    IF NEW.id_column IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pg_attribute WHERE attrelid = NEW.table_name AND attname = NEW.id_column AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'column "%" of % does not exist', NEW.id_column, NEW.table_name USING ERRCODE = '42703';
    END IF;
    IF rel.relreplident <> 'f' THEN
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', NEW.table_name);
    END IF;
    IF NOT pgfire.published(NEW.table_name) THEN
        EXECUTE format('ALTER PUBLICATION pgfire ADD TABLE %s', NEW.table_name);
    END IF;
    RETURN NEW;
END $$;

-- Rows of sources whose table is already gone.
DELETE FROM pgfire.sources s WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = s.table_name::oid);

-- Dropping a source table deletes its row. Runs as its owner (the role that installed pgfire),
-- so that any role may drop its own tables; it touches nothing but the rows of tables just dropped.
CREATE FUNCTION pgfire.source_dropped() RETURNS event_trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF to_regclass('pgfire.sources') IS NULL THEN
        RETURN; -- schema pgfire itself is being dropped
    END IF;
    IF EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() d JOIN pgfire.sources s ON s.table_name::oid = d.objid
                WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0) THEN
        DELETE FROM pgfire.sources s USING pg_event_trigger_dropped_objects() d
         WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND s.table_name::oid = d.objid;
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgfire.source_dropped() FROM PUBLIC;

-- Install the event trigger when the current role may (a superuser); true when it is in place.
-- A role that is not a superuser gets a warning, and a superuser can call this later.
CREATE FUNCTION pgfire.track_dropped_sources() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'pgfire_source_dropped') THEN
        RETURN true;
    END IF;
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RAISE WARNING 'role % is not a superuser: dropping a source table will not delete its pgfire.sources row', current_user
            USING HINT = 'delete such rows yourself, or have a superuser run SELECT pgfire.track_dropped_sources()';
        RETURN false;
    END IF;
    CREATE EVENT TRIGGER pgfire_source_dropped ON sql_drop EXECUTE FUNCTION pgfire.source_dropped();
    RETURN true;
END $$;

SELECT pgfire.track_dropped_sources();
