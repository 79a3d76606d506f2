"""A write to a table with PRE hooks whose results a psycopg 3 pipeline fetches before its Sync
(libpq sends Flush): refused with a message that says what to do; the same write with a Sync
first goes through. Exits non-zero on the first failure."""
import sys

import psycopg
from psycopg import errors

url = sys.argv[1]

with psycopg.connect(url, autocommit=True) as conn:
    try:
        with conn.pipeline():
            cur = conn.execute("INSERT INTO users (email) VALUES (%s) RETURNING id", ["flush@x.y"])
            cur.fetchone()
        raise AssertionError("fetched before Sync: not refused")
    except errors.FeatureNotSupported as e:
        msg = e.diag.message_primary
        assert "send Sync instead of Flush" in msg and "pipeline.sync()" in msg, msg
        print(f"refused: {msg}")
    assert conn.execute("SELECT count(*) FROM users WHERE email = 'flush@x.y'").fetchone()[0] == 0
    with conn.pipeline() as p:
        cur = conn.execute("INSERT INTO users (email) VALUES (%s) RETURNING id", ["Flush@X.Y"])
        p.sync()
        assert cur.fetchone()[0] > 0
    print("with a Sync first: held and stored")
print("ok")
