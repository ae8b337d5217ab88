//! The fabric channel over libfabric's tcp provider on loopback: records
//! both ways across many ring wraps, credit, the wait fd, and refusal of
//! peers that did not take part in the handshake.

use std::net::SocketAddr;
use std::time::Duration;

use rdma::{connect, Channel, ChannelConfig, Listener, TOKEN_BYTES};

fn cfg(ring: usize, wait_fd: bool) -> ChannelConfig {
    ChannelConfig {
        provider: "tcp".into(),
        ring_bytes: ring,
        wait_fd,
    }
}

fn listener() -> (Listener, SocketAddr) {
    let l = Listener::bind("tcp", "127.0.0.1:0".parse().unwrap()).unwrap();
    let port = l.port().unwrap();
    (l, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A connected pair (dialer, acceptor) with landing rings exchanged, as the
/// engine's handshake does over its authenticated TCP socket.
fn pair(c: &ChannelConfig, token: [u8; TOKEN_BYTES]) -> (Channel, Channel) {
    let (l, addr) = listener();
    let c2 = c.clone();
    let t = std::thread::spawn(move || connect(&c2, addr, &token, Duration::from_secs(5)));
    let mut refused = Vec::new();
    let mut b = l
        .accept(c, &token, Duration::from_secs(5), &mut refused)
        .unwrap();
    let mut a = t.join().unwrap().unwrap();
    assert!(refused.is_empty());
    a.set_peer(b.local_ring()).unwrap();
    b.set_peer(a.local_ring()).unwrap();
    (a, b)
}

fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i as usize * 31 + j) as u8).collect()
}

#[test]
fn records_cross_both_ways_in_order_over_many_ring_wraps() {
    let ring = 64 * 1024;
    let (mut a, mut b) = pair(&cfg(ring, false), [7; TOKEN_BYTES]);
    assert_ne!(a.local_ring().key, 0u64.wrapping_sub(1));
    let total = 2_000u64;
    let (mut sent_a, mut sent_b, mut got_a, mut got_b) = (0u64, 0u64, 0u64, 0u64);
    let mut bytes = 0usize;
    while got_a < total || got_b < total {
        // Sizes vary so records land at every offset and wrap often.
        while sent_a < total {
            let p = payload(sent_a, 100 + (sent_a as usize * 997) % 9000);
            if !a.send(&p).unwrap() {
                break;
            }
            bytes += p.len();
            sent_a += 1;
        }
        while sent_b < total {
            let p = payload(sent_b + 1_000_000, 1 + (sent_b as usize * 13) % 300);
            if !b.send(&p).unwrap() {
                break;
            }
            sent_b += 1;
        }
        b.poll(|r| {
            assert_eq!(r, &payload(got_b, 100 + (got_b as usize * 997) % 9000)[..]);
            got_b += 1;
        })
        .unwrap();
        a.poll(|r| {
            assert_eq!(
                r,
                &payload(got_a + 1_000_000, 1 + (got_a as usize * 13) % 300)[..]
            );
            got_a += 1;
        })
        .unwrap();
        a.send_credit_if_due().unwrap();
        b.send_credit_if_due().unwrap();
    }
    assert!(bytes > 20 * ring, "the ring wrapped many times");
    assert!(
        a.stats.credit_waits > 0,
        "the writer had to wait for credit"
    );
}

#[test]
fn a_one_way_stream_is_credited_by_empty_records() {
    let (mut a, mut b) = pair(&cfg(64 * 1024, false), [9; TOKEN_BYTES]);
    let (mut sent, mut got) = (0u64, 0u64);
    while got < 500 {
        while sent < 500 && a.send(&payload(sent, 4000)).unwrap() {
            sent += 1;
        }
        b.poll(|r| {
            assert_eq!(r, &payload(got, 4000)[..]);
            got += 1;
        })
        .unwrap();
        a.poll(|_| panic!("b sends no data")).unwrap();
        b.send_credit_if_due().unwrap();
    }
    assert!(b.stats.credit_records_sent > 0);
}

