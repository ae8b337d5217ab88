//! Task management, session reinstatement and reservations across sessions.

mod common;

use common::*;
use iscsi_target::{pdu, pdu::Pdu};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn tmf(i: &mut Initiator, func: u8, rtt: u32) -> Pdu {
    let mut p = Pdu::new(pdu::OP_TMF_REQ);
    p.bhs[0] |= 0x40;
    p.bhs[1] = 0x80 | func;
    i.itt += 1;
    p.set_u32(16, i.itt);
    p.set_u32(20, rtt);
    p.set_u32(24, i.cmd_sn);
    p.set_u32(28, i.exp_stat_sn);
    i.send(&mut p);
    let r = i.recv().expect("TMF response");
    assert_eq!(r.opcode(), pdu::OP_TMF_RESP);
    r
}

#[test]
fn abort_task_waiting_for_data_never_writes() {
    let (t, vol) = target(|_| {});
    let mut i = Initiator::connect(t.local_addr());
    i.login(&[]);
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[8] = 2;
    let mut p = i.cmd_pdu(&cdb, 1024, false, true);
    let itt = p.itt();
    i.send(&mut p);
    let r2t = i.recv().unwrap();
    assert_eq!(r2t.opcode(), pdu::OP_R2T);
    let r = tmf(&mut i, 1, itt);
    assert_eq!(r.bhs[2], 0, "function complete");
    // Late Data-Out for the aborted task is discarded.
    let mut d = Pdu::new(pdu::OP_DATA_OUT);
    d.bhs[1] = 0x80;
    d.set_u32(16, itt);
    d.set_u32(20, r2t.u32_at(20));
    d.data = vec![5; 1024];
    i.send(&mut d);
    i.s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(i.recv().is_none(), "no response for an aborted task");
    i.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(vol.writes.load(Ordering::Relaxed), 0);
    // Unknown task: "task does not exist".
    assert_eq!(tmf(&mut i, 1, 0xdead).bhs[2], 1);
    assert_eq!(i.tur().status, 0);
    t.shutdown();
}

#[test]
fn lun_reset_raises_unit_attention_on_every_nexus() {
    let (t, _vol) = target(|_| {});
    let mut a = Initiator::connect(t.local_addr());
    a.login(&[]);
    let mut b = Initiator::connect(t.local_addr());
    b.isid[5] = 2;
    b.login(&[]);
    assert_eq!(a.tur().status, 0);
    assert_eq!(b.tur().status, 0);
    assert_eq!(tmf(&mut a, 5, pdu::RSVD_TAG).bhs[2], 0);
    assert_eq!(b.tur().key_asc(), (6, 0x29, 0x03));
    assert_eq!(a.tur().key_asc(), (6, 0x29, 0x03));
    assert_eq!(b.tur().status, 0);
    t.shutdown();
}

/// A LUN reset on one session aborts the tasks of the others (each on its
/// own connection, possibly on another reactor): a write there that waits
/// for its Data-Out never reaches the volume and gets no response.
#[test]
fn lun_reset_on_one_session_aborts_the_tasks_of_another() {
    let (t, vol) = target(|_| {});
    let mut a = Initiator::connect(t.local_addr());
    a.login(&[]);
    let mut b = Initiator::connect(t.local_addr());
    b.isid[5] = 2;
    b.login(&[]);
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[8] = 2;
    let mut p = b.cmd_pdu(&cdb, 1024, false, true);
    let itt = p.itt();
    b.send(&mut p);
    let r2t = b.recv().unwrap();
    assert_eq!(r2t.opcode(), pdu::OP_R2T);
    assert_eq!(tmf(&mut a, 5, pdu::RSVD_TAG).bhs[2], 0);
    // The reset is done before its response: b's write is gone.
    let mut d = Pdu::new(pdu::OP_DATA_OUT);
    d.bhs[1] = 0x80;
    d.set_u32(16, itt);
    d.set_u32(20, r2t.u32_at(20));
    d.data = vec![5; 1024];
    b.send(&mut d);
    b.s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(b.recv().is_none(), "no response for an aborted task");
    b.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(vol.writes.load(Ordering::Relaxed), 0);
    assert_eq!(b.tur().key_asc(), (6, 0x29, 0x03));
    assert_eq!(b.write10(0, &[1; 512]).status, 0);
    assert_eq!(vol.writes.load(Ordering::Relaxed), 1);
    t.shutdown();
}

#[test]
fn reserve6_conflicts_and_is_released_with_the_session() {
    let (t, vol) = target(|_| {});
    let mut a = Initiator::connect(t.local_addr());
    a.login(&[]);
    let mut b = Initiator::connect(t.local_addr());
    b.isid[5] = 2;
    b.login(&[]);
    assert_eq!(a.scsi(&[0x16, 0, 0, 0, 0, 0], &[], 0).status, 0);
    assert_eq!(b.write10(0, &[1; 512]).status, 0x18, "reservation conflict");
    assert_eq!(vol.writes.load(Ordering::Relaxed), 0);
    a.logout();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(b.write10(0, &[1; 512]).status, 0);
    t.shutdown();
}

