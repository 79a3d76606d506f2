//! The gate's verdicts on statement texts it has seen, kept with the configuration they were
//! reached under: a text sent again (every extended-protocol Parse of the same statement, and
//! simple queries that differ only in their numbers) is not classified again. A new
//! configuration starts with an empty memory, so a verdict never outlives what it was based on.
//!
//! The key is the text itself, or, when the text has no quote, dollar sign, backslash or
//! non-ASCII byte, the text with every number replaced by `0`. Without quotes nothing can hide
//! an identifier, and an unquoted identifier never starts with a digit, so a digit run that
//! follows no letter, digit, `_` or `$` is a numeric literal's: the classifier never looks at
//! numeric values (it reads names, kinds and string constants), so texts with the same key get
//! the same verdict. One exception: a number can make a text fail to parse (`FETCH 99999999999`
//! needs an integer that fits), and a text that fails to parse passes; such verdicts are not
//! kept, so a failing variant never answers for one that parses.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;

use crate::proxy::classify::Strings;

/// Texts remembered per configuration (then the memory starts again).
const MAX_ENTRIES: usize = 4096;
/// Longer texts are classified every time.
const MAX_TEXT: usize = 2048;

/// Verdicts by key, one map per way of lexing strings.
#[derive(Debug)]
pub(in crate::proxy) struct Verdicts<D> {
    maps: Mutex<[HashMap<Box<str>, D>; 3]>,
}

impl<D> Default for Verdicts<D> {
    fn default() -> Verdicts<D> {
        Verdicts {
            maps: Mutex::new(Default::default()),
        }
    }
}

fn slot(strings: Strings) -> usize {
    match strings {
        Strings::On => 0,
        Strings::Off => 1,
        Strings::Either => 2,
    }
}

impl<D: Clone> Verdicts<D> {
    /// The verdict on `sql` lexed as `strings`: remembered, or reached by `decide`, which says
    /// whether it may be kept (see the module's documentation).
    pub fn get_or(&self, sql: &str, strings: Strings, decide: impl FnOnce() -> (D, bool)) -> D {
        if sql.len() > MAX_TEXT {
            return decide().0;
        }
        let key = key(sql);
        let i = slot(strings);
        if let Some(d) = self.lock()[i].get(key.as_ref()) {
            return d.clone();
        }
        let (d, keep) = decide();
        if keep {
            let mut maps = self.lock();
            if maps.iter().map(HashMap::len).sum::<usize>() >= MAX_ENTRIES {
                maps.iter_mut().for_each(HashMap::clear);
            }
            maps[i].insert(key.into(), d.clone());
        }
        d
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [HashMap<Box<str>, D>; 3]> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().iter().map(HashMap::len).sum()
    }
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// The text with its numbers masked, when that is safe (see the module's documentation).
fn key(sql: &str) -> Cow<'_, str> {
    let b = sql.as_bytes();
    if b.iter()
        .any(|&c| matches!(c, b'\'' | b'"' | b'$' | b'\\') || c >= 0x80)
    {
        return Cow::Borrowed(sql);
    }
    let mut out: Option<String> = None;
    let (mut i, mut copied) = (0, 0);
    while i < b.len() {
        if !b[i].is_ascii_digit() || (i > 0 && is_word(b[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i - start == 1 && b[start] == b'0' {
            continue;
        }
        let o = out.get_or_insert_with(|| String::with_capacity(sql.len()));
        o.push_str(&sql[copied..start]);
        o.push('0');
        copied = i;
    }
    match out {
        None => Cow::Borrowed(sql),
        Some(mut o) => {
            o.push_str(&sql[copied..]);
            Cow::Owned(o)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_masked_only_where_nothing_can_hide_a_name() {
        let k = |s| key(s).into_owned();
        assert_eq!(
            k("UPDATE pgbench_accounts SET abalance = abalance + -4242 WHERE aid = 17;"),
            "UPDATE pgbench_accounts SET abalance = abalance + -0 WHERE aid = 0;"
        );
        assert_eq!(
            k("SELECT 1.25, 3e10, 0x1F FROM t1"),
            "SELECT 0.0, 0e10, 0x1F FROM t1"
        );
        // Digits inside names stay: t1 and t2 are different tables.
        assert_ne!(k("DELETE FROM t1"), k("DELETE FROM t2"));
        assert_ne!(k("DELETE FROM s1.t"), k("DELETE FROM s2.t"));
        assert_ne!(k("DELETE FROM t_1"), k("DELETE FROM t_2"));
        // Any quote, dollar sign, backslash or non-ASCII byte: the text as it is.
        for s in [
            "DELETE FROM \"1\" WHERE id = 5",
            "DO $$ BEGIN DELETE FROM t1; END $$",
            "SELECT '1'",
            "SELECT $1 + 5",
            "SELECT 5 \\ 5",
            "SELECT 5 FROM tä",
        ] {
            assert_eq!(k(s), s);
        }
    }

    #[test]
    fn verdicts_are_kept_per_lexing_and_only_when_allowed() {
        let v: Verdicts<u32> = Verdicts::default();
        let calls = std::cell::Cell::new(0);
        let get = |sql: &str, strings, d: u32, keep| {
            v.get_or(sql, strings, || {
                calls.set(calls.get() + 1);
                (d, keep)
            })
        };
        assert_eq!(get("SELECT 1 FROM t", Strings::On, 1, true), 1);
        // Same key: remembered, even with another number.
        assert_eq!(get("SELECT 2 FROM t", Strings::On, 9, true), 1);
        // Another lexing: decided again.
        assert_eq!(get("SELECT 2 FROM t", Strings::Either, 2, true), 2);
        // Not to be kept (a parse error): decided every time.
        assert_eq!(get("FETCH 99999999999 FROM c", Strings::On, 3, false), 3);
        assert_eq!(get("FETCH 5 FROM c", Strings::On, 4, true), 4);
        assert_eq!(calls.get(), 4);
        // Long texts are not kept.
        let long = format!("SELECT {} FROM t", "1, ".repeat(MAX_TEXT));
        assert_eq!(get(&long, Strings::On, 5, true), 5);
        assert_eq!(get(&long, Strings::On, 6, true), 6);
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn the_memory_starts_again_when_full() {
        let v: Verdicts<usize> = Verdicts::default();
        for i in 0..MAX_ENTRIES + 10 {
            v.get_or(&format!("SELECT x{i}"), Strings::On, || (i, true));
        }
        assert!(v.len() <= MAX_ENTRIES);
        assert_eq!(v.get_or("SELECT x1", Strings::On, || (7, true)), 7);
    }
}
