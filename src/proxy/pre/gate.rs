//! What the relay does with a client's Query or Parse when PRE hooks are on: let it through, hold
//! it (simple protocol: [`super::hold`]), or replace it with a message whose error the server
//! raises itself, so the session's state after a refusal is the server's own. Pure.

use bytes::{BufMut, BytesMut};

use super::hold::{query_frame, raise_sql};
use super::PreConfig;
use crate::metrics::Action;
use crate::proxy::classify::{
    self, Classification, HoldReason, Outcome, Refusal, Strings, Verdict,
};
use crate::wire;

/// SQLSTATE feature_not_supported.
const NOT_SUPPORTED: &str = "0A000";
/// SQLSTATE insufficient_privilege.
const PRIVILEGE: &str = "42501";

pub(in crate::proxy) enum Gate {
    Pass,
    Hold(HoldAs),
    /// Send `frame` instead. With `rewrite`, the server's ErrorResponse whose message contains
    /// `rewrite.0` is replaced by `rewrite.1` on its way to the client.
    Replace {
        frame: BytesMut,
        rewrite: Option<(String, BytesMut)>,
    },
}

/// How a held statement is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::proxy) enum HoldAs {
    /// The whole query string (or batch) in one tentative run ([`super::hold`]).
    Whole,
    /// `COPY watched FROM STDIN`: the tentative run carries the client's COPY data
    /// ([`super::copy`]).
    CopyIn,
    /// A query string of several statements mixing transaction control (or COPY FROM STDIN)
    /// with held writes: run statement by statement ([`super::split`]).
    Split,
}

impl Gate {
    /// What the proxy does with the statement, for `pgfire_proxy_statements_total`.
    pub(in crate::proxy) fn action(&self) -> Action {
        match self {
            Gate::Pass => Action::Streamed,
            Gate::Hold(_) => Action::Held,
            Gate::Replace { .. } => Action::Refused,
        }
    }
}

fn refusal_code(r: &Refusal) -> &'static str {
    match r {
        Refusal::Truncate(_) | Refusal::TruncateCascade => NOT_SUPPORTED,
        _ => PRIVILEGE,
    }
}

