//! Which statements the proxy holds for PRE hooks: with PostgreSQL's own parser (`pg_query`), tells
//! the statements of a query string that cannot write a watched table from those that may, and
//! names the statements pgfire refuses outright (TRUNCATE of a watched table, tampering).
//!
//! Pure and synchronous; never panics on any input. What it decides, per statement:
//!
//! - **Holds**: a write to a watched table anywhere in the statement (INSERT, UPDATE, DELETE, MERGE,
//!   writable CTEs, INSERT ... SELECT, `COPY ... FROM`, `EXPLAIN ANALYZE` of one, the query of a
//!   `PREPARE`); a call of a function or procedure not known to be read-only (any function call that
//!   is not on the small allow-list of builtins, `CALL`); `DO`; `EXECUTE` of a prepared statement;
//!   `FETCH`/`MOVE` (a cursor's query runs there, not at `DECLARE`); anything the parser's output
//!   cannot be analysed for (a tree nested past the decoder's limit, a NUL byte).
//! - **Refused**: see [`Refusal`]: TRUNCATE of a watched table, `TRUNCATE ... CASCADE`,
//!   `session_replication_role` in any form, trigger enable/disable on a watched table, writes and
//!   DDL on pgfire's own schema, objects and triggers, a `search_path` naming pgfire, rules that
//!   write a watched table.
//! - **Passes**: everything else: plain reads (a SELECT or `COPY ... TO` of a watched table
//!   included), writes to other tables, utility commands (SET, SHOW, BEGIN, COMMIT, LISTEN, ...).
//!   A parse error passes untouched: the server reports it.
//!
//! Unqualified names: `users` may resolve through `search_path` to any schema, so an unqualified
//! name matching the name of any watched table counts as that table (a temporary or other table
//! of the same name is held too: cost, never a bypass).
//!
//! Function calls: the allow-list is small and explicit ([`SAFE_FUNCTIONS`]); everything else is
//! taken to possibly write. A read-only user function therefore makes its statements held (they
//! cost a savepoint and a trigger look-up), which is the price of never letting a writing one
//! through. An unqualified allow-listed name can be shadowed by a user function of the same name
//! (an overload, or a schema ahead of `pg_catalog` in `search_path`): whoever builds [`Watched`]
//! passes the names of such functions to [`Watched::with_shadowed_builtins`], and those are then
//! treated like any other function. `pg_catalog.`-qualified calls cannot be shadowed.
//!
//! What text cannot show. A statement can reach a watched table through objects the catalog
//! resolves, not the text: triggers, rules and column defaults of other tables, updatable views,
//! partitions and inheritance (the [`Watched`] set should hold the closure: the watched tables,
//! their partitions, children and ancestors, and views over them), operators and casts backed by
//! user functions, attribute-notation calls (`t.f` meaning `f(t)`), row-level-security policies.
//! This classifier is the cheap filter; completeness needs the backstop of DESIGN 6.3: pgfire's row
//! trigger on a watched table refuses a row written through the proxy by a statement that was
//! not held ("detected, never a silent bypass").
//!
//! Lexing follows the session: with `standard_conforming_strings = off` a backslash escapes a quote
//! in a plain string, so the caller passes the session's setting ([`Syntax`]) or the two parsers
//! could split strings differently ([`classify_lexed`] with [`Strings::Either`] while the
//! setting is not known yet). Not handled yet: a `client_encoding` that is not ASCII-safe (SJIS,
//! BIG5, GBK, UHC, GB18030, JOHAB: a trailing byte may be a backslash or a quote); the text is
//! taken as UTF-8, as the relay decodes it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Range;

use pg_query::protobuf::{AlterTableType, DropBehavior};
use serde_json::{Map, Value};

/// The schema of pgfire's own objects.
const PGFIRE_SCHEMA: &str = "pgfire";
/// Settings a client may not change through the proxy.
const REFUSED_SETTINGS: &[&str] = &["session_replication_role"];

pub use builtins::SAFE_FUNCTIONS;

mod builtins;

/// Words that make the pre-check parse: statements that run code or a stored statement without
/// naming a table, or that the classifier refuses without one.
const PRECHECK_WORDS: &[&[u8]] = &[b"do", b"execute", b"fetch", b"move", b"truncate", b"call"];

