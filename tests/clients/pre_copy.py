"""COPY FROM STDIN through the pgfire proxy with psycopg 3 (cursor.copy()).

The database has the seed's email check on PRE_USER_CREATE and a rewrite (lower-cased email,
name 'copied <user_id>'). Prints one line per check; exits non-zero on the first failure."""
import sys

import psycopg
from psycopg import errors

url = sys.argv[1]


def copy(conn, lines):
    with conn.cursor() as cur:
        with cur.copy("COPY users (email) FROM STDIN") as cp:
            for line in lines:
                cp.write_row((line,))
        return cur.rowcount


with psycopg.connect(url, autocommit=True) as conn:
    assert copy(conn, ["Ann@X.Y", "Bob@X.Y"]) == 2
    row = conn.execute("SELECT email, name FROM users ORDER BY id LIMIT 1").fetchone()
    assert row[0] == "ann@x.y" and row[1].startswith("copied "), row
    print("copied and rewritten")
    try:
        copy(conn, ["cy@x.y", "bad"])
        raise AssertionError("bad row not blocked")
    except errors.RaiseException as e:
        assert e.diag.message_primary == "Invalid email address", e.diag.message_primary
        print("blocked")
    # The client gives up inside the block: CopyFail, the server's error, nothing stored.
    try:
        with conn.cursor() as cur:
            with cur.copy("COPY users (email) FROM STDIN") as cp:
                cp.write_row(("fail@x.y",))
                raise RuntimeError("changed my mind")
    except RuntimeError:
        print("copy failed by the client")
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 2

with psycopg.connect(url) as conn:
    # In a transaction: a blocked COPY aborts it.
    assert copy(conn, ["Dee@X.Y"]) == 1
    try:
        copy(conn, ["bad2"])
        raise AssertionError("bad row not blocked")
    except errors.RaiseException:
        pass
    try:
        conn.execute("SELECT 1")
        raise AssertionError("transaction not aborted")
    except errors.InFailedSqlTransaction:
        print("transaction aborted")
    conn.rollback()
    assert copy(conn, ["Eve@X.Y", "Fay@X.Y"]) == 2
    conn.commit()
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 4
print("ok")
