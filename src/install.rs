//! `pgfire install` / `pgfire uninstall`: versioned, idempotent migrations from `sql/` into schema
//! `pgfire`, the publication and the replication slot, and a clear word on missing privileges.

use tokio_postgres::Client;

use crate::db;

/// One migration: applied once, in version order, in its own transaction.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The migrations this build of pgfire knows, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "schema",
        sql: include_str!("../sql/001_schema.sql"),
    },
    Migration {
        version: 2,
        name: "validation",
        sql: include_str!("../sql/002_validation.sql"),
    },
    Migration {
        version: 3,
        name: "config as of commit",
        sql: include_str!("../sql/003_config_as_of_commit.sql"),
    },
    Migration {
        version: 4,
        name: "snapshot of whole rows",
        sql: include_str!("../sql/004_snapshot_whole_rows.sql"),
    },
    Migration {
        version: 5,
        name: "events",
        sql: include_str!("../sql/005_events.sql"),
    },
    Migration {
        version: 6,
        name: "delivery",
        sql: include_str!("../sql/006_delivery.sql"),
    },
    Migration {
        version: 7,
        name: "pre hooks",
        sql: include_str!("../sql/007_pre_hooks.sql"),
    },
    Migration {
        version: 8,
        name: "delivery order",
        sql: include_str!("../sql/008_delivery_order.sql"),
    },
    Migration {
        version: 9,
        name: "pre hooks hardened",
        sql: include_str!("../sql/009_pre_hardening.sql"),
    },
    Migration {
        version: 10,
        name: "pre chains decided in the database",
        sql: include_str!("../sql/010_pre_in_database.sql"),
    },
    Migration {
        version: 11,
        name: "a lean in-database pre path",
        sql: include_str!("../sql/011_pre_lean_path.sql"),
    },
];

/// The publication pgfire's consumer reads; source tables are added to it.
pub const PUBLICATION: &str = "pgfire";
/// The replication slot's name when none is given.
pub const DEFAULT_SLOT: &str = "pgfire";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0}")]
    Privileges(String),
    #[error("wal_level is {0}; pgfire needs wal_level = logical (set it in postgresql.conf and restart PostgreSQL)")]
    WalLevel(String),
    #[error("migration {version} ({name}) failed: {}", db::describe(.source))]
    Migration {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the database has pgfire schema version {found}, newer than this pgfire ({known}); upgrade pgfire")]
    TooNew { found: i32, known: i32 },
    #[error("replication slot {0:?} is in use (pid {1}); stop the pgfire that reads it first")]
    SlotInUse(String, i32),
    #[error("{}", db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
}

/// What an install did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct InstallReport {
    pub applied: Vec<i32>,
    pub version: i32,
    pub created_publication: bool,
    pub created_slot: bool,
    pub slot: String,
    /// The event trigger that deletes the `pgfire.sources` row of a dropped table is in place
    /// (it needs a superuser to create).
    pub tracks_dropped_sources: bool,
    /// The event triggers of the datahub events (`api.dataTable_*`) are in place (they need a
    /// superuser to create).
    pub tracks_datahub: bool,
}

/// Install or upgrade: apply the migrations not yet applied, ensure the publication and slot.
/// Running it again changes nothing.
pub async fn install(
    client: &Client,
    slot: Option<&str>,
    migrations: &[Migration],
) -> Result<InstallReport, InstallError> {
    check_prerequisites(client).await?;
    client
        .batch_execute(
            "SET client_min_messages = warning;
             SELECT pg_advisory_lock(hashtext('pgfire.install'));
             CREATE SCHEMA IF NOT EXISTS pgfire;
             CREATE TABLE IF NOT EXISTS pgfire.migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now());",
        )
        .await?;
    let result = apply(client, slot, migrations).await;
    let _ = client
        .batch_execute("SELECT pg_advisory_unlock(hashtext('pgfire.install'))")
        .await;
    result
}

async fn apply(
    client: &Client,
    slot: Option<&str>,
    migrations: &[Migration],
) -> Result<InstallReport, InstallError> {
    let found: i32 = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM pgfire.migrations",
            &[],
        )
        .await?
        .get(0);
    let known = migrations.iter().map(|m| m.version).max().unwrap_or(0);
    if found > known {
        return Err(InstallError::TooNew { found, known });
    }
    let mut report = InstallReport::default();
    for m in migrations.iter().filter(|m| m.version > found) {
        let sql = format!(
            "BEGIN; SET LOCAL pgfire.migrating = 'on'; {}\n; INSERT INTO pgfire.migrations (version, name) VALUES ({}, {}); COMMIT;",
            m.sql,
            m.version,
            postgres_protocol::escape::escape_literal(m.name)
        );
        if let Err(source) = client.batch_execute(&sql).await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(InstallError::Migration {
                version: m.version,
                name: m.name,
                source,
            });
        }
        tracing::info!(version = m.version, name = m.name, "applied migration");
        report.applied.push(m.version);
    }
    report.version = known.max(found);

    let has_pub = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&PUBLICATION],
        )
        .await?
        .is_some();
    if !has_pub {
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {PUBLICATION} WITH (publish_via_partition_root = true)"
            ))
            .await?;
        report.created_publication = true;
    } else {
        // Changes of a partitioned source's partitions arrive as changes of the source itself
        // (publications made by pgfire before 0.1.1 lacked this).
        client
            .batch_execute(&format!(
                "ALTER PUBLICATION {PUBLICATION} SET (publish_via_partition_root = true)"
            ))
            .await?;
    }

    let stored: Option<String> = client
        .query_opt(
            "SELECT value FROM pgfire.settings WHERE key = 'slot_name'",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    let slot = slot
        .map(str::to_string)
        .or(stored.clone())
        .unwrap_or_else(|| DEFAULT_SLOT.to_string());
    if stored.as_deref() != Some(slot.as_str()) {
        client
            .execute(
                "INSERT INTO pgfire.settings (key, value, description)
                 VALUES ('slot_name', $1, 'replication slot pgfire reads (set by pgfire install --slot)')
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&slot],
            )
            .await?;
    }
    let has_slot = client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .is_some();
    if !has_slot {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await?;
        // A new slot starts from here: the configuration in force is today's.
        let applied: bool = client
            .query_one(
                "SELECT to_regclass('pgfire.config_applied') IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        if applied {
            client
                .batch_execute(
                    "DELETE FROM pgfire.config_applied;
                     INSERT INTO pgfire.config_applied (commit_lsn, snapshot) VALUES ('0/0', pgfire.config_snapshot());",
                )
                .await?;
        }
        report.created_slot = true;
    }
    report.slot = slot;
    // Event triggers a role that was not a superuser could not create: a superuser running
    // install again creates them.
    for track in ["pgfire.track_dropped_sources()", "pgfire.track_datahub()"] {
        let can: bool = client
            .query_one(
                "SELECT to_regprocedure($1) IS NOT NULL
                    AND (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
                &[&track],
            )
            .await?
            .get(0);
        if can {
            client.batch_execute(&format!("SELECT {track}")).await?;
        }
    }
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'pgfire_source_dropped'),
                    EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'pgfire_datahub_ddl')",
            &[],
        )
        .await?;
    report.tracks_dropped_sources = row.get(0);
    report.tracks_datahub = row.get(1);
    Ok(report)
}

