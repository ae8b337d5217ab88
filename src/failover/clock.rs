//! The agent's clock: CLOCK_BOOTTIME in milliseconds. Monotonic like
//! CLOCK_MONOTONIC, but it also counts a suspended host's sleep, during
//! which etcd's clock runs on and the lease expires: a primary that wakes
//! up must know its lease is gone.

/// Milliseconds since boot, suspend included.
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the
    // call; CLOCK_BOOTTIME exists on every Linux this runs on (2.6.39+).
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(r, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    #[test]
    fn never_goes_back() {
        let mut last = super::now_ms();
        for _ in 0..1000 {
            let t = super::now_ms();
            assert!(t >= last);
            last = t;
        }
    }
}
