//! SCSI persistent reservations survive a failover (issue 11, item 9): two
//! real `deltamirror serve` processes; an iSCSI initiator (the project's
//! test client, which sends the PERSISTENT RESERVE OUT / IN CDBs as any
//! initiator does) registers two initiator ports and reserves through the
//! primary; the primary is killed with kill -9 and the backup promoted, then
//! a planned failover (demote, promote) goes back. After each, PERSISTENT
//! RESERVE IN on the new primary shows the registrations and the
//! reservation, and the non-holder's write gets RESERVATION CONFLICT.

mod common;
#[path = "../iscsi-target/tests/common/mod.rs"]
mod iscsi;

use common::{field, Pair};
use iscsi::Initiator;

const RESERVATION_CONFLICT: u8 = 0x18;
const WE: u8 = 1;
const EA: u8 = 3;

/// A formatted pair whose target IQN is the test client's.
fn pair(name: &str, port_offset: u16) -> Pair {
    Pair::new(name, port_offset, |_, toml| {
        let iqn = field(&toml, "iscsi", "target_iqn").to_string();
        toml.replace(&iqn, iscsi::IQN)
    })
}

/// `deltamirror CMD` on node `i`, which must succeed.
fn admin(p: &Pair, i: usize, cmd: &str) {
    let (ok, err) = p.admin_args(i, &[cmd]);
    assert!(ok, "{cmd} on node {}: {err}", i + 1);
}

/// Logs in to node `i`'s iSCSI portal as initiator port ISID `…0p`.
fn login(p: &Pair, i: usize, port: u8) -> Initiator {
    let mut ini = Initiator::connect(p.n[i].iscsi.parse().unwrap());
    ini.isid[5] = port;
    ini.login(&[]);
    // A new nexus may first see the path-change unit attention.
    for _ in 0..3 {
        if ini.tur().status == 0 {
            break;
        }
    }
    ini
}

/// The example configuration's block size.
const BS: usize = 4096;

/// WRITE(10) of one block filled with `v`; the status.
fn write_block(i: &mut Initiator, v: u8) -> u8 {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[8] = 1;
    i.scsi(&cdb, &[v; BS], 0).status
}

/// READ(10) of block 0: status and data.
fn read_block(i: &mut Initiator) -> (u8, Vec<u8>) {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[8] = 1;
    let r = i.scsi(&cdb, &[], BS as u32);
    (r.status, r.data)
}

/// PERSISTENT RESERVE OUT with a 24-byte parameter list; the status.
fn pr_out(i: &mut Initiator, sa: u8, ty: u8, key: u64, sa_key: u64) -> u8 {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x5f;
    cdb[1] = sa;
    cdb[2] = ty;
    cdb[8] = 24;
    let mut param = vec![0u8; 24];
    param[0..8].copy_from_slice(&key.to_be_bytes());
    param[8..16].copy_from_slice(&sa_key.to_be_bytes());
    let r = i.scsi(&cdb, &param, 0);
    assert_eq!(r.status, 0, "PR OUT {sa}: sense {:?}", r.key_asc());
    r.status
}

/// PERSISTENT RESERVE IN READ KEYS: (PRgeneration, keys).
fn read_keys(i: &mut Initiator) -> (u32, Vec<u64>) {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x5e;
    cdb[8] = 255;
    let r = i.scsi(&cdb, &[], 255);
    assert_eq!(r.status, 0, "READ KEYS: sense {:?}", r.key_asc());
    let gen = u32::from_be_bytes(r.data[0..4].try_into().unwrap());
    let n = u32::from_be_bytes(r.data[4..8].try_into().unwrap()) as usize;
    let mut keys: Vec<u64> = r.data[8..8 + n]
        .chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect();
    keys.sort();
    (gen, keys)
}

