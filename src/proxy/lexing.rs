//! How the server will lex a client's statement, as far as the PRE classifier cares:
//! `standard_conforming_strings` as the server last reported it (a ParameterStatus at startup
//! and after every change, which the proxy relays), and whether it is settled: while anything
//! the client sent before is unanswered, that statement may change the setting before the
//! server parses the next one, so the classifier is told it may be either. Pure.

use crate::proxy::classify::Strings;
use crate::wire::{self, Backend};

/// The setting that changes how PostgreSQL lexes `'...'` strings.
const STANDARD_STRINGS: &[u8] = b"standard_conforming_strings";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Lexing {
    /// `standard_conforming_strings` as last reported (PostgreSQL's default: on).
    standard_strings: bool,
}

impl Default for Lexing {
    fn default() -> Lexing {
        Lexing {
            standard_strings: true,
        }
    }
}

impl Lexing {
    /// A server frame on its way to the client: a ParameterStatus of the setting updates it.
    pub(super) fn observe(&mut self, frame: &[u8]) {
        if frame.first() != Some(&b'S') {
            return;
        }
        if let Ok(Some(Backend::ParameterStatus { name, value })) = wire::decode_backend(frame) {
            if name == STANDARD_STRINGS {
                // Anything but "on" lexes backslashes as escapes, the conservative reading.
                self.standard_strings = value == b"on";
            }
        }
    }

    /// How a statement sent now will be lexed; `settled`: nothing the client sent before it is
    /// still unanswered.
    pub(super) fn strings(&self, settled: bool) -> Strings {
        match (settled, self.standard_strings) {
            (false, _) => Strings::Either,
            (true, true) => Strings::On,
            (true, false) => Strings::Off,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn status(name: &str, value: &str) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u8(b'S');
        b.put_i32((4 + name.len() + 1 + value.len() + 1) as i32);
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_slice(value.as_bytes());
        b.put_u8(0);
        b
    }

    #[test]
    fn follows_the_reported_setting() {
        let mut l = Lexing::default();
        assert_eq!(l.strings(true), Strings::On);
        l.observe(&status("standard_conforming_strings", "off"));
        assert_eq!(l.strings(true), Strings::Off);
        assert_eq!(l.strings(false), Strings::Either);
        l.observe(&status("TimeZone", "UTC"));
        l.observe(b"S\0\0\0\x05");
        l.observe(b"Z\0\0\0\x05I");
        assert_eq!(l.strings(true), Strings::Off);
        l.observe(&status("standard_conforming_strings", "on"));
        assert_eq!(l.strings(true), Strings::On);
    }
}