/// What the gate decided on a statement text (kept in [`super::verdicts`]).
#[derive(Debug, Clone)]
pub(in crate::proxy) enum Decision {
    Pass,
    Hold(HoldAs),
    Refuse(&'static str, String),
}

fn decide(cfg: &PreConfig, sql: &str, strings: Strings) -> Decision {
    cfg.verdicts.get_or(sql, strings, || {
        let c = classify::classify_lexed(sql, &cfg.watched, strings);
        // A text the parser rejects passes; its verdict must not answer for a variant that
        // parses (see verdicts).
        let keep = !matches!(c.outcome, Outcome::ParseError(_));
        (classified(cfg, &c), keep)
    })
}

fn classified(cfg: &PreConfig, c: &Classification) -> Decision {
    match c.verdict() {
        Verdict::Passes => Decision::Pass,
        Verdict::Refused { reason } => {
            if reason.allowable() && cfg.allow_truncate {
                Decision::Pass
            } else {
                Decision::Refuse(refusal_code(reason), format!("pgfire: {reason}"))
            }
        }
        Verdict::Holds { .. } => {
            let copy_stdin = c.statements.iter().any(|s| {
                matches!(
                    &s.verdict,
                    Verdict::Holds {
                        reason: HoldReason::CopyFromStdin,
                        ..
                    }
                )
            });
            let several = c.statements.len() > 1;
            let mixed = several && c.statements.iter().any(|s| s.control.is_some());
            Decision::Hold(match (several && (mixed || copy_stdin), copy_stdin) {
                (true, _) => HoldAs::Split,
                (false, true) => HoldAs::CopyIn,
                (false, false) => HoldAs::Whole,
            })
        }
    }
}

/// A simple-protocol Query, lexed as `strings` says.
pub(in crate::proxy) fn query(cfg: &PreConfig, strings: Strings, sql: &str) -> Gate {
    match decide(cfg, sql, strings) {
        Decision::Pass => Gate::Pass,
        Decision::Hold(how) => Gate::Hold(how),
        Decision::Refuse(code, message) => Gate::Replace {
            frame: query_frame(&raise_sql(&message, None, code)),
            rewrite: None,
        },
    }
}

/// An extended-protocol Parse: let through, held (its batch is held when it runs the
/// statement, see [`super::unit`]), or refused: replaced by a Parse of the same statement name
/// that fails at once (so the server skips the rest of the batch until Sync, as after any Parse
/// error), whose error is rewritten into the refusal.
pub(in crate::proxy) fn parse(
    cfg: &PreConfig,
    p: &wire::Parse<'_>,
    nonce: &dyn Fn() -> u64,
    strings: Strings,
) -> Gate {
    match decide(cfg, &p.sql, strings) {
        Decision::Pass => Gate::Pass,
        // A prepared statement is one statement (the server refuses several).
        Decision::Hold(HoldAs::Split) => Gate::Hold(HoldAs::Whole),
        Decision::Hold(how) => Gate::Hold(how),
        Decision::Refuse(code, message) => {
            let (frame, rewrite) = doomed_parse(p.statement, &message, code, nonce());
            Gate::Replace {
                frame,
                rewrite: Some(rewrite),
            }
        }
    }
}

/// A Parse of `statement` that fails at once with an error naming a marker, and the
/// ErrorResponse (`code`, `message`) the marked error is to be rewritten into.
pub(in crate::proxy) fn doomed_parse(
    statement: &str,
    message: &str,
    code: &str,
    nonce: u64,
) -> (BytesMut, (String, BytesMut)) {
    let marker = format!("pgfire-refused-{nonce:016x}");
    let sql = format!("SELECT '{marker}'::regclass");
    let mut frame = BytesMut::new();
    frame.put_u8(b'P');
    frame.put_i32((4 + statement.len() + 1 + sql.len() + 1 + 2) as i32);
    frame.put_slice(statement.as_bytes());
    frame.put_u8(0);
    frame.put_slice(sql.as_bytes());
    frame.put_u8(0);
    frame.put_i16(0);
    let mut error = BytesMut::new();
    wire::error_response(&mut error, "ERROR", code, message);
    (frame, (marker, error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::classify::Watched;

    const S: Strings = Strings::On;

    fn cfg() -> PreConfig {
        PreConfig {
            watched: Watched::new(["public.users"]).unwrap(),
            rows_limit: 1000,
            ..PreConfig::default()
        }
    }

    #[test]
    fn reads_pass_writes_hold_tampering_is_refused() {
        let c = cfg();
        assert!(matches!(query(&c, S, "SELECT * FROM users"), Gate::Pass));
        assert!(matches!(
            query(&c, S, "INSERT INTO users VALUES (1)"),
            Gate::Hold(HoldAs::Whole)
        ));
        for (sql, how) in [
            ("COPY users FROM STDIN", HoldAs::CopyIn),
            ("COPY users FROM '/tmp/stdin'", HoldAs::Whole),
            ("COPY users FROM PROGRAM 'cat'", HoldAs::Whole),
            ("SELECT 1; INSERT INTO users VALUES (1)", HoldAs::Whole),
            ("BEGIN; INSERT INTO users VALUES (1); COMMIT", HoldAs::Split),
            ("COPY users FROM STDIN; SELECT 1", HoldAs::Split),
        ] {
            assert!(
                matches!(query(&c, S, sql), Gate::Hold(h) if h == how),
                "{sql}"
            );
        }
        assert!(matches!(
            query(&c, S, "insert into \"USERS\" values (1)"),
            Gate::Pass
        ));
        assert!(matches!(
            query(&c, S, "INSERT INTO Users VALUES (1)"),
            Gate::Hold(_)
        ));
        for refused in [
            "SET session_replication_role = replica",
            "SET pgfire.pre_mode = 'record:1'",
            "RESET pgfire.proxied",
            "TRUNCATE users",
            "ALTER TABLE users DISABLE TRIGGER ALL",
            "DELETE FROM pgfire.settings",
        ] {
            assert!(
                matches!(query(&c, S, refused), Gate::Replace { .. }),
                "{refused}"
            );
        }
    }

    #[test]
    fn a_remembered_verdict_answers_only_for_texts_that_classify_the_same() {
        let cfg = cfg();
        let held = |sql: &str| matches!(query(&cfg, S, sql), Gate::Hold(_));
        // Texts that differ in their numbers share a verdict; names never.
        assert!(held("UPDATE users SET n = 1 WHERE id = 10"));
        assert!(held("UPDATE users SET n = 2 WHERE id = 20"));
        assert!(!held("UPDATE users2 SET n = 2 WHERE id = 20"));
        assert!(held("UPDATE users SET n = 3 WHERE id = 30"));
        // A number too large for the grammar: a parse error passes (the server reports it),
        // and is not remembered for the variant that parses.
        assert!(!held("FETCH 99999999999999999999 FROM c"));
        assert!(held("FETCH 5 FROM c"));
        assert_eq!(cfg.verdicts.len(), 3);
    }

    #[test]
    fn truncate_can_be_allowed() {
        let mut c = cfg();
        c.allow_truncate = true;
        assert!(matches!(query(&c, S, "TRUNCATE users"), Gate::Pass));
    }

    #[test]
    fn a_refused_parse_keeps_its_statement_name() {
        let p = wire::Parse {
            statement: "s1",
            sql: "TRUNCATE users".into(),
            param_types: vec![25],
        };
        let Gate::Replace { frame, rewrite } = parse(&cfg(), &p, &|| 7, S) else {
            panic!()
        };
        let Some(wire::Frontend::Parse(q)) = wire::decode_frontend(&frame).unwrap() else {
            panic!()
        };
        assert_eq!(q.statement, "s1");
        assert!(q.sql.contains(&rewrite.unwrap().0));
        assert!(q.param_types.is_empty());
    }
}
