-- 004: the configuration snapshot carries whole rows.
--
-- pgfire.config_snapshot() now takes every column of pgfire.functions, pgfire.subscriptions and
-- pgfire.sources (less the secret and the timestamps), so a column a later migration adds reaches
-- the consumer without this function being written again. Readers ignore fields they do not know
-- and default the ones a snapshot lacks.

CREATE OR REPLACE FUNCTION pgfire.config_snapshot() RETURNS jsonb
LANGUAGE sql STABLE AS $$
SELECT jsonb_build_object(
    'version', 2,
    'database', current_database(),
    'settings', coalesce((SELECT jsonb_object_agg(key, value) FROM pgfire.settings), '{}'::jsonb),
    'functions', coalesce((
        SELECT jsonb_agg((to_jsonb(f) - 'secret' - 'created_at') || jsonb_build_object(
                   'sql_callable', CASE WHEN f.kind = 'sql' THEN (
                       SELECT format('%I.%I', n.nspname, p.proname)
                         FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                        WHERE p.oid = to_regprocedure(f.target || '(jsonb)')) END)
                 ORDER BY f.name)
          FROM pgfire.functions f), '[]'::jsonb),
    'subscriptions', coalesce((
        SELECT jsonb_agg(to_jsonb(s) - 'subscribed_at'
                 ORDER BY s.event_type, s.priority, s.function_name)
          FROM pgfire.subscriptions s), '[]'::jsonb),
    'sources', coalesce((
        SELECT jsonb_agg((to_jsonb(s) - 'table_name' - 'created_at') || jsonb_build_object(
                   'oid', s.table_name::oid::bigint, 'table', s.table_name::text)
                 ORDER BY s.table_name::oid)
          FROM pgfire.sources s), '[]'::jsonb))
$$;
