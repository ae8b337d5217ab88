//! The poll loop shared by the mirrored and the standalone reactor.

use super::*;

/// What the poll loop drives: the mirrored reactor and the standalone one.
pub(super) trait Polled {
    fn shared(&self) -> &Shared;
    /// One pass over every source of work; whether anything happened.
    fn iteration(&mut self) -> bool;
    /// Nothing in flight on the disk: stopping may finish.
    fn drained(&self) -> bool;
    /// Sleep until one of the thread's fds, or `extra` (a hosted
    /// connection reactor's), has work (see [`sleep_on`]).
    fn sleep(&mut self, extra: Option<RawFd>);
}

/// The reactor loop. `busy` spins; `adaptive` polls `spin_us` after the
/// last work, yielding the core to any other ready thread between passes,
/// then sleeps. On stop it runs until the disk work drains (at most
/// 5 s more).
pub(super) fn poll_loop(p: &mut impl Polled, mode: PollMode, spin_us: u64) {
    let spin = Duration::from_micros(spin_us);
    let mut last_work = Instant::now();
    let mut stopping_since: Option<Instant> = None;
    let mut hosted: Option<netreactor::Hosted> = None;
    let mut clock = netreactor::PassClock::new();
    let mut did = false;
    loop {
        let now = clock.pass(did, &p.shared().load);
        if p.shared().hosted_new.swap(false, Ordering::AcqRel) {
            hosted = p.shared().hosted.lock().unwrap().take();
        }
        // Connections first: the requests they receive are taken by the
        // core in the same pass.
        did = hosted.as_mut().is_some_and(|h| h.poll());
        did |= p.iteration();
        if p.shared().stop.load(Ordering::Acquire) {
            let since = *stopping_since.get_or_insert_with(Instant::now);
            if p.drained() || since.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
        if did {
            last_work = now;
            continue;
        }
        if netreactor::Idle::after(mode == PollMode::Busy, now.duration_since(last_work), spin)
            .pause()
        {
            continue;
        }
        let extra = match hosted.as_mut().map(|h| h.prepare_sleep()) {
            None => None,
            Some(Some(fd)) => Some(fd),
            // Work arrived for the hosted connections: no sleep.
            Some(None) => continue,
        };
        let sh = p.shared();
        sh.sleeping.store(true, Ordering::Release);
        // A host op posted before `sleeping` was set would not wake us.
        if sh.mailbox.is_empty() && !sh.stop.load(Ordering::Acquire) {
            p.sleep(extra);
        }
        p.shared().sleeping.store(false, Ordering::Release);
        if let Some(h) = hosted.as_mut() {
            h.woke();
        }
        last_work = Instant::now() - spin;
    }
    // Dropping the hosted reactor closes its connections.
    drop(hosted);
}

/// Sleeps for at most `timeout_ms` until a backend operation completes or
/// one of `fds` is ready, then drains those of the eventfds `drain` that
/// were written. With io_uring the sleep is inside the backend's
/// io_uring_enter: one system call. A poll(2) on the fds and the backend's
/// `wait_fd` only for a backend without a wait of its own (memory, faults
/// over memory) or when the ring had no room for the polls. No sleep at
/// all while the backend holds completions that signal no fd.
pub(super) fn sleep_on<B: Backend>(
    backend: &mut B,
    fds: &[(RawFd, bool)],
    drain: &[&EventFd],
    timeout_ms: u64,
) {
    if backend.has_ready() {
        return;
    }
    if backend.wait(fds, timeout_ms) {
        // Drain only the eventfds that were written: no read on the rest.
        for e in drain {
            if backend.take_fired(e.fd()) {
                e.drain();
            }
        }
    } else {
        let mut all = fds.to_vec();
        all.extend(backend.wait_fd().map(|fd| (fd, false)));
        poll_fds(&all, timeout_ms as i32);
        for e in drain {
            e.drain();
        }
    }
}