#[test]
fn the_wait_fd_wakes_a_sleeping_reader() {
    let (mut a, mut b) = pair(&cfg(64 * 1024, true), [3; TOKEN_BYTES]);
    let fd = b.wait_fd().expect("a wait fd");
    for round in 0..20u64 {
        // Drain, then sleep on the fd only when fi_trywait allows.
        b.poll(|_| {}).unwrap();
        assert!(a.send(&payload(round, 64)).unwrap());
        let mut got = None;
        while got.is_none() {
            if b.trywait().unwrap() {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let n = unsafe { libc::poll(&mut p, 1, 5_000) };
                assert_eq!(n, 1, "the wait fd signalled the write");
            }
            b.poll(|r| got = Some(r.to_vec())).unwrap();
            a.poll(|_| {}).unwrap();
        }
        assert_eq!(got.unwrap(), payload(round, 64));
    }
}

#[test]
fn connection_requests_without_the_handshake_token_are_rejected() {
    let (l, addr) = listener();
    let c = cfg(64 * 1024, false);
    let token = [5u8; TOKEN_BYTES];
    // A stray peer with no token, and one with a stale token.
    let c1 = c.clone();
    let stray = std::thread::spawn(move || {
        let none = connect(&c1, addr, &[], Duration::from_secs(3));
        let stale = connect(&c1, addr, &[4; TOKEN_BYTES], Duration::from_secs(3));
        (none.is_err(), stale.is_err())
    });
    // The legitimate peer comes after the strays.
    let c2 = c.clone();
    let good = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        connect(&c2, addr, &token, Duration::from_secs(5))
    });
    let mut refused = Vec::new();
    let mut b = l
        .accept(&c, &token, Duration::from_secs(10), &mut refused)
        .unwrap();
    let mut a = good.join().unwrap().unwrap();
    let (e1, e2) = stray.join().unwrap();
    assert!(e1 && e2, "both strays were refused");
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused.iter().all(|r| r.contains("nothing written")));
    assert!(
        refused[0].contains("without a handshake token"),
        "{refused:?}"
    );
    assert!(
        refused[1].contains("not the current handshake's"),
        "{refused:?}"
    );
    // The accepted connection works and its ring holds only its records.
    a.set_peer(b.local_ring()).unwrap();
    b.set_peer(a.local_ring()).unwrap();
    assert!(a.send(b"hello").unwrap());
    let mut got = Vec::new();
    while got.is_empty() {
        b.poll(|r| got.push(r.to_vec())).unwrap();
        a.poll(|_| {}).unwrap();
    }
    assert_eq!(got, vec![b"hello".to_vec()]);
    // Between handshakes, a stray request is rejected too.
    let c3 = c.clone();
    let late = std::thread::spawn(move || connect(&c3, addr, &token, Duration::from_secs(3)));
    let mut more = Vec::new();
    while more.is_empty() {
        l.reject_strays(&mut more);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(late.join().unwrap().is_err(), "a reused token is refused");
}

#[test]
fn a_write_with_the_key_of_an_earlier_connection_lands_nothing() {
    let c = cfg(64 * 1024, false);
    let (a1, b1) = pair(&c, [1; TOKEN_BYTES]);
    let old = b1.local_ring();
    drop(a1);
    drop(b1);
    let (mut a2, mut b2) = pair(&c, [2; TOKEN_BYTES]);
    assert_ne!(b2.local_ring().key, old.key, "a new key per connection");
    // The dialer aims at the old registration.
    a2.set_peer(rdma::RingDesc {
        addr: b2.local_ring().addr,
        len: old.len,
        key: old.key,
    })
    .unwrap();
    assert!(a2.send(b"stale").unwrap());
    let mut delivered = 0;
    let mut failed = None;
    for _ in 0..100_000 {
        match b2.poll(|_| delivered += 1) {
            Ok(_) => {}
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
        if let Err(e) = a2.poll(|_| {}) {
            failed = Some(e);
            break;
        }
    }
    println!("stale write: {failed:?}");
    assert_eq!(delivered, 0, "nothing was written into the landing ring");
    assert!(failed.is_some(), "the stale write failed");
}
