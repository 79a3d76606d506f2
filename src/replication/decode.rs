//! pgoutput (protocol v2) to committed changes: relation cache, transaction framing, streamed
//! in-progress transactions decoded as they arrive and kept until they commit (dropped if they
//! abort; see `streamed`), and logical messages. Pure and synchronous: bytes in, [`Item`]s out.

use std::collections::HashMap;
use std::sync::Arc;

use super::row::{render_tuple, ARENA_CHUNK};
pub use super::row::{Cell, Cells, EncodedRow, Tuple};
use super::spill::SpillDir;
use super::streamed::{PendingChange, PendingMessage, Replay, StreamedTxn};
use super::values::{classify, json_string, TypeClass};
use crate::replication::position::{Commit, Lsn};
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use pg_walstream::{LogicalReplicationMessage as Msg, LogicalReplicationParser, TupleData};

const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A table as described by the stream's Relation message.
#[derive(Debug)]
pub struct Relation {
    pub oid: u32,
    pub schema: Arc<str>,
    pub name: Arc<str>,
    pub columns: Vec<Column>,
}

#[derive(Debug)]
pub struct Column {
    pub name: Arc<str>,
    pub type_oid: u32,
    pub class: TypeClass,
    /// Part of the replica identity's key.
    pub is_key: bool,
    /// Named like one of the keys pgfire adds to `event_data` (see `row_events`): for sources
    /// of every kind (`changes`, `old`, ...), of user sources (`user_id`), of other sources
    /// (`record_id`, `table`). Worked out once per relation, not per row.
    pub pgfire_key: PgfireKey,
    /// The name as a JSON string, written once for every event of the table.
    pub json_name: Box<[u8]>,
}

impl Column {
    pub fn new(name: Arc<str>, type_oid: u32) -> Column {
        let mut json_name = Vec::with_capacity(name.len() + 2);
        json_string(&name, &mut json_name);
        Column {
            class: classify(type_oid),
            type_oid,
            is_key: false,
            pgfire_key: PgfireKey::of(&name),
            json_name: json_name.into_boxed_slice(),
            name,
        }
    }

    /// The column as part of the replica identity's key or not.
    pub fn key(mut self, is_key: bool) -> Column {
        self.is_key = is_key;
        self
    }
}

/// Which sources a column's name collides with a pgfire key for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgfireKey {
    None,
    /// `changes`, `old`, `unchanged_toast`, `old_missing`, `columns`.
    All,
    /// `user_id`.
    User,
    /// `record_id`, `table`.
    Record,
}

