//! WAL positions, and the committed transaction a change belongs to.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// A WAL position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("invalid LSN {s:?}"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|_| format!("invalid LSN {s:?}"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| format!("invalid LSN {s:?}"))?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return Err(format!("invalid LSN {s:?}"));
        }
        Ok(Lsn(hi << 32 | lo))
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The transaction an event belongs to.
#[derive(Debug, Clone)]
pub struct Commit {
    /// LSN of the commit record; with the position in the transaction, it makes the event id.
    pub lsn: Lsn,
    /// LSN just past the commit: the slot may advance here once the transaction is settled.
    pub end_lsn: Lsn,
    pub time: DateTime<Utc>,
    pub xid: u32,
}
