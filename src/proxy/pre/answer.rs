//! What PRE functions answer (`{"allow": true}`, `{"allow": false, "message": "…"}`,
//! `{"allow": true, "data": {…}}`), parsed from untrusted bytes. Pure; never panics: anything
//! else is an [`AnswerError`] that follows the function's `on_error`.

use serde_json::{Map, Value};

/// Longest `message` kept from a handler (characters); the rest is cut.
const MESSAGE_CHARS: usize = 1000;

/// A handler's decision on one row.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Let the write through, with `data` replacing column values when given.
    Allow { data: Option<Map<String, Value>> },
    /// Refuse the write with this message.
    Block { message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("the answer is not JSON: {0}")]
    NotJson(String),
    #[error("the answer is not a JSON object")]
    NotObject,
    #[error("the answer has no boolean \"allow\"")]
    NoAllow,
    #[error("\"data\" must be a JSON object of column values")]
    BadData,
    #[error("\"message\" must be a string")]
    BadMessage,
}

/// The message a block without one gets.
pub const DEFAULT_MESSAGE: &str = "blocked by a PRE function";

/// Parse an answer. `data: null` and an empty `data` mean no rewrite.
pub fn parse(bytes: &[u8]) -> Result<Answer, AnswerError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| AnswerError::NotJson(e.to_string()))?;
    from_value(value)
}

/// An answer already decoded as JSON (what a `sql` function returns).
pub fn from_value(value: Value) -> Result<Answer, AnswerError> {
    let Value::Object(mut obj) = value else {
        return Err(AnswerError::NotObject);
    };
    let allow = match obj.get("allow") {
        Some(Value::Bool(b)) => *b,
        _ => return Err(AnswerError::NoAllow),
    };
    if !allow {
        let message = match obj.remove("message") {
            None | Some(Value::Null) => DEFAULT_MESSAGE.to_string(),
            Some(Value::String(s)) if s.trim().is_empty() => DEFAULT_MESSAGE.to_string(),
            Some(Value::String(s)) => s.chars().take(MESSAGE_CHARS).collect(),
            Some(_) => return Err(AnswerError::BadMessage),
        };
        return Ok(Answer::Block { message });
    }
    let data = match obj.remove("data") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) if m.is_empty() => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => return Err(AnswerError::BadData),
    };
    Ok(Answer::Allow { data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_shapes() {
        assert_eq!(
            parse(br#"{"allow": true}"#).unwrap(),
            Answer::Allow { data: None }
        );
        assert_eq!(
            parse(br#"{"allow": false, "message": "Invalid email address"}"#).unwrap(),
            Answer::Block {
                message: "Invalid email address".into()
            }
        );
        let Answer::Allow { data: Some(d) } =
            parse(br#"{"allow": true, "data": {"email": "a@b.c"}}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(d["email"], "a@b.c");
        assert_eq!(
            parse(br#"{"allow": false}"#).unwrap(),
            Answer::Block {
                message: DEFAULT_MESSAGE.into()
            }
        );
        assert_eq!(
            parse(br#"{"allow": true, "data": null}"#).unwrap(),
            Answer::Allow { data: None }
        );
    }

    #[test]
    fn anything_else_is_an_error() {
        for bad in [
            &b""[..],
            b"not json",
            b"[]",
            b"true",
            b"{}",
            br#"{"allow": "yes"}"#,
            br#"{"allow": 1}"#,
            br#"{"allow": true, "data": [1]}"#,
            br#"{"allow": true, "data": "x"}"#,
            br#"{"allow": false, "message": 42}"#,
            b"\xff\xfe",
            br#"{"allow": true"#,
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn long_messages_are_cut() {
        let long = format!(r#"{{"allow": false, "message": "{}"}}"#, "é".repeat(5000));
        let Answer::Block { message } = parse(long.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(message.chars().count(), MESSAGE_CHARS);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap stand-in for fuzzing: every prefix of some answers, and byte noise.
        let seeds: &[&[u8]] = &[
            br#"{"allow": false, "message": "x\u00e9"}"#,
            br#"{"allow": true, "data": {"a": [1, {"b": null}]}}"#,
        ];
        for s in seeds {
            for i in 0..=s.len() {
                let _ = parse(&s[..i]);
            }
        }
        let mut x: u32 = 7;
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..16)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            let _ = parse(&bytes);
        }
    }
}