impl PgfireKey {
    fn of(name: &str) -> PgfireKey {
        match name {
            "changes" | "old" | "unchanged_toast" | "old_missing" | "columns" => PgfireKey::All,
            "user_id" => PgfireKey::User,
            "record_id" | "table" => PgfireKey::Record,
            _ => PgfireKey::None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

/// A committed row change.
#[derive(Debug)]
pub struct RowChange {
    pub op: Op,
    pub relation: Arc<Relation>,
    pub row: EncodedRow,
    pub commit: Arc<Commit>,
    /// Position of the change in its transaction (with the commit LSN: the event id).
    pub position: u32,
}

/// What the decoder hands to dispatch, in commit order.
#[derive(Debug)]
pub enum Item {
    Row(RowChange),
    /// A `pg_logical_emit_message` payload; `commit` is `None` for a non-transactional one.
    Message {
        prefix: String,
        content: Bytes,
        lsn: Lsn,
        commit: Option<Arc<Commit>>,
        position: u32,
    },
    Truncate {
        relations: Vec<Arc<Relation>>,
        commit: Arc<Commit>,
        position: u32,
    },
    /// Everything before this position is committed and handed over: once it is settled, the
    /// slot may confirm this LSN.
    Checkpoint(Lsn),
}

impl Item {
    /// Whether this item was already handed over before a reconnect: everything up to the
    /// checkpoint `handed` was, and the server resends from an earlier transaction boundary.
    pub fn handed_before(&self, handed: Lsn) -> bool {
        match self {
            Item::Row(r) => r.commit.lsn < handed,
            Item::Truncate { commit, .. } => commit.lsn < handed,
            Item::Message { commit, .. } => commit.as_ref().is_some_and(|c| c.lsn < handed),
            Item::Checkpoint(lsn) => *lsn <= handed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed pgoutput message: {0}")]
    Malformed(String),
    #[error("change for relation {0} before its Relation message")]
    UnknownRelation(u32),
    /// A spill file could not be written or read back (the disk is full, say): the
    /// transaction is received again after a reconnect.
    #[error("cannot spill a streamed transaction to {dir}: {error}")]
    Spill { dir: String, error: std::io::Error },
}

/// Changes of one transaction after which the rest are read as a burst (see
/// [`Decoder::in_burst`]); a small transaction is read as it comes, for its latency.
const BURST_AFTER: u32 = 256;

/// A transaction whose changes are being numbered: its commit, and the next change's position.
pub(super) struct OpenTxn {
    pub commit: Arc<Commit>,
    pub position: u32,
}

impl OpenTxn {
    pub fn next_position(&mut self) -> (Arc<Commit>, u32) {
        let p = self.position;
        self.position += 1;
        (self.commit.clone(), p)
    }
}

/// A committed streamed transaction being handed over, a slice at a time, so its events need
/// never all be in flight at once.
struct Replaying {
    replay: Replay,
    end_lsn: Lsn,
    started: std::time::Instant,
}

pub struct Decoder {
    parser: LogicalReplicationParser,
    replay: Option<Replaying>,
    relations: HashMap<u32, Arc<Relation>>,
    txn: Option<OpenTxn>,
    streaming: Option<u32>,
    streamed: HashMap<u32, StreamedTxn>,
    /// Where a row is rendered before it is stored.
    scratch: Vec<u8>,
    /// The chunk rendered rows are stored in.
    arena: BytesMut,
    /// Bytes held in memory for streamed transactions not yet handed over.
    pub streamed_bytes: usize,
    /// Where streamed transactions go beyond `budget` bytes in memory; without it they stay
    /// in memory whatever their size.
    spill: Option<(SpillDir, usize)>,
    /// Bytes written to spill files since the decoder was made.
    pub spilled_bytes: u64,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder {
            parser: LogicalReplicationParser::with_protocol_version(2),
            replay: None,
            relations: HashMap::new(),
            txn: None,
            streaming: None,
            streamed: HashMap::new(),
            scratch: Vec::new(),
            arena: BytesMut::new(),
            streamed_bytes: 0,
            spill: None,
            spilled_bytes: 0,
        }
    }

    /// A decoder that writes streamed transactions to files in `dir` once they hold more than
    /// `budget` bytes of memory together.
    pub fn with_spill(dir: SpillDir, budget: usize) -> Decoder {
        Decoder {
            spill: Some((dir, budget)),
            ..Decoder::new()
        }
    }

    fn spill_error(&self, error: std::io::Error) -> DecodeError {
        let dir = self
            .spill
            .as_ref()
            .map(|(d, _)| d.path().display().to_string())
            .unwrap_or_default();
        DecodeError::Spill { dir, error }
    }

    /// Over the budget: write every streamed transaction's changes held in memory to its file.
    fn spill_if_over(&mut self) -> Result<(), DecodeError> {
        let Some((dir, budget)) = &mut self.spill else {
            return Ok(());
        };
        if self.streamed_bytes <= *budget {
            return Ok(());
        }
        let mut result = Ok(());
        for (xid, t) in self.streamed.iter_mut() {
            let before = t.spilled_bytes();
            match super::spill::blocking(|| t.spill(dir, *xid)) {
                Ok(freed) => {
                    self.streamed_bytes = self.streamed_bytes.saturating_sub(freed);
                    self.spilled_bytes += t.spilled_bytes() - before;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        result.map_err(|e| self.spill_error(e))
    }

    /// Forget transaction state after a reconnect: the server resends from a transaction boundary.
    /// The relation cache is kept; the server resends Relation messages on a new connection.
    pub fn reset(&mut self) {
        self.parser = LogicalReplicationParser::with_protocol_version(2);
        self.txn = None;
        self.replay = None;
        self.streaming = None;
        self.streamed.clear();
        self.streamed_bytes = 0;
    }

    /// Whether a transaction is being received or handed over, or a streamed one awaits its
    /// commit.
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
            || self.replay.is_some()
            || !self.streamed.is_empty()
            || self.streaming.is_some()
    }

    /// Whether a burst of changes that belong together is coming in: a streamed transaction's
    /// segment (between Stream Start and Stream Stop), or a transaction past its first
    /// [`BURST_AFTER`] changes (the walsender sends a decoded transaction at once).
    pub fn in_burst(&self) -> bool {
        self.streaming.is_some() || self.txn.as_ref().is_some_and(|t| t.position >= BURST_AFTER)
    }

    /// Whether a committed streamed transaction awaits [`Decoder::drain`].
    pub fn replaying(&self) -> bool {
        self.replay.is_some()
    }

    /// Hand over up to `limit` changes of the committed streamed transaction being replayed
    /// (already decoded); its checkpoint follows its last change.
    pub fn drain(&mut self, out: &mut Vec<Item>, limit: usize) -> Result<(), DecodeError> {
        match self.replay.as_ref().is_some_and(|r| r.replay.reads_spill()) {
            true => super::spill::blocking(|| self.drain_now(out, limit)),
            false => self.drain_now(out, limit),
        }
    }

    fn drain_now(&mut self, out: &mut Vec<Item>, limit: usize) -> Result<(), DecodeError> {
        let Some(mut r) = self.replay.take() else {
            return Ok(());
        };
        let mut handed = 0;
        while handed < limit.max(1) {
            let next = match r.replay.next_change() {
                Ok(next) => next,
                Err(e) => return Err(self.spill_error(e)),
            };
            let Some((size, item)) = next else {
                tracing::debug!(elapsed = ?r.started.elapsed(), "streamed transaction handed over");
                out.push(Item::Checkpoint(r.end_lsn));
                return Ok(());
            };
            self.streamed_bytes = self.streamed_bytes.saturating_sub(size);
            if let Some(item) = item {
                out.push(item);
                handed += 1;
            }
        }
        self.replay = Some(r);
        Ok(())
    }

    /// Decode one XLogData payload, appending what it completes to `out`. The changes of a
    /// streamed transaction are decoded as they arrive and kept; once it commits they are handed
    /// over by [`Decoder::drain`], which must run to completion before the next call.
    pub fn decode(&mut self, data: Bytes, out: &mut Vec<Item>) -> Result<(), DecodeError> {
        while self.replaying() {
            self.drain(out, usize::MAX)?;
        }
        let msg = self
            .parser
            .parse_wal_message_bytes(data)
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        match self.streaming {
            Some(top) => self.stream_change(top, msg.xid.unwrap_or(top), &msg.message),
            None => self.apply(&msg.message, out),
        }
    }

    /// Keep one change of a streamed transaction, decoded.
    fn stream_change(&mut self, top: u32, sub: u32, msg: &Msg) -> Result<(), DecodeError> {
        let parts = match *msg {
            Msg::StreamStop => {
                self.streaming = None;
                return Ok(());
            }
            Msg::Relation { .. } => return self.apply(msg, &mut Vec::new()),
            Msg::Truncate {
                ref relation_ids, ..
            } => {
                let relations = self.relations(relation_ids)?;
                let p = StreamedTxn::new_pending(sub, PendingChange::Truncate(relations));
                self.streamed_bytes += self.streamed.entry(top).or_default().push(p);
                return self.spill_if_over();
            }
            Msg::Message {
                flags,
                lsn,
                ref prefix,
                ref content,
            } => {
                let m = PendingMessage {
                    transactional: flags & 1 == 1,
                    prefix: prefix.clone(),
                    content: content.clone(),
                    lsn: Lsn(lsn),
                };
                let p = StreamedTxn::new_pending(sub, PendingChange::Message(Box::new(m)));
                self.streamed_bytes += self.streamed.entry(top).or_default().push(p);
                return self.spill_if_over();
            }
            // A row change; types and origins carry nothing pgfire delivers.
            _ => match row_parts(msg) {
                Some(parts) => parts,
                None => return Ok(()),
            },
        };
        let relation = self.relation(parts.oid)?;
        let old_len = self.render_row(&relation, &parts);
        let t = self.streamed.entry(top).or_default();
        self.streamed_bytes += t.push_row(
            sub,
            parts.op,
            relation,
            &self.scratch,
            old_len,
            parts.new.is_some(),
        );
        self.spill_if_over()
    }

    /// Apply one message (by reference: pgoutput messages are large, moving them costs).
    fn apply(&mut self, msg: &Msg, out: &mut Vec<Item>) -> Result<(), DecodeError> {
        match *msg {
            Msg::Begin {
                final_lsn,
                timestamp,
                xid,
            } => {
                self.txn = Some(OpenTxn {
                    commit: Arc::new(Commit {
                        lsn: Lsn(final_lsn),
                        end_lsn: Lsn(0),
                        time: pg_time(timestamp),
                        xid,
                    }),
                    position: 0,
                });
            }
            Msg::Commit { end_lsn, .. } => {
                self.txn = None;
                out.push(Item::Checkpoint(Lsn(end_lsn)));
            }
            Msg::Relation {
                relation_id,
                ref namespace,
                ref relation_name,
                ref columns,
                ..
            } => {
                let columns = columns
                    .iter()
                    .map(|c| Column::new(c.name.clone(), c.type_id).key(c.flags & 1 == 1))
                    .collect();
                self.relations.insert(
                    relation_id,
                    Arc::new(Relation {
                        oid: relation_id,
                        schema: namespace.clone(),
                        name: relation_name.clone(),
                        columns,
                    }),
                );
            }
            Msg::Insert { .. } | Msg::Update { .. } | Msg::Delete { .. } => {
                if let Some(parts) = row_parts(msg) {
                    self.row(&parts, out)?;
                }
            }
            Msg::Truncate {
                ref relation_ids, ..
            } => {
                let relations = self.relations(relation_ids)?;
                let (commit, position) = self.next_position()?;
                out.push(Item::Truncate {
                    relations,
                    commit,
                    position,
                });
            }
            Msg::Message {
                flags,
                lsn,
                ref prefix,
                ref content,
            } => {
                let transactional = flags & 1 == 1;
                let (commit, position) = match (transactional, self.txn.is_some()) {
                    (true, true) => {
                        let (c, p) = self.next_position()?;
                        (Some(c), p)
                    }
                    _ => (None, 0),
                };
                out.push(Item::Message {
                    prefix: prefix.clone(),
                    content: content.clone(),
                    lsn: Lsn(lsn),
                    commit,
                    position,
                });
            }
            Msg::StreamStart { xid, .. } => {
                self.streaming = Some(xid);
                // Known from its first segment on, changes or not (every change may be filtered).
                self.streamed.entry(xid).or_default();
            }
            Msg::StreamStop => self.streaming = None,
            Msg::StreamAbort {
                xid,
                subtransaction_xid,
                ..
            } => {
                if xid == subtransaction_xid {
                    if let Some(t) = self.streamed.remove(&xid) {
                        self.streamed_bytes = self.streamed_bytes.saturating_sub(t.bytes);
                    }
                } else if let Some(t) = self.streamed.get_mut(&xid) {
                    let freed = t.abort_subtransaction(subtransaction_xid);
                    self.streamed_bytes = self.streamed_bytes.saturating_sub(freed);
                }
            }
            Msg::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                timestamp,
                ..
            } => {
                let t = self.streamed.remove(&xid).ok_or_else(|| {
                    DecodeError::Malformed(format!(
                        "STREAM COMMIT of transaction {xid}, which was never streamed"
                    ))
                })?;
                tracing::debug!(
                    xid,
                    changes = t.changes(),
                    bytes = t.bytes,
                    spilled_bytes = t.spilled_bytes(),
                    "streamed transaction committed"
                );
                let commit = Arc::new(Commit {
                    lsn: Lsn(commit_lsn),
                    end_lsn: Lsn(end_lsn),
                    time: pg_time(timestamp),
                    xid,
                });
                let replay = t
                    .commit(OpenTxn {
                        commit,
                        position: 0,
                    })
                    .map_err(|e| self.spill_error(e))?;
                self.replay = Some(Replaying {
                    replay,
                    end_lsn: Lsn(end_lsn),
                    started: std::time::Instant::now(),
                });
            }
            // Types, origins and two-phase messages carry nothing pgfire delivers.
            _ => {}
        }
        Ok(())
    }

    fn next_position(&mut self) -> Result<(Arc<Commit>, u32), DecodeError> {
        self.txn
            .as_mut()
            .map(OpenTxn::next_position)
            .ok_or_else(|| DecodeError::Malformed("change outside a transaction".into()))
    }

    fn relations(&self, oids: &[u32]) -> Result<Vec<Arc<Relation>>, DecodeError> {
        oids.iter().map(|oid| self.relation(*oid)).collect()
    }

    fn relation(&self, oid: u32) -> Result<Arc<Relation>, DecodeError> {
        self.relations
            .get(&oid)
            .cloned()
            .ok_or(DecodeError::UnknownRelation(oid))
    }

    fn row(&mut self, parts: &RowParts<'_>, out: &mut Vec<Item>) -> Result<(), DecodeError> {
        let relation = self.relation(parts.oid)?;
        let (commit, position) = self.next_position()?;
        let row = self.encode_row(&relation, parts);
        out.push(Item::Row(RowChange {
            op: parts.op,
            relation,
            row,
            commit,
            position,
        }));
        Ok(())
    }

    /// Render a change's tuples by the relation's column types into `self.scratch`: the old
    /// tuple first; returns its length.
    fn render_row(&mut self, rel: &Relation, parts: &RowParts<'_>) -> Option<u32> {
        self.scratch.clear();
        if let Some(t) = parts.old {
            render_tuple(rel, t, parts.old_is_key, &mut self.scratch);
        }
        let old_len = parts.old.map(|_| self.scratch.len() as u32);
        if let Some(t) = parts.new {
            render_tuple(rel, t, false, &mut self.scratch);
        }
        old_len
    }

    /// Render a change's tuples and store them compactly.
    fn encode_row(&mut self, rel: &Relation, parts: &RowParts<'_>) -> EncodedRow {
        let old_len = self.render_row(rel, parts);
        if self.arena.capacity() - self.arena.len() < self.scratch.len() {
            self.arena = BytesMut::with_capacity(ARENA_CHUNK.max(self.scratch.len()));
        }
        self.arena.extend_from_slice(&self.scratch);
        EncodedRow::from_parts(self.arena.split().freeze(), old_len, parts.new.is_some())
    }
}

/// A row change as pgoutput sends it: operation, relation and tuples.
struct RowParts<'a> {
    op: Op,
    oid: u32,
    old: Option<&'a TupleData>,
    /// The old tuple holds only the replica identity's key columns (`K`; the table's replica
    /// identity is not FULL): the other columns are not in the WAL.
    old_is_key: bool,
    new: Option<&'a TupleData>,
}

/// A row change's parts; `None` for any other message.
fn row_parts(msg: &Msg) -> Option<RowParts<'_>> {
    match *msg {
        Msg::Insert {
            relation_id,
            ref tuple,
        } => Some(RowParts {
            op: Op::Insert,
            oid: relation_id,
            old: None,
            old_is_key: false,
            new: Some(tuple),
        }),
        Msg::Update {
            relation_id,
            ref old_tuple,
            ref new_tuple,
            key_type,
        } => Some(RowParts {
            op: Op::Update,
            oid: relation_id,
            old: old_tuple.as_ref(),
            old_is_key: key_type == Some('K'),
            new: Some(new_tuple),
        }),
        Msg::Delete {
            relation_id,
            ref old_tuple,
            key_type,
        } => Some(RowParts {
            op: Op::Delete,
            oid: relation_id,
            old: Some(old_tuple),
            old_is_key: key_type == 'K',
            new: None,
        }),
        _ => None,
    }
}

fn pg_time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros.saturating_add(PG_EPOCH_OFFSET_MICROS))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn relation_msg(oid: u32, ns: &str, name: &str, cols: &[(&str, u32)]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(oid);
        b.put_slice(ns.as_bytes());
        b.put_u8(0);
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_u8(b'f');
        b.put_u16(cols.len() as u16);
        for (n, t) in cols {
            b.put_u8(0);
            b.put_slice(n.as_bytes());
            b.put_u8(0);
            b.put_u32(*t);
            b.put_i32(-1);
        }
        b.freeze()
    }

    fn insert_msg(prefix_xid: Option<u32>, oid: u32, vals: &[Option<&str>]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        if let Some(x) = prefix_xid {
            b.put_u32(x);
        }
        b.put_u32(oid);
        b.put_u8(b'N');
        b.put_u16(vals.len() as u16);
        for v in vals {
            match v {
                None => b.put_u8(b'n'),
                Some(s) => {
                    b.put_u8(b't');
                    b.put_u32(s.len() as u32);
                    b.put_slice(s.as_bytes());
                }
            }
        }
        b.freeze()
    }

    fn begin(lsn: u64, xid: u32) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'B');
        b.put_u64(lsn);
        b.put_i64(0);
        b.put_u32(xid);
        b.freeze()
    }

    fn commit(lsn: u64, end: u64) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'C');
        b.put_u8(0);
        b.put_u64(lsn);
        b.put_u64(end);
        b.put_i64(0);
        b.freeze()
    }

    fn stream_start(xid: u32) -> Bytes {
        Bytes::from(vec![
            b'S',
            (xid >> 24) as u8,
            (xid >> 16) as u8,
            (xid >> 8) as u8,
            xid as u8,
            1,
        ])
    }

    fn stream_commit(xid: u32, lsn: u64, end: u64) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'c');
        b.put_u32(xid);
        b.put_u8(0);
        b.put_u64(lsn);
        b.put_u64(end);
        b.put_i64(0);
        b.freeze()
    }

    fn stream_abort(xid: u32, sub: u32) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'A');
        b.put_u32(xid);
        b.put_u32(sub);
        b.freeze()
    }

    /// (commit LSN, position, new row's cells as text: JSON, `null` or `unchanged`)
    fn rows(items: &[Item]) -> Vec<(u64, u32, Vec<String>)> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Row(r) => Some((
                    r.commit.lsn.0,
                    r.position,
                    r.row.new_row().unwrap().cells().map(cell_text).collect(),
                )),
                _ => None,
            })
            .collect()
    }

    fn cell_text(c: Cell<'_>) -> String {
        match c {
            Cell::Null => "null".into(),
            Cell::Unchanged => "unchanged".into(),
            Cell::Value(v) => String::from_utf8(v.to_vec()).unwrap(),
        }
    }

    #[test]
    fn plain_transaction() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.decode(begin(100, 7), &mut out).unwrap();
        d.decode(
            relation_msg(1, "public", "users", &[("id", 20), ("email", 25)]),
            &mut out,
        )
        .unwrap();
        d.decode(
            insert_msg(None, 1, &[Some("9007199254740993"), None]),
            &mut out,
        )
        .unwrap();
        assert!(d.in_transaction());
        d.decode(commit(100, 120), &mut out).unwrap();
        assert!(!d.in_transaction());
        let r = rows(&out);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, 100);
        assert_eq!(r[0].2, ["9007199254740993", "null"]);
        assert!(matches!(out.last(), Some(Item::Checkpoint(Lsn(120)))));
    }

    #[test]
    fn streamed_transaction_waits_for_commit_and_drops_aborted_subtransactions() {
        // A Relation inside a stream carries the xid prefix too.
        let mut rel = BytesMut::new();
        rel.put_u8(b'R');
        rel.put_u32(50);
        rel.put_slice(&relation_msg(1, "public", "t", &[("id", 23)])[1..]);
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.decode(stream_start(50), &mut out).unwrap();
        d.decode(rel.freeze(), &mut out).unwrap();
        d.decode(insert_msg(Some(50), 1, &[Some("1")]), &mut out)
            .unwrap();
        d.decode(insert_msg(Some(51), 1, &[Some("2")]), &mut out)
            .unwrap();
        d.decode(insert_msg(Some(50), 1, &[Some("3")]), &mut out)
            .unwrap();
        d.decode(Bytes::from_static(b"E"), &mut out).unwrap();
        assert!(out.is_empty(), "nothing before commit");
        assert!(d.streamed_bytes > 0);
        d.decode(stream_abort(50, 51), &mut out).unwrap();
        d.decode(stream_commit(50, 300, 320), &mut out).unwrap();
        assert!(d.replaying() && d.in_transaction());
        d.drain(&mut out, 1).unwrap();
        assert_eq!(rows(&out).len(), 1, "a slice at a time");
        d.drain(&mut out, 100).unwrap();
        assert!(!d.replaying() && !d.in_transaction());
        let r = rows(&out);
        assert_eq!(
            r.iter().map(|x| x.2[0].clone()).collect::<Vec<_>>(),
            ["1", "3"]
        );
        assert_eq!(
            r.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(),
            vec![(300, 0), (300, 1)]
        );
        assert_eq!(d.streamed_bytes, 0);
        assert!(matches!(out.last(), Some(Item::Checkpoint(Lsn(320)))));
    }

    /// Two interleaved streamed transactions, one with a subtransaction aborted after its rows
    /// were written out, one aborted whole; in several segments, with a message and a truncate.
    fn streamed_workload(d: &mut Decoder) -> Vec<Item> {
        let mut out = Vec::new();
        for seg in 0..4u32 {
            for xid in [50u32, 60] {
                d.decode(stream_start(xid), &mut out).unwrap();
                if seg == 0 {
                    let mut rel = BytesMut::new();
                    rel.put_u8(b'R');
                    rel.put_u32(xid);
                    rel.put_slice(&relation_msg(1, "public", "t", &[("id", 23), ("t", 25)])[1..]);
                    d.decode(rel.freeze(), &mut out).unwrap();
                }
                for i in 0..300u32 {
                    let sub = if xid == 50 && seg == 1 && i % 3 == 0 {
                        51
                    } else {
                        xid
                    };
                    let id = format!("{}", seg * 1000 + i);
                    let text = "y".repeat((i % 50) as usize);
                    d.decode(
                        insert_msg(Some(sub), 1, &[Some(&id), Some(&text)]),
                        &mut out,
                    )
                    .unwrap();
                }
                if seg == 2 {
                    let mut m = BytesMut::new();
                    m.put_u8(b'M');
                    m.put_u32(xid);
                    m.put_u8(1);
                    m.put_u64(0x900);
                    m.put_slice(b"app.note\0");
                    m.put_u32(5);
                    m.put_slice(b"hello");
                    d.decode(m.freeze(), &mut out).unwrap();
                    let mut t = BytesMut::new();
                    t.put_u8(b'T');
                    t.put_u32(xid);
                    t.put_u32(1);
                    t.put_u8(0);
                    t.put_u32(1);
                    d.decode(t.freeze(), &mut out).unwrap();
                }
                d.decode(Bytes::from_static(b"E"), &mut out).unwrap();
            }
            if seg == 1 {
                d.decode(stream_abort(50, 51), &mut out).unwrap();
            }
        }
        d.decode(stream_abort(60, 60), &mut out).unwrap();
        assert!(out.is_empty(), "nothing before the commit");
        d.decode(stream_commit(50, 0x1000, 0x1010), &mut out)
            .unwrap();
        while d.replaying() {
            d.drain(&mut out, 100).unwrap();
        }
        out
    }

    fn describe(items: &[Item]) -> Vec<String> {
        items
            .iter()
            .map(|i| match i {
                Item::Row(r) => format!("row {:?} {:?}", r.position, rows(std::slice::from_ref(i))),
                Item::Message {
                    prefix,
                    content,
                    position,
                    ..
                } => {
                    format!("message {prefix} {content:?} {position}")
                }
                Item::Truncate {
                    relations,
                    position,
                    ..
                } => {
                    format!("truncate {} {position}", relations.len())
                }
                Item::Checkpoint(l) => format!("checkpoint {l}"),
            })
            .collect()
    }

    #[test]
    fn a_spilled_transaction_is_handed_over_as_if_it_had_stayed_in_memory() {
        let in_memory = describe(&streamed_workload(&mut Decoder::new()));
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillDir::open(dir.path(), "slot").unwrap();
        let mut d = Decoder::with_spill(spill, 4096);
        let spilled = describe(&streamed_workload(&mut d));
        assert!(d.spilled_bytes > 100_000, "spilled {}", d.spilled_bytes);
        assert_eq!(spilled, in_memory);
        assert_eq!(
            spilled.iter().filter(|r| r.starts_with("row")).count(),
            1200 - 100
        );
        assert!(spilled.iter().any(|r| r.starts_with("message app.note")));
        assert_eq!(d.streamed_bytes, 0);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "files left: {left:?}");
    }

    #[test]
    fn a_reset_deletes_the_spill_files_of_unfinished_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Decoder::with_spill(SpillDir::open(dir.path(), "slot").unwrap(), 100);
        let mut out = Vec::new();
        d.decode(stream_start(70), &mut out).unwrap();
        let mut rel = BytesMut::new();
        rel.put_u8(b'R');
        rel.put_u32(70);
        rel.put_slice(&relation_msg(1, "public", "t", &[("id", 23)])[1..]);
        d.decode(rel.freeze(), &mut out).unwrap();
        for i in 0..100 {
            d.decode(insert_msg(Some(70), 1, &[Some(&i.to_string())]), &mut out)
                .unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        d.reset();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn long_streamed_transaction_with_an_earlier_subtransaction_aborted() {
        let mut rel = BytesMut::new();
        rel.put_u8(b'R');
        rel.put_u32(50);
        rel.put_slice(&relation_msg(1, "public", "t", &[("id", 23), ("t", 25)])[1..]);
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.decode(stream_start(50), &mut out).unwrap();
        d.decode(rel.freeze(), &mut out).unwrap();
        let big = "x".repeat(300 * 1024); // larger than a chunk of rendered rows
        for i in 0..10_000u32 {
            // Rows 100..200 belong to subtransaction 51, which aborts after more rows arrived.
            let sub = if (100..200).contains(&i) { 51 } else { 50 };
            let id = i.to_string();
            let text = if i % 3000 == 7 { big.as_str() } else { "a\tb" };
            d.decode(insert_msg(Some(sub), 1, &[Some(&id), Some(text)]), &mut out)
                .unwrap();
        }
        d.decode(Bytes::from_static(b"E"), &mut out).unwrap();
        d.decode(stream_abort(50, 51), &mut out).unwrap();
        d.decode(stream_commit(50, 300, 320), &mut out).unwrap();
        while d.replaying() {
            let before = out.len();
            d.drain(&mut out, 1000).unwrap();
            assert!(out.len() - before <= 1001);
        }
        let r = rows(&out);
        assert_eq!(r.len(), 9_900);
        let ids: Vec<u32> = (0..10_000).filter(|i| !(100..200).contains(i)).collect();
        for (n, (row, id)) in r.iter().zip(&ids).enumerate() {
            assert_eq!(row.1, n as u32, "positions count delivered changes only");
            assert_eq!(row.2[0], id.to_string());
            let text = if id % 3000 == 7 {
                format!("\"{big}\"")
            } else {
                r#""a\tb""#.to_string()
            };
            assert_eq!(row.2[1], text);
        }
        assert_eq!(d.streamed_bytes, 0);
        assert!(matches!(out.last(), Some(Item::Checkpoint(Lsn(320)))));
    }

    #[test]
    fn streamed_messages_and_truncates_keep_their_places() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.decode(relation_msg(1, "public", "t", &[("id", 23)]), &mut out)
            .unwrap();
        let mut msg = BytesMut::new();
        msg.put_u8(b'M');
        msg.put_u32(9);
        msg.put_u8(1); // transactional
        msg.put_u64(77);
        msg.put_slice(b"pgfire.config\0");
        msg.put_u32(2);
        msg.put_slice(b"{}");
        let mut truncate = BytesMut::new();
        truncate.put_u8(b'T');
        truncate.put_u32(9);
        truncate.put_u32(1);
        truncate.put_u8(0);
        truncate.put_u32(1);
        d.decode(stream_start(9), &mut out).unwrap();
        d.decode(insert_msg(Some(9), 1, &[Some("1")]), &mut out)
            .unwrap();
        d.decode(msg.freeze(), &mut out).unwrap();
        d.decode(truncate.freeze(), &mut out).unwrap();
        d.decode(insert_msg(Some(9), 1, &[Some("2")]), &mut out)
            .unwrap();
        d.decode(Bytes::from_static(b"E"), &mut out).unwrap();
        assert!(out.is_empty());
        d.decode(stream_commit(9, 500, 520), &mut out).unwrap();
        d.drain(&mut out, 100).unwrap();
        let kinds: Vec<(String, u32)> = out
            .iter()
            .map(|i| match i {
                Item::Row(r) => ("row".into(), r.position),
                Item::Message {
                    prefix,
                    position,
                    commit,
                    ..
                } => {
                    assert_eq!(commit.as_ref().unwrap().lsn, Lsn(500));
                    (prefix.clone(), *position)
                }
                Item::Truncate { position, .. } => ("truncate".into(), *position),
                Item::Checkpoint(l) => ("checkpoint".into(), l.0 as u32),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("row".into(), 0),
                ("pgfire.config".into(), 1),
                ("truncate".into(), 2),
                ("row".into(), 3),
                ("checkpoint".into(), 520)
            ]
        );
    }

    #[test]
    fn aborted_stream_produces_nothing() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.decode(relation_msg(1, "public", "t", &[("id", 23)]), &mut out)
            .unwrap();
        d.decode(stream_start(9), &mut out).unwrap();
        d.decode(insert_msg(Some(9), 1, &[Some("1")]), &mut out)
            .unwrap();
        d.decode(Bytes::from_static(b"E"), &mut out).unwrap();
        d.decode(stream_abort(9, 9), &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(d.streamed_bytes, 0);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for bad in [
            &b""[..],
            b"Z",
            b"B\x00",
            b"I\x00\x00\x00\x01N\x00\x05",
            b"R\x00",
        ] {
            assert!(
                d.decode(Bytes::copy_from_slice(bad), &mut out).is_err(),
                "{bad:?}"
            );
        }
        // An insert for a relation never described.
        d.decode(begin(1, 1), &mut out).unwrap();
        assert!(matches!(
            d.decode(insert_msg(None, 77, &[Some("1")]), &mut out),
            Err(DecodeError::UnknownRelation(77))
        ));
    }

    #[test]
    fn a_stream_commit_for_an_unknown_transaction_is_an_error() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        let err = d.decode(stream_commit(77, 300, 320), &mut out).unwrap_err();
        assert!(err.to_string().contains("never streamed"), "{err}");
        assert!(out.is_empty(), "nothing settled");
        // A streamed transaction whose changes were all filtered out is known all the same.
        d.decode(stream_start(78), &mut out).unwrap();
        d.decode(Bytes::from_static(b"E"), &mut out).unwrap();
        d.decode(stream_commit(78, 400, 420), &mut out).unwrap();
        d.drain(&mut out, 10).unwrap();
        assert!(matches!(out.last(), Some(Item::Checkpoint(Lsn(420)))));
    }
}
