-- pgfire 003: configuration applied exactly as of the commit that changed it.
--
-- Every change to a configuration table writes a transactional logical message whose content is
-- the whole configuration as that statement left it (pgfire.config_snapshot(), one statement, one
-- snapshot). The consumer applies it where it sits in the stream, so every row change is routed by
-- the configuration of its own commit, whatever today's tables say. pgfire.config_applied keeps the
-- snapshots pgfire applied, by the commit LSN of the change, so a restart resumes with the
-- configuration in force where the slot stands. Webhook secrets stay out of it (logical messages
-- reach every logical decoding consumer of the database): pgfire reads them from
-- pgfire.functions when it applies a snapshot.

CREATE FUNCTION pgfire.config_snapshot() RETURNS jsonb
LANGUAGE sql STABLE AS $$
SELECT jsonb_build_object(
    'version', 1,
    'database', current_database(),
    'settings', coalesce((SELECT jsonb_object_agg(key, value) FROM pgfire.settings), '{}'::jsonb),
    'functions', coalesce((
        SELECT jsonb_agg(jsonb_build_object(
                   'name', f.name, 'kind', f.kind, 'target', f.target, 'timeout_ms', f.timeout_ms,
                   'on_error', f.on_error, 'active', f.active,
                   'sql_callable', CASE WHEN f.kind = 'sql' THEN (
                       SELECT format('%I.%I', n.nspname, p.proname)
                         FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                        WHERE p.oid = to_regprocedure(f.target || '(jsonb)')) END)
                 ORDER BY f.name)
          FROM pgfire.functions f), '[]'::jsonb),
    'subscriptions', coalesce((
        SELECT jsonb_agg(jsonb_build_object(
                   'event_type', s.event_type, 'function_name', s.function_name,
                   'priority', s.priority, 'active', s.active)
                 ORDER BY s.event_type, s.priority, s.function_name)
          FROM pgfire.subscriptions s), '[]'::jsonb),
    'sources', coalesce((
        SELECT jsonb_agg(jsonb_build_object(
                   'oid', s.table_name::oid::bigint, 'table', s.table_name::text, 'kind', s.kind,
                   'id_column', s.id_column))
          FROM pgfire.sources s), '[]'::jsonb))
$$;

CREATE OR REPLACE FUNCTION pgfire.config_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgfire_config', TG_TABLE_NAME);
    PERFORM pg_logical_emit_message(true, 'pgfire.config', pgfire.config_snapshot()::text);
    RETURN NULL;
END $$;

CREATE TABLE pgfire.config_applied (
    commit_lsn pg_lsn PRIMARY KEY,
    snapshot   jsonb NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgfire.config_applied IS
    'configuration snapshots pgfire applied, by the commit LSN of the change (0/0: as installed); pgfire resumes with the latest one before the slot''s confirmed position';

-- The configuration in force before the first change pgfire reads: as it is now.
INSERT INTO pgfire.config_applied (commit_lsn, snapshot) VALUES ('0/0', pgfire.config_snapshot());

-- Partitioned sources. The publication publishes changes of partitions as changes of their root
-- (publish_via_partition_root, set by pgfire install), so they carry the source's name; and
-- every partition gets REPLICA IDENTITY FULL too (the old row of a change is logged by the
-- partition that holds it), now and whenever a partition is created or attached later.
CREATE FUNCTION pgfire.full_identity(root regclass) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    part regclass;
BEGIN
    FOR part IN
        SELECT t.relid FROM pg_partition_tree(root) t JOIN pg_class c ON c.oid = t.relid
         WHERE c.relkind = 'r' AND c.relreplident <> 'f'
    LOOP
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', part);
    END LOOP;
END $$;

CREATE FUNCTION pgfire.source_partitions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgfire.full_identity(NEW.table_name);
    RETURN NULL;
END $$;

CREATE TRIGGER source_partitions AFTER INSERT OR UPDATE OF table_name ON pgfire.sources
    FOR EACH ROW EXECUTE FUNCTION pgfire.source_partitions();

SELECT pgfire.full_identity(table_name) FROM pgfire.sources;

-- Runs for every CREATE/ALTER TABLE of every role: with the installing role's rights (so any
-- role's DDL can read pgfire.sources), and never failing the user's command.
CREATE FUNCTION pgfire.partition_added() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    root regclass;
BEGIN
    FOR root IN
        SELECT DISTINCT s.table_name
          FROM pg_event_trigger_ddl_commands() d
          JOIN pgfire.sources s ON s.table_name = coalesce(pg_partition_root(d.objid), d.objid)
          JOIN pg_class r ON r.oid = s.table_name
         WHERE d.classid = 'pg_class'::regclass AND r.relkind = 'p'
    LOOP
        BEGIN
            PERFORM pgfire.full_identity(root);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'pgfire: cannot set REPLICA IDENTITY FULL on the partitions of source %: %', root, SQLERRM
                USING HINT = format('old values are missing from its events until it is set: SELECT pgfire.full_identity(%L)', root::text);
        END;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgfire.partition_added() FROM PUBLIC;

-- Event triggers need a superuser; without one, partitions added later lack old values, which
-- pgfire names in old_missing, warns about in its log and shows in `pgfire status`.
DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        CREATE EVENT TRIGGER pgfire_partition_added ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
            EXECUTE FUNCTION pgfire.partition_added();
    ELSE
        RAISE NOTICE 'pgfire: not a superuser, so partitions added later to a partitioned source do not get REPLICA IDENTITY FULL by themselves (run SELECT pgfire.full_identity(''the_source'') after adding one)';
    END IF;
END $$;
