//! The node's small persistent state (role, generation history, degraded
//! record, dirty map) and its byte encoding. Stored through the metadata
//! store (two checksummed slots); written durably at role changes,
//! generation bumps, dirty-map folds and resync milestones.

use super::types::{GenEntry, Role, Seq, MAX_STATE_BYTES};

/// Bitmap of dirty chunks: extents written while the delta queue could not
/// hold them (overflow tier), or to be rewritten on the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyMap {
    pub granularity: u64,
    pub chunks: u64,
    words: Vec<u64>,
    count: u64,
}

impl DirtyMap {
    pub fn new(volume_bytes: u64, granularity: u64) -> Self {
        assert!(granularity.is_power_of_two());
        let chunks = volume_bytes.div_ceil(granularity);
        DirtyMap {
            granularity,
            chunks,
            words: vec![0; chunks.div_ceil(64) as usize],
            count: 0,
        }
    }
    pub fn count(&self) -> u64 {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn bytes(&self) -> u64 {
        self.count * self.granularity
    }
    pub fn is_set(&self, chunk: u64) -> bool {
        self.words[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }
    fn set(&mut self, chunk: u64) {
        let w = &mut self.words[(chunk / 64) as usize];
        if *w & (1 << (chunk % 64)) == 0 {
            *w |= 1 << (chunk % 64);
            self.count += 1;
        }
    }
    /// Marks every chunk that a byte range touches.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.granularity;
        let last = ((offset + len - 1) / self.granularity).min(self.chunks - 1);
        for c in first..=last {
            self.set(c);
        }
    }
    pub fn mark_all(&mut self) {
        for c in 0..self.chunks {
            self.set(c);
        }
    }
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.count = 0;
    }
    /// First dirty chunk at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        (from..self.chunks).find(|&c| {
            // Skip whole empty words quickly.
            self.words[(c / 64) as usize] != 0 && self.is_set(c)
        })
    }
}

/// Everything a node must remember across a restart, besides its ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub node_id: u32,
    pub role: Role,
    /// Generation history, oldest first; the last entry is the current
    /// generation. Empty on a new/replaced disk.
    pub history: Vec<GenEntry>,
    /// Degraded: the peer is stale from this seq on (durable before any
    /// write completes without ACK1).
    pub peer_stale_from: Option<Seq>,
    /// Lower bound of the executed watermark (persisted lazily).
    pub executed: Seq,
    /// This disk needs a full remirror (new disk, or one was interrupted).
    pub fresh: bool,
    /// This disk is receiving a dirty-map resync and is inconsistent.
    pub resyncing: bool,
    /// Dirty map (overflow tier) and the first seq it may stand for.
    pub dirty: DirtyMap,
    /// The dirty map covers every missing seq from here on (0 = never folded).
    pub fold_base: Seq,
    /// Full remirrors sent or received since format.
    pub remirrors: u64,
    /// Boot counter.
    pub incarnation: u64,
    /// A backup that has not yet received the authority's head as of its
    /// last handshake (0 = caught up); it refuses `promote` until then.
    pub behind_until: Seq,
    /// Generations opened by `promote --force` (newest last, at most
    /// `MAX_FORCED`): the operator accepted that the peer's writes after
    /// their first seq may be lost.
    pub forced: Vec<u64>,
    /// After a resync whose extents held the source's disk as executed
    /// through this seq, this disk mixes newer and older blocks until it has
    /// executed that seq too (0 = consistent). Not even a forced promote
    /// takes it before then.
    pub inconsistent_until: Seq,
    /// The replicated state blob (`ReqKind::State`; `None`: never set, or
    /// dropped with the entries past a fork until the authority sends its
    /// own) and the seq of the State REQ it came from: an executed State
    /// entry replaces it only when its seq is higher, so re-executing older
    /// entries after a restart never goes back. 0 with a blob: adopted from
    /// the peer with no seq of this node's history behind it.
    pub state_seq: Seq,
    pub state: Option<Vec<u8>>,
}

