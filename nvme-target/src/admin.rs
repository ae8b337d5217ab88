//! Builders for the data structures admin commands return: Identify
//! Controller / Namespace / lists and descriptors, and the log pages
//! (error, SMART, firmware slot, changed namespaces, ANA, discovery).
//! Byte offsets follow the NVMe Base specification figures.

use crate::spec::*;
use crate::subsystem::{Ctrl, Shared};
use std::net::SocketAddr;
use volume::PathState;

pub const IDENTIFY_LEN: usize = 4096;
/// Admin submission queue size we accept (entries).
pub const ADMIN_QUEUE_ENTRIES: u16 = 32;
/// Asynchronous Event Request limit (AERL is 0's based).
pub const AER_LIMIT: usize = 4;
/// Abort command limit (ACL is 0's based).
pub const ABORT_LIMIT: u8 = 4;
/// Version 1.4.0 (VS property and VER field).
pub const NVME_VERSION: u32 = 0x0001_0400;
pub const FIRMWARE_REVISION: &str = "dm-0.1";

/// MDTS field: log2 of the maximum transfer in units of the minimum page
/// size (4 KiB).
pub fn mdts_field(mdts_bytes: u32) -> u8 {
    (mdts_bytes / 4096).max(1).trailing_zeros() as u8
}

pub fn identify_controller(sh: &Shared, ctrl: &Ctrl) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    let id = &sh.identity;
    // VID / SSVID stay 0: no PCI vendor.
    put_ascii(&mut b, 4, 20, &id.serial);
    put_ascii(&mut b, 24, 40, &id.model);
    put_ascii(&mut b, 64, 8, FIRMWARE_REVISION);
    b[72] = 0; // RAB
    if !ctrl.discovery {
        // CMIC: multi-port, multi-controller, ANA reporting.
        b[76] = 0x01 | 0x02 | 0x08;
    }
    b[77] = mdts_field(sh.mdts_bytes);
    put_u16(&mut b, 78, ctrl.cntlid);
    put_u32(&mut b, 80, NVME_VERSION);
    if !ctrl.discovery {
        put_u32(&mut b, 92, AEN_ANA_CHANGE); // OAES
    }
    put_u32(&mut b, 96, CTRATT_HOST_ID_128); // CTRATT
    b[111] = if ctrl.discovery { 2 } else { 1 }; // CNTRLTYPE
    put_u16(&mut b, 256, 0); // OACS: no optional admin commands
    b[258] = ABORT_LIMIT - 1; // ACL
    b[259] = AER_LIMIT as u8 - 1; // AERL
    b[260] = 0x02; // FRMW: one slot, slot 1 read only
    b[261] = 0x04; // LPA: extended data for Get Log Page
    b[262] = 0; // ELPE: one error log entry
    put_u16(&mut b, 266, 343); // WCTEMP (K)
    put_u16(&mut b, 268, 373); // CCTEMP (K)
    put_u16(&mut b, 320, 1); // KAS: keep alive granularity 100 ms
    if !ctrl.discovery {
        b[342] = 10; // ANATT: seconds
                     // ANACAP: optimized and inaccessible states reported, ANAGRPID
                     // does not change while attached, non-zero ANAGRPID supported.
        b[343] = 0x01 | 0x04 | 0x40 | 0x80;
        put_u32(&mut b, 344, sh.cfg.ana_group_id); // ANAGRPMAX
        put_u32(&mut b, 348, 1); // NANAGRPID
    }
    b[512] = 0x66; // SQES: 64 bytes
    b[513] = 0x44; // CQES: 16 bytes
    put_u16(&mut b, 514, sh.cfg.max_queue_depth); // MAXCMD
    if !ctrl.discovery {
        put_u32(&mut b, 516, 1); // NN
        put_u16(&mut b, 520, (1 << 2) | (1 << 3)); // ONCS: DSM, Write Zeroes
        b[525] = 0x01; // VWC: volatile write cache present (flush matters)
        put_u32(&mut b, 540, 1); // MNAN
    }
    // SGLS: SGLs supported, offsets in data block descriptors (in-capsule).
    put_u32(&mut b, 536, 1 | (1 << 20));
    let nqn = if ctrl.discovery {
        DISCOVERY_NQN
    } else {
        &sh.cfg.subnqn
    };
    put_str0(&mut b, 768, 256, nqn);
    // Fabrics: IOCCSZ / IORCSZ in 16-byte units, ICDOFF 0, MSDBD 1.
    put_u32(&mut b, 1792, (64 + sh.icd_bytes) / 16);
    put_u32(&mut b, 1796, 1);
    put_u16(&mut b, 1800, 0);
    b[1802] = 0; // CTRATTR: dynamic controller model
    b[1803] = 1; // MSDBD
                 // Power state 0 descriptor: maximum power 25.00 W (centiwatts).
    put_u16(&mut b, 2048, 2500);
    b
}

pub fn lba_shift(block_size: u32) -> u8 {
    block_size.trailing_zeros() as u8
}

