//! When the io_uring backend hands its queued entries to the kernel: each
//! one as it is queued, or in chunks (see [`HandOver`]), chosen by which
//! completes more operations on this machine under the load of the moment
//! ([`HandOverChooser`]).
//!
//! Pure: it is told the time and the completions, and decides nothing else.

use std::time::{Duration, Instant};

/// How queued entries reach the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandOver {
    /// Each entry as it is queued (one `io_uring_enter` per entry): the
    /// device starts on the first request of a round while the reactor
    /// parses the next.
    AtOnce,
    /// Several entries per `io_uring_enter` (a chunk as it fills, the rest
    /// at the end of the reactor's pass or after a short hold): fewer
    /// system calls and device notifications per request.
    InChunks,
}

impl HandOver {
    fn index(self) -> usize {
        match self {
            HandOver::AtOnce => 0,
            HandOver::InChunks => 1,
        }
    }

    fn other(self) -> HandOver {
        match self {
            HandOver::AtOnce => HandOver::InChunks,
            HandOver::InChunks => HandOver::AtOnce,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HandOver::AtOnce => "at-once",
            HandOver::InChunks => "in-chunks",
        }
    }
}

/// `reactor.disk_handover`: a fixed [`HandOver`], or `Adaptive` to let
/// [`HandOverChooser`] pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HandOverPolicy {
    #[default]
    Adaptive,
    Fixed(HandOver),
}

/// A backend's hand-over as [`HandOverPolicy`] set it up: a fixed mode,
/// or a [`HandOverChooser`] that picks it.
#[derive(Clone, Debug)]
pub enum HandOverState {
    Fixed(HandOver),
    Adaptive(HandOverChooser),
}

impl HandOverState {
    /// A chooser's comparisons count from `now`.
    pub fn new(policy: HandOverPolicy, now: Instant) -> HandOverState {
        match policy {
            HandOverPolicy::Fixed(m) => HandOverState::Fixed(m),
            HandOverPolicy::Adaptive => HandOverState::Adaptive(HandOverChooser::new(now)),
        }
    }

    pub fn mode(&self) -> HandOver {
        match self {
            HandOverState::Fixed(m) => *m,
            HandOverState::Adaptive(c) => c.mode(),
        }
    }

    /// The chooser's figures; `None` for a fixed mode.
    pub fn stats(&self) -> Option<HandOverStats> {
        match self {
            HandOverState::Fixed(_) => None,
            HandOverState::Adaptive(c) => Some(c.stats()),
        }
    }
}

/// One slice of a comparison: this long in one mode, then the other.
pub const SLICE: Duration = Duration::from_millis(25);
/// Slices in one comparison, alternating between the two modes (half
/// each, the mode in use first), so that a drift in the load falls on
/// both alike.
pub const COMPARISON_SLICES: u32 = 8;
/// A slice that lasted longer than this (no completion came to end it
/// sooner: the node was idle) voids its comparison, which starts over.
pub const STALE_SLICE: Duration = Duration::from_millis(100);
/// How long the winner is kept before the next comparison: a comparison
/// spends `SLICE * COMPARISON_SLICES / 2` (100 ms) in the other mode, 5% of
/// the time.
pub const KEEP: Duration = Duration::from_secs(2);
/// Fewer completions than this in a comparison (both modes together) tell
/// nothing: the backend goes back to chunks, which costs a mirrored QD1
/// write less (docs/performance.md). A first slice with less than its
/// share of this ends the comparison at once (no slice in the other mode).
pub const MIN_COMPLETIONS: u64 = 2_000;
/// The other mode must complete this much more per second to replace the
/// mode in use (parts per thousand): a tie keeps what runs.
pub const SWITCH_MARGIN_PERMILLE: u64 = 30;

/// Picks the [`HandOver`] under which the backend completes more
/// operations per second, measured in the conditions of the moment.
///
/// Why both modes exist: on a virtual disk a submission that notifies the
/// device is a VM exit, whose cost depends on what else the machine runs.
/// On this project's 2-core VM (docs/performance.md, "Handing disk
/// operations over: measured as it runs"), handing each operation over at
/// once gave QD32 reads 8-28% more IOPS on every protocol, but cost NBD
/// and iSCSI QD32 writes 22-35%, whose hosts keep the other core busy (a
/// device notification then cost the reactor five times as much per
/// write). No fixed choice fits both, and on a physical NVMe drive a
/// notification is a cheap doorbell write.
///
/// It alternates the two modes for [`COMPARISON_SLICES`] slices of
/// [`SLICE`], keeps the one that completed more per second for [`KEEP`],
/// and compares again. When the difference is within
/// [`SWITCH_MARGIN_PERMILLE`] the mode in use stays; when the load is too
/// light to tell ([`MIN_COMPLETIONS`]) it goes back to chunks.
#[derive(Clone, Debug)]
pub struct HandOverChooser {
    mode: HandOver,
    /// The mode in use before the comparison under way (a tie keeps it).
    kept: HandOver,
    /// Completions and time per mode (by [`HandOver::index`]) in the
    /// comparison under way.
    done: [u64; 2],
    time: [Duration; 2],
    /// When the current slice (comparing) or keep began.
    since: Instant,
    /// Slices of the comparison still to run, the current one included;
    /// 0 while keeping.
    slices_left: u32,
    stats: HandOverStats,
}

