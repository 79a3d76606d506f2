"""PRE hooks through the pgfire proxy with psycopg 3 (extended protocol, binary, pipeline mode).

The database has the seed's email check on PRE_USER_CREATE and a rewrite (lower-cased email,
name 'rewritten <user_id>'). Prints one line per check; exits non-zero on the first failure."""
import sys

import psycopg
from psycopg import errors

url = sys.argv[1]


def expect_block(fn, what):
    try:
        fn()
    except errors.RaiseException as e:
        assert e.sqlstate == "P0001", (what, e.sqlstate)
        assert e.diag.message_primary == "Invalid email address", (what, e.diag.message_primary)
        assert "PRE_USER_CREATE" in (e.diag.message_detail or ""), (what, e.diag.message_detail)
        print(f"blocked: {what}")
        return
    raise AssertionError(f"{what}: not blocked")


with psycopg.connect(url, autocommit=True) as conn:
    expect_block(lambda: conn.execute("INSERT INTO users (email) VALUES (%s)", ["bad"]), "text parameter")
    expect_block(
        lambda: conn.execute("INSERT INTO users (email) VALUES (%s)", ["bad"], binary=True), "binary parameter"
    )
    # Prepared server-side (a named statement) after the first run.
    for i in range(3):
        conn.execute("INSERT INTO users (email) VALUES (%s)", [f"P{i}@X.Y"], prepare=True)
    expect_block(lambda: conn.execute("INSERT INTO users (email) VALUES (%s)", ["bad"], prepare=True), "prepared")
    for binary in (False, True):
        cur = conn.cursor(binary=binary)
        cur.execute("INSERT INTO users (email, name) VALUES (%s, %s) RETURNING id, email, name", ["Ann@X.Y", "x"])
        uid, email, name = cur.fetchone()
        assert email == "ann@x.y" and name == f"rewritten {uid}", (binary, uid, email, name)
        print(f"rewritten, binary={binary}: {email} {name}")
    # A block inside a transaction aborts it.
    conn.autocommit = False
    try:
        with conn.transaction():
            conn.execute("INSERT INTO users (email) VALUES (%s)", ["in-tx@x.y"])
            expect_block(lambda: conn.execute("INSERT INTO users (email) VALUES (%s)", ["bad"]), "in a transaction")
            try:
                conn.execute("SELECT 1")
                raise AssertionError("transaction not aborted")
            except errors.InFailedSqlTransaction:
                print("aborted until rollback")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    conn.autocommit = True
    n = conn.execute("SELECT count(*) FROM users WHERE email = 'in-tx@x.y'").fetchone()[0]
    assert n == 0, n
    # Pipeline mode: the blocked statement fails, the rest of its batch is skipped.
    try:
        with conn.pipeline():
            conn.execute("INSERT INTO users (email) VALUES (%s)", ["pipe1@x.y"])
            conn.execute("INSERT INTO users (email) VALUES (%s)", ["bad"])
            conn.execute("INSERT INTO users (email) VALUES (%s)", ["pipe3@x.y"])
        raise AssertionError("pipeline not blocked")
    except errors.RaiseException as e:
        assert e.diag.message_primary == "Invalid email address"
        print("blocked in a pipeline")
    n = conn.execute("SELECT count(*) FROM users WHERE email = 'bad'").fetchone()[0]
    assert n == 0, n
    with conn.pipeline():
        a = conn.execute("INSERT INTO users (email) VALUES (%s) RETURNING email", ["Q1@X.Y"])
        b = conn.execute("SELECT count(*) FROM users")
        c = conn.execute("INSERT INTO users (email) VALUES (%s) RETURNING email", ["Q2@X.Y"])
    assert a.fetchone()[0] == "q1@x.y" and c.fetchone()[0] == "q2@x.y"
    print("pipeline rewritten")
print("ok")
