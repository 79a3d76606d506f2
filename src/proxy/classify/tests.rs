use super::*;

fn watched() -> Watched {
    Watched::new(["public.users", "app.\"Orders\""]).unwrap()
}

fn verdict(sql: &str) -> Verdict {
    classify(sql, &watched()).verdict().clone()
}

fn users() -> TableName {
    TableName {
        schema: "public".into(),
        name: "users".into(),
    }
}

#[track_caller]
fn holds(sql: &str) {
    assert!(
        matches!(verdict(sql), Verdict::Holds { .. }),
        "{sql}: {:?}",
        verdict(sql)
    );
}

#[track_caller]
fn holds_users(sql: &str) {
    match verdict(sql) {
        Verdict::Holds { tables, .. } => assert_eq!(tables, vec![users()], "{sql}"),
        other => panic!("{sql}: {other:?}"),
    }
}

#[track_caller]
fn passes(sql: &str) {
    assert_eq!(verdict(sql), Verdict::Passes, "{sql}");
}

#[track_caller]
fn refused(sql: &str, reason: Refusal) {
    assert_eq!(verdict(sql), Verdict::Refused { reason }, "{sql}");
}

#[test]
fn writes_to_a_watched_table_hold() {
    for sql in [
        "INSERT INTO users (email) VALUES ('a@b.c')",
        "INSERT INTO users (email) VALUES ('a'), ('b'), ('c')",
        "INSERT INTO users DEFAULT VALUES",
        "INSERT INTO users (id, email) VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET email = excluded.email",
        "INSERT INTO users (email) VALUES ($1) ON CONFLICT DO NOTHING RETURNING id",
        "UPDATE users SET email = 'x' WHERE id = $1",
        "DELETE FROM users WHERE id = 1",
        "INSERT INTO users (email) SELECT email FROM staging",
        "MERGE INTO users u USING staging s ON u.id = s.id WHEN MATCHED THEN UPDATE SET email = s.email WHEN NOT MATCHED THEN INSERT (email) VALUES (s.email)",
        "WITH gone AS (DELETE FROM users WHERE id = 1 RETURNING *) SELECT * FROM gone",
        "WITH x AS (SELECT 1) UPDATE users SET email = 'y'",
        "SELECT * FROM (SELECT 1) s, LATERAL (SELECT 2) t; DELETE FROM users",
        "EXPLAIN ANALYZE DELETE FROM users",
        "COPY (INSERT INTO users (email) VALUES ('a') RETURNING id) TO STDOUT",
        "PREPARE p (text) AS INSERT INTO users (email) VALUES ($1)",
        "CREATE TABLE copy AS WITH d AS (DELETE FROM users RETURNING *) SELECT * FROM d",
    ] {
        holds_users(sql);
    }
}

#[test]
fn names_qualified_quoted_mixed_case_and_unqualified() {
    for sql in [
        "INSERT INTO public.users DEFAULT VALUES",
        "INSERT INTO \"public\".\"users\" DEFAULT VALUES",
        "UPDATE PUBLIC.Users SET x = 1",
        "UPDATE Users SET x = 1",
        "DELETE FROM \"users\"",
        "DELETE FROM mydb.public.users",
        "DELETE FROM U&\"\\0075sers\"",
    ] {
        holds_users(sql);
    }
    // Quoted names keep their case, unquoted ones fold.
    holds("UPDATE app.\"Orders\" SET x = 1");
    holds("UPDATE \"Orders\" SET x = 1");
    passes("UPDATE app.orders SET x = 1");
    passes("UPDATE orders SET x = 1");
    passes("UPDATE \"Users\" SET x = 1");
    passes("UPDATE other.users SET x = 1");
    passes("UPDATE pg_temp.users SET x = 1");
}

