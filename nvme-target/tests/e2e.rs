//! End-to-end: the initiator against the target over 127.0.0.1.

mod common;
use common::*;
use nvme_target::initiator::{Controller, HostError};
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
