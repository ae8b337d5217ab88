//! End-to-end: the initiator against the target over 127.0.0.1.

mod common;
use common::*;
use nvme_host::initiator::{Controller, HostError};
use nvme_target::pdu::Digests;
use nvme_target::spec::*;

#[test]
fn connect_identify_and_io_with_verification() {
    let vol = mem(512, 8192);
    let t = serve(vol.clone());
    let c = connect(&t);
    assert_eq!(c.id.subnqn, NQN);
    assert_eq!(c.id.cntrltype, 1);
    assert_eq!(c.id.cmic & 0x0B, 0x0B);
    assert_eq!(c.id.mdts_bytes, 1 << 20);
    assert_eq!(c.id.ioccsz, (64 + 8192) / 16);
    assert_eq!(c.id.oaes & AEN_ANA_CHANGE, AEN_ANA_CHANGE);
    let ns = c.ns.clone().unwrap();
    assert_eq!(
        (ns.block_size, ns.num_blocks, ns.nmic, ns.anagrpid),
        (512, 8192, 1, 1)
    );
    assert_eq!(ns.nguid, *b"deltamirror-mem!");
    assert_eq!(ns.uuid, Some(*b"deltamirror-mem!"));
    let cap = c.property_get(PROP_CAP).unwrap();
    assert_eq!(cap & 0xFFFF, 127);
    assert_eq!(c.property_get(PROP_VS).unwrap(), 0x10400);

    // In-capsule write (4 KiB), R2T write (64 KiB), reads back.
    let small = pattern(1, 4096);
    c.write(8, small.clone(), false).unwrap();
    assert_eq!(c.read(8, 8).unwrap(), small);
    let big = pattern(2, 64 * 1024);
    c.write(100, big.clone(), true).unwrap();
    assert_eq!(c.read(100, 128).unwrap(), big);
    // A read larger than one C2HData PDU (128 KiB).
    let huge = pattern(3, 512 * 1024);
    c.write(1024, huge.clone(), false).unwrap();
    assert_eq!(c.read(1024, 1024).unwrap(), huge);
    c.flush().unwrap();
    c.write_zeroes(100, 16).unwrap();
    let r = c.read(100, 128).unwrap();
    assert!(r[..8192].iter().all(|&b| b == 0));
    assert_eq!(&r[8192..], &big[8192..]);
    c.deallocate(&[(8, 8), (1024, 4)]).unwrap();
    assert!(c.read(8, 8).unwrap().iter().all(|&b| b == 0));
    assert_eq!(c.read(1028, 4).unwrap(), huge[2048..4096]);
    let w = writes(&vol);
    // Out of range and over MDTS.
    match c.read(8190, 4) {
        Err(HostError::Status(s)) => assert_eq!(s, SC_LBA_OUT_OF_RANGE),
        r => panic!("{r:?}"),
    }
    match c.write(0, vec![1; 2 << 20], false) {
        Err(HostError::Status(s)) => assert_eq!(s, SC_INVALID_FIELD),
        r => panic!("{r:?}"),
    }
    assert_eq!(writes(&vol), w);
    c.disconnect();
    t.shutdown();
}

#[test]
fn digests_on() {
    let vol = mem(4096, 1024);
    let t = serve(vol);
    let mut h = host();
    h.digests = Digests {
        header: true,
        data: true,
    };
    let c = Controller::connect(t.local_addr(), &h).unwrap();
    let d = pattern(9, 256 * 1024);
    c.write(3, d.clone(), false).unwrap();
    assert_eq!(c.read(3, 64).unwrap(), d);
    c.disconnect();
    t.shutdown();
}

#[test]
fn two_targets_share_identity_with_distinct_controller_ids() {
    let (a, b) = NodeVol::pair(512, 4096);
    let ta = serve(a.clone());
    let tb = serve(b.clone());
    let ca = connect(&ta);
    let cb = connect(&tb);
    assert_ne!(ca.cntlid, cb.cntlid);
    assert!(cb.cntlid >= 0x8000 && ca.cntlid < 0x8000);
    let (na, nb) = (ca.ns.clone().unwrap(), cb.ns.clone().unwrap());
    assert_eq!(na.nguid, nb.nguid);
    assert_eq!(na.uuid, nb.uuid);
    assert_eq!(ca.id.serial, cb.id.serial);
    assert_eq!(ca.ana_log().unwrap().state_of(1), Some(ANA_OPTIMIZED));
    assert_eq!(cb.ana_log().unwrap().state_of(1), Some(ANA_INACCESSIBLE));
    // I/O on the inaccessible path: ANA Inaccessible status, no write.
    let w = writes(&a.inner);
    match cb.write(0, vec![7; 512], false) {
        Err(HostError::Status(s)) => assert_eq!(s, SC_ANA_INACCESSIBLE),
        r => panic!("{r:?}"),
    }
    match cb.read(0, 1) {
        Err(HostError::Status(s)) => assert_eq!(s, SC_ANA_INACCESSIBLE),
        r => panic!("{r:?}"),
    }
    assert_eq!(writes(&a.inner), w);
    ca.disconnect();
    cb.disconnect();
    ta.shutdown();
    tb.shutdown();
}

