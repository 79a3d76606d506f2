//! `COPY watched FROM STDIN` held like any write: the tentative run carries the COPY
//! sub-protocol (the server's CopyInResponse goes to the client at once, the client's CopyData,
//! CopyDone or CopyFail go to the server as they come, and are kept), then the CommandComplete
//! is held while the PRE functions decide. A rewrite sends the kept data again after
//! `pgfire.pre_apply` (the statement's rows are the data's rows, in order, so the BEFORE
//! trigger overlays them exactly as it does for a re-run statement).
//!
//! Why a replay rather than an overlay in the first run: the decision needs every row (and
//! functions that may take seconds), so it can only come after the COPY ends; by then its rows
//! are written, and the only sound undo is the savepoint. The kept data is bounded: the
//! trigger fails a COPY of more than `limits.pre_rows_per_statement` rows, and past
//! [`REPLAY_LIMIT`] bytes the data is no longer kept (such a COPY can still be allowed or
//! blocked; one whose rows a function rewrites is then refused).

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use super::hold::{intact, query_frame, Io, Reply, CHECK_SQL};
use crate::proxy::session::{io_fatal, Fatal};
use crate::wire;

/// Most bytes reserved at a time for a client message still arriving.
const READ_AHEAD: usize = 256 << 10;

/// Most bytes of COPY data kept to send again for a rewrite.
pub(super) const REPLAY_LIMIT: usize = 64 << 20;

/// The client's COPY messages as forwarded in the tentative run.
#[derive(Default)]
pub(super) struct Replay {
    frames: BytesMut,
    /// More than [`REPLAY_LIMIT`] bytes came: `frames` is incomplete.
    pub too_large: bool,
}

impl Replay {
    fn keep(&mut self, frame: &[u8]) {
        self.keep_within(frame, REPLAY_LIMIT)
    }

    fn keep_within(&mut self, frame: &[u8], limit: usize) {
        if self.too_large {
            return;
        }
        if self.frames.len() + frame.len() > limit {
            self.too_large = true;
            self.frames = BytesMut::new();
            return;
        }
        self.frames.extend_from_slice(frame);
    }
}

/// The tentative run of a COPY FROM STDIN (`frame`: the client's Query, or its batch up to the
/// Sync): `setup` and the statement, the COPY data relayed, then the check of the settings.
/// Returns the answers to `setup` and to the statement (less what the client already has: the
/// messages up to and including CopyInResponse), whether the settings were intact, and the
/// data kept.
pub(super) async fn first_run(
    io: &mut Io<'_>,
    setup: &str,
    frame: &[u8],
    mode: &str,
) -> Result<(Reply, Reply, bool, Replay), Fatal> {
    let mut out = query_frame(setup);
    out.extend_from_slice(frame);
    io.send(&out).await?;
    let prepared = io.reply().await?;
    let mut run = Reply::default();
    let mut replay = Replay::default();
    loop {
        let f = io.frame().await?;
        if f[0] == b'G' {
            // The client needs everything so far (ParseComplete, BindComplete ...) and the
            // CopyInResponse before it sends its data.
            let mut early = std::mem::take(&mut run).frames;
            early.extend_from_slice(&f);
            io.send_client(early).await?;
            relay_data(io, &mut run, frame[0] != b'Q', &mut replay).await?;
            break;
        }
        if io.absorb(&mut run, f)? {
            break; // refused before any data (no such column, an aborted transaction ...)
        }
    }
    io.send(&query_frame(CHECK_SQL)).await?;
    let check = io.reply().await?;
    let ok = intact(&run, &check, mode);
    Ok((prepared, run, ok, replay))
}

