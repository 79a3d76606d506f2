// node-postgres through the pgfire proxy: simple and extended queries, prepared statements,
// transactions, errors, LISTEN/NOTIFY. Exits non-zero on the first failure.
const assert = require('assert');
const { Client } = require('pg');

async function main() {
  const url = process.argv[2];
  const client = new Client({ connectionString: url });
  await client.connect();
  await client.query('CREATE TABLE t (id int PRIMARY KEY, v text, big int8, n numeric)');
  await client.query('INSERT INTO t VALUES ($1, $2, $3, $4)', [1, 'one', '9007199254740993', '1.50']);
  const r = await client.query('SELECT v, big, n FROM t WHERE id = $1', [1]);
  assert.deepStrictEqual(r.rows, [{ v: 'one', big: '9007199254740993', n: '1.50' }]);
  // Named prepared statements.
  for (let i = 2; i < 50; i++) {
    await client.query({ name: 'ins', text: 'INSERT INTO t (id, v) VALUES ($1, $2)', values: [i, 'v' + i] });
  }
  // Queries in flight together (node-postgres queues them on the connection).
  const all = await Promise.all(Array.from({ length: 50 }, (_, i) => client.query('SELECT $1::int AS x', [i])));
  assert.strictEqual(all[49].rows[0].x, 49);
  // Multi-statement simple query and transactions.
  await client.query('BEGIN; INSERT INTO t (id) VALUES (1000); ROLLBACK;');
  await assert.rejects(client.query('INSERT INTO t (id) VALUES (1)'), (e) => e.code === '23505');
  const c = await client.query('SELECT count(*)::int AS c FROM t');
  assert.strictEqual(c.rows[0].c, 49);
  // LISTEN / NOTIFY.
  const got = new Promise((resolve) => client.on('notification', resolve));
  await client.query('LISTEN chan');
  const other = new Client({ connectionString: url });
  await other.connect();
  await other.query("NOTIFY chan, 'hi'");
  await other.end();
  const n = await got;
  assert.strictEqual(n.payload, 'hi');
  await client.end();
  console.log('node-postgres suite ok');
}

main().catch((e) => { console.error(e); process.exit(1); });
