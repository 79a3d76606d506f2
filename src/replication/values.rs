//! Column values from pgoutput's text format to JSON, without losing meaning: numbers exact
//! (int8 and numeric as written by PostgreSQL), json/jsonb as JSON, arrays as arrays, timestamps
//! in RFC 3339, NaN/Infinity and anything unknown as the text PostgreSQL printed.
//!
//! The replication connection sets DateStyle=ISO, TimeZone=UTC, IntervalStyle=iso_8601 and
//! extra_float_digits=3, which these functions rely on.

use serde_json::{Number, Value};

/// The shape of a column type, as far as rendering is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeClass {
    Bool,
    Number,
    Json,
    Timestamp,
    TimestampTz,
    Text,
    Array(ElemClass),
}

/// Element types of arrays (one level of indirection, so arrays of arrays are just deeper arrays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemClass {
    Bool,
    Number,
    Json,
    Timestamp,
    TimestampTz,
    Text,
}

impl ElemClass {
    fn scalar(self) -> TypeClass {
        match self {
            ElemClass::Bool => TypeClass::Bool,
            ElemClass::Number => TypeClass::Number,
            ElemClass::Json => TypeClass::Json,
            ElemClass::Timestamp => TypeClass::Timestamp,
            ElemClass::TimestampTz => TypeClass::TimestampTz,
            ElemClass::Text => TypeClass::Text,
        }
    }
}

/// Classify a built-in type by OID; user-defined types (enums, domains, composites) are text.
pub fn classify(oid: u32) -> TypeClass {
    use ElemClass as E;
    match oid {
        16 => TypeClass::Bool,
        20 | 21 | 23 | 26 | 700 | 701 | 1700 => TypeClass::Number,
        114 | 3802 => TypeClass::Json,
        1114 => TypeClass::Timestamp,
        1184 => TypeClass::TimestampTz,
        1000 => TypeClass::Array(E::Bool),
        1005 | 1007 | 1016 | 1021 | 1022 | 1028 | 1231 => TypeClass::Array(E::Number),
        199 | 3807 => TypeClass::Array(E::Json),
        1115 => TypeClass::Array(E::Timestamp),
        1185 => TypeClass::Array(E::TimestampTz),
        // text, varchar, bpchar, name, char, uuid, bytea, date, time, interval, inet, ... arrays
        1001 | 1002 | 1003 | 1009 | 1014 | 1015 | 1041 | 651 | 1182 | 1183 | 1187 | 1270 | 2951
        | 791 | 143 => TypeClass::Array(E::Text),
        _ => TypeClass::Text,
    }
}

/// Render one non-null text value of the given class.
pub fn render(class: TypeClass, text: &str) -> Value {
    match class {
        TypeClass::Bool => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            other => Value::String(other.to_string()),
        },
        TypeClass::Number => number(text),
        TypeClass::Json => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
        }
        TypeClass::Timestamp => Value::String(timestamp(text, false)),
        TypeClass::TimestampTz => Value::String(timestamp(text, true)),
        TypeClass::Text => Value::String(text.to_string()),
        TypeClass::Array(elem) => {
            parse_array(text, elem).unwrap_or_else(|| Value::String(text.to_string()))
        }
    }
}

/// Render one non-null text value of the given class as JSON text appended to `out`: the same
/// JSON that serializing [`render`]'s value writes, without building the value when it can.
pub fn render_json(class: TypeClass, text: &str, out: &mut Vec<u8>) {
    match class {
        TypeClass::Bool => match text {
            "t" => out.extend_from_slice(b"true"),
            "f" => out.extend_from_slice(b"false"),
            other => json_string(other, out),
        },
        // serde_json writes an exponent's `E` as `e`; PostgreSQL prints `e`.
        TypeClass::Number if is_json_number(text) && !text.contains('E') => {
            out.extend_from_slice(text.as_bytes())
        }
        TypeClass::Number => {
            let _ = serde_json::to_writer(&mut *out, &number(text));
        }
        TypeClass::Timestamp => json_string(&timestamp(text, false), out),
        TypeClass::TimestampTz => json_string(&timestamp(text, true), out),
        TypeClass::Text => json_string(text, out),
        TypeClass::Json | TypeClass::Array(_) => {
            // serde_json writes a value to a Vec without failing.
            let _ = serde_json::to_writer(&mut *out, &render(class, text));
        }
    }
}

