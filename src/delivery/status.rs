//! `pgfire status`, delivery part: per function, runs in flight (from the running service's
//! `/healthz`), runs parked and dead (from `pgfire.parked`), and the last error.

use std::collections::HashMap;

/// Print one line per function. `running` is what the service reports (empty when it does not
/// answer).
pub async fn print(
    client: &tokio_postgres::Client,
    running: &HashMap<String, u64>,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT f.name, f.kind, f.active, f.paused,
                    count(p.id) FILTER (WHERE p.status = 'parked')::int8,
                    count(p.id) FILTER (WHERE p.status = 'dead')::int8,
                    coalesce((SELECT p2.last_error FROM pgfire.parked p2 WHERE p2.function_name = f.name AND p2.last_error IS NOT NULL
                               ORDER BY p2.next_try DESC LIMIT 1),
                             (SELECT e.error FROM pgfire.executions e WHERE e.function_name = f.name AND e.status <> 'ok'
                               AND e.started_at > now() - interval '1 hour' ORDER BY e.id DESC LIMIT 1))
               FROM pgfire.functions f LEFT JOIN pgfire.parked p ON p.function_name = f.name
              GROUP BY f.name, f.kind, f.active, f.paused ORDER BY f.name",
            &[],
        )
        .await?;
    if rows.is_empty() {
        println!("no functions (INSERT INTO pgfire.functions ...)");
        return Ok(());
    }
    println!(
        "{:<24} {:<8} {:<8} {:>9} {:>7} {:>7}  LAST ERROR",
        "FUNCTION", "KIND", "STATE", "IN FLIGHT", "PARKED", "DEAD"
    );
    for r in rows {
        let (name, kind, active, paused, parked, dead, err): (
            String,
            String,
            bool,
            bool,
            i64,
            i64,
            Option<String>,
        ) = (
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
        );
        let state = match (active, paused) {
            (false, _) => "inactive",
            (true, true) => "paused",
            (true, false) => "active",
        };
        let in_flight = running.get(&name).copied().unwrap_or(0);
        let err: String = err.unwrap_or_default().chars().take(120).collect();
        println!("{name:<24} {kind:<8} {state:<8} {in_flight:>9} {parked:>7} {dead:>7}  {err}");
    }
    Ok(())
}
