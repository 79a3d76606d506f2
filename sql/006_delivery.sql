-- pgfire 006: the delivery engine's configuration and its durable retry queue.
--
-- * pgfire.functions gains `concurrency` (events of different rows run at once, up to this many;
--   events of one row always one at a time, in commit order), `paused` (events are parked and
--   delivered in order on resume; unlike active = false, which skips them), and per-function
--   overrides of delivery.max_attempts and delivery.max_age_seconds.
-- * pgfire.parked: runs that failed their brief in-memory retries (or whose function is paused,
--   or that wait behind such a run of the same row), with their envelope, attempt, next try and
--   last error. A parked run is settled for the slot; pgfire retries it from here with backoff
--   and jitter, and marks it `dead` after its attempts or its age. Dead runs keep their envelope:
--   pgfire.redeliver(...) sends them again.
-- * Settings: delivery.memory_attempts, delivery.max_age_seconds, delivery.max_in_flight,
--   delivery.max_in_flight_bytes, history.retention_seconds.

ALTER TABLE pgfire.functions
    ADD COLUMN concurrency  integer NOT NULL DEFAULT 10,
    ADD COLUMN paused       boolean NOT NULL DEFAULT false,
    ADD COLUMN max_attempts integer,
    ADD COLUMN max_age_seconds integer;

COMMENT ON COLUMN pgfire.functions.concurrency IS
    'POST events of different rows run at once up to this many (1 to 1000); one row''s events run one at a time, in commit order';
COMMENT ON COLUMN pgfire.functions.paused IS
    'while true, events are parked (not skipped) and delivered in order once it is false again';
COMMENT ON COLUMN pgfire.functions.max_attempts IS 'overrides setting delivery.max_attempts for this function';
COMMENT ON COLUMN pgfire.functions.max_age_seconds IS 'overrides setting delivery.max_age_seconds for this function';

CREATE FUNCTION pgfire.check_function_delivery() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.concurrency IS NULL OR NEW.concurrency < 1 OR NEW.concurrency > 1000 THEN
        RAISE EXCEPTION 'concurrency % of function "%" is out of range', NEW.concurrency, NEW.name
            USING ERRCODE = '22023', HINT = 'concurrency is from 1 (one event at a time, in commit order) to 1000; the default is 10';
    END IF;
    IF NEW.max_attempts IS NOT NULL AND (NEW.max_attempts < 1 OR NEW.max_attempts > 100) THEN
        RAISE EXCEPTION 'max_attempts % of function "%" is out of range', NEW.max_attempts, NEW.name
            USING ERRCODE = '22023', HINT = 'from 1 to 100, or NULL for setting delivery.max_attempts';
    END IF;
    IF NEW.max_age_seconds IS NOT NULL AND (NEW.max_age_seconds < 1 OR NEW.max_age_seconds > 31536000) THEN
        RAISE EXCEPTION 'max_age_seconds % of function "%" is out of range', NEW.max_age_seconds, NEW.name
            USING ERRCODE = '22023', HINT = 'from 1 to 31536000 (a year), or NULL for setting delivery.max_age_seconds';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER check_function_delivery BEFORE INSERT OR UPDATE ON pgfire.functions
    FOR EACH ROW EXECUTE FUNCTION pgfire.check_function_delivery();

CREATE TABLE pgfire.parked (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    function_name text NOT NULL,
    -- The ordering key: table and primary key of a row event, the event type of others.
    key           text NOT NULL,
    event_id      text NOT NULL,
    event_type    text NOT NULL,
    envelope      json NOT NULL,
    status        text NOT NULL DEFAULT 'parked' CHECK (status IN ('parked', 'dead')),
    -- Attempts made so far (0: never tried, it waits behind another run of its row or a pause).
    attempt       integer NOT NULL DEFAULT 0,
    next_try      timestamptz NOT NULL DEFAULT now(),
    parked_at     timestamptz NOT NULL DEFAULT now(),
    last_error    text,
    UNIQUE (function_name, event_id)
);
CREATE INDEX parked_heads ON pgfire.parked (function_name, key, id) WHERE status = 'parked';
CREATE INDEX parked_dead ON pgfire.parked (function_name, parked_at) WHERE status = 'dead';
COMMENT ON TABLE pgfire.parked IS
    'POST runs waiting for a retry (status parked) or given up (status dead, envelope kept for pgfire.redeliver)';

