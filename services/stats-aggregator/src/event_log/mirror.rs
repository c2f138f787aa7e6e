//! The id log's blobs and this process's mirror of the log.

use std::collections::HashMap;

use tidemark_connectors::{ConnectorError, ConnectorResult};

use super::{BACKEND, corrupt};

/// Appends `id` to a blob: its length (u16, little-endian), then its bytes.
pub(super) fn pack_id(blob: &mut Vec<u8>, id: &[u8]) -> ConnectorResult<()> {
    let len = u16::try_from(id.len())
        .map_err(|_| ConnectorError::invalid(BACKEND, "an event id is over 65,535 bytes"))?;
    blob.extend_from_slice(&len.to_le_bytes());
    blob.extend_from_slice(id);
    Ok(())
}

/// A blob's second and ids.
pub(super) fn unpack(blob: &[u8]) -> ConnectorResult<(u64, Vec<&[u8]>)> {
    let (at, mut rest) = blob
        .split_first_chunk::<8>()
        .ok_or_else(|| corrupt("blob without its time"))?;
    let mut ids = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_le_bytes(*len));
        if tail.len() < len {
            return Err(corrupt("truncated id"));
        }
        let (id, tail) = tail.split_at(len);
        ids.push(id);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(corrupt("trailing byte"));
    }
    Ok((u64::from_le_bytes(*at), ids))
}

/// This process's mirror of the id log.
#[derive(Default)]
pub(super) struct Mirror {
    /// The log's epoch; empty before the first read.
    pub(super) epoch: String,
    /// The log position the mirror holds every blob before.
    pub(super) position: u64,
    /// Id → the second of its blob.
    pub(super) seen: HashMap<Box<[u8]>, u64>,
    /// The largest window asked for: ids are kept for it.
    pub(super) keep_window: u64,
    /// `now / keep_window` at the last sweep.
    pub(super) swept: u64,
}

impl Mirror {
    pub(super) fn reset(&mut self, epoch: String, base: u64) {
        self.epoch = epoch;
        self.position = base;
        self.seen.clear();
    }

    pub(super) fn remember(&mut self, id: &[u8], at: u64) {
        match self.seen.get_mut(id) {
            Some(s) => *s = (*s).max(at),
            None => {
                self.seen.insert(id.into(), at);
            }
        }
    }

    pub(super) fn is_seen(&self, id: &[u8], now: u64, window: u64) -> bool {
        self.seen
            .get(id)
            .is_some_and(|&at| at / window + 1 >= now / window)
    }

    /// Whether `fresh` more ids keep the mirror within `max_ids`.
    pub(super) fn admits(&self, fresh: usize, max_ids: usize) -> bool {
        self.seen.len().saturating_add(fresh) <= max_ids
    }

    /// Time until the next sweep can forget ids (the next boundary of the
    /// kept window), at least a second.
    pub(super) fn until_next_sweep(&self, now: u64) -> std::time::Duration {
        let keep = self.keep_window.max(1);
        std::time::Duration::from_secs((keep - now % keep).max(1))
    }

    /// Forgets ids whose window (the largest asked for) has passed.
    pub(super) fn sweep(&mut self, now: u64, window: u64) {
        self.keep_window = self.keep_window.max(window);
        let current = now / self.keep_window;
        if current > self.swept {
            self.swept = current;
            let keep = self.keep_window;
            self.seen.retain(|_, at| *at / keep + 1 >= current);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip() {
        let mut blob = 42u64.to_le_bytes().to_vec();
        for id in ["a", "", "ünïcode", &"x".repeat(300)] {
            pack_id(&mut blob, id.as_bytes()).unwrap();
        }
        let (at, ids) = unpack(&blob).unwrap();
        assert_eq!(at, 42);
        assert_eq!(ids.len(), 4);
        assert_eq!(ids[2], "ünïcode".as_bytes());
        assert_eq!(ids[3].len(), 300);
        assert!(unpack(&blob[..blob.len() - 1]).is_err());
    }

    #[test]
    fn the_mirror_remembers_for_one_to_two_windows() {
        let mut m = Mirror::default();
        m.remember(b"x", 100);
        assert!(m.is_seen(b"x", 100, 10));
        assert!(m.is_seen(b"x", 119, 10));
        assert!(!m.is_seen(b"x", 120, 10));
        m.sweep(120, 10);
        assert!(m.seen.is_empty());
    }

    #[test]
    fn the_mirror_admits_up_to_its_bound() {
        let mut m = Mirror::default();
        m.sweep(100, 10);
        m.remember(b"a", 100);
        m.remember(b"b", 100);
        assert!(m.admits(1, 3));
        assert!(!m.admits(2, 3));
        // Remembered again: still one id.
        m.remember(b"a", 105);
        assert!(m.admits(1, 3));
        assert_eq!(m.until_next_sweep(105), std::time::Duration::from_secs(5));
        // Kept through the next window, forgotten in the one after.
        m.sweep(110, 10);
        assert!(!m.admits(2, 3));
        m.sweep(120, 10);
        assert!(m.admits(3, 3));
    }
}
