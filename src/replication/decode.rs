//! pgoutput (protocol v2) to committed changes: relation cache, transaction framing, buffering
//! of streamed in-progress transactions until they commit (dropped if they abort), and logical
//! messages. Pure and synchronous: bytes in, [`Item`]s out.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use pg_walstream::{LogicalReplicationMessage as Msg, LogicalReplicationParser, TupleData};
use serde_json::Value;

use super::values::{classify, render, TypeClass};
use crate::event::{Commit, Lsn};

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
}

/// One column of a decoded row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    /// An unchanged TOASTed value that the server did not send.
    Unchanged,
    Value(Value),
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
    pub old: Option<Vec<Cell>>,
    pub new: Option<Vec<Cell>>,
    pub commit: Arc<Commit>,
    /// Position of the change in its transaction (with the commit LSN: the event id).
    pub position: u32,
    /// Bytes of column data the server sent for the change.
    pub raw_size: usize,
}

impl RowChange {
    /// A rough size of the change: its column data and names (for cheap payload-limit checks).
    pub fn approx_size(&self) -> usize {
        self.raw_size
            + self
                .relation
                .columns
                .iter()
                .map(|c| c.name.len() + 8)
                .sum::<usize>()
                * 3
    }
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

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed pgoutput message: {0}")]
    Malformed(String),
    #[error("change for relation {0} before its Relation message")]
    UnknownRelation(u32),
}

struct OpenTxn {
    commit: Arc<Commit>,
    position: u32,
}

/// Changes of a streamed transaction, kept as received until it commits.
#[derive(Default)]
struct StreamedTxn {
    /// (subtransaction xid, raw pgoutput message including its xid prefix)
    messages: Vec<(u32, Bytes)>,
    bytes: usize,
}

/// A committed streamed transaction being decoded, a slice at a time, so its events need never
/// all be in memory at once.
struct Replay {
    parser: LogicalReplicationParser,
    messages: std::vec::IntoIter<(u32, Bytes)>,
    end_lsn: Lsn,
    started: std::time::Instant,
}