/// A table as PostgreSQL's catalog spells it (already case-folded).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            quote_ident(&self.schema),
            quote_ident(&self.name)
        )
    }
}

fn quote_ident(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b == b'_' || (i > 0 && (b.is_ascii_digit() || b == b'$'))
        });
    if plain {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WatchedError {
    #[error("table name {0:?} is not schema-qualified (write it as schema.table)")]
    Unqualified(String),
    #[error("invalid table name {0:?}")]
    Invalid(String),
}

/// The watched tables, as one immutable set, with what classifying against them needs.
#[derive(Debug, Clone, Default)]
pub struct Watched {
    tables: Vec<TableName>,
    /// Relation name → indexes into `tables`, for unqualified names.
    by_name: HashMap<String, Vec<usize>>,
    /// ASCII-lowercased byte strings whose absence lets the pre-check skip parsing.
    needles: Vec<Vec<u8>>,
    /// False when a name cannot be found by an ASCII case-insensitive search (non-ASCII, `"`).
    precheck: bool,
    shadowed: HashSet<String>,
}

impl Watched {
    /// From names in SQL syntax, schema-qualified: `public.users`, `"My Schema"."Users"`.
    /// Unquoted parts fold to lower case as PostgreSQL folds them.
    pub fn new<I, S>(names: I) -> Result<Watched, WatchedError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut tables = Vec::new();
        for name in names {
            let name = name.as_ref();
            let parts = split_qualified(name).ok_or_else(|| WatchedError::Invalid(name.into()))?;
            match <[String; 2]>::try_from(parts) {
                Ok([schema, name]) => tables.push(TableName { schema, name }),
                Err(parts) if parts.len() == 1 => {
                    return Err(WatchedError::Unqualified(name.into()))
                }
                Err(_) => return Err(WatchedError::Invalid(name.into())),
            }
        }
        Ok(Watched::from_catalog(tables))
    }

    /// From catalog names as stored (`nspname`, `relname`), no folding.
    pub fn from_catalog<I: IntoIterator<Item = TableName>>(tables: I) -> Watched {
        let mut tables: Vec<TableName> = tables.into_iter().collect();
        tables.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
        tables.dedup();
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, t) in tables.iter().enumerate() {
            by_name.entry(t.name.clone()).or_default().push(i);
        }
        let precheck = tables
            .iter()
            .all(|t| t.name.is_ascii() && !t.name.contains('"') && !t.name.is_empty());
        let mut needles: Vec<Vec<u8>> = by_name
            .keys()
            .map(|n| n.to_ascii_lowercase().into_bytes())
            .collect();
        needles.push(PGFIRE_SCHEMA.as_bytes().to_vec());
        needles.extend(REFUSED_SETTINGS.iter().map(|s| s.as_bytes().to_vec()));
        needles.push(b"u&".to_vec());
        Watched {
            tables,
            by_name,
            needles,
            precheck,
            shadowed: HashSet::new(),
        }
    }

    /// Names of allow-listed builtins that a user function shadows (an overload or a same-named
    /// function in another schema: `SELECT DISTINCT proname FROM pg_proc WHERE pronamespace <>
    /// 'pg_catalog'::regnamespace AND proname = ANY($1)` with [`SAFE_FUNCTIONS`]). Unqualified
    /// calls of these are then treated as possibly writing.
    pub fn with_shadowed_builtins<I, S>(mut self, names: I) -> Watched
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.shadowed.extend(names.into_iter().map(Into::into));
        self
    }

    pub fn tables(&self) -> &[TableName] {
        &self.tables
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// The watched tables a reference may name; an empty schema (unqualified) matches by name.
    fn lookup(&self, schema: &str, name: &str) -> Vec<&TableName> {
        let Some(found) = self.by_name.get(name) else {
            return Vec::new();
        };
        found
            .iter()
            .map(|&i| &self.tables[i])
            .filter(|t| schema.is_empty() || t.schema == schema)
            .collect()
    }

    /// True when the text provably passes without parsing: it names no watched table, no pgfire
    /// object nor refused setting, calls nothing (no `(`: every call the grammar makes without
    /// parentheses is on the allow-list), and has no word that runs stored code or refuses.
    fn precheck_passes(&self, sql: &str) -> bool {
        if !self.precheck || !self.shadowed.is_empty() {
            return false;
        }
        let bytes = sql.as_bytes();
        if bytes.contains(&b'(') || bytes.contains(&0) {
            return false;
        }
        if self
            .needles
            .iter()
            .any(|n| contains_ignore_ascii_case(bytes, n))
        {
            return false;
        }
        // Words: runs of letters, digits, `_` and non-ASCII bytes (`$` splits, conservatively).
        !bytes
            .split(|&b| !(b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80))
            .any(|w| PRECHECK_WORDS.iter().any(|k| w.eq_ignore_ascii_case(k)))
    }
}

