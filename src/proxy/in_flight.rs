//! What a client session has asked of the server and not yet seen answered, as far as the frames
//! tell: the ReadyForQuery still owed for each sync point sent (Query, Sync, FunctionCall), an
//! extended-protocol batch not yet closed by Sync, COPY data still coming. A session is idle, and
//! may be closed at shutdown, only when nothing is in flight and its transaction status is idle.
//! Pure: the relay reports the tags it forwards and the ReadyForQuery it sees.

#[derive(Debug)]
pub(super) struct InFlight {
    /// ReadyForQuery messages the server still owes: one per Query, Sync and FunctionCall sent,
    /// and one for the startup packet.
    owed: usize,
    /// Extended-protocol messages (Parse, Bind, Execute, Describe, Close) sent since the last
    /// Sync, or a COPY started by Execute that still needs its Sync.
    batch_open: bool,
    /// The client is sending COPY data: between its first CopyData and CopyDone or CopyFail.
    /// The server ignores Sync and Flush meanwhile.
    copying: bool,
    /// Syncs sent since the last Execute: when that Execute started a COPY FROM STDIN, the
    /// server ignored them (clients send Execute and Sync before they know it is a COPY).
    syncs_since_execute: usize,
    /// Whether the last statement sent was an Execute rather than a Query.
    last_was_execute: bool,
    /// Transaction status of the last ReadyForQuery (`I`, `T`, `E`); 0 before the first.
    status: u8,
}

impl InFlight {
    /// A session whose startup packet was sent: the server owes the ReadyForQuery that ends
    /// authentication.
    pub(super) fn new() -> InFlight {
        InFlight {
            owed: 1,
            batch_open: false,
            copying: false,
            syncs_since_execute: 0,
            last_was_execute: false,
            status: 0,
        }
    }

    /// The client sent a message with this tag (called before it is forwarded).
    pub(super) fn sent(&mut self, tag: u8) {
        if self.copying && matches!(tag, b'S' | b'H') {
            return; // ignored by a server in COPY FROM STDIN
        }
        match tag {
            b'd' | b'c' | b'f' => {
                if !self.copying {
                    self.copying = true;
                    if self.last_was_execute {
                        self.owed = self.owed.saturating_sub(self.syncs_since_execute);
                        self.syncs_since_execute = 0;
                        self.batch_open = true;
                    }
                }
                if tag != b'd' {
                    self.copying = false;
                }
            }
            b'Q' | b'F' => {
                self.copying = false;
                self.owed += 1;
                self.batch_open = false;
                self.last_was_execute = false;
                self.syncs_since_execute = 0;
            }
            b'S' => {
                self.copying = false;
                self.owed += 1;
                self.batch_open = false;
                self.syncs_since_execute += 1;
            }
            b'E' => {
                self.copying = false;
                self.batch_open = true;
                self.last_was_execute = true;
                self.syncs_since_execute = 0;
            }
            b'P' | b'B' | b'D' | b'C' => {
                self.copying = false;
                self.batch_open = true;
            }
            _ => {}
        }
    }

    /// The server sent ReadyForQuery with this transaction status.
    pub(super) fn ready(&mut self, status: u8) {
        self.owed = self.owed.saturating_sub(1);
        self.status = status;
    }

    /// ReadyForQuery messages the server still owes.
    pub(super) fn owed(&self) -> usize {
        self.owed
    }

    /// Transaction status of the last ReadyForQuery.
    pub(super) fn status(&self) -> u8 {
        self.status
    }

    /// Nothing in flight: every message sent so far is answered up to its ReadyForQuery.
    pub(super) fn answered(&self) -> bool {
        self.owed == 0 && !self.batch_open && !self.copying
    }

    /// Nothing in flight and no transaction open.
    pub(super) fn is_idle(&self) -> bool {
        self.owed == 0 && !self.batch_open && !self.copying && self.status == b'I'
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tracker after startup, fed `client` tags; `Z` in the string is a ReadyForQuery (idle).
    fn run(script: &str) -> InFlight {
        let mut f = InFlight::new();
        f.ready(b'I');
        for t in script.bytes() {
            if t == b'Z' {
                f.ready(b'I');
            } else {
                f.sent(t);
            }
        }
        f
    }

    #[test]
    fn startup_is_in_flight_until_its_ready_for_query() {
        let mut f = InFlight::new();
        f.sent(b'p');
        assert!(!f.is_idle());
        f.ready(b'I');
        assert!(f.is_idle());
    }

    #[test]
    fn pipelined_queries_are_in_flight_until_the_last_ready_for_query() {
        assert!(!run("QQZ").is_idle());
        assert!(run("QQZZ").is_idle());
        // Extended protocol: one ReadyForQuery per Sync.
        assert!(!run("PBESPBESZ").is_idle());
        assert!(run("PBESPBESZZ").is_idle());
        // A batch without its Sync yet (Flush only) is in flight.
        assert!(!run("PBEH").is_idle());
        assert!(run("PBEHSZ").is_idle());
        assert!(run("FZ").is_idle());
    }

    #[test]
    fn an_open_transaction_is_not_idle() {
        let mut f = run("Q");
        f.ready(b'T');
        assert!(!f.is_idle());
        f.sent(b'Q');
        f.ready(b'E');
        assert!(!f.is_idle());
    }

    #[test]
    fn copy_from_stdin_through_either_protocol() {
        // Simple protocol: the Query's ReadyForQuery comes after CopyDone.
        assert!(!run("Qdd").is_idle());
        assert!(!run("Qddc").is_idle());
        assert!(run("QddcZ").is_idle());
        // Extended protocol as tokio-postgres and libpq send it: the Sync before the data is
        // ignored by the server, the one after CopyDone is answered.
        assert!(!run("BESdd").is_idle());
        assert!(!run("BESddc").is_idle());
        assert!(!run("BESddcS").is_idle());
        assert!(run("BESddcSZ").is_idle());
        // Syncs and Flushes amid the data are ignored too; CopyFail ends the COPY like CopyDone.
        assert!(run("BESdSHdfSZ").is_idle());
        // A COPY with no data at all.
        assert!(run("BEScSZ").is_idle());
        // The next statement after a COPY counts as usual.
        assert!(!run("BESdcSZQ").is_idle());
        assert!(run("BESdcSZQZ").is_idle());
    }

    #[test]
    fn a_ready_for_query_nobody_asked_for_does_not_underflow() {
        let mut f = run("Z");
        assert!(f.is_idle());
        f.sent(b'Q');
        assert!(!f.is_idle());
    }
}
