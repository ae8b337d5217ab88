//! The few kernel calls the reactor needs beyond std: an eventfd to wake a
//! sleeping reactor, poll(2) to sleep on several fds, random nonces, and the
//! resident set size for status.

use std::io;
use std::os::unix::io::RawFd;

/// A non-blocking eventfd.
pub struct EventFd(RawFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; the returned fd is owned here.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(EventFd(fd))
    }
    pub fn fd(&self) -> RawFd {
        self.0
    }
    pub fn notify(&self) {
        let v: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A full
        // counter (EAGAIN) still leaves the fd readable, which is all we need.
        unsafe { libc::write(self.0, &v as *const u64 as *const libc::c_void, 8) };
    }
    /// Clears the counter.
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our own non-blocking fd.
        unsafe { libc::read(self.0, &mut v as *mut u64 as *mut libc::c_void, 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: we own the fd and close it once.
        unsafe { libc::close(self.0) };
    }
}

/// Sleeps until one of `fds` is ready (POLLIN, plus POLLOUT where asked) or
/// `timeout_ms` passes. Returns the number of ready fds.
pub fn poll_fds(fds: &[(RawFd, bool)], timeout_ms: i32) -> usize {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, want_out)| libc::pollfd {
            fd,
            events: libc::POLLIN | if want_out { libc::POLLOUT } else { 0 },
            revents: 0,
        })
        .collect();
    // SAFETY: pfds is a live, correctly sized array of pollfd for the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    n.max(0) as usize
}

/// Cryptographically random bytes from the kernel.
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most buf.len() - done bytes into the live slice.
        let n = unsafe {
            libc::getrandom(
                buf[done..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - done,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Resident set size of this process in bytes (0 if unknown).
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    pages * page
}

/// Monotonic milliseconds since an arbitrary start.
pub fn now_ms(start: std::time::Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Release);
}

/// Installs SIGTERM/SIGINT handlers that set a flag; returns the flag.
pub fn stop_on_signals() -> &'static std::sync::atomic::AtomicBool {
    let handler = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
    &STOP
}

/// Sends SIGTERM to a process.
pub fn terminate(pid: u32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
}