fn contains_ignore_ascii_case(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || hay
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
}

/// `a.b`, `"A"."b"`: parts as the catalog spells them, or None when malformed.
fn split_qualified(name: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut chars = name.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    '"' => break,
                    c => part.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if !(c.is_alphanumeric() || c == '_' || c == '$') {
                    return None;
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return None;
        }
        parts.push(part);
        match chars.next() {
            None => return Some(parts),
            Some('.') => continue,
            Some(_) => return None,
        }
    }
}

/// How the session lexes strings; PostgreSQL's defaults unless the session changed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syntax {
    pub standard_conforming_strings: bool,
}

impl Default for Syntax {
    fn default() -> Syntax {
        Syntax {
            standard_conforming_strings: true,
        }
    }
}

/// How the session lexes plain `'...'` strings when the proxy classifies a statement: as
/// `standard_conforming_strings` is (`On`, `Off`), or not known yet (`Either`: a statement
/// still in flight may change it before the server parses this one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strings {
    On,
    Off,
    Either,
}

/// Why a statement is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldReason {
    /// INSERT, UPDATE, DELETE or MERGE of a watched table (in a CTE, PREPARE, EXPLAIN ANALYZE ...).
    Writes,
    /// `COPY watched FROM 'file'` or `FROM PROGRAM` (server-side: the statement alone).
    CopyFrom,
    /// `COPY watched FROM STDIN`: the client sends the rows in the COPY sub-protocol.
    CopyFromStdin,
    /// A function not known to be read-only.
    FunctionCall(String),
    /// `CALL` of a procedure.
    Call(String),
    /// A `DO` block.
    Do,
    /// `EXECUTE` of a prepared statement.
    Execute(String),
    /// `FETCH` or `MOVE`: a cursor's query runs here.
    Cursor(String),
    /// The parse tree could not be analysed (nested too deep, NUL byte): held to be safe.
    Unanalysable,
}

/// Why a statement is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// TRUNCATE of a watched table: row triggers do not fire, PRE functions cannot see it.
    Truncate(TableName),
    /// `TRUNCATE ... CASCADE` may reach a watched table the text does not name.
    TruncateCascade,
    /// `session_replication_role` (SET, RESET, `set_config`, ALTER ROLE/DATABASE ... SET): under
    /// `replica` ordinary triggers do not fire.
    ReplicationRole,
    /// Enabling or disabling triggers of a watched table (DISABLE TRIGGER, ENABLE REPLICA ...).
    TriggerState(TableName),
    /// A write or DDL on pgfire's own schema, objects or triggers, or a `search_path` naming it
    /// (unqualified names could then reach pgfire's tables).
    PgfireObject,
    /// A rule whose action writes a watched table: later writes elsewhere would reach it unseen.
    RuleWritesWatched(TableName),
}

impl Refusal {
    /// Whether `pgfire.settings` may allow it (TRUNCATE only); the rest is never allowed.
    pub fn allowable(&self) -> bool {
        matches!(self, Refusal::Truncate(_) | Refusal::TruncateCascade)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Truncate(t) => write!(f, "TRUNCATE of {t} is refused: PRE hooks watch it"),
            Refusal::TruncateCascade => {
                write!(f, "TRUNCATE ... CASCADE is refused: it may reach a table PRE hooks watch")
            }
            Refusal::ReplicationRole => write!(
                f,
                "session_replication_role cannot be changed through pgfire: it would disable triggers"
            ),
            Refusal::TriggerState(t) => write!(
                f,
                "enabling or disabling triggers of {t} is refused: PRE hooks watch it"
            ),
            Refusal::PgfireObject => write!(
                f,
                "pgfire's own schema, settings and triggers cannot be changed through the pgfire proxy"
            ),
            Refusal::RuleWritesWatched(t) => {
                write!(f, "a rule writing {t} is refused: PRE hooks watch it")
            }
        }
    }
}

