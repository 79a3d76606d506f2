//! Extended-protocol batches when PRE hooks are on: the messages of a batch (Parse, Bind,
//! Describe, Execute, Close, up to its Sync) are gathered, and the batch is held whole when it
//! executes a statement that may write a watched table, whether it was parsed in this batch or
//! an earlier one (statements and portals are followed by name). A batch that holds nothing is
//! forwarded as it came, at its Sync or Flush. Pure.

use std::collections::HashSet;

use bytes::{BufMut, BytesMut};

use super::gate::{self, Gate, HoldAs};
use super::PreConfig;
use crate::metrics::Metrics;
use crate::proxy::classify::Strings;
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
    /// parses (sent before it runs again); `how`: whether it runs a COPY FROM STDIN.
    Hold {
        batch: BytesMut,
        closes: BytesMut,
        how: HoldAs,
    },
}

pub(in crate::proxy) struct Units {
    held_statements: HashSet<String>,
    held_portals: HashSet<String>,
    /// Held statements and portals that are a `COPY watched FROM STDIN`.
    copy_statements: HashSet<String>,
    copy_portals: HashSet<String>,
    /// This batch executes such a portal, and how many Executes it has in all.
    copies: bool,
    executes: usize,
    buf: BytesMut,
    held: bool,
    parsed: Vec<String>,
    rewrites: Vec<(String, BytesMut)>,
    /// The server is between batches (the last one ended with Sync, or a Query followed): only
    /// then can the proxy run statements of its own before a held batch.
    clean: bool,
}

impl Default for Units {
    fn default() -> Units {
        Units {
            held_statements: HashSet::new(),
            held_portals: HashSet::new(),
            copy_statements: HashSet::new(),
            copy_portals: HashSet::new(),
            copies: false,
            executes: 0,
            buf: BytesMut::new(),
            held: false,
            parsed: Vec::new(),
            rewrites: Vec::new(),
            clean: true,
        }
    }
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
    /// A simple Query went to the server: it ends any batch there.
    pub fn query_sent(&mut self) {
        self.clean = true;
    }

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

