"""psycopg 3 through the pgfire proxy: simple and extended queries, binary, COPY, pipeline mode,
transactions, LISTEN/NOTIFY, cancel. Exits non-zero on the first failure."""
import sys
import threading
import time

import psycopg

url = sys.argv[1]

with psycopg.connect(url, autocommit=True) as conn:
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text, n numeric, j jsonb)")
    # Extended protocol with parameters, text and binary results.
    conn.execute("INSERT INTO t VALUES (%s, %s, %s, %s)", (1, "one", "1.50", '{"a": 1}'))
    assert conn.execute("SELECT v, n::text FROM t WHERE id = %s", (1,)).fetchone() == ("one", "1.50")
    cur = conn.cursor(binary=True)
    assert cur.execute("SELECT id, v FROM t").fetchall() == [(1, "one")]
    # Server-side prepared statements (prepare_threshold=0 prepares on first use).
    for i in range(2, 12):
        conn.execute("INSERT INTO t (id, v) VALUES (%s, %s)", (i, f"v{i}"), prepare=True)
    # Pipeline mode: many statements, one sync.
    with conn.pipeline():
        for i in range(100, 300):
            conn.execute("INSERT INTO t (id, v) VALUES (%s, %s)", (i, f"p{i}"))
        cur = conn.execute("SELECT count(*) FROM t")
    assert cur.fetchone() == (211,)
    # An error inside a pipeline.
    try:
        with conn.pipeline():
            conn.execute("INSERT INTO t (id) VALUES (1)")
            conn.execute("SELECT 1")
        raise AssertionError("duplicate key not reported")
    except psycopg.errors.UniqueViolation:
        pass
    # Transactions.
    with conn.transaction():
        conn.execute("INSERT INTO t (id) VALUES (1000)")
    try:
        with conn.transaction():
            conn.execute("INSERT INTO t (id) VALUES (1001)")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    assert conn.execute("SELECT count(*) FROM t WHERE id >= 1000").fetchone() == (1,)
    # COPY both ways.
    with conn.cursor().copy("COPY t (id, v) FROM STDIN") as copy:
        for i in range(2000, 3000):
            copy.write_row((i, f"c{i}"))
    rows = []
    with conn.cursor().copy("COPY (SELECT id FROM t WHERE id >= 2000 ORDER BY id) TO STDOUT") as copy:
        for row in copy.rows():
            rows.append(row)
    assert len(rows) == 1000
    # LISTEN / NOTIFY.
    conn.execute("LISTEN chan")
    with psycopg.connect(url, autocommit=True) as other:
        other.execute("NOTIFY chan, 'hi'")
    got = next(conn.notifies(timeout=10))
    assert (got.channel, got.payload) == ("chan", "hi")
    # Cancel a long query.
    timer = threading.Timer(0.3, conn.cancel)
    timer.start()
    started = time.time()
    try:
        conn.execute("SELECT pg_sleep(20)")
        raise AssertionError("not cancelled")
    except psycopg.errors.QueryCanceled:
        assert time.time() - started < 10

print("psycopg suite ok")