/// The verdict on one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Cannot write a watched table: forward as is.
    Passes,
    /// May write a watched table: hold it. `tables` are the watched tables it names as written
    /// (empty when only a call or stored statement may write).
    Holds {
        tables: Vec<TableName>,
        reason: HoldReason,
    },
    /// Refused with an error, never forwarded.
    Refused { reason: Refusal },
}

impl Verdict {
    fn rank(&self) -> u8 {
        match self {
            Verdict::Passes => 0,
            Verdict::Holds { .. } => 1,
            Verdict::Refused { .. } => 2,
        }
    }
}

/// One statement of the query string: where it is and its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// Byte range in the query string.
    pub span: Range<usize>,
    pub verdict: Verdict,
    /// When it is transaction control, which.
    pub control: Option<Control>,
}

/// Transaction control that acts on the session's transaction block (`COMMIT PREPARED` and
/// `ROLLBACK PREPARED`, which cannot run in one, are not listed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// BEGIN, START TRANSACTION.
    Begin,
    /// COMMIT, END, and `chain`: AND CHAIN.
    Commit {
        chain: bool,
    },
    /// ROLLBACK, ABORT.
    Rollback {
        chain: bool,
    },
    /// PREPARE TRANSACTION.
    Prepare,
    Savepoint,
    Release,
    RollbackTo,
}

impl Control {
    fn of(stmt: Option<&pg_query::Node>) -> Option<Control> {
        use pg_query::protobuf::TransactionStmtKind as K;
        let Some(pg_query::NodeEnum::TransactionStmt(t)) = stmt.and_then(|n| n.node.as_ref())
        else {
            return None;
        };
        Some(match t.kind() {
            K::TransStmtBegin | K::TransStmtStart => Control::Begin,
            K::TransStmtCommit => Control::Commit { chain: t.chain },
            K::TransStmtRollback => Control::Rollback { chain: t.chain },
            K::TransStmtPrepare => Control::Prepare,
            K::TransStmtSavepoint => Control::Savepoint,
            K::TransStmtRelease => Control::Release,
            K::TransStmtRollbackTo => Control::RollbackTo,
            K::TransStmtCommitPrepared | K::TransStmtRollbackPrepared | K::Undefined => {
                return None
            }
        })
    }
}

/// How the verdicts were reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The pre-check proved the whole text passes; nothing parsed, no statements listed.
    PreChecked,
    /// Parsed; one entry per statement.
    Parsed,
    /// The parser rejected the text: it passes untouched, the server reports the error.
    ParseError(String),
}

/// The verdicts on a query string, one per statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    pub outcome: Outcome,
    pub statements: Vec<Statement>,
}

const PASSES: Verdict = Verdict::Passes;

impl Classification {
    /// The strongest verdict of all statements: Refused over Holds over Passes.
    pub fn verdict(&self) -> &Verdict {
        self.statements
            .iter()
            .map(|s| &s.verdict)
            .max_by_key(|v| v.rank())
            .unwrap_or(&PASSES)
    }

    /// True when no statement is held or refused.
    pub fn passes(&self) -> bool {
        *self.verdict() == Verdict::Passes
    }
}

/// Classifies a query string (one or more statements) with the default [`Syntax`].
pub fn classify(sql: &str, watched: &Watched) -> Classification {
    classify_with(sql, watched, Syntax::default())
}

/// Classifies a query string lexed as [`Strings`] says. Without a backslash both lexings read
/// the same text; with one and `Either`, the text is classified both ways and the stronger
/// verdict wins (Refused over Holds over Passes), so a statement passes only when it passes
/// however the server lexes it.
pub fn classify_lexed(sql: &str, watched: &Watched, strings: Strings) -> Classification {
    let syntax = |standard_conforming_strings| Syntax {
        standard_conforming_strings,
    };
    match strings {
        _ if !sql.as_bytes().contains(&b'\\') => classify(sql, watched),
        Strings::On => classify_with(sql, watched, syntax(true)),
        Strings::Off => classify_with(sql, watched, syntax(false)),
        Strings::Either => {
            let on = classify_with(sql, watched, syntax(true));
            let off = classify_with(sql, watched, syntax(false));
            if off.verdict().rank() > on.verdict().rank() {
                off
            } else {
                on
            }
        }
    }
}

