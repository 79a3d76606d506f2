//! PostgreSQL wire protocol codec shared by the proxy and the rest of pgfire: framing with checked
//! lengths, the startup packet, typed decoders for the few messages pgfire looks into (Query,
//! Parse, Bind; ReadyForQuery, ErrorResponse and NoticeResponse, whose fields stay bytes) and an
//! ErrorResponse encoder. Pure and synchronous: bytes in, values or [`WireError`] out, never a
//! panic.

use bytes::{BufMut, BytesMut};
use std::borrow::Cow;

/// Largest startup packet PostgreSQL accepts (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP: usize = 10_000;
/// Largest regular message (PostgreSQL's PQ_LARGE_MESSAGE_LIMIT is 1 GB).
pub const MAX_MESSAGE: usize = 1 << 30;

pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// SQLSTATE protocol_violation.
pub const PROTOCOL_VIOLATION: &str = "08P01";
/// SQLSTATE too_many_connections.
pub const TOO_MANY_CONNECTIONS: &str = "53300";
/// SQLSTATE admin_shutdown.
pub const ADMIN_SHUTDOWN: &str = "57P01";
/// SQLSTATE connection_failure.
pub const CONNECTION_FAILURE: &str = "08006";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("invalid startup packet: {0}")]
    BadStartup(String),
    #[error("invalid frontend message type {0}")]
    UnknownTag(u8),
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

/// The first packet of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        key: i32,
    },
    /// Protocol version and parameters (user, database, options, ...).
    Startup {
        version: i32,
        params: Vec<(String, String)>,
    },
}

/// Parse a startup-phase packet at the start of `buf`: `Ok(None)` until it is complete, else the
/// packet and its length.
pub fn startup_packet(buf: &[u8]) -> Result<Option<(Startup, usize)>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(8..=MAX_STARTUP as i32).contains(&len) {
        return Err(WireError::BadLength(len as i64));
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let code = i32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let body = &buf[8..len];
    let packet = match code {
        SSL_REQUEST if body.is_empty() => Startup::Ssl,
        GSSENC_REQUEST if body.is_empty() => Startup::GssEnc,
        CANCEL_REQUEST if body.len() == 8 => Startup::Cancel {
            pid: i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
            key: i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
        },
        v if v >> 16 == 3 => {
            let mut params = Vec::new();
            let mut r = Reader(body);
            loop {
                let k = r.cstr("startup")?;
                if k.is_empty() {
                    break;
                }
                let v = r.cstr("startup")?;
                params.push((k.to_string(), v.to_string()));
            }
            if !r.0.is_empty() {
                return Err(WireError::BadStartup(
                    "trailing bytes after the parameters".into(),
                ));
            }
            Startup::Startup { version: v, params }
        }
        other => {
            return Err(WireError::BadStartup(format!(
                "unsupported protocol or request code {other}"
            )))
        }
    };
    Ok(Some((packet, len)))
}

/// Frontend message types a client may send after startup.
pub fn is_frontend_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'B' | b'C'
            | b'd'
            | b'c'
            | b'f'
            | b'D'
            | b'E'
            | b'H'
            | b'F'
            | b'P'
            | b'p'
            | b'Q'
            | b'S'
            | b'X'
    )
}

/// The header of a regular message at the start of `buf`: its tag and whole length (tag byte
/// included), or `Ok(None)` until 5 bytes are there.
pub fn frame_header(buf: &[u8]) -> Result<Option<(u8, usize)>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > MAX_MESSAGE {
        return Err(WireError::BadLength(len as i64));
    }
    Ok(Some((buf[0], len as usize + 1)))
}

/// A simple-protocol query ('Q'). `sql` is the text for reading (classifying): the bytes as
/// they came when they are UTF-8, otherwise with each invalid sequence replaced (a client in
/// another `client_encoding`); `raw` is what the client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query<'a> {
    pub sql: Cow<'a, str>,
    pub raw: &'a [u8],
}

/// An extended-protocol Parse ('P').
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    pub statement: &'a str,
    /// For reading, as [`Query::sql`].
    pub sql: Cow<'a, str>,
    pub param_types: Vec<u32>,
}

