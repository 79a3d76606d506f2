//! A streamed transaction's changes between their arrival and its commit: decoded as they arrive
//! (values rendered), stored compactly (rendered rows packed in shared chunks, a few words per
//! change), each with the subtransaction that made it, so that an aborted subtransaction's
//! changes are never delivered. Beyond the memory budget they go to a spill file (`spill`),
//! read back first at the commit.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::decode::{EncodedRow, Item, Op, OpenTxn, Relation, RowChange};
use super::row::ARENA_CHUNK;
use super::spill::{SpillDir, SpillReader, SpillWriter, Spilled};
use crate::replication::position::Lsn;

/// Changes are kept in blocks of this many (no reallocation of one huge list as it grows).
const BLOCK: usize = 4096;

/// One change of a streamed transaction.
pub(super) struct Pending {
    /// The (sub)transaction that made the change: its changes are dropped if it aborts.
    sub: u32,
    change: PendingChange,
}

pub(super) enum PendingChange {
    Row {
        op: Op,
        relation: Arc<Relation>,
        at: RowAt,
    },
    Truncate(Vec<Arc<Relation>>),
    Message(Box<PendingMessage>),
}

pub(super) struct PendingMessage {
    pub transactional: bool,
    pub prefix: String,
    pub content: Bytes,
    pub lsn: Lsn,
}

/// Where a rendered row is: its chunk, offset and length; the old tuple comes first.
#[derive(Clone, Copy)]
pub(super) struct RowAt {
    chunk: u32,
    offset: u32,
    len: u32,
    /// Length of the old tuple; `u32::MAX` when there is none.
    old_len: u32,
    has_new: bool,
}

impl Pending {
    /// Bytes held for the change.
    fn size(&self) -> usize {
        std::mem::size_of::<Pending>()
            + match &self.change {
                PendingChange::Row { at, .. } => at.len as usize,
                PendingChange::Truncate(r) => r.len() * 8,
                PendingChange::Message(m) => m.prefix.len() + m.content.len() + 64,
            }
    }
}

/// A streamed transaction not yet committed.
#[derive(Default)]
pub(super) struct StreamedTxn {
    blocks: Vec<Vec<Pending>>,
    /// Filled chunks of rendered rows, and the one being filled.
    chunks: Vec<Bytes>,
    arena: BytesMut,
    /// Subtransactions that aborted; their changes are not delivered.
    aborted: HashSet<u32>,
    /// Bytes held in memory for its changes.
    pub bytes: usize,
    /// Its earlier changes, written out when memory ran short.
    spilled: Option<SpillWriter>,
}

impl StreamedTxn {
    pub fn changes(&self) -> usize {
        self.blocks.iter().map(Vec::len).sum::<usize>()
            + self.spilled.as_ref().map_or(0, |w| w.changes)
    }

    /// Bytes written to its spill file.
    pub fn spilled_bytes(&self) -> u64 {
        self.spilled.as_ref().map_or(0, |w| w.bytes)
    }

    /// Write the changes held in memory to the transaction's spill file (created under `dir` the
    /// first time) and free them. Returns the bytes freed.
    pub fn spill(&mut self, dir: &mut SpillDir, xid: u32) -> std::io::Result<usize> {
        if self.blocks.is_empty() {
            return Ok(0);
        }
        let mut w = match self.spilled.take() {
            Some(w) => w,
            None => dir.create(xid)?,
        };
        for p in self.blocks.iter().flatten() {
            match &p.change {
                PendingChange::Row { op, relation, at } => {
                    let chunk = match self.chunks.get(at.chunk as usize) {
                        Some(c) => &c[..],
                        None => &self.arena[..],
                    };
                    let (start, end) = (at.offset as usize, at.offset as usize + at.len as usize);
                    let rendered = chunk.get(start..end).unwrap_or_default();
                    let old_len = (at.old_len != u32::MAX).then_some(at.old_len);
                    w.row(p.sub, *op, relation, old_len, at.has_new, rendered)?;
                }
                PendingChange::Truncate(relations) => w.truncate(p.sub, relations)?,
                PendingChange::Message(m) => w.message(p.sub, m)?,
            }
        }
        w.flush()?;
        self.spilled = Some(w);
        self.blocks = Vec::new();
        self.chunks = Vec::new();
        self.arena = BytesMut::new();
        Ok(std::mem::take(&mut self.bytes))
    }

    /// Keep a row change rendered as `rendered`: an old tuple of `old_len` bytes (if any), then
    /// the new tuple (if `has_new`). Returns the bytes it holds.
    pub fn push_row(
        &mut self,
        sub: u32,
        op: Op,
        relation: Arc<Relation>,
        rendered: &[u8],
        old_len: Option<u32>,
        has_new: bool,
    ) -> usize {
        if self.arena.capacity() - self.arena.len() < rendered.len() {
            let full = std::mem::replace(
                &mut self.arena,
                BytesMut::with_capacity(ARENA_CHUNK.max(rendered.len())),
            );
            self.chunks.push(full.freeze());
        }
        let at = RowAt {
            chunk: self.chunks.len() as u32,
            offset: self.arena.len() as u32,
            len: rendered.len() as u32,
            old_len: old_len.unwrap_or(u32::MAX),
            has_new,
        };
        self.arena.extend_from_slice(rendered);
        self.push(Pending {
            sub,
            change: PendingChange::Row { op, relation, at },
        })
    }

