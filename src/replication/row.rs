//! A decoded row as pgfire keeps it: each column's value rendered to JSON text once, when the
//! change is decoded, and packed with its neighbours in one buffer (no allocation per value).

use bytes::Bytes;
use pg_walstream::TupleData;

use super::decode::Relation;
use super::values::{json_string, render_json, TypeClass};

/// One column of a decoded row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell<'a> {
    Null,
    /// A value the WAL does not hold: an unchanged TOASTed value of the new row, or, in an old
    /// row that holds only the replica identity's key, a column outside the key.
    Unchanged,
    /// The value rendered to JSON text (see [`super::values::render_json`]).
    Value(&'a [u8]),
}

/// Rendered rows are packed into shared chunks of this size (one allocation for many rows).
pub(super) const ARENA_CHUNK: usize = 256 * 1024;

const TAG_NULL: u8 = b'n';
const TAG_UNCHANGED: u8 = b'u';
const TAG_VALUE: u8 = b'v';

/// A row's columns as stored: for each column a tag (`n` null, `u` unchanged TOAST, `v` value)
/// and, for a value, its length (u32, little endian) and its JSON text.
#[derive(Debug, Clone, Copy)]
pub struct Tuple<'a>(&'a [u8]);

impl<'a> Tuple<'a> {
    pub fn cells(self) -> Cells<'a> {
        Cells(self.0)
    }

    pub fn get(self, i: usize) -> Option<Cell<'a>> {
        self.cells().nth(i)
    }
}

/// The cells of a [`Tuple`], in column order.
pub struct Cells<'a>(&'a [u8]);

impl<'a> Iterator for Cells<'a> {
    type Item = Cell<'a>;

    fn next(&mut self) -> Option<Cell<'a>> {
        let (&tag, rest) = self.0.split_first()?;
        match tag {
            TAG_NULL => {
                self.0 = rest;
                Some(Cell::Null)
            }
            TAG_UNCHANGED => {
                self.0 = rest;
                Some(Cell::Unchanged)
            }
            _ => {
                let (len, rest) = rest.split_first_chunk::<4>()?;
                let len = u32::from_le_bytes(*len) as usize;
                let value = rest.get(..len)?;
                self.0 = &rest[len..];
                Some(Cell::Value(value))
            }
        }
    }
}

/// Append a tuple's encoding to `out`.
fn put_cells<'a>(cells: impl IntoIterator<Item = Cell<'a>>, out: &mut Vec<u8>) {
    for c in cells {
        match c {
            Cell::Null => out.push(TAG_NULL),
            Cell::Unchanged => out.push(TAG_UNCHANGED),
            Cell::Value(v) => {
                out.push(TAG_VALUE);
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                out.extend_from_slice(v);
            }
        }
    }
}

/// The old and new tuples of a row change, rendered, in one buffer.
#[derive(Debug, Clone)]
pub struct EncodedRow {
    bytes: Bytes,
    /// Length of the old tuple, which comes first; `None` when there is no old tuple.
    old_len: Option<u32>,
    has_new: bool,
}

impl EncodedRow {
    /// Encode rows given as cells (for tests and tools; the decoder renders pgoutput directly).
    pub fn from_cells(old: Option<&[Cell<'_>]>, new: Option<&[Cell<'_>]>) -> EncodedRow {
        let mut out = Vec::new();
        if let Some(old) = old {
            put_cells(old.iter().copied(), &mut out);
        }
        let old_len = old.map(|_| out.len() as u32);
        if let Some(new) = new {
            put_cells(new.iter().copied(), &mut out);
        }
        EncodedRow {
            bytes: Bytes::from(out),
            old_len,
            has_new: new.is_some(),
        }
    }

    pub(super) fn from_parts(bytes: Bytes, old_len: Option<u32>, has_new: bool) -> EncodedRow {
        EncodedRow {
            bytes,
            old_len,
            has_new,
        }
    }

    pub fn old(&self) -> Option<Tuple<'_>> {
        let len = self.old_len? as usize;
        self.bytes.get(..len).map(Tuple)
    }

    pub fn new_row(&self) -> Option<Tuple<'_>> {
        if !self.has_new {
            return None;
        }
        let start = self.old_len.unwrap_or(0) as usize;
        self.bytes.get(start..).map(Tuple)
    }

    /// Bytes held.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }
}

/// Render a tuple's columns by the relation's column types, encoded as a [`Tuple`]. In a key
/// tuple (`key_only`) the columns outside the key are not in the WAL (pgoutput sends them as
/// nulls): they are kept as [`Cell::Unchanged`], never as a made-up null.
pub(super) fn render_tuple(rel: &Relation, tuple: &TupleData, key_only: bool, out: &mut Vec<u8>) {
    for (i, c) in tuple.columns.iter().enumerate() {
        let in_wal = !key_only || rel.columns.get(i).is_some_and(|c| c.is_key);
        match c.data_type {
            _ if !in_wal => out.push(TAG_UNCHANGED),
            b'n' => out.push(TAG_NULL),
            b'u' => out.push(TAG_UNCHANGED),
            _ => {
                out.push(TAG_VALUE);
                let at = out.len();
                out.extend_from_slice(&[0; 4]);
                let class = rel
                    .columns
                    .get(i)
                    .map(|c| c.class)
                    .unwrap_or(TypeClass::Text);
                match std::str::from_utf8(c.as_bytes()) {
                    Ok(text) => render_json(class, text, out),
                    Err(_) => json_string(&String::from_utf8_lossy(c.as_bytes()), out),
                }
                let len = (out.len() - at - 4) as u32;
                out[at..at + 4].copy_from_slice(&len.to_le_bytes());
            }
        }
    }
}
