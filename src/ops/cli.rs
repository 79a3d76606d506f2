//! The operator subcommands (`subscribe`, `unsubscribe`, `functions`, `executions`,
//! `redeliver`, `events --json`): a table for people, `--json` for scripts; every error names the
//! problem and ends the command non-zero.

use serde::Serialize;

use super::{ExecutionFilter, Redeliver, Subscribed};
use crate::cli::DbArgs;

#[derive(Debug, clap::Args)]
pub struct SubscribeArgs {
    /// Event type, e.g. POST_USER_CREATE (`pgfire events` lists them).
    pub event: String,
    /// Function name (`pgfire functions` lists them).
    pub function: String,
    /// Execution order among the event's functions, lower first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Declare EVENT as a custom event type when it does not exist yet.
    #[arg(long)]
    pub declare: bool,
    /// JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub db: DbArgs,
}

impl SubscribeArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        subscribe_cmd(
            &self.db.database_url,
            &self.event,
            &self.function,
            self.priority,
            self.declare,
            self.json,
        )
        .await
    }
}

#[derive(Debug, clap::Args)]
pub struct UnsubscribeArgs {
    /// Event type.
    pub event: String,
    /// Function name.
    pub function: String,
    /// JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub db: DbArgs,
}

impl UnsubscribeArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        unsubscribe_cmd(
            &self.db.database_url,
            &self.event,
            &self.function,
            self.json,
        )
        .await
    }
}

#[derive(Debug, clap::Args)]
pub struct ExecutionsArgs {
    /// Only runs of this function.
    #[arg(long)]
    pub function: Option<String>,
    /// Only runs of this event type.
    #[arg(long)]
    pub event: Option<String>,
    /// Only runs with this status: ok, error, timeout, blocked, modified, dead, or failed
    /// (error, timeout and dead).
    #[arg(long)]
    pub status: Option<String>,
    /// Only runs since then: 30s, 15m, 2h, 1d ago, or a timestamp (2026-12-02 03:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Only runs until then (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// Most runs shown.
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    /// JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub db: DbArgs,
}

impl ExecutionsArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        if self.limit < 1 {
            anyhow::bail!("--limit must be at least 1, not {}", self.limit);
        }
        let filter = ExecutionFilter {
            event_type: self.event,
            function: self.function,
            status: self.status,
            since: self.since,
            until: self.until,
            after_id: None,
            limit: self.limit,
        };
        executions_cmd(&self.db.database_url, filter, self.json).await
    }
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).multiple(true).args(["execution", "function", "since"])))]
pub struct RedeliverArgs {
    /// The dead run one execution recorded (its id in `pgfire executions`).
    #[arg(long)]
    pub execution: Option<i64>,
    /// Every dead run of this function (with --since: only those of the time range).
    #[arg(long)]
    pub function: Option<String>,
    /// Dead runs parked since then (30s, 15m, 2h, 1d ago, or a timestamp).
    #[arg(long)]
    pub since: Option<String>,
    /// With --since: parked until then (default now).
    #[arg(long, requires = "since")]
    pub until: Option<String>,
    /// JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub db: DbArgs,
}

impl RedeliverArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let what = match (self.execution, self.since) {
            (Some(id), None) if self.function.is_none() => Redeliver::Execution(id),
            (Some(_), _) => {
                anyhow::bail!("--execution names one run: leave out --function and --since")
            }
            (None, Some(since)) => Redeliver::Range {
                since,
                until: self.until,
                function: self.function,
            },
            (None, None) => Redeliver::Function(self.function.unwrap_or_default()),
        };
        redeliver_cmd(&self.db.database_url, what, self.json).await
    }
}

/// Print `value` as JSON (scripts) or run `table` (people).
fn output<T: Serialize>(json: bool, value: &T, table: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        table(value);
    }
    Ok(())
}

/// Rows aligned in columns under `headers`; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, (cell, w)) in cells.into_iter().zip(&widths).enumerate() {
            if i + 1 == n {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

fn one_line(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(119).collect::<String>())
    } else {
        s
    }
}

