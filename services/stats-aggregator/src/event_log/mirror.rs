//! The id log's blobs and this process's mirror of the log.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use siphasher::sip128::{Hasher128 as _, SipHasher13};

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

/// An event id as the mirror keeps it: 128 bits of SipHash-1-3 under
/// this process's random key. A keyed PRF, so ids a client picks cannot be
/// made to collide with another client's (which would drop its event as a
/// duplicate); 128 bits, so an accidental collision among the 10⁸ ids of a
/// large window has a chance of about 10⁻²³. 16 bytes whatever the id's
/// length, where keeping the id cost ~60 bytes plus the id rounded up to 16.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Fingerprint([u8; 16]);

impl std::hash::Hash for Fingerprint {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already uniformly random: its first 8 bytes are the table's hash.
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(head));
    }
}

/// The table's hasher: passes a fingerprint's own bits through.
#[derive(Default)]
pub(super) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only fingerprints are hashed here (`write_u64`); anything else
        // is folded in so the hasher stays correct if misused.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// This process's mirror of the id log: 20 bytes a remembered id in a
/// table (plus hashbrown's control byte and its free slots), whatever the
/// ids' length, so `dedup_max_ids` bounds it at about 24–48 bytes an id.
pub(super) struct Mirror {
    /// The log's epoch; empty before the first read.
    pub(super) epoch: String,
    /// The log position the mirror holds every blob before.
    pub(super) position: u64,
    /// Fingerprint → the second of its blob.
    pub(super) seen: HashMap<Fingerprint, u32, BuildHasherDefault<PassThrough>>,
    /// This process's fingerprint key.
    key: SipHasher13,
    /// The largest window asked for: ids are kept for it.
    pub(super) keep_window: u64,
    /// `now / keep_window` at the last sweep.
    pub(super) swept: u64,
}

impl Default for Mirror {
    fn default() -> Self {
        Self {
            epoch: String::new(),
            position: 0,
            seen: HashMap::default(),
            key: SipHasher13::new_with_keys(rand::random(), rand::random()),
            keep_window: 0,
            swept: 0,
        }
    }
}

/// Seconds as the mirror keeps them (u32: until 2106).
fn secs(at: u64) -> u32 {
    u32::try_from(at).unwrap_or(u32::MAX)
}

impl Mirror {
    pub(super) fn reset(&mut self, epoch: String, base: u64) {
        self.epoch = epoch;
        self.position = base;
        self.seen.clear();
        self.seen.shrink_to_fit();
    }

    pub(super) fn fingerprint(&self, id: &[u8]) -> Fingerprint {
        let mut h = self.key;
        h.write(id);
        Fingerprint(h.finish128().as_bytes())
    }

    pub(super) fn remember(&mut self, id: &[u8], at: u64) {
        let f = self.fingerprint(id);
        let at = secs(at);
        self.seen
            .entry(f)
            .and_modify(|s| *s = (*s).max(at))
            .or_insert(at);
    }

    pub(super) fn is_seen(&self, id: &[u8], now: u64, window: u64) -> bool {
        self.seen
            .get(&self.fingerprint(id))
            .is_some_and(|&at| u64::from(at) / window + 1 >= now / window)
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

    /// Forgets ids whose window (the largest asked for) has passed, and
    /// gives back the table's memory when it holds under a quarter of what
    /// it could (a burst's ids, once forgotten, do not keep their memory).
    pub(super) fn sweep(&mut self, now: u64, window: u64) {
        self.keep_window = self.keep_window.max(window);
        let current = now / self.keep_window;
        if current > self.swept {
            self.swept = current;
            let keep = self.keep_window;
            self.seen
                .retain(|_, at| u64::from(*at) / keep + 1 >= current);
            if self.seen.len() < self.seen.capacity() / 4 {
                self.seen.shrink_to_fit();
            }
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
    fn fingerprints_are_keyed_per_process_and_tell_ids_apart() {
        let (a, b) = (Mirror::default(), Mirror::default());
        assert!(a.fingerprint(b"event-1") == a.fingerprint(b"event-1"));
        assert!(a.fingerprint(b"event-1") != a.fingerprint(b"event-2"));
        // Another process's key: another fingerprint of the same id.
        assert!(a.fingerprint(b"event-1") != b.fingerprint(b"event-1"));
        let mut m = Mirror::default();
        for i in 0..100_000u32 {
            m.remember(format!("id-{i}").as_bytes(), 100);
        }
        assert_eq!(
            m.seen.len(),
            100_000,
            "no two of 100,000 ids share a fingerprint"
        );
        assert!(m.is_seen(b"id-99999", 100, 10));
        assert!(!m.is_seen(b"id-100000", 100, 10));
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