/// How many forced generations the metadata remembers.
pub const MAX_FORCED: usize = 16;

impl Meta {
    /// State of a freshly formatted node. `replace`: the disk is new and
    /// must be filled from the peer (empty history).
    pub fn formatted(
        node_id: u32,
        role: Role,
        volume_bytes: u64,
        granularity: u64,
        replace: bool,
    ) -> Meta {
        Meta {
            node_id,
            role,
            history: if replace {
                vec![]
            } else {
                vec![GenEntry {
                    gen: 1,
                    first_seq: 1,
                    origin: 0,
                }]
            },
            peer_stale_from: None,
            executed: 0,
            fresh: replace,
            resyncing: false,
            dirty: DirtyMap::new(volume_bytes, granularity),
            fold_base: 0,
            remirrors: 0,
            incarnation: 0,
            behind_until: 0,
            forced: Vec::new(),
            inconsistent_until: 0,
            state_seq: 0,
            state: None,
        }
    }

    pub fn generation(&self) -> u64 {
        self.history.last().map_or(0, |g| g.gen)
    }

    /// Bytes of memory the dirty map takes (one bit per chunk).
    pub fn dirty_map_bytes(&self) -> u64 {
        self.dirty.words.len() as u64 * 8
    }

    /// An upper bound of `encode().len()` whatever the dirty map holds, for
    /// sizing the metadata slots (history and forced lists as they are now,
    /// plus room for 256 more generations).
    pub fn encoded_len_bound(&self) -> usize {
        let mut dense = self.clone();
        dense.dirty.mark_all();
        dense.state = None;
        dense.encode().len() + 256 * 24 + 8 * MAX_FORCED + MAX_STATE_BYTES + 8
    }