/// What the chooser decided and on what figures (the node's status).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HandOverStats {
    /// Comparisons finished, and how many of them chose
    /// [`HandOver::AtOnce`] (too light a load goes back to chunks and
    /// counts as a comparison too).
    pub comparisons: u64,
    pub chose_at_once: u64,
    /// Completions per second in each mode in the last comparison.
    pub at_once_per_sec: u64,
    pub in_chunks_per_sec: u64,
}

impl HandOverChooser {
    /// Starts in chunks, and compares from `now`.
    pub fn new(now: Instant) -> HandOverChooser {
        HandOverChooser {
            mode: HandOver::InChunks,
            kept: HandOver::InChunks,
            done: [0; 2],
            time: [Duration::ZERO; 2],
            since: now,
            slices_left: COMPARISON_SLICES,
            stats: HandOverStats::default(),
        }
    }

    pub fn mode(&self) -> HandOver {
        self.mode
    }

    pub fn stats(&self) -> HandOverStats {
        self.stats
    }

    /// `completed` operations completed (reaped) at `now`; called at least
    /// once per reactor pass that reaps, with 0 when none did.
    pub fn record(&mut self, completed: u64, now: Instant) {
        if self.slices_left > 0 {
            self.done[self.mode.index()] += completed;
        }
        let elapsed = now.saturating_duration_since(self.since);
        if self.slices_left == 0 {
            if elapsed >= KEEP {
                // The keep is over: compare again, from the mode in use.
                self.kept = self.mode;
                self.slices_left = COMPARISON_SLICES;
                self.since = now;
            }
            return;
        }
        if elapsed < SLICE {
            return;
        }
        if elapsed > STALE_SLICE {
            // The reactor had nothing to reap for a while (an idle node):
            // what the comparison holds says nothing; start it over, in
            // chunks, as a new chooser would (the figures stay).
            *self = HandOverChooser {
                stats: self.stats,
                ..HandOverChooser::new(now)
            };
            return;
        }
        self.time[self.mode.index()] += elapsed;
        self.since = now;
        self.slices_left -= 1;
        let first = self.slices_left == COMPARISON_SLICES - 1;
        if first && self.done[self.mode.index()] * u64::from(COMPARISON_SLICES) < MIN_COMPLETIONS {
            // Too light a load already: no slice in the other mode.
            self.slices_left = 0;
        }
        if self.slices_left > 0 {
            self.mode = self.mode.other();
            return;
        }
        self.decide();
    }

