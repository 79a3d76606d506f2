#!/usr/bin/env python3
"""Writes the hand-made seeds of the fuzz targets (fuzz/seeds/<target>/seed-*). The fuzzer starts
from them and keeps what it finds in fuzz/corpus/<target>, minimised by `scripts/fuzz`."""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def cstr(s):
    return s.encode() + b"\0"


def frame(tag, body):
    return tag + struct.pack(">i", len(body) + 4) + body


def startup(params):
    body = struct.pack(">i", 196608) + b"".join(cstr(k) + cstr(v) for k, v in params) + b"\0"
    return struct.pack(">i", len(body) + 4) + body


wire = {
    "startup": startup([("user", "app"), ("database", "app"), ("application_name", "x")]),
    "ssl": struct.pack(">ii", 8, 80877103),
    "cancel": struct.pack(">iiii", 16, 80877102, 42, 7),
    "query": frame(b"Q", cstr("INSERT INTO users (email) VALUES ('a@b.c') RETURNING *")),
    "extended": frame(b"P", cstr("s1") + cstr("UPDATE users SET email = $1 WHERE id = $2") + struct.pack(">hii", 2, 25, 20))
    + frame(b"B", cstr("p1") + cstr("s1") + struct.pack(">hhh", 2, 0, 1) + struct.pack(">h", 2)
            + struct.pack(">i", 5) + b"x@y.z" + struct.pack(">i", 8) + struct.pack(">q", 42) + struct.pack(">hh", 1, 1))
    + frame(b"D", b"P" + cstr("p1")) + frame(b"E", cstr("p1") + struct.pack(">i", 0)) + frame(b"S", b""),
    "backend": frame(b"Z", b"I") + frame(b"E", b"SERROR\0C23505\0Mduplicate key\0\0")
    + frame(b"N", b"SNOTICE\0C00000\0Mhello\0\0") + frame(b"C", cstr("INSERT 0 1")),
    "copy": frame(b"d", b"1\tada\n") + frame(b"c", b"") + frame(b"f", cstr("no")),
}


def relation(oid, ns, name, cols):
    b = b"R" + struct.pack(">I", oid) + cstr(ns) + cstr(name) + b"f" + struct.pack(">H", len(cols))
    for n, t, key in cols:
        b += bytes([1 if key else 0]) + cstr(n) + struct.pack(">Ii", t, -1)
    return b


def tuple_(vals):
    b = struct.pack(">H", len(vals))
    for v in vals:
        if v is None:
            b += b"n"
        elif v == "u":
            b += b"u"
        else:
            b += b"t" + struct.pack(">I", len(v)) + v.encode()
    return b


def begin(lsn, xid):
    return b"B" + struct.pack(">QqI", lsn, 0, xid)


def commit(lsn, end):
    return b"C" + b"\0" + struct.pack(">QQq", lsn, end, 0)


def seq(*msgs):
    return b"".join(struct.pack(">H", len(m)) + m for m in msgs)


users = relation(16384, "public", "users", [("id", 20, True), ("email", 25, False), ("meta", 3802, False), ("n", 1700, False)])
pgoutput = {
    "insert": seq(users, begin(0x100, 700), b"I" + struct.pack(">I", 16384) + b"N" + tuple_(["1", "a@b.c", '{"k":[1,2]}', "1.50"]), commit(0x100, 0x120)),
    "update": seq(users, begin(0x200, 701), b"U" + struct.pack(">I", 16384) + b"O" + tuple_(["1", "a@b.c", None, "u"]) + b"N" + tuple_(["1", "x@b.c", None, "u"]), commit(0x200, 0x220)),
    "delete": seq(users, begin(0x300, 702), b"D" + struct.pack(">I", 16384) + b"K" + tuple_(["1", None, None, None]), commit(0x300, 0x320)),
    "truncate_message": seq(users, begin(0x400, 703), b"T" + struct.pack(">IBI", 1, 0, 16384),
                            b"M" + b"\1" + struct.pack(">Q", 0x410) + cstr("pgfire.config") + struct.pack(">I", 2) + b"{}", commit(0x400, 0x420)),
    "streamed": seq(b"S" + struct.pack(">IB", 800, 1), relation(16385, "public", "t", [("id", 23, True)]),
                    b"I" + struct.pack(">II", 800, 16385) + b"N" + tuple_(["7"]), b"E",
                    b"c" + struct.pack(">IBQQq", 800, 0, 0x500, 0x520, 0)),
    "stream_abort": seq(b"S" + struct.pack(">IB", 801, 1), b"E", b"A" + struct.pack(">II", 801, 801)),
}

classify = {
    "insert": "INSERT INTO users (email) VALUES ('a@b.c') ON CONFLICT (email) DO UPDATE SET email = excluded.email RETURNING *",
    "update": "UPDATE public.users u SET email = lower(email) FROM accounts a WHERE a.id = u.id",
    "cte": "WITH d AS (DELETE FROM \"users\" WHERE id = 1 RETURNING *) INSERT INTO app.\"Orders\" SELECT * FROM d",
    "merge": "MERGE INTO users t USING (VALUES (1)) s(id) ON t.id = s.id WHEN MATCHED THEN DELETE",
    "do": "DO $$ BEGIN UPDATE users SET email = 'x'; END $$",
    "call": "CALL app.proc(1); SELECT my_func(2); PREPARE p AS DELETE FROM users; EXECUTE p",
    "copy": "COPY users (email) FROM STDIN WITH (FORMAT csv)",
    "select": "SELECT 1; SELECT * FROM users WHERE email LIKE 'a%'; SET search_path = app, public",
    "tamper": "SET session_replication_role = replica; ALTER TABLE users DISABLE TRIGGER ALL; TRUNCATE users",
    "escape": "SELECT E'\\x41', U&'\\0041', $tag$users$tag$, 'it''s'",
}

answer = {
    "allow": '{"allow": true}',
    "block": '{"allow": false, "message": "Invalid email address"}',
    "modify": '{"allow": true, "data": {"email": "a@b.c", "n": 12345678901234567890.5, "tags": ["x"], "meta": {"k": null}}}',
    "bad": '{"allow": "yes", "data": [1]}',
    "nested": '[[[[[[[[[[{"allow": true}]]]]]]]]]]',
    "unicode": r'{"allow": false, "message": "\u00e9\ud83d\ude00"}',
}

for target, seeds in (("wire", wire), ("pgoutput", pgoutput), ("classify", classify), ("answer", answer)):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        if isinstance(data, str):
            data = data.encode()
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(data)