/// An extended-protocol Bind ('B'); parameter values stay raw (format code per parameter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    pub param_formats: Vec<i16>,
    pub params: Vec<Option<&'a [u8]>>,
    pub result_formats: Vec<i16>,
}

/// A frontend message pgfire looks into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend<'a> {
    Query(Query<'a>),
    Parse(Parse<'a>),
    Bind(Bind<'a>),
}

/// Decode a whole frontend frame (tag and length included) if it is one pgfire looks into.
pub fn decode_frontend(frame: &[u8]) -> Result<Option<Frontend<'_>>, WireError> {
    let Some(&tag) = frame.first() else {
        return Err(WireError::Malformed("empty"));
    };
    let body = frame.get(5..).ok_or(WireError::Malformed("short"))?;
    let mut r = Reader(body);
    Ok(Some(match tag {
        b'Q' => {
            let raw = r.cstr_bytes("Query")?;
            Frontend::Query(Query {
                sql: String::from_utf8_lossy(raw),
                raw,
            })
        }
        b'P' => {
            let statement = r.cstr("Parse")?;
            let sql = String::from_utf8_lossy(r.cstr_bytes("Parse")?);
            let n = r.i16("Parse")?;
            let n = usize::try_from(n).map_err(|_| WireError::Malformed("Parse"))?;
            if r.0.len() < n * 4 {
                return Err(WireError::Malformed("Parse"));
            }
            let param_types = (0..n)
                .map(|_| r.i32("Parse").map(|v| v as u32))
                .collect::<Result<_, _>>()?;
            Frontend::Parse(Parse {
                statement,
                sql,
                param_types,
            })
        }
        b'B' => {
            let portal = r.cstr("Bind")?;
            let statement = r.cstr("Bind")?;
            let nf = r.count("Bind", 2)?;
            let param_formats = (0..nf).map(|_| r.i16("Bind")).collect::<Result<_, _>>()?;
            let np = r.count("Bind", 4)?;
            let mut params = Vec::with_capacity(np);
            for _ in 0..np {
                let len = r.i32("Bind")?;
                params.push(if len < 0 {
                    None
                } else {
                    Some(r.take(len as usize, "Bind")?)
                });
            }
            let nr = r.count("Bind", 2)?;
            let result_formats = (0..nr).map(|_| r.i16("Bind")).collect::<Result<_, _>>()?;
            Frontend::Bind(Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            })
        }
        _ => return Ok(None),
    }))
}

/// The fields of an ErrorResponse or NoticeResponse pgfire reads, as the server sent them. They
/// are in the client's encoding (`client_encoding`), which need not be UTF-8: a WIN1252 client
/// gets `Müller` as the byte 0xFC, so the fields stay bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Notice<'a> {
    /// `S`: the severity, possibly localized.
    pub severity: &'a [u8],
    /// `V`: the severity, never localized (absent before PostgreSQL 9.6).
    pub severity_raw: Option<&'a [u8]>,
    /// `C`: the SQLSTATE.
    pub code: &'a [u8],
    /// `M`: the primary message.
    pub message: &'a [u8],
    /// `D`: the detail, empty when there is none.
    pub detail: &'a [u8],
}

impl Notice<'_> {
    /// The SQLSTATE, when it is one (five ASCII characters).
    pub fn sqlstate(&self) -> Option<&str> {
        (self.code.len() == 5 && self.code.iter().all(u8::is_ascii_alphanumeric))
            .then(|| std::str::from_utf8(self.code).ok())
            .flatten()
    }

    /// The severity in English (`ERROR`, `FATAL`, `WARNING`, ...).
    pub fn severity(&self) -> String {
        String::from_utf8_lossy(self.severity_raw.unwrap_or(self.severity)).into_owned()
    }

    /// The message for logs; bytes that are not UTF-8 become U+FFFD.
    pub fn message_lossy(&self) -> String {
        String::from_utf8_lossy(self.message).into_owned()
    }
}

