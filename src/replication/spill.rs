//! Streamed transactions beyond the memory budget: their decoded changes appended to a file of
//! their own under the data directory, read back in order at the commit, and deleted when the
//! transaction is handed over or aborted (or, after a crash, by the next pgfire on that slot).
//!
//! A file is a sequence of records, each `sub u32 · kind u8 · body`, all integers big-endian:
//! a row `op u8 · relation u32 · old_len u32 · has_new u8 · len u32 · rendered row`, a truncate
//! `n u16 · n × relation u32`, a message `transactional u8 · lsn u64 · prefix (u32 len, bytes) ·
//! content (u32 len, bytes)`. Relations are indexes into the file's own table of the relations
//! (as they were when the change was decoded), kept in memory: a few per transaction.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::decode::{Op, Relation};
use super::streamed::PendingMessage;
use crate::replication::position::Lsn;

const BUFFER: usize = 1 << 20;
const ROW: u8 = 0;
const TRUNCATE: u8 = 1;
const MESSAGE: u8 = 2;

/// Where spill files go, and how much a streamed transaction may hold in memory.
#[derive(Debug, Clone)]
pub struct SpillConfig {
    pub dir: PathBuf,
    /// Bytes all streamed transactions not yet handed over may hold in memory together; beyond
    /// it their changes are written to files.
    pub budget: usize,
}

/// `--max-transaction-memory` when not given.
pub const DEFAULT_BUDGET: &str = "128MiB";

impl SpillConfig {
    /// The directory when `--spill-dir` is not given: `pgfire` in the system's temp directory.
    pub fn default_dir() -> PathBuf {
        std::env::temp_dir().join("pgfire")
    }
}

impl Default for SpillConfig {
    fn default() -> Self {
        SpillConfig {
            dir: SpillConfig::default_dir(),
            budget: parse_size(DEFAULT_BUDGET).unwrap_or(128 << 20),
        }
    }
}

/// Run `f`, which writes or reads spill files, without holding up the other tasks of this
/// worker thread: on a multi-threaded runtime they move to another thread meanwhile.
pub(super) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The directory of one slot's spill files.
#[derive(Debug)]
pub struct SpillDir {
    dir: PathBuf,
    /// `<slot>-<pid>-`: files of this process; those of processes gone are leftovers.
    prefix: String,
    next: u64,
}