/// Classifies a query string lexed as the session lexes it.
pub fn classify_with(sql: &str, watched: &Watched, syntax: Syntax) -> Classification {
    if watched.precheck_passes(sql) {
        return Classification {
            outcome: Outcome::PreChecked,
            statements: Vec::new(),
        };
    }
    let whole = |reason| Classification {
        outcome: Outcome::Parsed,
        statements: vec![Statement {
            span: 0..sql.len(),
            verdict: Verdict::Holds {
                tables: Vec::new(),
                reason,
            },
            control: None,
        }],
    };
    if sql.as_bytes().contains(&0) {
        return whole(HoldReason::Unanalysable);
    }
    let options = if syntax.standard_conforming_strings {
        pg_query::ParserOptions::DEFAULT
    } else {
        pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS
    };
    // pg_query's own summary code indexes and casts; a panic there must not end the session.
    let parsed = std::panic::catch_unwind(|| pg_query::parse(sql, options));
    let tree = match parsed {
        Ok(Ok(result)) => result.protobuf,
        Ok(Err(pg_query::Error::Parse(message))) => {
            return Classification {
                outcome: Outcome::ParseError(message),
                statements: Vec::new(),
            }
        }
        // A tree nested past the decoder's limit, or anything else unexpected: hold.
        Ok(Err(_)) | Err(_) => return whole(HoldReason::Unanalysable),
    };
    let mut statements = Vec::with_capacity(tree.stmts.len());
    for raw in &tree.stmts {
        let start = usize::try_from(raw.stmt_location)
            .unwrap_or(0)
            .min(sql.len());
        let end = match usize::try_from(raw.stmt_len) {
            Ok(0) | Err(_) => sql.len(),
            Ok(len) => start.saturating_add(len).min(sql.len()),
        };
        let verdict = match serde_json::to_value(&raw.stmt) {
            Ok(value) => {
                let mut walk = Walk::new(watched);
                walk.value(&value);
                walk.verdict()
            }
            Err(_) => Verdict::Holds {
                tables: Vec::new(),
                reason: HoldReason::Unanalysable,
            },
        };
        statements.push(Statement {
            span: start..end,
            verdict,
            control: Control::of(raw.stmt.as_deref()),
        });
    }
    Classification {
        outcome: Outcome::Parsed,
        statements,
    }
}

/// A walk over every node of one statement's tree (its JSON form: every node type is an object
/// key in CamelCase, every field a snake_case key, so nothing is skipped).
struct Walk<'w> {
    watched: &'w Watched,
    tables: Vec<TableName>,
    reason: Option<HoldReason>,
    refusal: Option<Refusal>,
    in_rule: bool,
}

impl<'w> Walk<'w> {
    fn new(watched: &'w Watched) -> Walk<'w> {
        Walk {
            watched,
            tables: Vec::new(),
            reason: None,
            refusal: None,
            in_rule: false,
        }
    }

    fn verdict(self) -> Verdict {
        if let Some(reason) = self.refusal {
            return Verdict::Refused { reason };
        }
        match (self.reason, self.tables.is_empty()) {
            (Some(reason), _) => Verdict::Holds {
                tables: self.tables,
                reason,
            },
            (None, false) => Verdict::Holds {
                tables: self.tables,
                reason: HoldReason::Writes,
            },
            (None, true) => Verdict::Passes,
        }
    }

    fn hold(&mut self, reason: HoldReason) {
        self.reason.get_or_insert(reason);
    }

    fn refuse(&mut self, refusal: Refusal) {
        self.refusal.get_or_insert(refusal);
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Object(map) => {
                for (key, child) in map {
                    let was_in_rule = self.in_rule;
                    if let Value::Object(fields) = child {
                        if key.starts_with(|c: char| c.is_ascii_uppercase()) {
                            self.node(key, fields);
                        }
                    }
                    self.value(child);
                    self.in_rule = was_in_rule;
                }
            }
            Value::Array(items) => items.iter().for_each(|i| self.value(i)),
            _ => {}
        }
    }

