//! Subscription filters: a condition on the event that must hold for the subscription to run.
//! Pure: parsed once per distinct text, evaluated on `event_data`.
//!
//! ```text
//! filter    := condition { ("and" | "or") condition }     "and" binds tighter; no parentheses
//! condition := ["not"] test
//! test      := "changed(" field ")"                      the field is in event_data.changes
//!            | field "is" ["not"] "null"                 missing counts as null
//!            | field op literal
//! field     := name { "." name }                         from event_data: email, old.email
//! op        := "=" | "!=" | "<>" | "<" | "<=" | ">" | ">="
//! literal   := number | 'text' ('' for a quote) | true | false
//! ```
//!
//! Keywords are case-insensitive. A comparison of values of different types is false (`!=`:
//! true); `<` and friends compare numbers with numbers and text with text. The database checks
//! the same syntax when a subscription is written (`pgfire.check_filter`).

use serde_json::Value;

/// Why a filter does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("invalid filter at {at:?}: {what}")]
    Syntax { at: String, what: &'static str },
}

impl FilterError {
    pub fn kind(&self) -> crate::functions::ErrorKind {
        crate::functions::ErrorKind::Permanent
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Number(f64),
    Text(String),
    Bool(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
enum Test {
    Changed(Vec<String>),
    IsNull(Vec<String>, bool),
    Compare(Vec<String>, Op, Literal),
}

/// A parsed filter: alternatives (or) of conjunctions (and) of possibly negated tests.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    any: Vec<Vec<(bool, Test)>>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Text(String),
    Number(f64),
    Op(Op),
    ChangedOpen,
    Close,
}

fn tokens(s: &str) -> Result<Vec<Token>, FilterError> {
    let err = |at: &str, what| FilterError::Syntax {
        at: at.chars().take(20).collect(),
        what,
    };
    let mut out = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        let c = rest.chars().next().unwrap_or(' ');
        let (tok, len) = if c == '\'' {
            let mut text = String::new();
            let mut chars = rest.char_indices().skip(1).peekable();
            let mut end = None;
            while let Some((i, ch)) = chars.next() {
                if ch == '\'' {
                    if chars.peek().map(|p| p.1) == Some('\'') {
                        chars.next();
                        text.push('\'');
                    } else {
                        end = Some(i + 1);
                        break;
                    }
                } else {
                    text.push(ch);
                }
            }
            match end {
                Some(e) => (Token::Text(text), e),
                None => return Err(err(rest, "unterminated 'text'")),
            }
        } else if c.is_ascii_digit() || c == '-' {
            let len = rest
                .char_indices()
                .skip(1)
                .find(|(_, ch)| !(ch.is_ascii_digit() || *ch == '.'))
                .map_or(rest.len(), |(i, _)| i);
            match rest[..len].parse::<f64>() {
                Ok(n) if n.is_finite() => (Token::Number(n), len),
                _ => return Err(err(rest, "invalid number")),
            }
        } else if c.is_ascii_alphabetic() || c == '_' {
            let len = rest
                .char_indices()
                .find(|(_, ch)| !(ch.is_ascii_alphanumeric() || *ch == '_' || *ch == '.'))
                .map_or(rest.len(), |(i, _)| i);
            let word = &rest[..len];
            if word.eq_ignore_ascii_case("changed") && rest[len..].trim_start().starts_with('(') {
                let open = rest[len..].find('(').unwrap_or(0);
                (Token::ChangedOpen, len + open + 1)
            } else {
                (Token::Word(word.to_string()), len)
            }
        } else if c == ')' {
            (Token::Close, 1)
        } else {
            let two = rest.get(..2).unwrap_or("");
            match two {
                "!=" | "<>" => (Token::Op(Op::Ne), 2),
                "<=" => (Token::Op(Op::Le), 2),
                ">=" => (Token::Op(Op::Ge), 2),
                _ => match c {
                    '=' => (Token::Op(Op::Eq), 1),
                    '<' => (Token::Op(Op::Lt), 1),
                    '>' => (Token::Op(Op::Gt), 1),
                    _ => return Err(err(rest, "unexpected character")),
                },
            }
        };
        out.push(tok);
        rest = rest[len..].trim_start();
    }
    Ok(out)
}

fn is_kw(t: Option<&Token>, kw: &str) -> bool {
    matches!(t, Some(Token::Word(w)) if w.eq_ignore_ascii_case(kw))
}

fn field(t: Option<Token>, at: &str) -> Result<Vec<String>, FilterError> {
    match t {
        Some(Token::Word(w))
            if !["and", "or", "not", "is", "null", "true", "false"]
                .iter()
                .any(|k| w.eq_ignore_ascii_case(k))
                && !w.starts_with('.')
                && !w.ends_with('.')
                && !w.contains("..") =>
        {
            Ok(w.split('.').map(str::to_string).collect())
        }
        _ => Err(FilterError::Syntax {
            at: at.chars().take(20).collect(),
            what: "expected a field name",
        }),
    }
}

impl Filter {
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        let err = |what| FilterError::Syntax {
            at: text.chars().take(20).collect(),
            what,
        };
        let mut toks = tokens(text)?.into_iter().peekable();
        let mut any = vec![Vec::new()];
        loop {
            let negated = is_kw(toks.peek(), "not");
            if negated {
                toks.next();
            }
            let test = match toks.next() {
                Some(Token::ChangedOpen) => {
                    let f = field(toks.next(), text)?;
                    if toks.next() != Some(Token::Close) {
                        return Err(err("expected ) after changed(field"));
                    }
                    Test::Changed(f)
                }
                t => {
                    let f = field(t, text)?;
                    match toks.next() {
                        Some(Token::Word(w)) if w.eq_ignore_ascii_case("is") => {
                            let not = is_kw(toks.peek(), "not");
                            if not {
                                toks.next();
                            }
                            if !is_kw(toks.next().as_ref(), "null") {
                                return Err(err("expected null after is"));
                            }
                            Test::IsNull(f, !not)
                        }
                        Some(Token::Op(op)) => {
                            let lit = match toks.next() {
                                Some(Token::Number(n)) => Literal::Number(n),
                                Some(Token::Text(s)) => Literal::Text(s),
                                Some(Token::Word(w)) if w.eq_ignore_ascii_case("true") => {
                                    Literal::Bool(true)
                                }
                                Some(Token::Word(w)) if w.eq_ignore_ascii_case("false") => {
                                    Literal::Bool(false)
                                }
                                _ => return Err(err("expected a number, 'text', true or false")),
                            };
                            Test::Compare(f, op, lit)
                        }
                        _ => return Err(err("expected is [not] null or a comparison")),
                    }
                }
            };
            if let Some(last) = any.last_mut() {
                last.push((negated, test));
            }
            match toks.next() {
                None => break,
                Some(Token::Word(w)) if w.eq_ignore_ascii_case("and") => {}
                Some(Token::Word(w)) if w.eq_ignore_ascii_case("or") => any.push(Vec::new()),
                _ => return Err(err("expected and, or, or the end")),
            }
        }
        Ok(Filter { any })
    }

