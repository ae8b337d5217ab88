//! A landing ring that does not fit under RLIMIT_MEMLOCK fails at start
//! with an error naming the limit, the setting and the fix. (Its own test
//! binary: it lowers the process's limit.)

use std::time::Duration;

use rdma::{connect, ChannelConfig, TOKEN_BYTES};

#[test]
fn a_ring_above_rlimit_memlock_is_refused_with_the_fix() {
    let lim = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: libc::RLIM_INFINITY,
    };
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit on this test process.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut old), 0);
        let lim = libc::rlimit {
            rlim_max: old.rlim_max,
            ..lim
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim), 0);
    }
    let c = ChannelConfig {
        provider: "tcp".into(),
        ring_bytes: 4 << 20,
        wait_fd: false,
    };
    let e = match connect(
        &c,
        "127.0.0.1:9".parse().unwrap(),
        &[0; TOKEN_BYTES],
        Duration::from_secs(1),
    ) {
        Ok(_) => panic!("a channel above the limit was created"),
        Err(e) => e,
    };
    println!("{e}");
    assert!(e.contains("RLIMIT_MEMLOCK"), "{e}");
    assert!(e.contains("link.fabric_ring_bytes"), "{e}");
    assert!(e.contains("LimitMEMLOCK"), "{e}");
    assert_eq!(rdma::mem::memlock_limit().unwrap(), Some(1 << 20));
}