#[test]
fn unqualified_names_match_every_watched_table_of_that_name() {
    let w = Watched::new(["public.users", "auth.users"]).unwrap();
    match classify("DELETE FROM users", &w).verdict() {
        Verdict::Holds { tables, reason } => {
            assert_eq!(tables.len(), 2);
            assert_eq!(*reason, HoldReason::Writes);
        }
        other => panic!("{other:?}"),
    }
    match classify("DELETE FROM auth.users", &w).verdict() {
        Verdict::Holds { tables, .. } => assert_eq!(tables[0].schema, "auth"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn copy_from_holds_copy_to_passes() {
    assert_eq!(
        verdict("COPY users (email) FROM STDIN"),
        Verdict::Holds {
            tables: vec![users()],
            reason: HoldReason::CopyFromStdin
        }
    );
    for server_side in [
        "COPY public.users FROM '/tmp/x.csv' WITH (FORMAT csv)",
        "COPY users (email) FROM '/tmp/stdin.csv'",
        "COPY users (email) FROM PROGRAM 'echo stdin'",
    ] {
        assert_eq!(
            verdict(server_side),
            Verdict::Holds {
                tables: vec![users()],
                reason: HoldReason::CopyFrom
            },
            "{server_side}"
        );
    }
    passes("COPY users TO STDOUT");
    passes("COPY (SELECT * FROM users) TO STDOUT");
    passes("COPY other FROM STDIN");
}

#[test]
fn calls_and_stored_code_hold() {
    let cases = [
        (
            "SELECT add_user('a@b.c')",
            HoldReason::FunctionCall("add_user".into()),
        ),
        (
            "SELECT * FROM app.make_users(3)",
            HoldReason::FunctionCall("app.make_users".into()),
        ),
        (
            "SELECT id FROM other WHERE f(id)",
            HoldReason::FunctionCall("f".into()),
        ),
        (
            "INSERT INTO other VALUES (writes_users())",
            HoldReason::FunctionCall("writes_users".into()),
        ),
        ("CALL make_user('a')", HoldReason::Call("make_user".into())),
        (
            "DO $$BEGIN INSERT INTO users DEFAULT VALUES; END$$",
            HoldReason::Do,
        ),
        ("EXECUTE p('a')", HoldReason::Execute("p".into())),
        ("FETCH 10 FROM c", HoldReason::Cursor("c".into())),
        ("MOVE NEXT IN c", HoldReason::Cursor("c".into())),
        (
            "SELECT set_config($1, 'x', false)",
            HoldReason::FunctionCall("set_config".into()),
        ),
        (
            "SELECT pg_catalog.lo_import('/etc/passwd')",
            HoldReason::FunctionCall("pg_catalog.lo_import".into()),
        ),
    ];
    for (sql, reason) in cases {
        assert_eq!(
            verdict(sql),
            Verdict::Holds {
                tables: vec![],
                reason
            },
            "{sql}"
        );
    }
}

#[test]
fn safe_builtins_pass_unless_shadowed() {
    for sql in [
        "SELECT now(), count(*), coalesce(a, 1), lower(email) FROM users GROUP BY 3, 4",
        "SELECT pg_catalog.now()",
        "SELECT nextval('s')",
        "SELECT ts AT TIME ZONE 'UTC' FROM other",
        "SELECT a FROM other WHERE a LIKE 'x%' ESCAPE '!' OR a SIMILAR TO 'y'",
        "SELECT set_config('search_path', 'public', false)",
        "SELECT pgfire.emit('ORDER_SHIPPED', '{}'::jsonb)",
        "SELECT extract(year FROM now()), substring('abc' FROM 2), trim(' a ')",
    ] {
        passes(sql);
    }
    let w = watched().with_shadowed_builtins(["lower"]);
    assert!(!classify("SELECT lower(email) FROM users", &w).passes());
    assert!(classify("SELECT pg_catalog.lower(email) FROM users", &w).passes());
}

#[test]
fn reads_other_writes_and_utility_commands_pass() {
    for sql in [
        "SELECT * FROM users WHERE id = $1",
        "SELECT u.email FROM users u JOIN app.\"Orders\" o ON o.user_id = u.id",
        "SELECT * FROM users FOR UPDATE",
        "TABLE users",
        "VALUES (1, 2)",
        "INSERT INTO other (a) VALUES (1)",
        "UPDATE other SET a = 1 FROM users WHERE other.id = users.id",
        "DELETE FROM other USING users WHERE other.id = users.id",
        "WITH u AS (SELECT * FROM users) INSERT INTO other SELECT id FROM u",
        "SET search_path = app, public",
        "SET client_min_messages = warning",
        "RESET ALL",
        "SHOW search_path",
        "BEGIN",
        "BEGIN ISOLATION LEVEL SERIALIZABLE",
        "COMMIT",
        "ROLLBACK",
        "SAVEPOINT s",
        "RELEASE SAVEPOINT s",
        "LISTEN ch",
        "NOTIFY ch, 'x'",
        "UNLISTEN *",
        "DISCARD ALL",
        "DECLARE c CURSOR FOR SELECT * FROM users",
        "CLOSE c",
        "PREPARE q AS SELECT * FROM users WHERE id = $1",
        "DEALLOCATE q",
        "CREATE TABLE t (id int)",
        "ALTER TABLE users ADD COLUMN nickname text",
        "ALTER TABLE other DISABLE TRIGGER ALL",
        "CREATE INDEX ON users (email)",
        "TRUNCATE other",
        "VACUUM users",
        "LOCK TABLE users IN SHARE MODE",
        "EXPLAIN SELECT * FROM users",
    ] {
        passes(sql);
    }
}

#[test]
fn truncate_and_tampering_are_refused() {
    refused("TRUNCATE users", Refusal::Truncate(users()));
    refused(
        "TRUNCATE TABLE other, public.users",
        Refusal::Truncate(users()),
    );
    refused("TRUNCATE other CASCADE", Refusal::TruncateCascade);
    for sql in [
        "SET session_replication_role = replica",
        "SET LOCAL session_replication_role TO 'replica'",
        "SET \"Session_Replication_Role\" = replica",
        "RESET session_replication_role",
        "SELECT set_config('session_replication_role', 'replica', false)",
        "SELECT pg_catalog.set_config('SESSION_REPLICATION_ROLE', 'replica', true)",
        "ALTER ROLE app SET session_replication_role = replica",
        "ALTER DATABASE app SET session_replication_role = replica",
    ] {
        refused(sql, Refusal::ReplicationRole);
    }
    for sql in [
        "ALTER TABLE users DISABLE TRIGGER ALL",
        "ALTER TABLE public.users DISABLE TRIGGER pgfire_pre",
        "ALTER TABLE ONLY users DISABLE TRIGGER USER",
        "ALTER TABLE users ENABLE REPLICA TRIGGER t",
        "ALTER TABLE IF EXISTS Users ENABLE TRIGGER ALL",
    ] {
        refused(sql, Refusal::TriggerState(users()));
    }
    for sql in [
        "INSERT INTO pgfire.settings (key, value) VALUES ('a', 'b')",
        "UPDATE pgfire.subscriptions SET active = false",
        "DELETE FROM pgfire.functions",
        "COPY pgfire.settings FROM STDIN",
        "TRUNCATE pgfire.executions",
        "DROP SCHEMA pgfire CASCADE",
        "DROP TABLE pgfire.sources",
        "DROP TRIGGER pgfire_pre ON users",
        "ALTER TABLE pgfire.settings DISABLE ROW LEVEL SECURITY",
        "CREATE OR REPLACE FUNCTION pgfire.emit(text, jsonb) RETURNS void LANGUAGE sql AS 'select'",
        "ALTER EVENT TRIGGER pgfire_ddl DISABLE",
        "SET search_path = pgfire, public",
        "SELECT set_config('search_path', 'pgfire', false)",
    ] {
        refused(sql, Refusal::PgfireObject);
    }
    refused(
        "CREATE RULE r AS ON INSERT TO other DO ALSO INSERT INTO users DEFAULT VALUES",
        Refusal::RuleWritesWatched(users()),
    );
    assert!(Refusal::Truncate(users()).allowable());
    assert!(!Refusal::ReplicationRole.allowable());
    assert!(Refusal::Truncate(users())
        .to_string()
        .contains("public.users"));
}

#[test]
fn multi_statement_strings_get_one_verdict_each() {
    let sql = "BEGIN; SELECT 1; UPDATE users SET a = 1; TRUNCATE users; COMMIT";
    let c = classify(sql, &watched());
    assert_eq!(c.outcome, Outcome::Parsed);
    let kinds: Vec<u8> = c.statements.iter().map(|s| s.verdict.rank()).collect();
    assert_eq!(kinds, vec![0, 0, 1, 2, 0]);
    assert_eq!(
        &sql[c.statements[2].span.clone()].trim(),
        &"UPDATE users SET a = 1"
    );
    assert!(matches!(c.verdict(), Verdict::Refused { .. }));
}

#[test]
fn parse_errors_pass_untouched() {
    let c = classify("SELEC * FROM users", &watched());
    assert!(matches!(c.outcome, Outcome::ParseError(_)));
    assert!(c.passes());
}

#[test]
fn standard_conforming_strings_off_is_lexed_as_the_server_lexes_it() {
    // With the setting off the server sees a DELETE here; with it on, two strings.
    let sql = "SELECT 'a\\' , ' ; DELETE FROM users; --'";
    assert!(classify(sql, &watched()).passes());
    let off = Syntax {
        standard_conforming_strings: false,
    };
    assert!(!classify_with(sql, &watched(), off).passes());
}

#[test]
fn strings_not_known_yet_are_classified_both_ways() {
    let w = watched();
    let hidden = "SELECT '\\''; INSERT INTO users VALUES (1); --'";
    assert!(classify_lexed(hidden, &w, Strings::On).passes());
    assert!(!classify_lexed(hidden, &w, Strings::Off).passes());
    assert!(!classify_lexed(hidden, &w, Strings::Either).passes());
    // The other way round: a write on only if the setting is on.
    let other = "SELECT 'a\\'; DELETE FROM users; -- '";
    assert!(!classify_lexed(other, &w, Strings::On).passes());
    assert!(classify_lexed(other, &w, Strings::Off).passes());
    assert!(!classify_lexed(other, &w, Strings::Either).passes());
    // Harmless backslashes pass both ways; without one, the setting does not matter.
    for s in [Strings::On, Strings::Off, Strings::Either] {
        assert!(classify_lexed("SELECT 'C:\\dir\\file'", &w, s).passes());
        assert!(!classify_lexed("DELETE FROM users", &w, s).passes());
    }
}

#[test]
fn deep_trees_and_nul_bytes_hold() {
    let deep = format!("INSERT INTO users SELECT {}", "-".repeat(2000) + "1");
    holds(&deep);
    let nested = format!("SELECT {}1{}", "(SELECT ".repeat(300), ")".repeat(300));
    let v = verdict(&nested);
    assert!(
        v != Verdict::Refused {
            reason: Refusal::PgfireObject
        }
    );
    holds("UPDATE users SET a = 1\0; garbage");
}

#[test]
fn precheck_skips_only_what_provably_passes() {
    let w = watched();
    let pre = |sql: &str| classify(sql, &w).outcome == Outcome::PreChecked;
    assert!(pre("SELECT abalance FROM pgbench_accounts WHERE aid = $1"));
    assert!(pre(
        "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2"
    ));
    assert!(pre("BEGIN"));
    assert!(pre("SET client_min_messages TO warning"));
    for sql in [
        "SELECT * FROM USERS",
        "SELECT f()",
        "SELECT 1; DO 'begin end'",
        "EXECUTE p",
        "FETCH c",
        "TRUNCATE other CASCADE",
        "SET session_replication_role = replica",
        "UPDATE pgfire.settings SET value = 'x'",
        "DELETE FROM U&\"\\0075sers\"",
        "INSERT INTO other VALUES (1)",
    ] {
        assert!(!pre(sql), "{sql}");
    }
    // Whatever the pre-check skips, the parser passes too.
    for sql in [
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "SELECT ts AT TIME ZONE 'UTC' FROM t",
        "SELECT a FROM t WHERE a LIKE 'x' ESCAPE '!' OR a SIMILAR TO 'y' OR a IS NORMALIZED",
        "SELECT SYSTEM_USER, CURRENT_SCHEMA, CURRENT_USER, CURRENT_TIMESTAMP",
    ] {
        assert!(pre(sql), "{sql}");
        let parsed = classify(sql, &Watched::new(["x.unrelated_name"]).unwrap());
        assert!(parsed.passes(), "{sql}: {parsed:?}");
    }
    // A watched name the search cannot find disables the pre-check.
    let odd = Watched::new(["public.\"Ünïcode\""]).unwrap();
    assert_ne!(classify("SELECT 1", &odd).outcome, Outcome::PreChecked);
}

#[test]
fn watched_names_parse_as_postgres_spells_them() {
    let w = Watched::new(["Public.Users", "\"My Schema\".\"T\"\"x\""]).unwrap();
    assert_eq!(w.tables()[0].to_string(), "\"My Schema\".\"T\"\"x\"");
    assert_eq!(w.tables()[1].to_string(), "public.users");
    assert_eq!(
        Watched::new(["users"]).unwrap_err(),
        WatchedError::Unqualified("users".into())
    );
    assert!(Watched::new(["a.b.c"]).is_err());
    assert!(Watched::new(["a..b"]).is_err());
    assert!(Watched::new(["\"open"]).is_err());
    assert!(Watched::new(["a b.c"]).is_err());
}

/// Random bytes and every prefix of real statements: never a panic.
#[test]
fn never_panics() {
    let w = watched();
    let samples = [
        "WITH d AS (DELETE FROM users RETURNING *) INSERT INTO users SELECT * FROM d ON CONFLICT DO NOTHING",
        "MERGE INTO users u USING s ON u.id = s.id WHEN MATCHED THEN DELETE",
        "COPY users FROM STDIN; CALL p(); DO $$ begin end $$; ALTER TABLE users DISABLE TRIGGER ALL",
        "SELECT U&\"\\0075sers\", E'\\'', $x$ ' $x$, \"a\"\"b\" FROM t /* ( */ -- (",
    ];
    for s in samples {
        for end in 0..=s.len() {
            if s.is_char_boundary(end) {
                let _ = classify(&s[..end], &w);
                let _ = classify_with(
                    &s[..end],
                    &w,
                    Syntax {
                        standard_conforming_strings: false,
                    },
                );
            }
        }
    }
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..3000 {
        let len = (seed % 64) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let alphabet = b" ();,'\"$-*/\\&Uuselectinsertupdateusers0\n";
                alphabet[(seed % alphabet.len() as u64) as usize]
            })
            .collect();
        let _ = classify(&String::from_utf8_lossy(&bytes), &w);
    }
}

/// `cargo test --release --lib classify_cost -- --ignored --nocapture`
#[test]
#[ignore]
fn classify_cost() {
    let w = Watched::new(["public.pgbench_accounts"]).unwrap();
    let n = 20_000;
    for sql in [
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
        "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
    ] {
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(pg_query::parse(sql, 0).ok());
        }
        let parse = t.elapsed() / n;
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(classify(sql, &w));
        }
        let all = t.elapsed() / n;
        println!("{all:>10?} classify  {parse:>10?} parse  {:?}  {sql}", classify(sql, &w).outcome);
    }
}