    /// Keep a change; returns the bytes it holds.
    pub fn push(&mut self, p: Pending) -> usize {
        if self.blocks.last().is_none_or(|b| b.len() == BLOCK) {
            self.blocks.push(Vec::with_capacity(BLOCK));
        }
        let size = p.size();
        if let Some(b) = self.blocks.last_mut() {
            b.push(p);
        }
        self.bytes += size;
        size
    }

    pub fn new_pending(sub: u32, change: PendingChange) -> Pending {
        Pending { sub, change }
    }

    /// A subtransaction aborted: its changes will not be delivered. They are usually the last
    /// ones received, and then freed at once; any others are skipped at the commit. Returns the
    /// bytes freed.
    pub fn abort_subtransaction(&mut self, sub: u32) -> usize {
        self.aborted.insert(sub);
        let mut freed = 0;
        while let Some(block) = self.blocks.last_mut() {
            match block.last() {
                Some(p) if self.aborted.contains(&p.sub) => {
                    freed += p.size();
                    block.pop();
                }
                Some(_) => break,
                None => {
                    self.blocks.pop();
                }
            }
        }
        self.bytes = self.bytes.saturating_sub(freed);
        freed
    }

    /// The transaction committed: hand its changes over in order (the spilled ones first).
    pub fn commit(mut self, txn: OpenTxn) -> std::io::Result<Replay> {
        let last = std::mem::take(&mut self.arena);
        self.chunks.push(last.freeze());
        Ok(Replay {
            spilled: self.spilled.map(SpillWriter::finish).transpose()?,
            blocks: self.blocks.into_iter(),
            block: Vec::new().into_iter(),
            chunks: self.chunks,
            released: 0,
            aborted: self.aborted,
            txn,
        })
    }
}

/// A committed streamed transaction's changes, in order, each chunk of rendered rows released
/// once its rows are handed over.
pub(super) struct Replay {
    /// The changes written to the spill file, read back before those in memory.
    spilled: Option<SpillReader>,
    blocks: std::vec::IntoIter<Vec<Pending>>,
    block: std::vec::IntoIter<Pending>,
    chunks: Vec<Bytes>,
    released: usize,
    aborted: HashSet<u32>,
    /// The commit, and the position of the next change handed over.
    txn: OpenTxn,
}

impl Replay {
    /// Whether the next changes come from the spill file (reads that may wait for the disk).
    pub fn reads_spill(&self) -> bool {
        self.spilled.is_some()
    }

    /// The next change kept: the bytes of memory it held, and its item unless its
    /// subtransaction aborted. `None` once all are handed over.
    pub fn next_change(&mut self) -> std::io::Result<Option<(usize, Option<Item>)>> {
        if let Some(reader) = &mut self.spilled {
            match reader.next()? {
                Some((sub, change)) => return Ok(Some((0, self.spilled_item(sub, change)))),
                // Deletes the file.
                None => self.spilled = None,
            }
        }
        let p = loop {
            match self.block.next() {
                Some(p) => break p,
                None => match self.blocks.next() {
                    Some(b) => self.block = b.into_iter(),
                    None => return Ok(None),
                },
            }
        };
        let size = p.size();
        if self.aborted.contains(&p.sub) {
            return Ok(Some((size, None)));
        }
        let item = match p.change {
            PendingChange::Row { op, relation, at } => {
                let chunk = at.chunk as usize;
                // Rows are stored in order: earlier chunks are no longer needed here.
                while self.released < chunk {
                    if let Some(c) = self.chunks.get_mut(self.released) {
                        *c = Bytes::new();
                    }
                    self.released += 1;
                }
                let (start, end) = (at.offset as usize, at.offset as usize + at.len as usize);
                let bytes = match self.chunks.get(chunk) {
                    Some(c) if end <= c.len() => c.slice(start..end),
                    _ => Bytes::new(),
                };
                let old_len = (at.old_len != u32::MAX).then_some(at.old_len);
                let (commit, position) = self.txn.next_position();
                Item::Row(RowChange {
                    op,
                    relation,
                    row: EncodedRow::from_parts(bytes, old_len, at.has_new),
                    commit,
                    position,
                })
            }
            PendingChange::Truncate(relations) => {
                let (commit, position) = self.txn.next_position();
                Item::Truncate {
                    relations,
                    commit,
                    position,
                }
            }
            PendingChange::Message(m) => self.message_item(*m),
        };
        Ok(Some((size, Some(item))))
    }

    /// The item of a change read back from the spill file, unless its subtransaction aborted.
    fn spilled_item(&mut self, sub: u32, change: Spilled) -> Option<Item> {
        if self.aborted.contains(&sub) {
            return None;
        }
        Some(match change {
            Spilled::Row {
                op,
                relation,
                old_len,
                has_new,
                rendered,
            } => {
                let (commit, position) = self.txn.next_position();
                Item::Row(RowChange {
                    op,
                    relation,
                    row: EncodedRow::from_parts(rendered, old_len, has_new),
                    commit,
                    position,
                })
            }
            Spilled::Truncate(relations) => {
                let (commit, position) = self.txn.next_position();
                Item::Truncate {
                    relations,
                    commit,
                    position,
                }
            }
            Spilled::Message(m) => self.message_item(*m),
        })
    }

    fn message_item(&mut self, m: PendingMessage) -> Item {
        let (commit, position) = match m.transactional {
            true => {
                let (c, p) = self.txn.next_position();
                (Some(c), p)
            }
            false => (None, 0),
        };
        Item::Message {
            prefix: m.prefix,
            content: m.content,
            lsn: m.lsn,
            commit,
            position,
        }
    }
}
