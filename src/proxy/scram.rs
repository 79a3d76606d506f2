//! What the proxy changes in SCRAM authentication, which otherwise passes through: the client is
//! never offered SCRAM-SHA-256-PLUS (channel binding ties the proof to the TLS session it was
//! made on, the proxy's upstream leg, which the client cannot see), and a client that would
//! authenticate in a way the database must refuse learns why. Pure functions over frames.

use bytes::{BufMut, BytesMut};

/// The channel-binding SCRAM mechanism.
pub const SCRAM_PLUS: &[u8] = b"SCRAM-SHA-256-PLUS";

/// AuthenticationSASL's code in an `R` message.
const AUTH_SASL: i32 = 10;

/// An AuthenticationSASL frame without SCRAM-SHA-256-PLUS, or `None` when the frame is another
/// message or does not offer it.
pub fn without_channel_binding(frame: &[u8]) -> Option<BytesMut> {
    if frame.first() != Some(&b'R') || frame.get(5..9)? != AUTH_SASL.to_be_bytes() {
        return None;
    }
    let mechanisms: Vec<&[u8]> = frame[9..]
        .split(|b| *b == 0)
        .take_while(|m| !m.is_empty())
        .collect();
    if !mechanisms.contains(&SCRAM_PLUS) {
        return None;
    }
    let mut body = BytesMut::new();
    body.put_i32(AUTH_SASL);
    for m in mechanisms.into_iter().filter(|m| *m != SCRAM_PLUS) {
        body.put_slice(m);
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(b'R');
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(&body);
    Some(out)
}

/// Whether a `p` frame is a SASLInitialResponse for SCRAM whose GS2 header says "y": the client
/// supports channel binding but thinks the server does not. A server on TLS must refuse it (a
/// downgrade would look the same), so through a TLS upstream the proxy refuses it first, with
/// the way out.
pub fn client_expects_binding(frame: &[u8]) -> bool {
    let Some(body) = frame.get(5..) else {
        return false;
    };
    let Some(end) = body.iter().position(|b| *b == 0) else {
        return false;
    };
    if !body[..end].starts_with(b"SCRAM-SHA-256") {
        return false;
    }
    // Mechanism, its terminator, the length of the data, then the GS2 header.
    body.get(end + 5) == Some(&b'y')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sasl(mechanisms: &[&[u8]]) -> Vec<u8> {
        let mut body = AUTH_SASL.to_be_bytes().to_vec();
        for m in mechanisms {
            body.extend_from_slice(m);
            body.push(0);
        }
        body.push(0);
        let mut f = vec![b'R'];
        f.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        f.extend(body);
        f
    }

    #[test]
    fn channel_binding_is_taken_off_the_mechanisms_offered() {
        let both = sasl(&[b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"]);
        assert_eq!(
            without_channel_binding(&both).unwrap().to_vec(),
            sasl(&[b"SCRAM-SHA-256"])
        );
        assert!(without_channel_binding(&sasl(&[b"SCRAM-SHA-256"])).is_none());
        // AuthenticationOk, SASLContinue, short and odd frames are left alone.
        assert!(without_channel_binding(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]).is_none());
        assert!(without_channel_binding(&[b'R', 0, 0, 0, 8, 0, 0, 0, 11, b'r']).is_none());
        assert!(without_channel_binding(&[b'R', 0, 0]).is_none());
        assert!(without_channel_binding(b"Z\0\0\0\x05I").is_none());
        // No terminator: the mechanisms up to the end.
        let mut cut = sasl(&[b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"]);
        cut.truncate(cut.len() - 2);
        assert_eq!(
            without_channel_binding(&cut).unwrap().to_vec(),
            sasl(&[b"SCRAM-SHA-256"])
        );
    }

    #[test]
    fn the_gs2_header_of_a_scram_initial_response_is_read() {
        let initial = |flag: &[u8]| {
            let mut body = b"SCRAM-SHA-256\0".to_vec();
            let data = [flag, b",,n=,r=abc"].concat();
            body.extend_from_slice(&(data.len() as i32).to_be_bytes());
            body.extend(data);
            let mut f = vec![b'p'];
            f.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
            f.extend(body);
            f
        };
        assert!(client_expects_binding(&initial(b"y")));
        assert!(!client_expects_binding(&initial(b"n")));
        assert!(!client_expects_binding(&initial(b"p=tls-server-end-point")));
        // A cleartext password, a SASLResponse, truncated frames.
        assert!(!client_expects_binding(b"p\0\0\0\x0aSCRAM-SHA-256\0"));
        assert!(!client_expects_binding(b"p\0\0\0\x0ac=biws,r=abc"));
        assert!(!client_expects_binding(b"p\0\0"));
        assert!(!client_expects_binding(b""));
    }
}