pub fn identify_namespace(sh: &Shared) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    let g = sh.geometry;
    put_u64(&mut b, 0, g.num_blocks); // NSZE
    put_u64(&mut b, 8, g.num_blocks); // NCAP
    put_u64(&mut b, 16, g.num_blocks); // NUSE
    b[24] = 0; // NSFEAT
    b[25] = 0; // NLBAF: one format
    b[26] = 0; // FLBAS: format 0
    b[30] = 0x01; // NMIC: may be attached to several controllers (shared)
    put_u32(&mut b, 92, sh.cfg.ana_group_id); // ANAGRPID
    b[104..120].copy_from_slice(&sh.identity.uuid); // NGUID
                                                    // LBAF0: no metadata, LBADS, relative performance best.
    b[128 + 2] = lba_shift(g.block_size);
    b
}

/// Namespace identification descriptor list: NGUID, UUID and CSI (NVM).
pub fn ns_descriptors(sh: &Shared) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    let mut o = 0;
    for (nidt, nid) in [
        (2u8, &sh.identity.uuid[..]),
        (3u8, &sh.identity.uuid[..]),
        (4u8, &[0u8][..]),
    ] {
        b[o] = nidt;
        b[o + 1] = nid.len() as u8;
        b[o + 4..o + 4 + nid.len()].copy_from_slice(nid);
        o += 4 + nid.len();
    }
    b
}

/// Active namespace list: namespaces with an id greater than `nsid`.
pub fn active_ns_list(nsid: u32) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    if nsid < 1 {
        put_u32(&mut b, 0, 1);
    }
    b
}

pub fn ana_state(p: PathState) -> u8 {
    match p {
        PathState::Optimized => ANA_OPTIMIZED,
        PathState::Inaccessible => ANA_INACCESSIBLE,
    }
}

/// ANA log page: header (change count, group count) and one group
/// descriptor holding NSID 1. `groups_only` is LSP bit 0 (RGO).
pub fn ana_log(sh: &Shared, epoch: u64, state: PathState, groups_only: bool) -> Vec<u8> {
    let nnsid = if groups_only { 0 } else { 1 };
    let mut b = vec![0u8; 16 + 32 + 4 * nnsid];
    put_u64(&mut b, 0, epoch);
    put_u16(&mut b, 8, 1);
    put_u32(&mut b, 16, sh.cfg.ana_group_id);
    put_u32(&mut b, 20, nnsid as u32);
    put_u64(&mut b, 24, epoch);
    b[32] = ana_state(state);
    if nnsid == 1 {
        put_u32(&mut b, 48, 1);
    }
    b
}

pub fn error_log() -> Vec<u8> {
    vec![0u8; 64]
}

pub fn smart_log() -> Vec<u8> {
    let mut b = vec![0u8; 512];
    put_u16(&mut b, 1, 300); // composite temperature (K)
    b[3] = 100; // available spare
    b[4] = 10; // available spare threshold
    b
}

pub fn fw_slot_log() -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0] = 1; // AFI: slot 1 active
    put_ascii(&mut b, 8, 8, FIRMWARE_REVISION);
    b
}

pub fn changed_ns_log() -> Vec<u8> {
    vec![0u8; 4096]
}

/// Discovery log page: a 1024-byte header then one 1024-byte entry per
/// port that exports the NVM subsystem.
pub fn discovery_log(sh: &Shared, host_allowed: bool) -> Vec<u8> {
    let ports: Vec<(SocketAddr, u16)> = if !host_allowed {
        Vec::new()
    } else if sh.cfg.discovery_ports.is_empty() {
        vec![(sh.local_addr, sh.cfg.port_id)]
    } else {
        sh.cfg
            .discovery_ports
            .iter()
            .map(|p| (p.addr, p.port_id))
            .collect()
    };
    let mut b = vec![0u8; 1024 * (1 + ports.len())];
    put_u64(&mut b, 0, 1); // GENCTR: the port list never changes at run time
    put_u64(&mut b, 8, ports.len() as u64); // NUMREC
    put_u16(&mut b, 16, 0); // RECFMT
    for (i, (addr, port_id)) in ports.iter().enumerate() {
        let e = &mut b[1024 * (i + 1)..1024 * (i + 2)];
        e[0] = 3; // TRTYPE: TCP
        e[1] = if addr.is_ipv4() { 1 } else { 2 }; // ADRFAM
        e[2] = 2; // SUBTYPE: NVM subsystem
                  // TREQ: secure channel not required; SQ flow control disable supported.
        e[3] = 0x02 | 0x04;
        put_u16(e, 4, *port_id);
        put_u16(e, 6, 0xFFFF); // CNTLID: dynamic controller model
        put_u16(e, 8, ADMIN_QUEUE_ENTRIES); // ASQSZ
        put_str0(e, 32, 32, &addr.port().to_string()); // TRSVCID
        put_str0(e, 256, 256, &sh.cfg.subnqn);
        put_str0(e, 512, 256, &addr.ip().to_string()); // TRADDR
        e[768] = 0; // TSAS: SECTYPE none
    }
    b
}