    /// One node of type `kind`; its children are walked afterwards by [`Walk::value`].
    fn node(&mut self, kind: &str, n: &Map<String, Value>) {
        match kind {
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                self.written(n.get("relation"), HoldReason::Writes)
            }
            "CopyStmt" if flag(n, "is_from") => {
                let stdin = text(n, "filename").is_empty() && !flag(n, "is_program");
                let reason = if stdin {
                    HoldReason::CopyFromStdin
                } else {
                    HoldReason::CopyFrom
                };
                self.written(n.get("relation"), reason)
            }
            "TruncateStmt" => self.truncate(n),
            "FuncCall" => self.call(n),
            "CallStmt" => {
                let name = n.get("funccall").map(|c| func_name(c.get("funcname")));
                self.hold(HoldReason::Call(name.unwrap_or_default()));
            }
            "DoStmt" => self.hold(HoldReason::Do),
            "ExecuteStmt" => self.hold(HoldReason::Execute(text(n, "name").into())),
            "FetchStmt" => self.hold(HoldReason::Cursor(text(n, "portalname").into())),
            "VariableSetStmt" => self.setting(n),
            // Their VariableSetStmt is a plain field, not a node.
            "AlterRoleSetStmt" | "AlterDatabaseSetStmt" | "AlterSystemStmt" => {
                if let Some(set) = n.get("setstmt").and_then(Value::as_object) {
                    self.setting(set);
                }
            }
            "AlterTableStmt" => {
                self.alter_table(n);
                self.pgfire_ddl(n);
            }
            "RuleStmt" => {
                self.in_rule = true;
                self.pgfire_ddl(n);
            }
            "DropStmt"
            | "RenameStmt"
            | "AlterObjectSchemaStmt"
            | "AlterOwnerStmt"
            | "CreateFunctionStmt"
            | "AlterFunctionStmt"
            | "CreateTrigStmt"
            | "AlterEventTrigStmt"
            | "CreatePolicyStmt"
            | "AlterPolicyStmt" => self.pgfire_ddl(n),
            _ => {}
        }
    }

    /// A written relation (a RangeVar object).
    fn written(&mut self, relation: Option<&Value>, reason: HoldReason) {
        let Some((schema, name)) = relation.and_then(range_var) else {
            return;
        };
        if schema == PGFIRE_SCHEMA {
            self.refuse(Refusal::PgfireObject);
        }
        let found = self.watched.lookup(schema, name);
        if found.is_empty() {
            return;
        }
        if self.in_rule {
            self.refuse(Refusal::RuleWritesWatched(found[0].clone()));
        }
        if matches!(reason, HoldReason::CopyFrom | HoldReason::CopyFromStdin) {
            self.hold(reason);
        }
        for t in found {
            if !self.tables.contains(t) {
                self.tables.push(t.clone());
            }
        }
    }

    fn truncate(&mut self, n: &Map<String, Value>) {
        if int(n, "behavior") == DropBehavior::DropCascade as i64 {
            self.refuse(Refusal::TruncateCascade);
        }
        for rel in array(n, "relations") {
            let Some((schema, name)) = rel
                .get("node")
                .and_then(|n| n.get("RangeVar"))
                .and_then(range_var)
            else {
                continue;
            };
            if schema == PGFIRE_SCHEMA {
                self.refuse(Refusal::PgfireObject);
            }
            if let Some(t) = self.watched.lookup(schema, name).first() {
                self.refuse(Refusal::Truncate((*t).clone()));
            }
        }
    }

    fn call(&mut self, n: &Map<String, Value>) {
        let names = name_parts(n.get("funcname"));
        let (schema, name) = match names.as_slice() {
            [name] => ("", *name),
            [.., schema, name] => (*schema, *name),
            [] => ("", ""),
        };
        if name == "set_config" && (schema.is_empty() || schema == "pg_catalog") {
            let args = array(n, "args");
            match (
                args.first().and_then(a_const_str),
                args.get(1).and_then(a_const_str),
            ) {
                (Some(setting), value) => self.check_setting(
                    &setting.to_ascii_lowercase(),
                    value.unwrap_or(PGFIRE_SCHEMA),
                ),
                (None, _) => self.hold(HoldReason::FunctionCall("set_config".into())),
            }
            return;
        }
        let safe = match schema {
            "" => SAFE_FUNCTIONS.contains(&name) && !self.watched.shadowed.contains(name),
            "pg_catalog" => SAFE_FUNCTIONS.contains(&name),
            PGFIRE_SCHEMA => name == "emit",
            _ => false,
        };
        if !safe {
            self.hold(HoldReason::FunctionCall(names.join(".")));
        }
    }

    fn setting(&mut self, n: &Map<String, Value>) {
        let name = text(n, "name").to_ascii_lowercase();
        let values: Vec<&str> = array(n, "args").iter().filter_map(a_const_str).collect();
        self.check_setting(&name, &values.join(","));
    }

    /// A setting changed to `value` (any value when unknown).
    fn check_setting(&mut self, name: &str, value: &str) {
        if REFUSED_SETTINGS.contains(&name) {
            self.refuse(Refusal::ReplicationRole);
        } else if name.starts_with("pgfire.") {
            // The PRE mechanism's own settings (pgfire.proxied, pgfire.pre_mode, ...).
            self.refuse(Refusal::PgfireObject);
        } else if name == "search_path" && value.to_ascii_lowercase().contains(PGFIRE_SCHEMA) {
            self.refuse(Refusal::PgfireObject);
        }
    }

    fn alter_table(&mut self, n: &Map<String, Value>) {
        let Some((schema, name)) = n.get("relation").and_then(range_var) else {
            return;
        };
        let triggers =
            AlterTableType::AtEnableTrig as i64..=AlterTableType::AtDisableTrigUser as i64;
        let touches_triggers = array(n, "cmds").iter().any(|c| {
            c.get("node")
                .and_then(|c| c.get("AlterTableCmd"))
                .and_then(|c| c.get("subtype"))
                .and_then(Value::as_i64)
                .is_some_and(|t| triggers.contains(&t))
        });
        if touches_triggers {
            if let Some(t) = self.watched.lookup(schema, name).first() {
                self.refuse(Refusal::TriggerState((*t).clone()));
            }
        }
    }

    /// DDL naming pgfire's schema or an object named `pgfire_*` (its triggers) is refused.
    fn pgfire_ddl(&mut self, n: &Map<String, Value>) {
        if mentions_pgfire(n.values()) {
            self.refuse(Refusal::PgfireObject);
        }
    }
}