impl SpillDir {
    /// Create the directory if needed and delete the files a pgfire that ended without cleaning
    /// up (killed) left there for `slot`; files of a live process (another pgfire) are kept.
    pub fn open(dir: &Path, slot: &str) -> io::Result<SpillDir> {
        std::fs::create_dir_all(dir)?;
        let pid = std::process::id();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(rest) = name
                .to_str()
                .and_then(|n| n.strip_prefix(slot))
                .and_then(|n| n.strip_prefix('-'))
                .filter(|n| n.ends_with(".spill"))
            else {
                continue;
            };
            let owner = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            let alive =
                owner.is_some_and(|p| p == pid || Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {
                        tracing::info!(file = %entry.path().display(), "removed a spill file left by an earlier run")
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(SpillDir {
            dir: dir.to_path_buf(),
            prefix: format!("{slot}-{pid}-"),
            next: 0,
        })
    }

    /// A new file for streamed transaction `xid`.
    pub(super) fn create(&mut self, xid: u32) -> io::Result<SpillWriter> {
        self.next += 1;
        let path = self
            .dir
            .join(format!("{}{}-{xid}.spill", self.prefix, self.next));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(SpillWriter {
            guard: FileGuard(path),
            out: BufWriter::with_capacity(BUFFER, file),
            relations: Vec::new(),
            index: HashMap::new(),
            changes: 0,
            bytes: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

/// Deletes its file when dropped: nothing of a transaction outlives it.
#[derive(Debug)]
struct FileGuard(PathBuf);

impl Drop for FileGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(file = %self.0.display(), error = %e, "cannot remove a spill file");
            }
        }
    }
}

/// The spill file of a streamed transaction being received.
pub(super) struct SpillWriter {
    guard: FileGuard,
    out: BufWriter<File>,
    relations: Vec<Arc<Relation>>,
    /// Relation (by address: a new Relation message makes a new one) → index in `relations`.
    index: HashMap<usize, u32>,
    /// Changes written.
    pub changes: usize,
    /// Bytes written.
    pub bytes: u64,
}

impl SpillWriter {
    fn relation(&mut self, r: &Arc<Relation>) -> u32 {
        let key = Arc::as_ptr(r) as usize;
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        let i = self.relations.len() as u32;
        self.relations.push(r.clone());
        self.index.insert(key, i);
        i
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.bytes += bytes.len() as u64;
        self.out.write_all(bytes)
    }

    fn head(&mut self, sub: u32, kind: u8) -> io::Result<()> {
        self.changes += 1;
        let mut h = [0u8; 5];
        h[..4].copy_from_slice(&sub.to_be_bytes());
        h[4] = kind;
        self.put(&h)
    }

    /// A rendered row: the old tuple (`old_len` bytes, if any) then the new one (if `has_new`).
    pub fn row(
        &mut self,
        sub: u32,
        op: Op,
        relation: &Arc<Relation>,
        old_len: Option<u32>,
        has_new: bool,
        rendered: &[u8],
    ) -> io::Result<()> {
        let len = u32::try_from(rendered.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "row over 4 GB"))?;
        self.head(sub, ROW)?;
        let rel = self.relation(relation);
        let op = match op {
            Op::Insert => 0u8,
            Op::Update => 1,
            Op::Delete => 2,
        };
        let mut b = [0u8; 14];
        b[0] = op;
        b[1..5].copy_from_slice(&rel.to_be_bytes());
        b[5..9].copy_from_slice(&old_len.unwrap_or(u32::MAX).to_be_bytes());
        b[9] = has_new as u8;
        b[10..14].copy_from_slice(&len.to_be_bytes());
        self.put(&b)?;
        self.put(rendered)
    }

    pub fn truncate(&mut self, sub: u32, relations: &[Arc<Relation>]) -> io::Result<()> {
        self.head(sub, TRUNCATE)?;
        let n = u16::try_from(relations.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "truncate of too many tables")
        })?;
        self.put(&n.to_be_bytes())?;
        for r in relations {
            let i = self.relation(r);
            self.put(&i.to_be_bytes())?;
        }
        Ok(())
    }

    pub fn message(&mut self, sub: u32, m: &PendingMessage) -> io::Result<()> {
        self.head(sub, MESSAGE)?;
        self.put(&[m.transactional as u8])?;
        self.put(&m.lsn.0.to_be_bytes())?;
        for part in [m.prefix.as_bytes(), &m.content[..]] {
            let len = u32::try_from(part.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message over 4 GB"))?;
            self.put(&len.to_be_bytes())?;
            self.put(part)?;
        }
        Ok(())
    }

    /// Everything written so far reaches the file (the kernel's page cache).
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// The transaction committed: read its changes back from the start.
    pub fn finish(self) -> io::Result<SpillReader> {
        let mut file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.rewind()?;
        Ok(SpillReader {
            guard: self.guard,
            input: BufReader::with_capacity(BUFFER, file),
            relations: self.relations,
            left: self.changes,
        })
    }
}

/// One change read back.
pub(super) enum Spilled {
    Row {
        op: Op,
        relation: Arc<Relation>,
        old_len: Option<u32>,
        has_new: bool,
        rendered: Bytes,
    },
    Truncate(Vec<Arc<Relation>>),
    Message(Box<PendingMessage>),
}

/// A committed transaction's spilled changes, in the order they were written.
pub(super) struct SpillReader {
    #[allow(dead_code)] // deletes the file when the reader goes
    guard: FileGuard,
    input: BufReader<File>,
    relations: Vec<Arc<Relation>>,
    left: usize,
}

