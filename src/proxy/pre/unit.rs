//! Extended-protocol batches when PRE hooks are on: the messages of a batch (Parse, Bind,
//! Describe, Execute, Close, up to its Sync) are gathered, and the batch is held whole when it
//! executes a statement that may write a watched table, whether it was parsed in this batch or
//! an earlier one (statements and portals are followed by name). A batch that holds nothing is
//! forwarded as it came, at its Sync or Flush. Pure.

use std::collections::HashSet;

use bytes::{BufMut, BytesMut};

use super::gate::{self, Gate};
use super::PreConfig;
use crate::wire::{self, Frontend, WireError};

/// The extended-protocol messages a batch is made of.
pub(in crate::proxy) fn is_extended(tag: u8) -> bool {
    matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S')
}

/// What to do once a message joined the batch.
pub(in crate::proxy) enum Next {
    /// Keep gathering.
    Gather,
    /// Send these bytes as they are; with the errors of refused statements to rewrite.
    Forward(BytesMut, Vec<(String, BytesMut)>),
    /// A batch ending in its Sync to hold; `closes` are Close frames for the named statements it
    /// parses (sent before it runs again).
    Hold { batch: BytesMut, closes: BytesMut },
}

#[derive(Default)]
pub(in crate::proxy) struct Units {
    held_statements: HashSet<String>,
    held_portals: HashSet<String>,
    buf: BytesMut,
    held: bool,
    parsed: Vec<String>,
    rewrites: Vec<(String, BytesMut)>,
}

fn cstr(r: &[u8]) -> Result<(&str, &[u8]), WireError> {
    let end = r
        .iter()
        .position(|&b| b == 0)
        .ok_or(WireError::Malformed("name"))?;
    let s = std::str::from_utf8(&r[..end]).map_err(|_| WireError::Malformed("name"))?;
    Ok((s, &r[end + 1..]))
}

impl Units {
    /// Whether a batch is being gathered.
    pub fn pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The gathered bytes as they came, when holding is off (the configuration changed).
    pub fn take_raw(&mut self) -> (BytesMut, Vec<(String, BytesMut)>) {
        self.held = false;
        self.parsed.clear();
        (
            std::mem::take(&mut self.buf),
            std::mem::take(&mut self.rewrites),
        )
    }

    /// Add one whole extended-protocol frame.
    pub fn push(&mut self, cfg: &PreConfig, frame: &[u8], nonce: u64) -> Result<Next, WireError> {
        let tag = frame[0];
        let body = frame.get(5..).ok_or(WireError::Malformed("short"))?;
        match tag {
            b'P' => {
                let Some(Frontend::Parse(p)) = wire::decode_frontend(frame)? else {
                    return Err(WireError::Malformed("Parse"));
                };
                let name = p.statement.to_string();
                match gate::parse(cfg, &p, nonce) {
                    Gate::Pass => {
                        self.held_statements.remove(&name);
                        self.buf.extend_from_slice(frame);
                    }
                    Gate::Hold => {
                        self.held_statements.insert(name.clone());
                        self.held = true;
                        if !name.is_empty() {
                            self.parsed.push(name);
                        }
                        self.buf.extend_from_slice(frame);
                    }
                    Gate::Replace {
                        frame: doomed,
                        rewrite,
                    } => {
                        self.held_statements.remove(&name);
                        self.buf.extend_from_slice(&doomed);
                        self.rewrites.extend(rewrite);
                    }
                }
            }
            b'B' => {
                let Some(Frontend::Bind(b)) = wire::decode_frontend(frame)? else {
                    return Err(WireError::Malformed("Bind"));
                };
                if self.held_statements.contains(b.statement) {
                    self.held_portals.insert(b.portal.to_string());
                    self.held = true;
                } else {
                    self.held_portals.remove(b.portal);
                }
                self.buf.extend_from_slice(frame);
            }
            b'E' => {
                let (portal, _) = cstr(body)?;
                if self.held_portals.contains(portal) {
                    self.held = true;
                }
                self.buf.extend_from_slice(frame);
            }
            b'C' => {
                let (&kind, rest) = body.split_first().ok_or(WireError::Malformed("Close"))?;
                let (name, _) = cstr(rest)?;
                match kind {
                    b'S' => self.held_statements.remove(name),
                    _ => self.held_portals.remove(name),
                };
                self.buf.extend_from_slice(frame);
            }
            b'S' => {
                self.buf.extend_from_slice(frame);
                return Ok(self.end(true, nonce));
            }
            b'H' => {
                self.buf.extend_from_slice(frame);
                return Ok(self.end(false, nonce));
            }
            _ => self.buf.extend_from_slice(frame),
        }
        Ok(Next::Gather)
    }

    /// The batch ends here: at its Sync (`synced`), at a Flush, or because another kind of
    /// message interrupts it.
    pub fn end(&mut self, synced: bool, nonce: u64) -> Next {
        let batch = std::mem::take(&mut self.buf);
        let rewrites = std::mem::take(&mut self.rewrites);
        let held = std::mem::take(&mut self.held);
        let parsed = std::mem::take(&mut self.parsed);
        if !held {
            return Next::Forward(batch, rewrites);
        }
        if synced {
            let mut closes = BytesMut::new();
            for name in parsed {
                closes.put_u8(b'C');
                closes.put_i32((4 + 1 + name.len() + 1) as i32);
                closes.put_u8(b'S');
                closes.put_slice(name.as_bytes());
                closes.put_u8(0);
            }
            return Next::Hold { batch, closes };
        }
        // A batch the client wants answered before its Sync (Flush) cannot be held whole: it is
        // refused, never let through unseen. The server skips the rest until the Sync.
        let message = "pgfire: a batch that writes a table with PRE hooks must end with Sync before the client waits for its results (Flush is not supported for such writes yet)";
        let (doomed, rewrite) = gate::doomed_parse("pgfire_refused", message, "0A000", nonce);
        let mut out = doomed;
        out.put_slice(&[b'H', 0, 0, 0, 4]);
        let mut all = rewrites;
        all.push(rewrite);
        Next::Forward(out, all)
    }
}