    fn decide(&mut self) {
        let per_sec = |m: HandOver| {
            let t = self.time[m.index()].as_micros().max(1);
            (u128::from(self.done[m.index()]) * 1_000_000 / t) as u64
        };
        let (kept, other) = (per_sec(self.kept), per_sec(self.kept.other()));
        self.mode = if self.done[0] + self.done[1] < MIN_COMPLETIONS {
            HandOver::InChunks
        } else if other * 1000 > kept * (1000 + SWITCH_MARGIN_PERMILLE) {
            self.kept.other()
        } else {
            self.kept
        };
        self.stats.comparisons += 1;
        self.stats.chose_at_once += u64::from(self.mode == HandOver::AtOnce);
        self.stats.at_once_per_sec = per_sec(HandOver::AtOnce);
        self.stats.in_chunks_per_sec = per_sec(HandOver::InChunks);
        self.done = [0; 2];
        self.time = [Duration::ZERO; 2];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A steady load: each mode completes `rate(mode)` operations per
    /// second, reported every millisecond, for `for_ms`.
    fn run(
        c: &mut HandOverChooser,
        now: &mut Instant,
        for_ms: u64,
        rate: impl Fn(HandOver) -> u64,
    ) {
        for _ in 0..for_ms {
            *now += Duration::from_millis(1);
            c.record(rate(c.mode()) / 1000, *now);
        }
    }

    /// A load under which at once completes `at_once` per second and
    /// chunks `in_chunks`.
    fn rates(at_once: u64, in_chunks: u64) -> impl Fn(HandOver) -> u64 + Copy {
        move |m| match m {
            HandOver::AtOnce => at_once,
            HandOver::InChunks => in_chunks,
        }
    }

    const COMPARISON_MS: u64 = SLICE.as_millis() as u64 * COMPARISON_SLICES as u64;
    const KEEP_MS: u64 = KEEP.as_millis() as u64;

    #[test]
    fn a_comparison_alternates_the_modes_slice_by_slice() {
        let mut now = Instant::now();
        let mut c = HandOverChooser::new(now);
        let mut seen = Vec::new();
        for _ in 0..COMPARISON_SLICES {
            seen.push(c.mode());
            run(&mut c, &mut now, SLICE.as_millis() as u64, |_| 50_000);
        }
        let expect: Vec<HandOver> = (0..COMPARISON_SLICES)
            .map(|i| [HandOver::InChunks, HandOver::AtOnce][i as usize % 2])
            .collect();
        assert_eq!(seen, expect);
        assert_eq!(c.stats().comparisons, 1);
        // A tie keeps the mode in use.
        assert_eq!(c.mode(), HandOver::InChunks);
    }

    #[test]
    fn it_keeps_the_faster_mode_and_follows_a_change() {
        let mut now = Instant::now();
        let mut c = HandOverChooser::new(now);
        let at_once_faster = rates(52_000, 45_000);
        run(&mut c, &mut now, COMPARISON_MS, at_once_faster);
        assert_eq!(c.mode(), HandOver::AtOnce);
        let s = c.stats();
        assert_eq!((s.at_once_per_sec, s.in_chunks_per_sec), (52_000, 45_000));
        // Kept for the whole keep, then compared again from it.
        run(&mut c, &mut now, KEEP_MS, at_once_faster);
        assert_eq!((c.mode(), c.stats().comparisons), (HandOver::AtOnce, 1));
        // The load changes (reads become writes): chunks win the next
        // comparison.
        let chunks_faster = rates(33_000, 54_000);
        run(&mut c, &mut now, COMPARISON_MS + 1, chunks_faster);
        assert_eq!(c.stats().comparisons, 2);
        assert_eq!(c.mode(), HandOver::InChunks);
        assert_eq!(c.stats().chose_at_once, 1);
    }

    #[test]
    fn a_small_difference_keeps_the_mode_in_use_and_a_light_load_goes_back_to_chunks() {
        let mut now = Instant::now();
        let mut c = HandOverChooser::new(now);
        // 2% better at once: within the margin.
        run(&mut c, &mut now, COMPARISON_MS, rates(51_000, 50_000));
        assert_eq!(c.mode(), HandOver::InChunks);
        // At once wins by far, then the load falls to 3,000 operations a
        // second (twice as fast at once): too few to tell, back to chunks.
        run(&mut c, &mut now, KEEP_MS, |_| 0);
        run(&mut c, &mut now, COMPARISON_MS + 1, rates(90_000, 50_000));
        assert_eq!(c.mode(), HandOver::AtOnce);
        run(&mut c, &mut now, KEEP_MS, |_| 0);
        run(&mut c, &mut now, COMPARISON_MS + 1, rates(6_000, 3_000));
        assert_eq!(c.stats().comparisons, 3);
        assert_eq!(c.mode(), HandOver::InChunks);
    }

    #[test]
    fn a_light_load_never_runs_at_once() {
        let mut now = Instant::now();
        let mut c = HandOverChooser::new(now);
        for _ in 0..10 * (KEEP_MS + COMPARISON_MS) {
            now += Duration::from_millis(1);
            c.record(3, now);
            assert_eq!(c.mode(), HandOver::InChunks);
        }
        assert!(c.stats().comparisons >= 10);
    }

    #[test]
    fn a_pass_longer_than_a_slice_still_ends_it_and_an_idle_gap_voids_the_comparison() {
        let mut now = Instant::now();
        let mut c = HandOverChooser::new(now);
        now += SLICE * 3;
        c.record(10_000, now);
        assert_eq!(c.mode(), HandOver::AtOnce);
        // Nothing completes for a second, then a slow slice would look
        // like at once losing: the comparison starts over instead.
        now += Duration::from_secs(1);
        c.record(1_000, now);
        assert_eq!(c.mode(), HandOver::InChunks);
        run(&mut c, &mut now, COMPARISON_MS + 1, rates(60_000, 40_000));
        assert_eq!(c.stats().comparisons, 1);
        assert_eq!(c.mode(), HandOver::AtOnce);
    }
}