/// A backend message pgfire looks into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend<'a> {
    /// Transaction status: `I` idle, `T` in a transaction, `E` in a failed transaction.
    ReadyForQuery(u8),
    ErrorResponse(Notice<'a>),
    NoticeResponse(Notice<'a>),
    /// A run-time parameter's value, at startup and whenever it changes (names and values in the
    /// server's encoding, bytes).
    ParameterStatus {
        name: &'a [u8],
        value: &'a [u8],
    },
}

/// Decode a whole backend frame if it is one pgfire looks into.
pub fn decode_backend(frame: &[u8]) -> Result<Option<Backend<'_>>, WireError> {
    let Some(&tag) = frame.first() else {
        return Err(WireError::Malformed("empty"));
    };
    let body = frame.get(5..).ok_or(WireError::Malformed("short"))?;
    Ok(Some(match tag {
        b'Z' => Backend::ReadyForQuery(*body.first().ok_or(WireError::Malformed("ReadyForQuery"))?),
        b'E' => Backend::ErrorResponse(notice_fields(body, "ErrorResponse")?),
        b'N' => Backend::NoticeResponse(notice_fields(body, "NoticeResponse")?),
        b'S' => {
            let mut r = Reader(body);
            Backend::ParameterStatus {
                name: r.cstr_bytes("ParameterStatus")?,
                value: r.cstr_bytes("ParameterStatus")?,
            }
        }
        _ => return Ok(None),
    }))
}

/// The fields of an ErrorResponse or NoticeResponse body, as bytes.
fn notice_fields<'a>(body: &'a [u8], what: &'static str) -> Result<Notice<'a>, WireError> {
    let mut notice = Notice::default();
    let mut r = Reader(body);
    loop {
        let field = r.u8(what)?;
        if field == 0 {
            break;
        }
        let value = r.cstr_bytes(what)?;
        match field {
            b'S' => notice.severity = value,
            b'V' => notice.severity_raw = Some(value),
            b'C' => notice.code = value,
            b'M' => notice.message = value,
            b'D' => notice.detail = value,
            _ => {}
        }
    }
    Ok(notice)
}

/// Append an ErrorResponse ('E') with severity, SQLSTATE and message (NUL bytes dropped).
pub fn error_response(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    let clean = |s: &str| s.replace('\0', "");
    let fields = [
        (b'S', clean(severity)),
        (b'V', clean(severity)),
        (b'C', clean(code)),
        (b'M', clean(message)),
    ];
    let len = 4 + fields.iter().map(|(_, v)| v.len() + 2).sum::<usize>() + 1;
    buf.put_u8(b'E');
    buf.put_i32(len as i32);
    for (t, v) in &fields {
        buf.put_u8(*t);
        buf.put_slice(v.as_bytes());
        buf.put_u8(0);
    }
    buf.put_u8(0);
}