pub async fn events_json(url: &str) -> anyhow::Result<()> {
    let c = super::connect(url).await?;
    let events = super::events(&c).await?;
    println!("{}", serde_json::to_string_pretty(&events)?);
    Ok(())
}

pub async fn subscribe_cmd(
    url: &str,
    event: &str,
    function: &str,
    priority: i32,
    declare: bool,
    json: bool,
) -> anyhow::Result<()> {
    let c = super::connect(url).await?;
    let what = super::subscribe(&c, event, function, priority, declare).await?;
    #[derive(Serialize)]
    struct Out<'a> {
        event_type: &'a str,
        function_name: &'a str,
        priority: i32,
        result: Subscribed,
    }
    let out = Out {
        event_type: event,
        function_name: function,
        priority,
        result: what,
    };
    output(json, &out, |o| match o.result {
        Subscribed::New => println!(
            "subscribed {} to {} (priority {}, active)",
            o.function_name, o.event_type, o.priority
        ),
        Subscribed::Updated => println!(
            "{} was subscribed to {} already: priority {}, active",
            o.function_name, o.event_type, o.priority
        ),
    })
}

pub async fn unsubscribe_cmd(
    url: &str,
    event: &str,
    function: &str,
    json: bool,
) -> anyhow::Result<()> {
    let c = super::connect(url).await?;
    super::unsubscribe(&c, event, function).await?;
    let out = serde_json::json!({"event_type": event, "function_name": function, "result": "unsubscribed"});
    output(json, &out, |_| {
        println!("unsubscribed {function} from {event} (its execution history stays)")
    })
}

pub async fn functions_cmd(url: &str, json: bool) -> anyhow::Result<()> {
    let c = super::connect(url).await?;
    let functions = super::functions(&c).await?;
    output(json, &functions, |fs| {
        let rows: Vec<Vec<String>> = fs
            .iter()
            .map(|f| {
                vec![
                    f.name.clone(),
                    f.kind.clone(),
                    if f.active { "active" } else { "inactive" }.into(),
                    format!("{} ms", f.timeout_ms),
                    f.on_error.clone(),
                    f.subscriptions
                        .iter()
                        .map(|s| {
                            if s.active {
                                s.event_type.clone()
                            } else {
                                format!("{} (inactive)", s.event_type)
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    one_line(f.target.as_deref().unwrap_or("-")),
                ]
            })
            .collect();
        print!(
            "{}",
            table(
                &[
                    "FUNCTION",
                    "KIND",
                    "STATUS",
                    "TIMEOUT",
                    "ON_ERROR",
                    "SUBSCRIPTIONS",
                    "TARGET"
                ],
                &rows
            )
        );
    })
}

pub async fn executions_cmd(url: &str, filter: ExecutionFilter, json: bool) -> anyhow::Result<()> {
    let c = super::connect(url).await?;
    let runs = super::history::executions(&c, &filter).await?;
    output(json, &runs, |runs| {
        if runs.is_empty() {
            println!("no executions match");
            return;
        }
        let rows: Vec<Vec<String>> = runs
            .iter()
            .map(|r| {
                vec![
                    r.id.to_string(),
                    r.started_at.clone(),
                    r.event_type.clone(),
                    r.function_name.clone(),
                    r.status.clone(),
                    r.attempt.to_string(),
                    format!("{:.1} ms", r.duration_ms),
                    one_line(r.error.as_deref().unwrap_or("")),
                ]
            })
            .collect();
        print!(
            "{}",
            table(
                &["ID", "STARTED", "EVENT", "FUNCTION", "STATUS", "ATTEMPT", "DURATION", "ERROR"],
                &rows
            )
        );
    })
}

pub async fn redeliver_cmd(url: &str, what: Redeliver, json: bool) -> anyhow::Result<()> {
    let c = super::connect(url).await?;
    let n = super::redeliver(&c, &what).await?;
    let out = serde_json::json!({ "redelivered": n });
    output(json, &out, |_| match n {
        0 => println!("no dead runs matched: nothing to redeliver"),
        1 => println!("1 dead run sent again"),
        n => println!("{n} dead runs sent again"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_do_not_pad_the_last_column() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["é".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    BB\nxyz  1\né    22\n");
        assert_eq!(one_line("a\nb"), "a b");
    }
}