-- Send dead runs again: with their attempts counted from zero and their age from now. Each
-- returns how many runs it put back; pgfire picks them up within a second (NOTIFY wakes it).
CREATE FUNCTION pgfire.redeliver_where(cond text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format('UPDATE pgfire.parked SET status = ''parked'', attempt = 0, next_try = now(), parked_at = now()
                     WHERE status = ''dead'' AND (%s)', cond);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('pgfire_redeliver', '');
    END IF;
    RETURN n;
END $$;
REVOKE ALL ON FUNCTION pgfire.redeliver_where(text) FROM PUBLIC;

-- One execution: the dead run that pgfire.executions row `execution` recorded.
CREATE FUNCTION pgfire.redeliver(execution bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    e record;
BEGIN
    SELECT event_id, function_name INTO e FROM pgfire.executions WHERE id = execution;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no execution %', execution
            USING ERRCODE = '22023', HINT = 'SELECT id FROM pgfire.executions WHERE status = ''dead'' lists dead runs';
    END IF;
    RETURN pgfire.redeliver_where(format('function_name = %L AND event_id = %L', e.function_name, e.event_id));
END $$;

-- Every dead run of a function.
CREATE FUNCTION pgfire.redeliver(function_name text) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgfire.functions f WHERE f.name = redeliver.function_name) THEN
        RAISE EXCEPTION 'no function "%"', redeliver.function_name
            USING ERRCODE = '22023', HINT = 'SELECT name FROM pgfire.functions lists them';
    END IF;
    RETURN pgfire.redeliver_where(format('function_name = %L', redeliver.function_name));
END $$;

-- Every dead run parked in a time range (of any function, or of one).
CREATE FUNCTION pgfire.redeliver(since timestamptz, until timestamptz, function_name text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    IF since IS NULL OR until IS NULL OR since > until THEN
        RAISE EXCEPTION 'invalid time range % to %', since, until
            USING ERRCODE = '22023', HINT = 'for example pgfire.redeliver(now() - interval ''1 hour'', now())';
    END IF;
    RETURN pgfire.redeliver_where(format('parked_at BETWEEN %L AND %L AND (%L::text IS NULL OR function_name = %L)',
                                         since, until, redeliver.function_name, redeliver.function_name));
END $$;

INSERT INTO pgfire.settings (key, value, description) VALUES
    ('delivery.memory_attempts', '3', 'attempts of a failing POST run in memory, before it is parked in pgfire.parked'),
    ('delivery.max_age_seconds', '86400', 'a parked run older than this is dead (per function: pgfire.functions.max_age_seconds)'),
    ('delivery.max_in_flight', '10000', 'events held in memory at most; past it the backlog waits in the WAL'),
    ('delivery.max_in_flight_bytes', '67108864', 'bytes of event envelopes held in memory at most'),
    ('history.retention_seconds', '604800', 'pgfire.executions rows and dead parked runs older than this are pruned')
ON CONFLICT (key) DO NOTHING;

-- The ranges of every numeric setting (002's list, with the delivery engine's).
CREATE OR REPLACE FUNCTION pgfire.setting_range(setting text, OUT min_value bigint, OUT max_value bigint,
                                     OUT default_value bigint, OUT unit text)
LANGUAGE sql IMMUTABLE AS $$
    SELECT r.min_value::bigint, r.max_value::bigint, r.default_value::bigint, r.unit FROM (VALUES
        ('limits.subscriptions_per_event', 1, 1000, 10, 'subscriptions'),
        ('limits.timeout_ms', 1, 300000, 10000, 'ms'),
        ('limits.payload_bytes', 1024, 104857600, 1048576, 'bytes'),
        ('delivery.max_attempts', 1, 100, 5, 'attempts'),
        ('delivery.retry_base_ms', 1, 3600000, 200, 'ms'),
        ('delivery.retry_max_ms', 1, 3600000, 10000, 'ms'),
        ('delivery.memory_attempts', 1, 100, 3, 'attempts'),
        ('delivery.max_age_seconds', 1, 31536000, 86400, 's'),
        ('delivery.max_in_flight', 1, 1000000, 10000, 'events'),
        ('delivery.max_in_flight_bytes', 1048576, 4294967296, 67108864, 'bytes'),
        ('history.retention_seconds', 60, 315360000, 604800, 's'),
        ('auth.verification_ttl_seconds', 60, 31536000, 86400, 's'),
        ('auth.reset_ttl_seconds', 60, 31536000, 3600, 's')
    ) AS r (key, min_value, max_value, default_value, unit)
    WHERE r.key = setting
$$;

-- Subscription filters: a condition on the event; only matching events run the subscription.
-- The syntax (pgfire's delivery::filter reads the same):
--   condition { and|or condition }      (and binds tighter; no parentheses)
--   condition: [not] changed(field) | [not] field is [not] null | [not] field op literal
--   field: name[.name...] of event_data; op: = != <> < <= > >=; literal: number, 'text', true, false
ALTER TABLE pgfire.subscriptions ADD COLUMN filter text;
COMMENT ON COLUMN pgfire.subscriptions.filter IS
    'only events matching this condition run the subscription, e.g. changed(email) and plan = ''pro'' (NULL: every event)';

CREATE FUNCTION pgfire.check_filter(filter text) RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    rest text := filter;
    m text[];
    k text;
    kinds text[] := '{}';
    i int := 1;
    n int;
    what text;
BEGIN
    IF filter IS NULL THEN
        RETURN;
    END IF;
    LOOP
        rest := ltrim(rest, E' \t\r\n');
        EXIT WHEN rest = '';
        m := regexp_match(rest, '^(changed\s*\()', 'i');
        k := 'changed';
        IF m IS NULL THEN
            m := regexp_match(rest, '^(''(?:[^'']|'''')*'')');
            k := 'literal';
        END IF;
        IF m IS NULL THEN
            m := regexp_match(rest, '^(-?[0-9][0-9.]*)');
            IF m IS NOT NULL AND m[1] !~ '^-?[0-9]+(\.[0-9]+)?$' THEN
                what := format('invalid number %s', m[1]);
                EXIT;
            END IF;
        END IF;
        IF m IS NULL THEN
            m := regexp_match(rest, '^(!=|<>|<=|>=|=|<|>)');
            k := 'op';
        END IF;
        IF m IS NULL THEN
            m := regexp_match(rest, '^([A-Za-z_][A-Za-z0-9_.]*)');
            k := CASE lower(m[1]) WHEN 'and' THEN 'conj' WHEN 'or' THEN 'conj' WHEN 'not' THEN 'not'
                                  WHEN 'is' THEN 'is' WHEN 'null' THEN 'null' WHEN 'true' THEN 'literal'
                                  WHEN 'false' THEN 'literal' ELSE 'field' END;
            IF k = 'field' AND (m[1] LIKE '%.' OR m[1] LIKE '%..%') THEN
                what := format('invalid field name %s', m[1]);
                EXIT;
            END IF;
        END IF;
        IF m IS NULL THEN
            m := regexp_match(rest, '^(\))');
            k := 'close';
        END IF;
        IF m IS NULL THEN
            what := format('unexpected %s', left(rest, 20));
            EXIT;
        END IF;
        kinds := kinds || k;
        rest := substr(rest, length(m[1]) + 1);
    END LOOP;
    n := coalesce(array_length(kinds, 1), 0);
    IF what IS NULL AND n = 0 THEN
        what := 'empty (use NULL for no filter)';
    END IF;
    WHILE what IS NULL LOOP
        IF kinds[i] = 'not' THEN
            i := i + 1;
        END IF;
        IF kinds[i] = 'changed' THEN
            IF kinds[i + 1] IS DISTINCT FROM 'field' OR kinds[i + 2] IS DISTINCT FROM 'close' THEN
                what := 'expected changed(field)';
                EXIT;
            END IF;
            i := i + 3;
        ELSIF kinds[i] = 'field' THEN
            IF kinds[i + 1] = 'is' THEN
                i := i + 2;
                IF kinds[i] = 'not' THEN
                    i := i + 1;
                END IF;
                IF kinds[i] IS DISTINCT FROM 'null' THEN
                    what := 'expected null after is [not]';
                    EXIT;
                END IF;
                i := i + 1;
            ELSIF kinds[i + 1] = 'op' THEN
                IF kinds[i + 2] IS DISTINCT FROM 'literal' THEN
                    what := 'expected a number, ''text'', true or false after the comparison';
                    EXIT;
                END IF;
                i := i + 3;
            ELSE
                what := 'expected is [not] null or a comparison after the field';
                EXIT;
            END IF;
        ELSE
            what := 'expected a condition: changed(field), field is [not] null, or field op literal';
            EXIT;
        END IF;
        EXIT WHEN i > n;
        IF kinds[i] <> 'conj' THEN
            what := 'expected and, or, or the end';
            EXIT;
        END IF;
        i := i + 1;
        IF i > n THEN
            what := 'expected a condition after and/or';
        END IF;
    END LOOP;
    IF what IS NOT NULL THEN
        RAISE EXCEPTION 'invalid filter "%": %', filter, what
            USING ERRCODE = '22023',
                  HINT = 'a filter is conditions joined by and/or: changed(field), field is [not] null, field op literal (op = != < <= > >=; literal a number, ''text'', true, false), each optionally preceded by not; e.g. changed(email) and plan = ''pro''';
    END IF;
END $$;

CREATE FUNCTION pgfire.check_subscription_filter() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgfire.check_filter(NEW.filter);
    RETURN NEW;
END $$;

CREATE TRIGGER check_subscription_filter BEFORE INSERT OR UPDATE OF filter ON pgfire.subscriptions
    FOR EACH ROW EXECUTE FUNCTION pgfire.check_subscription_filter();