    /// Add one whole extended-protocol frame (a Parse, lexed as `strings` says, is counted in
    /// `metrics` as streamed, held or refused).
    pub fn push(
        &mut self,
        cfg: &PreConfig,
        (frame, strings): (&[u8], Strings),
        nonce: &dyn Fn() -> u64,
        metrics: &Metrics,
    ) -> Result<Next, WireError> {
        let tag = frame[0];
        let body = frame.get(5..).ok_or(WireError::Malformed("short"))?;
        match tag {
            b'P' => {
                let Some(Frontend::Parse(p)) = wire::decode_frontend(frame)? else {
                    return Err(WireError::Malformed("Parse"));
                };
                let name = p.statement.to_string();
                let gate = gate::parse(cfg, &p, nonce, strings);
                metrics.statement(gate.action());
                self.copy_statements.remove(&name);
                match gate {
                    Gate::Pass => {
                        self.held_statements.remove(&name);
                        self.buf.extend_from_slice(frame);
                    }
                    Gate::Hold(how) => {
                        // Held when a Bind of this batch or a later one runs it.
                        self.held_statements.insert(name.clone());
                        if how == HoldAs::CopyIn {
                            self.copy_statements.insert(name.clone());
                        }
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
                if self.copy_statements.contains(b.statement) {
                    self.copy_portals.insert(b.portal.to_string());
                } else {
                    self.copy_portals.remove(b.portal);
                }
                self.buf.extend_from_slice(frame);
            }
            b'E' => {
                let (portal, _) = cstr(body)?;
                if self.held_portals.contains(portal) {
                    self.held = true;
                }
                self.copies |= self.copy_portals.contains(portal);
                self.executes += 1;
                self.buf.extend_from_slice(frame);
            }
            b'C' => {
                let (&kind, rest) = body.split_first().ok_or(WireError::Malformed("Close"))?;
                let (name, _) = cstr(rest)?;
                match kind {
                    b'S' => {
                        self.copy_statements.remove(name);
                        self.held_statements.remove(name)
                    }
                    _ => {
                        self.copy_portals.remove(name);
                        self.held_portals.remove(name)
                    }
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
    pub fn end(&mut self, synced: bool, nonce: &dyn Fn() -> u64) -> Next {
        // split, not take: the gathering buffer keeps its allocation for the next batch once
        // this one is sent and dropped.
        let batch = self.buf.split();
        let rewrites = std::mem::take(&mut self.rewrites);
        let held = std::mem::take(&mut self.held);
        let parsed = std::mem::take(&mut self.parsed);
        let copies = std::mem::take(&mut self.copies);
        let executes = std::mem::take(&mut self.executes);
        let clean = std::mem::replace(&mut self.clean, synced);
        // A batch with a refused statement fails at it anyway (a write before it that the proxy
        // did not hold is refused by pgfire's trigger).
        if !held || !rewrites.is_empty() {
            return Next::Forward(batch, rewrites);
        }
        if copies && executes > 1 && synced && clean {
            // Its COPY data comes after the whole batch: the answers to the other statements
            // could not be held until the PRE functions decide.
            return refused(
                rewrites,
                "pgfire: a COPY FROM STDIN into a table with PRE hooks must be the only statement its batch executes (send the others in a batch of their own)",
                synced,
                nonce(),
            );
        }
        if synced && clean {
            let mut closes = BytesMut::new();
            for name in parsed {
                closes.put_u8(b'C');
                closes.put_i32((4 + 1 + name.len() + 1) as i32);
                closes.put_u8(b'S');
                closes.put_slice(name.as_bytes());
                closes.put_u8(0);
            }
            let how = if copies {
                HoldAs::CopyIn
            } else {
                HoldAs::Whole
            };
            return Next::Hold { batch, closes, how };
        }
        // A batch the client wants answered before its Sync (Flush), or one that continues a
        // batch the server has begun, cannot be held whole: it is refused, never let through
        // unseen. The server skips the rest until the Sync.
        let message = if synced {
            "pgfire: this batch writes a table with PRE hooks but continues a batch whose results the client already asked for with Flush; a write to such a table must start a batch of its own: send Sync before it"
        } else {
            "pgfire: a write to a table with PRE hooks cannot be answered before its batch ends: this batch asked for results with Flush; send Sync instead of Flush after the write (libpq: PQpipelineSync rather than PQsendFlushRequest; psycopg pipeline mode: call pipeline.sync() before fetching the write's results)"
        };
        refused(rewrites, message, synced, nonce())
    }
}

/// The batch is refused instead of sent: a Parse that fails at once (the server then skips
/// the rest until the Sync), then the batch's Sync (`synced`) or a Flush, so the client gets
/// the error without waiting.
fn refused(rewrites: Vec<(String, BytesMut)>, message: &str, synced: bool, nonce: u64) -> Next {
    let (doomed, rewrite) = gate::doomed_parse("pgfire_refused", message, "0A000", nonce);
    let mut out = doomed;
    out.put_slice(&[if synced { b'S' } else { b'H' }, 0, 0, 0, 4]);
    let mut all = rewrites;
    all.push(rewrite);
    Next::Forward(out, all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::classify::Watched;

    fn cfg() -> PreConfig {
        PreConfig {
            watched: Watched::new(["public.users"]).unwrap(),
            rows_limit: 1000,
            ..PreConfig::default()
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
    }

    fn bind(portal: &str, statement: &str) -> Vec<u8> {
        msg(
            b'B',
            format!("{portal}\0{statement}\0\0\0\0\0\0\0").as_bytes(),
        )
    }

    fn execute(portal: &str) -> Vec<u8> {
        msg(b'E', format!("{portal}\0\0\0\0\0").as_bytes())
    }

    fn run(u: &mut Units, frames: &[Vec<u8>]) -> Next {
        let c = cfg();
        let mut last = Next::Gather;
        for f in frames {
            last = u
                .push(&c, (f, Strings::On), &|| 1, &Metrics::default())
                .unwrap();
        }
        last
    }

    const SYNC: &[u8] = b"S\0\0\0\x04";
    const FLUSH: &[u8] = b"H\0\0\0\x04";

    #[test]
    fn held_when_a_held_statement_runs_in_this_batch_or_a_later_one() {
        let mut u = Units::default();
        let ins = "INSERT INTO users VALUES ($1)";
        // Preparing alone holds nothing.
        let prep = [parse("s1", ins), msg(b'D', b"Ss1\0"), SYNC.to_vec()];
        assert!(matches!(run(&mut u, &prep), Next::Forward(_, r) if r.is_empty()));
        // Running it later does.
        let exec = [bind("", "s1"), execute(""), SYNC.to_vec()];
        let Next::Hold { batch, closes, .. } = run(&mut u, &exec) else {
            panic!("not held")
        };
        assert_eq!(batch.len(), exec.iter().map(Vec::len).sum::<usize>());
        assert!(closes.is_empty());
        // All in one batch: held, and the rerun closes s2 first.
        let all = [
            parse("s2", ins),
            bind("p", "s2"),
            execute("p"),
            SYNC.to_vec(),
        ];
        let Next::Hold { closes, .. } = run(&mut u, &all) else {
            panic!("not held")
        };
        assert_eq!(&closes[..], &msg(b'C', b"Ss2\0")[..]);
        // Reads and other tables stream through.
        let read = [
            parse("", "SELECT * FROM users"),
            bind("", ""),
            execute(""),
            SYNC.to_vec(),
        ];
        assert!(matches!(run(&mut u, &read), Next::Forward(..)));
        // A closed statement is no longer held.
        let close = [msg(b'C', b"Ss1\0"), SYNC.to_vec()];
        assert!(matches!(run(&mut u, &close), Next::Forward(..)));
        let again = [
            parse("s1", "SELECT 1"),
            bind("", "s1"),
            execute(""),
            SYNC.to_vec(),
        ];
        assert!(matches!(run(&mut u, &again), Next::Forward(..)));
    }

    #[test]
    fn a_held_batch_without_its_sync_is_refused() {
        let mut u = Units::default();
        let ins = "INSERT INTO users VALUES ($1)";
        let flushed = [parse("", ins), bind("", ""), execute(""), FLUSH.to_vec()];
        let Next::Forward(bytes, rewrites) = run(&mut u, &flushed) else {
            panic!()
        };
        assert_eq!(rewrites.len(), 1);
        assert!(bytes.windows(14).any(|w| w == b"pgfire-refused"));
        // The rest of that batch, up to its Sync, cannot be held either.
        let rest = [bind("", ""), execute(""), SYNC.to_vec()];
        assert!(matches!(run(&mut u, &rest), Next::Forward(_, r) if r.len() == 1));
        // After it, batches are whole again.
        let whole = [parse("", ins), bind("", ""), execute(""), SYNC.to_vec()];
        assert!(matches!(run(&mut u, &whole), Next::Hold { .. }));
        // A refused statement in the batch: the batch goes as is and fails there.
        let refused = [
            parse("", "TRUNCATE users"),
            bind("", ""),
            execute(""),
            SYNC.to_vec(),
        ];
        assert!(matches!(run(&mut u, &refused), Next::Forward(_, r) if r.len() == 1));
        // A COPY FROM STDIN is held as one, alone in its batch.
        let copy = [
            parse("c", "COPY users FROM STDIN"),
            msg(b'D', b"Sc\0"),
            SYNC.to_vec(),
        ];
        assert!(matches!(run(&mut u, &copy), Next::Forward(..)));
        let alone = [bind("", "c"), execute(""), SYNC.to_vec()];
        assert!(matches!(
            run(&mut u, &alone),
            Next::Hold {
                how: HoldAs::CopyIn,
                ..
            }
        ));
        let with_more = [
            parse("", ins),
            bind("", ""),
            execute(""),
            bind("p", "c"),
            execute("p"),
            SYNC.to_vec(),
        ];
        let Next::Forward(bytes, r) = run(&mut u, &with_more) else {
            panic!("not refused")
        };
        assert_eq!(r.len(), 1);
        assert_eq!(&bytes[bytes.len() - 5..], SYNC, "the client's Sync is kept");
        // Garbage is an error, never a panic.
        let c = cfg();
        let m = Metrics::default();
        assert!(u
            .push(&c, (&msg(b'E', b"no terminator"), Strings::On), &|| 1, &m)
            .is_err());
        assert!(u
            .push(&c, (&msg(b'C', b""), Strings::On), &|| 1, &m)
            .is_err());
        assert!(u
            .push(&c, (&msg(b'B', b"\0"), Strings::On), &|| 1, &m)
            .is_err());
    }
}