pub struct Decoder {
    parser: LogicalReplicationParser,
    replay: Option<Replay>,
    relations: HashMap<u32, Arc<Relation>>,
    txn: Option<OpenTxn>,
    streaming: Option<u32>,
    streamed: HashMap<u32, StreamedTxn>,
    /// Bytes held for streamed transactions not yet committed.
    pub streamed_bytes: usize,
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
            streamed_bytes: 0,
        }
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

    /// Whether a transaction is being received or a streamed one awaits its commit.
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some() || !self.streamed.is_empty() || self.streaming.is_some()
    }

    /// Whether a committed streamed transaction awaits [`Decoder::drain`].
    pub fn replaying(&self) -> bool {
        self.replay.is_some()
    }

    /// Decode up to `limit` changes of the committed streamed transaction being replayed; its
    /// checkpoint follows its last change.
    pub fn drain(&mut self, out: &mut Vec<Item>, limit: usize) -> Result<(), DecodeError> {
        let Some(mut replay) = self.replay.take() else {
            return Ok(());
        };
        for _ in 0..limit.max(1) {
            let Some((_, raw)) = replay.messages.next() else {
                tracing::debug!(elapsed = ?replay.started.elapsed(), "streamed transaction decoded");
                self.txn = None;
                out.push(Item::Checkpoint(replay.end_lsn));
                return Ok(());
            };
            self.streamed_bytes -= raw.len();
            let msg = replay
                .parser
                .parse_wal_message_bytes(raw)
                .map_err(|e| DecodeError::Malformed(e.to_string()))?;
            self.apply(&msg.message, out)?;
        }
        self.replay = Some(replay);
        Ok(())
    }

    /// Decode one XLogData payload, appending what it completes to `out`. A committed streamed
    /// transaction is not decoded here but by [`Decoder::drain`], which must run to completion
    /// before the next call.
    pub fn decode(&mut self, data: Bytes, out: &mut Vec<Item>) -> Result<(), DecodeError> {
        while self.replaying() {
            self.drain(out, usize::MAX)?;
        }
        let raw = data.clone();
        let msg = self
            .parser
            .parse_wal_message_bytes(data)
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if let Some(top) = self.streaming {
            match msg.message {
                Msg::StreamStop => self.streaming = None,
                Msg::Relation { .. } => {
                    self.apply(&msg.message, out)?;
                    self.buffer(top, msg.xid.unwrap_or(top), raw);
                }
                _ => self.buffer(top, msg.xid.unwrap_or(top), raw),
            }
            return Ok(());
        }
        self.apply(&msg.message, out)
    }

    fn buffer(&mut self, top: u32, xid: u32, raw: Bytes) {
        let t = self.streamed.entry(top).or_default();
        t.bytes += raw.len();
        self.streamed_bytes += raw.len();
        t.messages.push((xid, raw));
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
                    .map(|c| Column {
                        class: classify(c.type_id),
                        type_oid: c.type_id,
                        name: c.name.clone(),
                    })
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
            Msg::Insert {
                relation_id,
                ref tuple,
            } => {
                self.row(Op::Insert, relation_id, None, Some(tuple), out)?;
            }
            Msg::Update {
                relation_id,
                ref old_tuple,
                ref new_tuple,
                ..
            } => {
                self.row(
                    Op::Update,
                    relation_id,
                    old_tuple.as_ref(),
                    Some(new_tuple),
                    out,
                )?;
            }
            Msg::Delete {
                relation_id,
                ref old_tuple,
                ..
            } => {
                self.row(Op::Delete, relation_id, Some(old_tuple), None, out)?;
            }
            Msg::Truncate {
                ref relation_ids, ..
            } => {
                let relations = relation_ids
                    .iter()
                    .map(|oid| self.relation(*oid))
                    .collect::<Result<Vec<_>, _>>()?;
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
            Msg::StreamStart { xid, .. } => self.streaming = Some(xid),
            Msg::StreamStop => self.streaming = None,
            Msg::StreamAbort {
                xid,
                subtransaction_xid,
                ..
            } => {
                if xid == subtransaction_xid {
                    if let Some(t) = self.streamed.remove(&xid) {
                        self.streamed_bytes -= t.bytes;
                    }
                } else if let Some(t) = self.streamed.get_mut(&xid) {
                    let before = t.bytes;
                    t.messages.retain(|(sub, _)| *sub != subtransaction_xid);
                    t.bytes = t.messages.iter().map(|(_, b)| b.len()).sum();
                    self.streamed_bytes -= before - t.bytes;
                }
            }
            Msg::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                timestamp,
                ..
            } => {
                let t = self.streamed.remove(&xid).unwrap_or_default();
                self.start_replay(xid, t, Lsn(commit_lsn), Lsn(end_lsn), pg_time(timestamp))?;
            }
            // Types, origins and two-phase messages carry nothing pgfire delivers.
            _ => {}
        }
        Ok(())
    }

    /// Set up the decoding of a committed streamed transaction's buffered messages.
    fn start_replay(
        &mut self,
        xid: u32,
        t: StreamedTxn,
        lsn: Lsn,
        end_lsn: Lsn,
        time: DateTime<Utc>,
    ) -> Result<(), DecodeError> {
        // The buffered messages carry the xid prefix of a streamed chunk: put the parser in one.
        let mut parser = LogicalReplicationParser::with_protocol_version(2);
        let mut start = BytesMut::with_capacity(6);
        start.put_u8(b'S');
        start.put_u32(xid);
        start.put_u8(1);
        parser
            .parse_wal_message(&start)
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        self.txn = Some(OpenTxn {
            commit: Arc::new(Commit {
                lsn,
                end_lsn,
                time,
                xid,
            }),
            position: 0,
        });
        tracing::debug!(
            xid,
            changes = t.messages.len(),
            bytes = t.bytes,
            "streamed transaction committed"
        );
        self.replay = Some(Replay {
            parser,
            messages: t.messages.into_iter(),
            end_lsn,
            started: std::time::Instant::now(),
        });
        Ok(())
    }

    fn next_position(&mut self) -> Result<(Arc<Commit>, u32), DecodeError> {
        let txn = self
            .txn
            .as_mut()
            .ok_or_else(|| DecodeError::Malformed("change outside a transaction".into()))?;
        let p = txn.position;
        txn.position += 1;
        Ok((txn.commit.clone(), p))
    }

    fn relation(&self, oid: u32) -> Result<Arc<Relation>, DecodeError> {
        self.relations
            .get(&oid)
            .cloned()
            .ok_or(DecodeError::UnknownRelation(oid))
    }

    fn row(
        &mut self,
        op: Op,
        oid: u32,
        old: Option<&TupleData>,
        new: Option<&TupleData>,
        out: &mut Vec<Item>,
    ) -> Result<(), DecodeError> {
        let relation = self.relation(oid)?;
        let (commit, position) = self.next_position()?;
        let raw_size = [old, new]
            .iter()
            .flatten()
            .map(|t| t.columns.iter().map(|c| c.as_bytes().len()).sum::<usize>())
            .sum();
        let old = old.map(|t| cells(&relation, t));
        let new = new.map(|t| cells(&relation, t));
        out.push(Item::Row(RowChange {
            op,
            relation,
            old,
            new,
            commit,
            position,
            raw_size,
        }));
        Ok(())
    }
}

/// Render a tuple's columns by the relation's column types.
fn cells(rel: &Relation, tuple: &TupleData) -> Vec<Cell> {
    tuple
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| match c.data_type {
            b'n' => Cell::Null,
            b'u' => Cell::Unchanged,
            _ => {
                let class = rel
                    .columns
                    .get(i)
                    .map(|c| c.class)
                    .unwrap_or(TypeClass::Text);
                match std::str::from_utf8(c.as_bytes()) {
                    Ok(text) => Cell::Value(render(class, text)),
                    Err(_) => Cell::Value(Value::String(
                        String::from_utf8_lossy(c.as_bytes()).into_owned(),
                    )),
                }
            }
        })
        .collect()
}

fn pg_time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros.saturating_add(PG_EPOCH_OFFSET_MICROS))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn rows(items: &[Item]) -> Vec<(u64, u32, Vec<Cell>)> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Row(r) => Some((r.commit.lsn.0, r.position, r.new.clone().unwrap())),
                _ => None,
            })
            .collect()
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
        assert_eq!(
            r[0].2[0],
            Cell::Value(serde_json::from_str("9007199254740993").unwrap())
        );
        assert_eq!(r[0].2[1], Cell::Null);
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
        d.drain(&mut out, 2).unwrap(); // the Relation message and one insert
        assert_eq!(rows(&out).len(), 1, "a slice at a time");
        d.drain(&mut out, 100).unwrap();
        assert!(!d.replaying() && !d.in_transaction());
        let r = rows(&out);
        assert_eq!(
            r.iter().map(|x| x.2[0].clone()).collect::<Vec<_>>(),
            vec![Cell::Value(1.into()), Cell::Value(3.into())]
        );
        assert_eq!(
            r.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(),
            vec![(300, 0), (300, 1)]
        );
        assert_eq!(d.streamed_bytes, 0);
        assert!(matches!(out.last(), Some(Item::Checkpoint(Lsn(320)))));
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
}