impl SpillReader {
    fn bytes<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.input.read_exact(&mut b)?;
        Ok(b)
    }

    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_be_bytes(self.bytes()?))
    }

    fn vec(&mut self, len: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.input.read_exact(&mut v)?;
        Ok(v)
    }

    fn relation(&self, i: u32) -> io::Result<Arc<Relation>> {
        self.relations
            .get(i as usize)
            .cloned()
            .ok_or_else(|| corrupt("unknown relation"))
    }

    /// The next change and the subtransaction that made it; `None` after the last.
    pub fn next(&mut self) -> io::Result<Option<(u32, Spilled)>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let sub = self.u32()?;
        let [kind] = self.bytes()?;
        let change = match kind {
            ROW => {
                let b: [u8; 14] = self.bytes()?;
                let op = match b[0] {
                    0 => Op::Insert,
                    1 => Op::Update,
                    2 => Op::Delete,
                    _ => return Err(corrupt("unknown operation")),
                };
                let rel = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
                let old_len = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
                let len = u32::from_be_bytes([b[10], b[11], b[12], b[13]]) as usize;
                Spilled::Row {
                    op,
                    relation: self.relation(rel)?,
                    old_len: (old_len != u32::MAX).then_some(old_len),
                    has_new: b[9] == 1,
                    rendered: Bytes::from(self.vec(len)?),
                }
            }
            TRUNCATE => {
                let n = u16::from_be_bytes(self.bytes()?);
                let mut relations = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let i = self.u32()?;
                    relations.push(self.relation(i)?);
                }
                Spilled::Truncate(relations)
            }
            MESSAGE => {
                let [transactional] = self.bytes()?;
                let lsn = Lsn(u64::from_be_bytes(self.bytes()?));
                let len = self.u32()? as usize;
                let prefix =
                    String::from_utf8(self.vec(len)?).map_err(|_| corrupt("message prefix"))?;
                let len = self.u32()? as usize;
                let content = Bytes::from(self.vec(len)?);
                Spilled::Message(Box::new(PendingMessage {
                    transactional: transactional == 1,
                    prefix,
                    content,
                    lsn,
                }))
            }
            _ => return Err(corrupt("unknown record")),
        };
        Ok(Some((sub, change)))
    }
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("spill file damaged: {what}"),
    )
}

/// A size with an optional unit: `65536`, `64kB`, `64KiB`, `256MB`, `1GiB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("invalid size {s:?}: a number with an optional unit, like 256MiB"))?;
    let unit_bytes: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "kib" | "k" => 1 << 10,
        "mb" | "mib" | "m" => 1 << 20,
        "gb" | "gib" | "g" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unit must be B, KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(unit_bytes)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("invalid size {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64kB"), Ok(64 << 10));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        for bad in ["", "MB", "12XB", "0", "-1", "99999999999999999999GB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn leftovers_of_dead_processes_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join("s1-999999999-1-7.spill");
        let live = dir
            .path()
            .join(format!("s1-{}-9-7.spill", std::process::id()));
        let other_slot = dir.path().join("s2-999999999-1-7.spill");
        for p in [&dead, &live, &other_slot] {
            std::fs::write(p, b"x").unwrap();
        }
        // pid 1 always runs: a file of it counts as another pgfire's.
        let init = dir.path().join("s1-1-1-7.spill");
        std::fs::write(&init, b"x").unwrap();
        let mut spill = SpillDir::open(dir.path(), "s1").unwrap();
        assert!(!dead.exists());
        assert!(live.exists() && init.exists() && other_slot.exists());
        let w = spill.create(7).unwrap();
        let path = w.guard.0.clone();
        assert!(path.exists());
        drop(w);
        assert!(!path.exists(), "an abandoned file is deleted");
    }
}