    /// Whether `event_data` passes.
    pub fn matches(&self, data: &Value) -> bool {
        self.any
            .iter()
            .any(|all| all.iter().all(|(neg, t)| test(t, data) != *neg))
    }
}

fn get<'a>(data: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(data, |v, k| v.get(k))
}

fn test(t: &Test, data: &Value) -> bool {
    match t {
        Test::Changed(f) => data.get("changes").and_then(|c| get(c, f)).is_some(),
        Test::IsNull(f, null) => get(data, f).is_none_or(Value::is_null) == *null,
        Test::Compare(f, op, lit) => {
            let v = get(data, f);
            let ord = match (v, lit) {
                (Some(Value::Number(n)), Literal::Number(l)) => n
                    .as_f64()
                    .or_else(|| n.to_string().parse().ok())
                    .and_then(|n| n.partial_cmp(l)),
                (Some(Value::String(s)), Literal::Text(l)) => Some(s.as_str().cmp(l.as_str())),
                (Some(Value::Bool(b)), Literal::Bool(l)) if matches!(op, Op::Eq | Op::Ne) => {
                    Some(b.cmp(l))
                }
                _ => None,
            };
            match ord {
                None => *op == Op::Ne,
                Some(o) => match op {
                    Op::Eq => o.is_eq(),
                    Op::Ne => o.is_ne(),
                    Op::Lt => o.is_lt(),
                    Op::Le => o.is_le(),
                    Op::Gt => o.is_gt(),
                    Op::Ge => o.is_ge(),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(f: &str, data: Value) -> bool {
        Filter::parse(f).unwrap().matches(&data)
    }

    #[test]
    fn conditions() {
        let upd = json!({"user_id": 1, "email": "a@b.c", "plan": "pro", "n": 5, "ok": true,
                         "changes": {"email": {"old": "x", "new": "a@b.c"}}, "old": {"email": "x"}});
        assert!(m("changed(email)", upd.clone()));
        assert!(!m("changed(plan)", upd.clone()));
        assert!(m("CHANGED ( email ) AND plan = 'pro'", upd.clone()));
        assert!(m("n > 4 and n <= 5 and n != 6 and n <> 7", upd.clone()));
        assert!(!m("n < 5", upd.clone()));
        assert!(m("old.email = 'x'", upd.clone()));
        assert!(m("missing is null and email is not null", upd.clone()));
        assert!(m("ok = true", upd.clone()));
        assert!(m("not changed(plan)", upd.clone()));
        assert!(m("plan = 'free' or changed(email)", upd.clone()));
        // "and" binds tighter than "or".
        assert!(m("plan = 'free' and n = 1 or n = 5", upd.clone()));
        assert!(!m(
            "plan = 'free' and (n = 5)".replace(['(', ')'], "").as_str(),
            upd.clone()
        ));
        // Types that differ never compare equal.
        assert!(!m("n = '5'", upd.clone()));
        assert!(m("n != '5'", upd.clone()));
        assert!(m("email = 'it''s'", json!({"email": "it's"})));
        assert!(m(
            "amount >= -1.5",
            json!({"amount": 12345678901234567890u64})
        ));
    }

    #[test]
    fn bad_filters_are_errors() {
        for bad in [
            "",
            "email",
            "email =",
            "email = x",
            "changed(email",
            "changed()",
            "email = 'x",
            "a = 1 and",
            "a = 1 b = 2",
            "a ~ 1",
            "and = 1",
            "a. = 1",
            "a is nul",
            "a = 1e5",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
