//! The execution history's rows in COPY's binary format: pure encoding, no IO (cheaper than
//! text to write here and for the server to parse).

use bytes::{BufMut, Bytes, BytesMut};

use super::Execution;
use crate::events::EventId;

/// Microseconds from the Unix epoch to the PostgreSQL epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// The rows in COPY's binary format (cheaper than text to write here and to parse in the server).
pub(super) fn copy_rows(batch: &[Execution]) -> Bytes {
    let mut buf = BytesMut::with_capacity(19 + batch.len() * 128 + 2);
    buf.put_slice(b"PGCOPY\n\xff\r\n\0");
    buf.put_i32(0); // flags
    buf.put_i32(0); // header extension
    let mut id = [0u8; 32];
    for e in batch {
        buf.put_i16(8);
        copy_text(&mut buf, event_id(e.event_id, &mut id));
        copy_text(&mut buf, &e.event_type);
        copy_text(&mut buf, &e.function_name);
        buf.put_i32(4);
        buf.put_i32(e.attempt.min(i32::MAX as u32) as i32);
        copy_text(&mut buf, e.status.as_str());
        buf.put_i32(8);
        buf.put_i64(e.started_at_us.saturating_sub(PG_EPOCH_OFFSET_MICROS));
        buf.put_i32(8);
        buf.put_f64(e.duration_us as f64 / 1000.0);
        match &e.error {
            Some(err) if err.contains('\0') => copy_text(&mut buf, &err.replace('\0', "")),
            Some(err) => copy_text(&mut buf, err),
            None => buf.put_i32(-1),
        }
    }
    buf.put_i16(-1);
    buf.freeze()
}

/// A text field: its length and UTF-8 bytes (text cannot hold NUL; callers remove it).
fn copy_text(buf: &mut BytesMut, s: &str) {
    buf.put_i32(s.len().min(i32::MAX as usize) as i32);
    buf.put_slice(s.as_bytes());
}

/// The event id as [`EventId`]'s `Display` writes it (hex LSN, position, and `-NN` for the
/// further events of a change), without the formatting machinery.
fn event_id(id: EventId, out: &mut [u8; 32]) -> &str {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let lsn = id.commit_lsn.0;
    for (i, b) in out[..16].iter_mut().enumerate() {
        *b = HEX[((lsn >> (60 - 4 * i)) & 0xf) as usize];
    }
    out[16] = b'-';
    let mut digits = [0u8; 10];
    let mut n = id.position;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        n /= 10;
        len += 1;
        if n == 0 {
            break;
        }
    }
    let width = len.max(10);
    for i in 0..width {
        out[17 + i] = if i < width - len {
            b'0'
        } else {
            digits[width - 1 - i]
        };
    }
    let mut end = 17 + width;
    if id.sub > 0 {
        out[end] = b'-';
        out[end + 1] = b'0' + (id.sub / 10) % 10;
        out[end + 2] = b'0' + id.sub % 10;
        end += 3;
    }
    std::str::from_utf8(&out[..end]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Lsn;
    use crate::executions::Status;
    use std::sync::Arc;

    #[test]
    fn event_ids_are_written_as_displayed() {
        let mut buf = [0u8; 32];
        for (lsn, position, sub) in [
            (0x16B3748, 2, 0),
            (0, 0, 0),
            (u64::MAX, u32::MAX, 99),
            (1, 999_999, 1),
            (1, 1_000_000, 10),
        ] {
            let id = EventId {
                commit_lsn: Lsn(lsn),
                position,
                sub,
            };
            assert_eq!(event_id(id, &mut buf), id.to_string());
        }
    }

    #[test]
    fn binary_copy_rows() {
        let e = Execution {
            event_id: EventId {
                commit_lsn: Lsn(0x10),
                position: 1,
                sub: 0,
            },
            event_type: Arc::from("T"),
            function_name: Arc::from("f"),
            attempt: 2,
            status: Status::Ok,
            started_at_us: PG_EPOCH_OFFSET_MICROS + 5,
            duration_us: 1500,
            error: Some("a\0b".into()),
        };
        let b = copy_rows(&[e]);
        let mut want = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0\0\x08".to_vec();
        let text = |w: &mut Vec<u8>, s: &str| {
            w.extend((s.len() as i32).to_be_bytes());
            w.extend(s.as_bytes());
        };
        text(&mut want, "0000000000000010-0000000001");
        text(&mut want, "T");
        text(&mut want, "f");
        want.extend(4i32.to_be_bytes());
        want.extend(2i32.to_be_bytes());
        text(&mut want, "ok");
        want.extend(8i32.to_be_bytes());
        want.extend(5i64.to_be_bytes());
        want.extend(8i32.to_be_bytes());
        want.extend(1.5f64.to_be_bytes());
        text(&mut want, "ab");
        want.extend((-1i16).to_be_bytes());
        assert_eq!(&b[..], &want[..]);
    }
}
