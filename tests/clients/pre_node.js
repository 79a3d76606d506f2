// PRE hooks through the pgfire proxy with node-postgres: parameterised (extended protocol) and
// plain (simple protocol) queries, a block inside a transaction, a rewrite with RETURNING.
const { Client } = require('pg');

async function expectBlock(client, text, values, what) {
  try {
    await client.query(text, values);
  } catch (e) {
    if (e.code !== 'P0001' || e.message !== 'Invalid email address') throw new Error(`${what}: ${e.code} ${e.message}`);
    if (!String(e.detail).includes('PRE_USER_CREATE')) throw new Error(`${what}: detail ${e.detail}`);
    console.log(`blocked: ${what}`);
    return;
  }
  throw new Error(`${what}: not blocked`);
}

(async () => {
  const client = new Client({ connectionString: process.argv[2] });
  await client.connect();
  await expectBlock(client, 'INSERT INTO users (email) VALUES ($1)', ['bad'], 'parameter');
  await expectBlock(client, "INSERT INTO users (email) VALUES ('bad')", undefined, 'simple protocol');
  await expectBlock(client, { name: 'ins', text: 'INSERT INTO users (email) VALUES ($1)', values: ['bad'] }, undefined, 'named statement');
  await client.query({ name: 'ins', text: 'INSERT INTO users (email) VALUES ($1)', values: ['N@X.Y'] });
  const r = await client.query('INSERT INTO users (email, name) VALUES ($1, $2) RETURNING id, email, name', ['Bo@X.Y', 'x']);
  const row = r.rows[0];
  if (row.email !== 'bo@x.y' || row.name !== `rewritten ${row.id}`) throw new Error(`rewrite: ${JSON.stringify(row)}`);
  console.log('rewritten');
  await client.query('BEGIN');
  await expectBlock(client, 'INSERT INTO users (email) VALUES ($1)', ['bad'], 'in a transaction');
  try {
    await client.query('SELECT 1');
    throw new Error('transaction not aborted');
  } catch (e) {
    if (e.code !== '25P02') throw e;
  }
  await client.query('ROLLBACK');
  // Queries queued at once.
  const all = await Promise.allSettled([
    client.query('INSERT INTO users (email) VALUES ($1)', ['q1@x.y']),
    client.query('INSERT INTO users (email) VALUES ($1)', ['bad']),
    client.query('INSERT INTO users (email) VALUES ($1)', ['q3@x.y']),
  ]);
  if (all.map((a) => a.status).join() !== 'fulfilled,rejected,fulfilled') throw new Error(JSON.stringify(all));
  console.log('queued queries');
  await client.end();
  console.log('ok');
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