fn mentions_pgfire<'a>(values: impl Iterator<Item = &'a Value>) -> bool {
    let mut stack: Vec<&Value> = values.collect();
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) => {
                let s = s.to_ascii_lowercase();
                if s == PGFIRE_SCHEMA || s.starts_with("pgfire_") {
                    return true;
                }
            }
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    false
}

fn flag(n: &Map<String, Value>, key: &str) -> bool {
    n.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn int(n: &Map<String, Value>, key: &str) -> i64 {
    n.get(key).and_then(Value::as_i64).unwrap_or(0)
}

fn text<'a>(n: &'a Map<String, Value>, key: &str) -> &'a str {
    n.get(key).and_then(Value::as_str).unwrap_or("")
}

fn array<'a>(n: &'a Map<String, Value>, key: &str) -> &'a [Value] {
    n.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// (schema, relation) of a RangeVar object; schema empty when unqualified.
fn range_var(v: &Value) -> Option<(&str, &str)> {
    let v = v.as_object()?;
    Some((text(v, "schemaname"), text(v, "relname")))
}

/// The parts of a qualified name: a list of `{"node": {"String": {"sval": ...}}}`.
fn name_parts(list: Option<&Value>) -> Vec<&str> {
    list.and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.get("node")?.get("String")?.get("sval")?.as_str())
                .collect()
        })
        .unwrap_or_default()
}

fn func_name(list: Option<&Value>) -> String {
    name_parts(list).join(".")
}

/// The string of a string constant node (`{"node": {"AConst": {"val": {"Sval": ...}}}}`).
fn a_const_str(v: &Value) -> Option<&str> {
    let c = v.get("node")?.get("AConst")?;
    c.get("val")?.get("Sval")?.get("sval")?.as_str()
}

#[cfg(test)]
mod tests;