/// Check wal_level and the privileges install needs; report every missing one with its fix.
pub async fn check_prerequisites(client: &Client) -> Result<(), InstallError> {
    let row = client
        .query_one(
            "SELECT current_user::text, current_database()::text, r.rolsuper, r.rolreplication,
                    has_database_privilege(current_database(), 'CREATE'),
                    (SELECT pg_has_role(nspowner, 'USAGE') FROM pg_namespace WHERE nspname = 'pgfire'),
                    current_setting('wal_level')
               FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let (user, database): (String, String) = (row.get(0), row.get(1));
    let (superuser, replication, create): (bool, bool, bool) = (row.get(2), row.get(3), row.get(4));
    let owns_schema: Option<bool> = row.get(5);
    let wal_level: String = row.get(6);
    let mut missing = Vec::new();
    if !superuser && !replication {
        missing.push(format!(
            "REPLICATION, to create and read the replication slot (ALTER ROLE {user} REPLICATION)"
        ));
    }
    if !superuser && !create {
        missing.push(format!(
            "CREATE on database {database}, to create schema pgfire and the publication (GRANT CREATE ON DATABASE {database} TO {user})"
        ));
    }
    if owns_schema == Some(false) {
        missing.push(format!(
            "ownership of schema pgfire, which another role installed (run as that role, or ALTER SCHEMA pgfire OWNER TO {user})"
        ));
    }
    if !missing.is_empty() {
        return Err(InstallError::Privileges(format!(
            "role {user} lacks privileges pgfire needs:\n  - {}",
            missing.join("\n  - ")
        )));
    }
    if wal_level != "logical" {
        return Err(InstallError::WalLevel(wal_level));
    }
    Ok(())
}

/// Remove the slot, the publication and schema pgfire (configuration and history included).
pub async fn uninstall(client: &Client) -> Result<(), InstallError> {
    let slot: Option<String> = client
        .query_opt(
            "SELECT value FROM pgfire.settings WHERE key = 'slot_name'
              AND to_regclass('pgfire.settings') IS NOT NULL",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0));
    if let Some(slot) = slot {
        if let Some(row) = client
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
        {
            if let Some(pid) = row.get::<_, Option<i32>>(0) {
                return Err(InstallError::SlotInUse(slot, pid));
            }
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await?;
        }
    }
    client
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {PUBLICATION}; DROP SCHEMA IF EXISTS pgfire CASCADE;"
        ))
        .await?;
    Ok(())
}

pub async fn install_cmd(url: &str, slot: Option<&str>) -> anyhow::Result<()> {
    let client = db::connect(url).await?;
    let report = install(&client, slot, MIGRATIONS).await?;
    if report.applied.is_empty() {
        println!(
            "pgfire is up to date (schema version {}, slot {}).",
            report.version, report.slot
        );
    } else {
        println!(
            "pgfire installed: schema version {} (applied {:?}), publication {PUBLICATION}, slot {}{}.",
            report.version,
            report.applied,
            report.slot,
            if report.created_slot { " (created)" } else { "" }
        );
        println!("Register a table:  INSERT INTO pgfire.sources (table_name, kind) VALUES ('public.users', 'user');");
    }
    if !report.tracks_datahub {
        println!(
            "Note: not installed as a superuser, so pgfire could not create the event triggers of the datahub \
             events (api.dataTable_created/_updated/_deleted/_emptied): they stay off, everything else works; \
             have a superuser run SELECT pgfire.track_datahub(); to turn them on."
        );
    }
    if !report.tracks_dropped_sources {
        println!(
            "Note: not installed as a superuser, so dropping a source table leaves its pgfire.sources row; \
             delete it yourself, or have a superuser run SELECT pgfire.track_dropped_sources();"
        );
    }
    Ok(())
}

pub async fn uninstall_cmd(url: &str, yes: bool) -> anyhow::Result<()> {
    if !yes {
        anyhow::bail!(
            "uninstall drops schema pgfire (functions, subscriptions, execution history), the publication and the replication slot; run again with --yes to confirm"
        );
    }
    let client = db::connect(url).await?;
    uninstall(&client).await?;
    println!("pgfire uninstalled.");
    Ok(())
}