#[test]
fn ana_change_sends_async_event_and_log_follows() {
    let vol = mem(512, 1024);
    let t = serve(vol.clone());
    let c = connect(&t);
    let before = c.ana_log().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    c.enable_ana_events(std::sync::Arc::new(move |dw0| {
        let _ = tx.lock().unwrap().send(dw0);
    }))
    .unwrap();
    vol.path.set(volume::PathState::Inaccessible);
    let dw0 = rx
        .recv_timeout(std::time::Duration::from_secs(2))
        .expect("ANA AEN");
    assert_eq!(dw0, AER_ANA_CHANGE_DW0);
    let after = c.ana_log().unwrap();
    assert_eq!(after.state_of(1), Some(ANA_INACCESSIBLE));
    assert!(after.chgcnt > before.chgcnt);
    vol.path.set(volume::PathState::Optimized);
    rx.recv_timeout(std::time::Duration::from_secs(2))
        .expect("second ANA AEN after the log was read");
    assert_eq!(c.ana_log().unwrap().state_of(1), Some(ANA_OPTIMIZED));
    c.disconnect();
    t.shutdown();
}

#[test]
fn discovery_log_lists_both_ports() {
    let vol = mem(512, 64);
    let mut cf = cfg();
    cf.discovery_ports = vec![
        nvme_target::DiscoveryPort {
            addr: "127.0.0.1:4420".parse().unwrap(),
            port_id: 1,
        },
        nvme_target::DiscoveryPort {
            addr: "127.0.0.1:4421".parse().unwrap(),
            port_id: 2,
        },
    ];
    let t = nvme_target::start(cf, vol).unwrap();
    let mut h = host();
    h.subnqn = DISCOVERY_NQN.into();
    h.kato_ms = 0;
    let c = Controller::connect(t.local_addr(), &h).unwrap();
    assert_eq!(c.id.cntrltype, 2);
    let log = c.discovery_log().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(
        (
            log[0].trsvcid.as_str(),
            log[0].portid,
            log[0].trtype,
            log[0].subtype
        ),
        ("4420", 1, 3, 2)
    );
    assert_eq!((log[1].trsvcid.as_str(), log[1].portid), ("4421", 2));
    assert!(log
        .iter()
        .all(|e| e.subnqn == NQN && e.traddr == "127.0.0.1" && e.cntlid == 0xFFFF));
    c.disconnect();
    t.shutdown();
}

#[test]
fn host_allow_list_refuses_unknown_host() {
    let vol = mem(512, 64);
    let mut cf = cfg();
    cf.allowed_hosts = vec!["nqn.2014-08.org.nvmexpress:uuid:allowed".into()];
    let t = nvme_target::start(cf, vol).unwrap();
    match Controller::connect(t.local_addr(), &host()) {
        Err(HostError::Status(s)) => assert_eq!(s, SC_CONNECT_INVALID_HOST),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("connected"),
    }
    let mut h = host();
    h.hostnqn = "nqn.2014-08.org.nvmexpress:uuid:allowed".into();
    Controller::connect(t.local_addr(), &h)
        .unwrap()
        .disconnect();
    t.shutdown();
}

#[test]
fn keep_alive_timeout_ends_the_controller() {
    let vol = mem(512, 64);
    let t = serve(vol);
    let mut h = host();
    h.kato_ms = 300;
    h.send_keep_alive = false;
    let c = Controller::connect(t.local_addr(), &h).unwrap();
    assert_eq!(t.controller_count(), 1);
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert_eq!(t.controller_count(), 0);
    assert!(c.admin.is_dead() && c.io[0].is_dead());
    assert!(c.read(0, 1).is_err());
    // With keep-alives the controller lives on.
    h.send_keep_alive = true;
    let c2 = Controller::connect(t.local_addr(), &h).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert_eq!(t.controller_count(), 1);
    c2.read(0, 1).unwrap();
    c2.disconnect();
    t.shutdown();
}

#[test]
fn pipelined_io_with_verification_and_several_queues() {
    let vol = mem(4096, 4096);
    let t = serve(vol);
    let mut h = host();
    h.io_queues = 2;
    h.queue_depth = 16;
    let c = Controller::connect(t.local_addr(), &h).unwrap();
    assert_eq!(c.io.len(), 2);
    let spec = nvme_host::load::IoSpec {
        rw: nvme_host::load::Rw::RandRw,
        block_bytes: 8192,
        queue_depth: 32,
        duration: std::time::Duration::from_millis(500),
        region_bytes: 4 << 20,
        verify: true,
        seed: 7,
    };
    let r = nvme_host::load::run_io(&c, &spec).unwrap();
    assert!(r.ops > 100, "{r}");
    assert_eq!((r.errors, r.verify_errors), (0, 0), "{r}");
    assert!(r.verified_chunks > 0);
    c.disconnect();
    t.shutdown();
}