/// Run the COPY again with the data kept, after `setup` (and `closes`, Close messages for the
/// statements the batch parses): the answers to `setup` and to the statement (less what the
/// client had from the first run) and whether the settings were intact.
pub(super) async fn rerun(
    io: &mut Io<'_>,
    setup: &str,
    frame: &[u8],
    closes: &[u8],
    replay: &Replay,
    mode: &str,
) -> Result<(Reply, Reply, bool), Fatal> {
    let mut out = query_frame(setup);
    out.extend_from_slice(closes);
    out.extend_from_slice(frame);
    out.extend_from_slice(&replay.frames);
    out.extend_from_slice(&query_frame(CHECK_SQL));
    io.send(&out).await?;
    let prepared = io.reply().await?;
    let mut run = Reply::default();
    // What comes before the CopyInResponse the client already has (CloseComplete,
    // BindComplete ...) is left out; an error or the end may come first.
    loop {
        let f = io.frame().await?;
        if f[0] == b'G' {
            io.reply_into(&mut run).await?;
            break;
        }
        if matches!(f[0], b'E' | b'Z' | b'A' | b'S') && io.absorb(&mut run, f)? {
            break;
        }
    }
    let check = io.reply().await?;
    let ok = intact(&run, &check, mode);
    Ok((prepared, run, ok))
}

/// Relay the client's COPY messages to the server until it answers the COPY with its
/// ReadyForQuery, collecting its answer in `run`. In the simple protocol nothing after the
/// client's CopyDone or CopyFail is taken (it is the client's next statement); in the extended
/// protocol the Sync after it is (the server ignores Syncs during COPY and needs that one to
/// end). After an error the server answers at once, or at that Sync (extended): what the client
/// sends next is left to the relay, and the server ignores COPY messages outside a COPY, as it
/// would without the proxy.
pub(super) async fn relay_data(
    io: &mut Io<'_>,
    run: &mut Reply,
    extended: bool,
    replay: &mut Replay,
) -> Result<(), Fatal> {
    let mut done = false;
    let mut synced = false;
    loop {
        while let Some(f) = io.buffered_frame()? {
            if io.absorb(run, f)? {
                return Ok(());
            }
        }
        let mut sent = BytesMut::new();
        while wants_client_frame(done, synced, extended) {
            let Some((tag, len)) = wire::frame_header(io.cbuf)? else {
                break;
            };
            if io.cbuf.len() < len {
                // Room for the rest as it comes, not all at once on the client's word.
                io.cbuf.reserve((len - io.cbuf.len()).min(READ_AHEAD));
                break;
            }
            let f = io.cbuf.split_to(len);
            match tag {
                b'c' | b'f' => done = true,
                b'S' if done => synced = true,
                _ => {}
            }
            replay.keep(&f);
            sent.extend_from_slice(&f);
        }
        if !sent.is_empty() {
            io.send(&sent).await?;
            continue;
        }
        let wants_client = wants_client_frame(done, synced, extended);
        tokio::select! {
            r = io.cr.read_buf(io.cbuf), if wants_client => {
                if r.map_err(io_fatal)? == 0 {
                    return Err(Fatal {
                        code: wire::CONNECTION_FAILURE,
                        message: "the client left during COPY".into(),
                    });
                }
            }
            r = io.ur.read_buf(io.buf) => {
                if r.map_err(io_fatal)? == 0 {
                    return Err(Fatal {
                        code: wire::CONNECTION_FAILURE,
                        message: "the database closed the connection".into(),
                    });
                }
            }
        }
    }
}

/// Whether the next client message still belongs to the COPY.
fn wants_client_frame(done: bool, synced: bool, extended: bool) -> bool {
    !done || (extended && !synced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_data_is_bounded() {
        let mut r = Replay::default();
        r.keep_within(b"d\0\0\0\x06ab", 20);
        r.keep_within(b"d\0\0\0\x06cd", 20);
        assert_eq!(r.frames.len(), 14);
        assert!(!r.too_large);
        r.keep_within(b"d\0\0\0\x06ef", 20);
        assert!(r.too_large && r.frames.is_empty());
        r.keep_within(b"c\0\0\0\x04", 20);
        assert!(r.too_large && r.frames.is_empty());
    }

    #[test]
    fn copy_messages_end_at_copy_done_and_extended_at_the_sync_after_it() {
        assert!(wants_client_frame(false, false, false));
        assert!(!wants_client_frame(true, false, false));
        assert!(wants_client_frame(true, false, true));
        assert!(!wants_client_frame(true, true, true));
    }
}
