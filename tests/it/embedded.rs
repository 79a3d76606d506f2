//! The private PostgreSQL the tests (and `pgfire dev`) run.

use crate::support::TestDb;

#[test]
fn shared_cluster_runs_with_logical_replication() {
    let db = TestDb::new();
    assert_eq!(db.psql("SHOW wal_level"), "logical");
    assert_eq!(db.psql("SELECT current_database()"), db.name);
}