    /// The dirty map goes out sparse (index, word pairs) when that is
    /// smaller than the dense bitmap: an empty or lightly dirty map costs a
    /// few bytes per metadata write even at 4 KiB granularity.
    pub fn encode(&self) -> Vec<u8> {
        let nonzero = self.dirty.words.iter().filter(|w| **w != 0).count();
        let sparse = nonzero * 2 < self.dirty.words.len();
        let mut b = Vec::with_capacity(
            160 + self.history.len() * 24
                + if sparse {
                    nonzero * 16
                } else {
                    self.dirty.words.len() * 8
                },
        );
        b.extend_from_slice(b"DMMETA03");
        let u64s = |v: u64, b: &mut Vec<u8>| b.extend_from_slice(&v.to_le_bytes());
        u64s(self.node_id as u64, &mut b);
        u64s(matches!(self.role, Role::Primary) as u64, &mut b);
        u64s(self.history.len() as u64, &mut b);
        for g in &self.history {
            u64s(g.gen, &mut b);
            u64s(g.first_seq, &mut b);
            u64s(g.origin as u64, &mut b);
        }
        u64s(self.peer_stale_from.map_or(0, |s| s + 1), &mut b);
        u64s(self.executed, &mut b);
        u64s(self.fresh as u64, &mut b);
        u64s(self.resyncing as u64, &mut b);
        u64s(self.dirty.granularity, &mut b);
        u64s(self.dirty.chunks, &mut b);
        if sparse {
            u64s(1, &mut b);
            u64s(nonzero as u64, &mut b);
            for (i, w) in self
                .dirty
                .words
                .iter()
                .enumerate()
                .filter(|(_, w)| **w != 0)
            {
                u64s(i as u64, &mut b);
                u64s(*w, &mut b);
            }
        } else {
            u64s(0, &mut b);
            for w in &self.dirty.words {
                u64s(*w, &mut b);
            }
        }
        u64s(self.fold_base, &mut b);
        u64s(self.remirrors, &mut b);
        u64s(self.incarnation, &mut b);
        u64s(self.behind_until, &mut b);
        u64s(self.forced.len() as u64, &mut b);
        for g in &self.forced {
            u64s(*g, &mut b);
        }
        u64s(self.inconsistent_until, &mut b);
        // Added with replicated state: seq, blob length + 1 (0 = none), the
        // blob padded with zeroes to 8 bytes.
        u64s(self.state_seq, &mut b);
        match &self.state {
            None => u64s(0, &mut b),
            Some(s) => {
                u64s(s.len() as u64 + 1, &mut b);
                b.extend_from_slice(s);
                b.resize(b.len().next_multiple_of(8), 0);
            }
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Meta, String> {
        let v3 = b.len() >= 8 && &b[..8] == b"DMMETA03";
        if b.len() < 8 || (!v3 && &b[..8] != b"DMMETA02") {
            return Err(
                "node metadata has an unknown format (not written by this deltamirror version)"
                    .into(),
            );
        }
        let p = std::cell::Cell::new(8);
        let next = || -> Result<u64, String> {
            let s = b
                .get(p.get()..p.get() + 8)
                .ok_or("node metadata is truncated")?;
            p.set(p.get() + 8);
            Ok(u64::from_le_bytes(s.try_into().unwrap()))
        };
        let node_id = next()? as u32;
        let role = if next()? == 1 {
            Role::Primary
        } else {
            Role::Backup
        };
        let n = next()?;
        if n > 1 << 16 {
            return Err("node metadata: generation history too long".into());
        }
        let mut history = Vec::new();
        for _ in 0..n {
            history.push(GenEntry {
                gen: next()?,
                first_seq: next()?,
                origin: next()? as u32,
            });
        }
        let stale = next()?;
        let executed = next()?;
        let fresh = next()? != 0;
        let resyncing = next()? != 0;
        let granularity = next()?;
        let chunks = next()?;
        if !granularity.is_power_of_two() || chunks > 1 << 40 {
            return Err("node metadata: bad dirty map".into());
        }
        let nwords = chunks.div_ceil(64) as usize;
        let mut words = Vec::new();
        // DMMETA02 is always dense; DMMETA03 says which.
        if v3 && next()? == 1 {
            words = vec![0u64; nwords];
            let n = next()?;
            if n > nwords as u64 {
                return Err("node metadata: bad dirty map".into());
            }
            for _ in 0..n {
                let i = next()? as usize;
                let w = next()?;
                *words.get_mut(i).ok_or("node metadata: bad dirty map")? = w;
            }
        } else {
            for _ in 0..nwords {
                words.push(next()?);
            }
        }
        let count = words.iter().map(|w| w.count_ones() as u64).sum();
        let fold_base = next()?;
        let remirrors = next()?;
        let incarnation = next()?;
        let behind_until = next()?;
        // Added after DMMETA02 shipped: absent in older metadata.
        let mut forced = Vec::new();
        if p.get() < b.len() {
            let n = next()?;
            if n > MAX_FORCED as u64 {
                return Err("node metadata: too many forced generations".into());
            }
            for _ in 0..n {
                forced.push(next()?);
            }
        }
        let inconsistent_until = if p.get() < b.len() { next()? } else { 0 };
        let (mut state_seq, mut state) = (0, None);
        if p.get() < b.len() {
            state_seq = next()?;
            let n = next()?;
            if n > MAX_STATE_BYTES as u64 + 1 {
                return Err("node metadata: state blob too large".into());
            }
            if n > 0 {
                let n = n as usize - 1;
                let s = b
                    .get(p.get()..p.get() + n)
                    .ok_or("node metadata is truncated")?;
                state = Some(s.to_vec());
                p.set(p.get() + n.next_multiple_of(8));
            }
        }
        Ok(Meta {
            node_id,
            role,
            history,
            peer_stale_from: if stale == 0 { None } else { Some(stale - 1) },
            executed,
            fresh,
            resyncing,
            dirty: DirtyMap {
                granularity,
                chunks,
                words,
                count,
            },
            fold_base,
            remirrors,
            incarnation,
            behind_until,
            forced,
            inconsistent_until,
            state_seq,
            state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        let mut m = Meta::formatted(2, Role::Backup, 1 << 20, 4096, false);
        m.dirty.mark(5000, 10000);
        m.peer_stale_from = Some(17);
        m.forced = vec![2];
        m.inconsistent_until = 9;
        m.state_seq = 12;
        m.state = Some(vec![7; 13]);
        m.history.push(GenEntry {
            gen: 2,
            first_seq: 40,
            origin: 1,
        });
        let d = Meta::decode(&m.encode()).unwrap();
        assert_eq!(d, m);
        assert_eq!(d.dirty.count(), 3);
        assert!(Meta::decode(&m.encode()[..20]).is_err());
        // Dense when most words are dirty, and within the bound.
        m.dirty.mark_all();
        let full = m.encode();
        assert_eq!(Meta::decode(&full).unwrap(), m);
        assert!(full.len() <= m.encoded_len_bound());
        m.state = Some(vec![1; MAX_STATE_BYTES]);
        assert!(m.encode().len() <= m.encoded_len_bound());
        assert_eq!(Meta::decode(&m.encode()).unwrap(), m);
        m.state = Some(Vec::new());
        assert_eq!(Meta::decode(&m.encode()).unwrap(), m);
        m.state = None;
        assert_eq!(Meta::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn a_4k_dirty_map_of_a_large_volume_costs_little_while_clean() {
        // 1 TiB at 4 KiB: a 32 MiB bitmap in memory, a few bytes on disk
        // while clean or lightly dirty.
        let mut m = Meta::formatted(1, Role::Primary, 1 << 40, 4096, false);
        assert_eq!(m.dirty_map_bytes(), 32 << 20);
        assert!(m.encode().len() < 256, "{}", m.encode().len());
        m.dirty.mark(123 << 30, 4096);
        m.dirty.mark(700 << 30, 8192);
        let e = m.encode();
        assert!(e.len() < 256 + 32, "{}", e.len());
        let d = Meta::decode(&e).unwrap();
        assert_eq!(d.dirty.count(), 3);
        assert!(d.dirty.is_set((123 << 30) / 4096));
    }

    #[test]
    fn metadata_written_by_the_previous_version_still_decodes() {
        // DMMETA02: dense map, no forced list, no inconsistent_until.
        let m = Meta::formatted(2, Role::Backup, 1 << 20, 4096, false);
        let mut b = b"DMMETA02".to_vec();
        for v in [2u64, 0, 1, 1, 1, 0, 0, 0, 0, 0, 4096, 256] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend(std::iter::repeat_n(0u8, 4 * 8)); // 256 chunks = 4 words
        for v in [0u64, 0, 0, 0] {
            b.extend_from_slice(&v.to_le_bytes()); // fold_base, remirrors, incarnation, behind
        }
        assert_eq!(Meta::decode(&b).unwrap(), m);
    }

    #[test]
    fn metadata_written_before_replicated_state_still_decodes() {
        // DMMETA03 as written before the state trailer existed.
        let m = Meta::formatted(1, Role::Primary, 1 << 20, 4096, false);
        let b = m.encode();
        assert_eq!(Meta::decode(&b[..b.len() - 16]).unwrap(), m);
        // A truncated blob is an error, not a panic.
        let mut m = m;
        m.state = Some(vec![5; 20]);
        let b = m.encode();
        assert!(Meta::decode(&b[..b.len() - 8]).is_err());
    }

    #[test]
    fn dirty_map_marks_chunks() {
        let mut d = DirtyMap::new(10 * 4096, 4096);
        d.mark(4095, 2);
        assert_eq!(d.count(), 2);
        assert_eq!(d.next_set(0), Some(0));
        assert_eq!(d.next_set(2), None);
        d.mark_all();
        assert_eq!(d.count(), 10);
    }
}