#[test]
fn a_new_login_with_the_same_isid_reinstates_the_session() {
    let (t, _vol) = target(|_| {});
    let mut a = Initiator::connect(t.local_addr());
    a.login(&[]);
    let mut b = Initiator::connect(t.local_addr());
    b.login(&[]);
    assert!(a.closed(), "the old connection is closed");
    assert_eq!(b.tur().status, 0);
    t.shutdown();
}

#[test]
fn persistent_reservation_write_exclusive() {
    let (t, vol) = target(|_| {});
    let mut a = Initiator::connect(t.local_addr());
    a.login(&[]);
    let mut b = Initiator::connect(t.local_addr());
    b.isid[5] = 2;
    b.login(&[]);
    let prout = |i: &mut Initiator, sa: u8, ty: u8, key: u64, sa_key: u64| {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x5f;
        cdb[1] = sa;
        cdb[2] = ty;
        cdb[8] = 24;
        let mut param = vec![0u8; 24];
        param[0..8].copy_from_slice(&key.to_be_bytes());
        param[8..16].copy_from_slice(&sa_key.to_be_bytes());
        i.scsi(&cdb, &param, 0).status
    };
    assert_eq!(prout(&mut a, 0, 0, 0, 0xaa), 0); // REGISTER
    assert_eq!(prout(&mut b, 0, 0, 0, 0xbb), 0);
    assert_eq!(prout(&mut a, 1, 1, 0xaa, 0), 0); // RESERVE, Write Exclusive
    let before = vol.writes.load(Ordering::Relaxed);
    assert_eq!(b.write10(0, &[2; 512]).status, 0x18);
    assert_eq!(b.read10(0, 1).status, 0, "reads are allowed under WE");
    assert_eq!(vol.writes.load(Ordering::Relaxed), before);
    assert_eq!(a.write10(0, &[2; 512]).status, 0);
    // PREEMPT by b removes a's registration and takes the reservation.
    assert_eq!(prout(&mut b, 4, 1, 0xbb, 0xaa), 0);
    assert_eq!(a.write10(0, &[3; 512]).status, 0x18);
    assert_eq!(b.write10(0, &[3; 512]).status, 0);
    // READ KEYS lists only b's key now.
    let mut cdb = [0u8; 10];
    cdb[0] = 0x5e;
    cdb[8] = 64;
    let r = b.scsi(&cdb, &[], 64);
    assert_eq!(&r.data[4..8], &8u32.to_be_bytes());
    assert_eq!(&r.data[8..16], &0xbbu64.to_be_bytes());
    t.shutdown();
}

/// The reservations live in the volume's replicated state: a new logical
/// unit on the same volume (a restart, or the peer after a failover) finds
/// them, and a change is refused on a standby port.
#[test]
fn persistent_reservations_are_kept_in_the_volume() {
    let (t, vol) = target(|_| {});
    let mut a = Initiator::connect(t.local_addr());
    a.login(&[]);
    let prout = |i: &mut Initiator, sa: u8, ty: u8, key: u64, sa_key: u64| {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x5f;
        cdb[1] = sa;
        cdb[2] = ty;
        cdb[8] = 24;
        let mut param = vec![0u8; 24];
        param[0..8].copy_from_slice(&key.to_be_bytes());
        param[8..16].copy_from_slice(&sa_key.to_be_bytes());
        i.scsi(&cdb, &param, 0)
    };
    assert_eq!(prout(&mut a, 0, 0, 0, 0xaa).status, 0);
    assert_eq!(prout(&mut a, 1, 1, 0xaa, 0).status, 0);
    assert!(volume::Volume::persistent_state(&*vol).is_some());
    a.logout();
    t.shutdown();
    // A new target on the same volume: the registration and the
    // reservation are there.
    let t = iscsi_target::start(
        iscsi_target::IscsiConfig::new("127.0.0.1:0".parse().unwrap(), IQN),
        vol.clone(),
    )
    .unwrap();
    let mut b = Initiator::connect(t.local_addr());
    b.isid[5] = 2;
    b.login(&[]);
    assert_eq!(b.write10(0, &[1; 512]).status, 0x18, "reservation kept");
    let mut cdb = [0u8; 10];
    cdb[0] = 0x5e;
    cdb[1] = 1; // READ RESERVATION
    cdb[8] = 64;
    let r = b.scsi(&cdb, &[], 64);
    assert_eq!(&r.data[8..16], &0xaau64.to_be_bytes());
    assert_eq!(r.data[21], 1);
    // Standby: PR IN answers from the mirrored state, PR OUT is refused.
    vol.path.set(volume::PathState::Inaccessible);
    let _ = b.tur(); // the path-change unit attention
    let r = b.scsi(&cdb, &[], 64);
    assert_eq!(r.status, 0);
    assert_eq!(&r.data[8..16], &0xaau64.to_be_bytes());
    let r = prout(&mut b, 0, 0, 0, 0xbb);
    assert_eq!(r.status, 2);
    assert_eq!(r.key_asc(), (2, 0x04, 0x0b));
    t.shutdown();
}