/// PERSISTENT RESERVE IN READ RESERVATION: (key, type) of the reservation.
fn read_reservation(i: &mut Initiator) -> Option<(u64, u8)> {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x5e;
    cdb[1] = 1;
    cdb[8] = 64;
    let r = i.scsi(&cdb, &[], 64);
    assert_eq!(r.status, 0, "READ RESERVATION: sense {:?}", r.key_asc());
    let n = u32::from_be_bytes(r.data[4..8].try_into().unwrap());
    (n >= 16).then(|| {
        (
            u64::from_be_bytes(r.data[8..16].try_into().unwrap()),
            r.data[21] & 0x0f,
        )
    })
}

#[test]
fn persistent_reservations_survive_failover() {
    let mut p = pair("pr-failover", 900);
    p.start(0);
    p.start(1);
    p.wait(1, "current backup", 60, |s| {
        s["role"] == "backup" && s["current"] == true && s["peer_state"] == "connected"
    });
    p.wait(0, "serving primary", 60, |s| s["serving"] == true);

    // Two initiator ports (a two-node cluster) register; the first
    // reserves Write Exclusive.
    let mut a = login(&p, 0, 1);
    let mut b = login(&p, 0, 2);
    pr_out(&mut a, 0, 0, 0, 0xaa); // REGISTER
    pr_out(&mut b, 0, 0, 0, 0xbb);
    pr_out(&mut a, 1, WE, 0xaa, 0); // RESERVE
    assert_eq!(write_block(&mut b, 2), RESERVATION_CONFLICT);
    let (gen, keys) = read_keys(&mut a);
    assert_eq!(keys, vec![0xaa, 0xbb]);
    drop((a, b));

    // Unplanned failover: kill -9 the primary, promote the backup.
    p.kill9(0);
    // As an operator would: promote once the backup saw its peer go (until
    // then it refuses, the peer being primary and connected).
    p.wait(1, "peer gone", 60, |s| s["peer_state"] != "connected");
    admin(&p, 1, "promote");
    p.wait(1, "serving after promote", 60, |s| s["serving"] == true);
    let mut a = login(&p, 1, 1);
    let mut b = login(&p, 1, 2);
    assert_eq!(
        read_keys(&mut b),
        (gen, vec![0xaa, 0xbb]),
        "registrations on the promoted node"
    );
    assert_eq!(
        read_reservation(&mut b),
        Some((0xaa, WE)),
        "reservation on the promoted node"
    );
    assert_eq!(
        write_block(&mut b, 3),
        RESERVATION_CONFLICT,
        "a non-holder's write after the failover"
    );
    assert_eq!(read_block(&mut b).0, 0, "reads are allowed under WE");
    assert_eq!(write_block(&mut a, 4), 0, "the holder writes");

    // The old primary returns as backup and catches up; a change made on the
    // new primary meanwhile (Exclusive Access now) travels too.
    p.start(0);
    p.wait(0, "current backup", 60, |s| {
        s["role"] == "backup" && s["current"] == true && s["peer_state"] == "connected"
    });
    pr_out(&mut a, 2, WE, 0xaa, 0); // RELEASE
    pr_out(&mut a, 1, EA, 0xaa, 0); // RESERVE, Exclusive Access
    drop((a, b));

    // Planned failover back: demote, promote.
    admin(&p, 1, "demote");
    p.wait(1, "demoted", 60, |s| s["role"] == "backup");
    p.wait(0, "current after demote", 60, |s| s["current"] == true);
    admin(&p, 0, "promote");
    p.wait(0, "serving after promote", 60, |s| s["serving"] == true);
    let mut a = login(&p, 0, 1);
    let mut b = login(&p, 0, 2);
    assert_eq!(read_keys(&mut b).1, vec![0xaa, 0xbb]);
    assert_eq!(read_reservation(&mut b), Some((0xaa, EA)));
    assert_eq!(write_block(&mut b, 5), RESERVATION_CONFLICT);
    assert_eq!(read_block(&mut b).0, RESERVATION_CONFLICT, "EA: no reads");
    assert_eq!(write_block(&mut a, 6), 0);
    let (st, data) = read_block(&mut a);
    assert_eq!(st, 0);
    assert!(data.len() == BS && data.iter().all(|&x| x == 6));
}