/// Checked reads over a message body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// A NUL-terminated string that must be UTF-8.
    fn cstr(&mut self, what: &'static str) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.cstr_bytes(what)?).map_err(|_| WireError::Malformed(what))
    }
    /// A NUL-terminated string in whatever encoding it came, without its terminator.
    fn cstr_bytes(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let end = self
            .0
            .iter()
            .position(|b| *b == 0)
            .ok_or(WireError::Malformed(what))?;
        let (s, rest) = (&self.0[..end], &self.0[end + 1..]);
        self.0 = rest;
        Ok(s)
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Malformed(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, WireError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, WireError> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A count followed by at least `min_each` bytes per item (checked before allocating).
    fn count(&mut self, what: &'static str, min_each: usize) -> Result<usize, WireError> {
        let n = usize::try_from(self.i16(what)?).map_err(|_| WireError::Malformed(what))?;
        if self.0.len() < n * min_each {
            return Err(WireError::Malformed(what));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend;

    fn framed(f: impl FnOnce(&mut BytesMut)) -> BytesMut {
        let mut b = BytesMut::new();
        f(&mut b);
        b
    }

    #[test]
    fn startup_packets() {
        let b =
            framed(|b| frontend::startup_message([("user", "u"), ("database", "d")], b).unwrap());
        let (p, n) = startup_packet(&b).unwrap().unwrap();
        assert_eq!(n, b.len());
        assert_eq!(
            p,
            Startup::Startup {
                version: 196608,
                params: vec![("user".into(), "u".into()), ("database".into(), "d".into())]
            }
        );
        assert_eq!(startup_packet(&b[..b.len() - 1]).unwrap(), None);
        let b = framed(frontend::ssl_request);
        assert_eq!(startup_packet(&b).unwrap().unwrap().0, Startup::Ssl);
        let b = framed(|b| frontend::cancel_request(7, 9, b));
        assert_eq!(
            startup_packet(&b).unwrap().unwrap().0,
            Startup::Cancel { pid: 7, key: 9 }
        );
    }

    #[test]
    fn hostile_startup_packets_are_errors() {
        assert!(matches!(
            startup_packet(&[0, 0, 0, 3, 0, 0, 0, 0]),
            Err(WireError::BadLength(3))
        ));
        assert!(matches!(
            startup_packet(&[0x7f, 0, 0, 0]),
            Err(WireError::BadLength(_))
        ));
        assert!(matches!(
            startup_packet(b"GET / HTTP/1.1\r\n"),
            Err(WireError::BadLength(_))
        ));
        assert!(matches!(
            startup_packet(&[0, 0, 0, 8, 0, 2, 0, 0]),
            Err(WireError::BadStartup(_))
        ));
        // Parameters without their terminator.
        assert!(startup_packet(&[0, 0, 0, 11, 0, 3, 0, 0, b'u', 0, b'x']).is_err());
    }

    #[test]
    fn frames() {
        assert_eq!(frame_header(&[b'Q', 0, 0, 0, 9]).unwrap(), Some((b'Q', 10)));
        assert_eq!(frame_header(&[b'Q', 0, 0]).unwrap(), None);
        assert!(frame_header(&[b'Q', 0, 0, 0, 3]).is_err());
        assert!(frame_header(&[b'Q', 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(frame_header(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).is_err());
        assert!(is_frontend_tag(b'Q') && !is_frontend_tag(b'Z') && !is_frontend_tag(0));
    }

    #[test]
    fn frontend_round_trips() {
        let b = framed(|b| frontend::query("SELECT 1", b).unwrap());
        assert_eq!(
            decode_frontend(&b).unwrap(),
            Some(Frontend::Query(Query {
                sql: "SELECT 1".into(),
                raw: b"SELECT 1"
            }))
        );
        let b = framed(|b| frontend::parse("s1", "SELECT $1", [23u32], b).unwrap());
        assert_eq!(
            decode_frontend(&b).unwrap(),
            Some(Frontend::Parse(Parse {
                statement: "s1",
                sql: "SELECT $1".into(),
                param_types: vec![23]
            }))
        );
        let b = framed(|b| {
            frontend::bind(
                "p",
                "s1",
                [0i16],
                [Some(&b"42"[..]), None],
                |v, buf| match v {
                    Some(v) => {
                        buf.put_slice(v);
                        Ok(postgres_protocol::IsNull::No)
                    }
                    None => Ok(postgres_protocol::IsNull::Yes),
                },
                [1i16],
                b,
            )
            .map_err(|_| ())
            .unwrap()
        });
        assert_eq!(
            decode_frontend(&b).unwrap(),
            Some(Frontend::Bind(Bind {
                portal: "p",
                statement: "s1",
                param_formats: vec![0],
                params: vec![Some(b"42"), None],
                result_formats: vec![1]
            }))
        );
        let b = framed(frontend::sync);
        assert_eq!(decode_frontend(&b).unwrap(), None);
    }

    #[test]
    fn malformed_frontend_messages_are_errors() {
        for bad in [
            &b"Q\x00\x00\x00\x06ab"[..],
            b"P\x00\x00\x00\x08s\x00q\x00",
            b"B\x00\x00\x00\x0ap\x00s\x00\x7f\xff",
            b"P",
        ] {
            assert!(decode_frontend(bad).is_err(), "{bad:?}");
        }
        // A huge parameter count with no bytes behind it must not allocate.
        assert!(decode_frontend(b"B\x00\x00\x00\x0cp\x00s\x00\x00\x00\x7f\xff").is_err());
    }

    #[test]
    fn backend_messages_and_error_encoding() {
        let mut b = BytesMut::new();
        error_response(&mut b, "FATAL", "08P01", "bad \0 thing");
        let (tag, len) = frame_header(&b).unwrap().unwrap();
        assert_eq!((tag, len), (b'E', b.len()));
        assert_eq!(
            decode_backend(&b).unwrap(),
            Some(Backend::ErrorResponse(Notice {
                severity: b"FATAL",
                severity_raw: Some(b"FATAL"),
                code: b"08P01",
                message: b"bad  thing",
                detail: b"",
            }))
        );
        // postgres-protocol reads it too.
        let parsed = postgres_protocol::message::backend::Message::parse(&mut b.clone()).unwrap();
        assert!(matches!(
            parsed,
            Some(postgres_protocol::message::backend::Message::ErrorResponse(
                _
            ))
        ));
        assert_eq!(
            decode_backend(b"Z\x00\x00\x00\x05T").unwrap(),
            Some(Backend::ReadyForQuery(b'T'))
        );
        assert!(decode_backend(b"Z\x00\x00\x00\x04").is_err());
        assert!(decode_backend(b"E\x00\x00\x00\x06Sx").is_err());
        assert_eq!(
            decode_backend(b"S\x00\x00\x00\x0ba\x00off\x00").unwrap(),
            Some(Backend::ParameterStatus {
                name: b"a",
                value: b"off"
            })
        );
        assert!(decode_backend(b"S\x00\x00\x00\x06a\x00").is_err());
    }

    #[test]
    fn query_text_need_not_be_utf8() {
        let mut b = BytesMut::new();
        b.put_u8(b'Q');
        b.put_i32(4 + 12);
        b.put_slice(b"SELECT 'J\xe9'\0");
        let Some(Frontend::Query(q)) = decode_frontend(&b).unwrap() else {
            panic!("not a Query");
        };
        assert_eq!(q.raw, b"SELECT 'J\xe9'");
        assert_eq!(q.sql, "SELECT 'J\u{fffd}'");
    }

    #[test]
    fn error_and_notice_fields_need_not_be_utf8() {
        // What a WIN1252 client gets for a unique violation on 'M\u{fc}ller': 0xFC is not UTF-8.
        let body: &[u8] = b"SERROR\0VERROR\0C23505\0Mduplicate key value\0DKey (name)=(M\xfcller) already exists.\0\0";
        let mut frame = vec![b'E'];
        frame.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        frame.extend_from_slice(body);
        let Some(Backend::ErrorResponse(e)) = decode_backend(&frame).unwrap() else {
            panic!("not an ErrorResponse");
        };
        assert_eq!(e.sqlstate(), Some("23505"));
        assert_eq!(e.severity(), "ERROR");
        assert_eq!(e.message, b"duplicate key value");
        // A localized severity and message in LATIN1, as a NoticeResponse.
        let body: &[u8] = b"SREMARQUE\0C00000\0Mla cl\xe9 existe\0\0";
        frame[0] = b'N';
        frame.truncate(1);
        frame.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        frame.extend_from_slice(body);
        let Some(Backend::NoticeResponse(n)) = decode_backend(&frame).unwrap() else {
            panic!("not a NoticeResponse");
        };
        assert_eq!(
            (n.severity(), n.message),
            ("REMARQUE".into(), &b"la cl\xe9 existe"[..])
        );
        assert_eq!(n.message_lossy(), "la cl\u{fffd} existe");
        // A field without its terminator is still malformed; a bogus SQLSTATE is not one.
        assert!(decode_backend(b"N\x00\x00\x00\x07M\xfc\xfc").is_err());
        let bogus = Notice {
            code: b"2\xfc505",
            ..Notice::default()
        };
        assert_eq!(bogus.sqlstate(), None);
    }
}