/// Whether a class's values may hold JSON objects (whose equality ignores key order, so two
/// different JSON texts can be equal values).
pub fn may_hold_objects(class: TypeClass) -> bool {
    matches!(class, TypeClass::Json | TypeClass::Array(ElemClass::Json))
}

/// Whether `text` is a JSON number (RFC 8259 grammar): what serde_json accepts as one.
fn is_json_number(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// `s` as a JSON string, escaped by serde_json.
pub fn json_string(s: &str, out: &mut Vec<u8>) {
    // serde_json writes a string to a Vec without failing.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A JSON number exactly as PostgreSQL wrote it, or a string for NaN and the infinities.
fn number(text: &str) -> Value {
    let looks_numeric = text
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'));
    if looks_numeric {
        if let Ok(n) = serde_json::from_str::<Number>(text) {
            return Value::Number(n);
        }
    }
    Value::String(text.to_string())
}

/// ISO `2024-01-02 03:04:05.5+00` to RFC 3339 `2024-01-02T03:04:05.5Z`; infinity, BC dates and
/// years past 9999 stay as PostgreSQL printed them.
fn timestamp(text: &str, with_zone: bool) -> String {
    let b = text.as_bytes();
    let shaped = b.len() >= 19
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b' '
        && b[13] == b':'
        && b[16] == b':'
        && b[..4].iter().all(u8::is_ascii_digit)
        && !text.ends_with(" BC");
    if !shaped {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 3);
    out.push_str(&text[..10]);
    out.push('T');
    if with_zone {
        match text.strip_suffix("+00") {
            Some(rest) => {
                out.push_str(&rest[11..]);
                out.push('Z');
            }
            None => out.push_str(&text[11..]),
        }
    } else {
        out.push_str(&text[11..]);
    }
    out
}

/// Parse an array literal such as `{1,2,NULL}`, `{{"a b",c},{d,e}}` or `[0:1]={1,2}`.
pub fn parse_array(text: &str, elem: ElemClass) -> Option<Value> {
    let body = match text.strip_prefix('[') {
        Some(_) => &text[text.find('=')? + 1..],
        None => text,
    };
    let mut p = ArrayParser {
        s: body.as_bytes(),
        i: 0,
        elem,
    };
    let v = p.array(0)?;
    (p.i == p.s.len()).then_some(v)
}

struct ArrayParser<'a> {
    s: &'a [u8],
    i: usize,
    elem: ElemClass,
}

impl ArrayParser<'_> {
    fn array(&mut self, depth: usize) -> Option<Value> {
        if depth > 6 || self.s.get(self.i) != Some(&b'{') {
            return None;
        }
        self.i += 1;
        let mut items = Vec::new();
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Some(Value::Array(items));
        }
        loop {
            let item = match self.s.get(self.i)? {
                b'{' => self.array(depth + 1)?,
                b'"' => render(self.elem.scalar(), &self.quoted()?),
                _ => {
                    let start = self.i;
                    while !matches!(self.s.get(self.i)?, b',' | b'}') {
                        self.i += 1;
                    }
                    let raw = std::str::from_utf8(&self.s[start..self.i]).ok()?;
                    if raw.eq_ignore_ascii_case("NULL") {
                        Value::Null
                    } else {
                        render(self.elem.scalar(), raw)
                    }
                }
            };
            items.push(item);
            match self.s.get(self.i)? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(Value::Array(items));
                }
                _ => return None,
            }
        }
    }

    fn quoted(&mut self) -> Option<String> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match *self.s.get(self.i)? {
                b'"' => {
                    self.i += 1;
                    return String::from_utf8(out).ok();
                }
                b'\\' => {
                    out.push(*self.s.get(self.i + 1)?);
                    self.i += 2;
                }
                c => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_are_exact() {
        assert_eq!(
            render(classify(20), "9223372036854775807").to_string(),
            "9223372036854775807"
        );
        assert_eq!(
            render(classify(1700), "12345678901234567890.000000000000000001").to_string(),
            "12345678901234567890.000000000000000001"
        );
        assert_eq!(render(classify(1700), "1.50").to_string(), "1.50");
        assert_eq!(render(classify(1700), "NaN"), json!("NaN"));
        assert_eq!(render(classify(701), "-Infinity"), json!("-Infinity"));
        assert_eq!(render(classify(701), "1.5e-07").to_string(), "1.5e-07");
        assert_eq!(render(classify(23), "-42"), json!(-42));
    }

    #[test]
    fn scalars() {
        assert_eq!(render(classify(16), "t"), json!(true));
        assert_eq!(render(classify(16), "f"), json!(false));
        assert_eq!(
            render(classify(3802), r#"{"a": [1, 2.50]}"#).to_string(),
            r#"{"a":[1,2.50]}"#
        );
        assert_eq!(render(classify(114), "not json"), json!("not json"));
        assert_eq!(render(classify(25), "hello"), json!("hello"));
        assert_eq!(
            render(classify(2950), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(
            render(classify(1184), "2024-01-02 03:04:05.123456+00"),
            json!("2024-01-02T03:04:05.123456Z")
        );
        assert_eq!(
            render(classify(1184), "2024-01-02 03:04:05+00"),
            json!("2024-01-02T03:04:05Z")
        );
        assert_eq!(
            render(classify(1114), "2024-01-02 03:04:05"),
            json!("2024-01-02T03:04:05")
        );
        assert_eq!(render(classify(1184), "infinity"), json!("infinity"));
        assert_eq!(
            render(classify(1184), "0044-03-15 00:00:00+00 BC"),
            json!("0044-03-15 00:00:00+00 BC")
        );
        assert_eq!(
            render(classify(1184), "12345-01-01 00:00:00+00"),
            json!("12345-01-01 00:00:00+00")
        );
    }

    #[test]
    fn arrays() {
        assert_eq!(render(classify(1007), "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(
            render(classify(1009), r#"{"a b",c,"NULL","q\"x\\y"}"#),
            json!(["a b", "c", "NULL", "q\"x\\y"])
        );
        assert_eq!(
            render(classify(1007), "{{1,2},{3,4}}"),
            json!([[1, 2], [3, 4]])
        );
        assert_eq!(render(classify(1007), "{}"), json!([]));
        assert_eq!(render(classify(1007), "[0:1]={7,8}"), json!([7, 8]));
        assert_eq!(
            render(classify(3807), r#"{"{\"a\": 1}",null}"#),
            json!([{"a": 1}, null])
        );
        assert_eq!(render(classify(1000), "{t,f}"), json!([true, false]));
        assert_eq!(
            render(classify(1185), r#"{"2024-01-02 03:04:05+00"}"#),
            json!(["2024-01-02T03:04:05Z"])
        );
    }

    /// The JSON text written directly is exactly what serializing the rendered value writes.
    #[test]
    fn render_json_matches_render() {
        let cases: &[(u32, &str)] = &[
            (20, "9223372036854775807"),
            (1700, "12345678901234567890.000000000000000001"),
            (1700, "1.50"),
            (1700, "NaN"),
            (701, "-Infinity"),
            (701, "1.5e-07"),
            (701, "1E+5"),
            (23, "-42"),
            (23, "-0"),
            (23, "00"),
            (23, "+1"),
            (23, "1."),
            (23, ".5"),
            (23, "1e"),
            (23, ""),
            (16, "t"),
            (16, "f"),
            (16, "x"),
            (3802, r#"{"b": [1, 2.50], "a": null}"#),
            (114, "not json"),
            (
                25,
                "hello \"world\" \\ \n\t\r\u{8}\u{c}\u{1}\u{1f}\u{7f} é ✓",
            ),
            (25, ""),
            (1184, "2024-01-02 03:04:05.123456+00"),
            (1184, "infinity"),
            (1114, "2024-01-02 03:04:05"),
            (1007, "{1,2,NULL}"),
            (1009, r#"{"a b",c,"NULL","q\"x\\y"}"#),
            (3807, r#"{"{\"a\": 1}",null}"#),
            (1007, "{1,2"),
        ];
        for &(oid, text) in cases {
            let mut out = Vec::new();
            render_json(classify(oid), text, &mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&render(classify(oid), text)).unwrap(),
                "{oid} {text:?}"
            );
        }
    }

    #[test]
    fn malformed_arrays_fall_back_to_text() {
        for bad in ["{1,2", "{\"a}", "{1}}", "{", "[1:2]", "{{{{{{{{1}}}}}}}}"] {
            assert_eq!(render(classify(1007), bad), json!(bad), "{bad}");
        }
    }
}
