-- pgfire 001: configuration tables, event catalog, execution history.
-- Runs inside one transaction; `pgfire install` records it in pgfire.migrations.

CREATE TABLE pgfire.settings (
    key         text PRIMARY KEY,
    value       text NOT NULL,
    description text
);

INSERT INTO pgfire.settings (key, value, description) VALUES
    ('datahub_schemas', 'public', 'comma-separated schemas whose tables are datahub tables (api.dataTable_* events)'),
    ('limits.subscriptions_per_event', '10', 'most active subscriptions one event type may have'),
    ('limits.timeout_ms', '10000', 'longest handler timeout a function may set, in milliseconds'),
    ('limits.payload_bytes', '1048576', 'largest event envelope delivered, in bytes'),
    ('delivery.max_attempts', '5', 'attempts of a failing POST run before it is recorded as dead'),
    ('delivery.retry_base_ms', '200', 'first retry delay; doubles with each attempt'),
    ('delivery.retry_max_ms', '10000', 'longest retry delay'),
    ('auth.verification_link', 'http://localhost:3000/verify?token={token}', 'link template of auth.email_verificationRequested'),
    ('auth.verification_ttl_seconds', '86400', 'validity of an email verification token'),
    ('auth.reset_link', 'http://localhost:3000/reset-password?token={token}', 'link template of auth.password_resetRequested'),
    ('auth.reset_ttl_seconds', '3600', 'validity of a password reset token');

CREATE TABLE pgfire.event_types (
    name        text PRIMARY KEY,
    phase       text NOT NULL CHECK (phase IN ('pre', 'post')),
    description text NOT NULL,
    custom      boolean NOT NULL DEFAULT false
);

INSERT INTO pgfire.event_types (name, phase, description) VALUES
    ('PRE_USER_CREATE',    'pre',  'Before a new user is created'),
    ('POST_USER_CREATE',   'post', 'After a new user is created'),
    ('PRE_USER_UPDATE',    'pre',  'Before a user is updated'),
    ('POST_USER_UPDATE',   'post', 'After a user is updated'),
    ('PRE_USER_DELETE',    'pre',  'Before a user is deleted'),
    ('POST_USER_DELETE',   'post', 'After a user is deleted'),
    ('POST_LOGIN',         'post', 'After successful login'),
    ('POST_LOGOUT',        'post', 'After user logout'),
    ('POST_PASSWORD_RESET','post', 'After password reset'),
    ('PRE_RECORD_CREATE',  'pre',  'Before a record is created'),
    ('POST_RECORD_CREATE', 'post', 'After a record is created'),
    ('PRE_RECORD_UPDATE',  'pre',  'Before a record is updated'),
    ('POST_RECORD_UPDATE', 'post', 'After a record is updated'),
    ('PRE_RECORD_DELETE',  'pre',  'Before a record is deleted'),
    ('POST_RECORD_DELETE', 'post', 'After a record is deleted'),
    ('api.dataTable_created', 'post', 'Emitted on every table creation'),
    ('api.dataTable_updated', 'post', 'Emitted on every table update'),
    ('api.dataTable_emptied', 'post', 'Emitted whenever a table is cleared'),
    ('api.dataTable_deleted', 'post', 'Emitted whenever a table is deleted'),
    ('auth.user_loggedIn', 'post', 'Emitted whenever a user logs in'),
    ('auth.user_signedUp', 'post', 'Emitted whenever a user signs up'),
    ('auth.email_verificationRequested', 'post', 'Emitted whenever the email verification is requested; the token and link are valid for one day'),
    ('auth.email_verified', 'post', 'Emitted whenever the email verification is successful'),
    ('auth.password_resetRequested', 'post', 'Emitted whenever the password reset was requested; the token and link are valid for one hour'),
    ('auth.password_reset', 'post', 'Emitted whenever the password reset was successful; changing the password as an admin does not trigger it');

CREATE TABLE pgfire.functions (
    name        text PRIMARY KEY,
    kind        text NOT NULL,
    target      text,
    timeout_ms  integer NOT NULL DEFAULT 10000,
    secret      text,
    on_error    text NOT NULL DEFAULT 'block',
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pgfire.subscriptions (
    event_type    text NOT NULL REFERENCES pgfire.event_types (name) ON UPDATE CASCADE,
    function_name text NOT NULL REFERENCES pgfire.functions (name) ON DELETE CASCADE ON UPDATE CASCADE,
    priority      integer NOT NULL DEFAULT 0,
    active        boolean NOT NULL DEFAULT true,
    subscribed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_type, function_name)
);

CREATE TABLE pgfire.sources (
    table_name                regclass PRIMARY KEY,
    kind                      text NOT NULL CHECK (kind IN ('user', 'record', 'session')),
    id_column                 text,
    password_column           text,
    email_verified_column     text,
    verification_token_column text,
    reset_token_column        text,
    last_sign_in_column       text,
    user_id_column            text,
    created_at                timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pgfire.executions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      text NOT NULL,
    event_type    text NOT NULL,
    function_name text NOT NULL,
    attempt       integer NOT NULL,
    status        text NOT NULL CHECK (status IN ('ok', 'error', 'timeout', 'blocked', 'modified', 'dead')),
    started_at    timestamptz NOT NULL,
    duration_ms   double precision NOT NULL,
    error         text
);
CREATE INDEX executions_event_id ON pgfire.executions (event_id);
CREATE INDEX executions_started_at ON pgfire.executions USING brin (started_at);