/// A polled I/O queue (no reader thread: the submitting thread reads the
/// socket) carries the same load: small writes in-capsule, large ones
/// through R2T/H2CData answered from `poll`, reads, and the read-back.
#[test]
fn a_polled_io_queue_runs_verified_io_without_a_reader_thread() {
    let vol = mem(4096, 16384);
    let t = serve(vol);
    let mut h = host();
    h.polled_io = true;
    h.queue_depth = 16;
    let c = Controller::connect(t.local_addr(), &h).unwrap();
    assert!(c.io[0].is_polled() && !c.admin.is_polled());
    for (bs, rw) in [
        (4096, nvme_host::load::Rw::RandRw),
        (256 << 10, nvme_host::load::Rw::RandRw),
    ] {
        let spec = nvme_host::load::IoSpec {
            rw,
            block_bytes: bs,
            queue_depth: 16,
            duration: std::time::Duration::from_millis(300),
            region_bytes: 16 << 20,
            verify: true,
            seed: 11,
        };
        let r = nvme_host::load::run_io(&c, &spec).unwrap();
        assert!(r.ops > 16, "{r}");
        assert_eq!((r.errors, r.verify_errors), (0, 0), "{r}");
        assert!(r.verified_chunks > 0, "{r}");
    }
    // Single commands wait by polling too.
    let d = pattern(9, 8192);
    c.write(3, d.clone(), false).unwrap();
    assert_eq!(c.read(3, 2).unwrap(), d);
    assert!(matches!(c.read(16383, 2), Err(HostError::Status(s)) if s == SC_LBA_OUT_OF_RANGE));
    c.disconnect();
    t.shutdown();
}

/// The initiator's multipath logic alone: both targets export one shared
/// in-memory volume and a thread flips their ANA states, so the data cannot
/// be lost here by construction. What this checks is the host side: it
/// follows every flip, retries the writes refused on the inaccessible path,
/// and never lets an older write to a chunk land after a newer one (the
/// read-back finds each chunk's latest acknowledged data). Durability across
/// a real failover, planned and kill -9, is tests/pair.rs test f, on two
/// mirrored `deltamirror serve` processes.
#[test]
fn initiator_follows_ana_flips_between_two_targets_of_one_volume() {
    let (a, b) = NodeVol::pair(512, 8192);
    let ta = serve(a.clone());
    let tb = serve(b.clone());
    let paths = [ta.local_addr(), tb.local_addr()];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
        std::thread::spawn(move || {
            use volume::PathState::*;
            for i in 0..4 {
                std::thread::sleep(std::time::Duration::from_millis(250));
                // Demote the primary, then promote the backup.
                let (old, new) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
                old.path.set(Inaccessible);
                std::thread::sleep(std::time::Duration::from_millis(20));
                new.path.set(Optimized);
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
            stop.store(true, std::sync::atomic::Ordering::Release);
        })
    };
    let r = nvme_host::load::run_failover(&paths, &host(), 8, 4096, 2 << 20, stop).unwrap();
    flipper.join().unwrap();
    assert_eq!(r.lost_writes, 0, "{r}");
    assert!(r.writes_completed > 100, "{r}");
    assert!(r.path_switches >= 3, "{r}");
    assert!(r.writes_retried > 0 || r.ana_events > 0, "{r}");
    ta.shutdown();
    tb.shutdown();
}

#[test]
fn many_large_writes_in_flight_wait_for_r2t_budget() {
    let vol = mem(4096, 16384);
    let t = serve(vol);
    let mut h = host();
    h.queue_depth = 32;
    let c = Controller::connect(t.local_addr(), &h).unwrap();
    let spec = nvme_host::load::IoSpec {
        rw: nvme_host::load::Rw::RandWrite,
        block_bytes: 1 << 20,
        queue_depth: 32,
        duration: std::time::Duration::from_millis(300),
        region_bytes: 64 << 20,
        verify: true,
        seed: 3,
    };
    let r = nvme_host::load::run_io(&c, &spec).unwrap();
    assert!(r.ops >= 32, "{r}");
    assert_eq!((r.errors, r.verify_errors), (0, 0), "{r}");
    c.disconnect();
    t.shutdown();
}

#[test]
fn sq_flow_control_disabled_reads_end_with_c2h_success() {
    let vol = mem(512, 4096);
    let t = serve(vol);
    let mut h = host();
    h.disable_sqflow = true;
    h.digests = Digests {
        header: true,
        data: false,
    };
    let c = Controller::connect(t.local_addr(), &h).unwrap();
    let d = pattern(5, 300 * 1024);
    c.write(10, d.clone(), false).unwrap();
    assert_eq!(c.read(10, 600).unwrap(), d);
    // Errors still come back as CapsuleResp.
    assert!(matches!(c.read(4095, 2), Err(HostError::Status(s)) if s == SC_LBA_OUT_OF_RANGE));
    c.disconnect();
    t.shutdown();
}