CREATE VIEW pgfire.events AS
SELECT t.name,
       t.phase,
       t.description,
       (SELECT count(*) FROM pgfire.subscriptions s WHERE s.event_type = t.name)::int AS subscribers,
       (SELECT count(*) FROM pgfire.subscriptions s JOIN pgfire.functions f ON f.name = s.function_name
         WHERE s.event_type = t.name AND s.active AND f.active)::int AS active_subscribers,
       t.custom
  FROM pgfire.event_types t;

-- Validation: every configuration row is checked by the database, with errors that say what to do.

CREATE FUNCTION pgfire.setting(name text, fallback text DEFAULT NULL) RETURNS text
LANGUAGE sql STABLE AS $$ SELECT coalesce((SELECT value FROM pgfire.settings WHERE key = name), fallback) $$;

CREATE FUNCTION pgfire.check_function() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    max_timeout integer := pgfire.setting('limits.timeout_ms', '10000')::integer;
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
    IF NEW.secret IS NOT NULL AND NEW.secret !~ '^whsec_[A-Za-z0-9+/]+={0,2}$' THEN
        RAISE EXCEPTION 'secret of function "%" must be whsec_ followed by base64', NEW.name
            USING ERRCODE = '22023', HINT = 'leave it NULL to have one generated';
    END IF;
    IF NEW.kind = 'sql' AND to_regprocedure(NEW.target || '(jsonb)') IS NULL THEN
        RAISE EXCEPTION 'SQL function %(jsonb) does not exist', NEW.target
            USING ERRCODE = '42883', HINT = 'create it first: CREATE FUNCTION ' || NEW.target || '(event jsonb) RETURNS jsonb ...';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER check_function BEFORE INSERT OR UPDATE ON pgfire.functions
    FOR EACH ROW EXECUTE FUNCTION pgfire.check_function();

CREATE FUNCTION pgfire.check_subscription() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    max_subs integer := pgfire.setting('limits.subscriptions_per_event', '10')::integer;
    n integer;
BEGIN
    IF NEW.active THEN
        SELECT count(*) INTO n FROM pgfire.subscriptions
         WHERE event_type = NEW.event_type AND active AND function_name <> NEW.function_name;
        IF n >= max_subs THEN
            RAISE EXCEPTION 'event % already has % active subscriptions', NEW.event_type, n
                USING ERRCODE = '54000', HINT = 'deactivate one, or raise setting limits.subscriptions_per_event';
        END IF;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER check_subscription BEFORE INSERT OR UPDATE ON pgfire.subscriptions
    FOR EACH ROW EXECUTE FUNCTION pgfire.check_subscription();

-- An unknown event type: a custom name is registered on the fly; a misspelt built-in one is refused.
CREATE FUNCTION pgfire.register_event_type() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgfire.event_types WHERE name = NEW.event_type) THEN
        IF NEW.event_type ~ '^(PRE_|POST_|auth\.|api\.)' THEN
            RAISE EXCEPTION 'unknown event type "%"', NEW.event_type
                USING ERRCODE = '23503', HINT = 'SELECT name FROM pgfire.events lists them; custom events may not use the PRE_, POST_, auth. or api. prefixes';
        END IF;
        IF NEW.event_type !~ '^[A-Za-z][A-Za-z0-9_.:-]{0,127}$' THEN
            RAISE EXCEPTION 'invalid custom event type "%"', NEW.event_type
                USING ERRCODE = '22023', HINT = 'use letters, digits, _ . : -, starting with a letter';
        END IF;
        INSERT INTO pgfire.event_types (name, phase, description, custom)
        VALUES (NEW.event_type, 'post', 'Custom event emitted with pgfire.emit', true);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER register_event_type BEFORE INSERT OR UPDATE OF event_type ON pgfire.subscriptions
    FOR EACH ROW EXECUTE FUNCTION pgfire.register_event_type();

-- Whether a table is in publication pgfire.
CREATE FUNCTION pgfire.published(t regclass) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                    WHERE p.pubname = 'pgfire' AND r.prrelid = t)
$$;

-- A source table joins the publication, with the replica identity that gives old values.
CREATE FUNCTION pgfire.register_source() RETURNS trigger LANGUAGE plpgsql AS $$
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
    SELECT c.relkind, c.relreplident, pg_get_userbyid(c.relowner) AS owner,
           pg_has_role(c.relowner, 'USAGE') AS owned
      INTO rel FROM pg_class c WHERE c.oid = NEW.table_name;
    IF (SELECT relnamespace FROM pg_class WHERE oid = NEW.table_name) = 'pgfire'::regnamespace THEN
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

CREATE TRIGGER register_source BEFORE INSERT OR UPDATE OR DELETE ON pgfire.sources
    FOR EACH ROW EXECUTE FUNCTION pgfire.register_source();

-- Configuration changes reach a running pgfire twice: a NOTIFY for prompt reloads, and a
-- transactional logical message so the consumer applies them in commit order with row changes.
CREATE FUNCTION pgfire.config_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgfire_config', TG_TABLE_NAME);
    PERFORM pg_logical_emit_message(true, 'pgfire.config', TG_TABLE_NAME);
    RETURN NULL;
END $$;

CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgfire.functions
    FOR EACH STATEMENT EXECUTE FUNCTION pgfire.config_changed();
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgfire.subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION pgfire.config_changed();
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgfire.sources
    FOR EACH STATEMENT EXECUTE FUNCTION pgfire.config_changed();
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgfire.settings
    FOR EACH STATEMENT EXECUTE FUNCTION pgfire.config_changed();
