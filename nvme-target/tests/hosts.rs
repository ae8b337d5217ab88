//! What independent NVMe/TCP host stacks send that our own host does not
//! (issue 11, item 6): an empty host NQN, a command id reused from an AER
//! the host gave up on, the 128-bit host identifier, the discovery of the
//! peer's port from the shipped configuration.

mod common;
use common::*;
use nvme_host::initiator::Controller;
use nvme_target::fuzz::{Harness, Stream, FUZZ_HOST};
use nvme_target::pdu::*;
use nvme_target::spec::*;
use std::sync::{Mutex, Once};

/// Collects the log records of this test binary (the target logs refused
/// Connects); each test looks only for the lines it caused.
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        self.0
            .lock()
            .unwrap()
            .push(format!("{} {}", r.level(), r.args()));
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

fn log_lines() -> Vec<String> {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        log::set_logger(&CAPTURE).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Trace);
    });
    CAPTURE.0.lock().unwrap().clone()
}

const PLAIN: Digests = Digests {
    header: false,
    data: false,
};

#[test]
fn connect_with_empty_host_nqn_and_refusals_logged() {
    log_lines();
    // allowed_hosts empty: any host, also one that sends no host NQN, as
    // SPDK and the Linux target accept it. Over TCP, admin + I/O queue.
    let vol = mem(512, 4096);
    let t = serve(vol.clone());
    let mut h = host();
    h.hostnqn = String::new();
    let c = Controller::connect(t.local_addr(), &h)
        .expect("a Connect with an empty host NQN is accepted when allowed_hosts is empty");
    c.write(3, pattern(7, 512), false).unwrap();
    assert_eq!(c.read(3, 1).unwrap(), pattern(7, 512));
    let mut d = h.clone();
    d.subnqn = DISCOVERY_NQN.into();
    let dc = Controller::connect(t.local_addr(), &d).expect("discovery with an empty host NQN");
    assert_eq!(dc.discovery_log().unwrap().len(), 1);
    dc.disconnect();
    c.disconnect();
    t.shutdown();

    // With an allow-list the empty NQN is not in it: Connect Invalid Host.
    let mut cfg = cfg();
    cfg.allowed_hosts = vec![FUZZ_HOST.into()];
    let hx = Harness::new(mem(512, 4096), cfg).unwrap();
    let mut s = Stream::new(PLAIN);
    s.connect(1, 0, 0xFFFF, NQN, "");
    let out = hx.session(&s.bytes, true);
    assert_eq!(out.status_of(1), Some(SC_CONNECT_INVALID_HOST));
    // A wrong subsystem NQN and an I/O queue for an unknown controller.
    let mut s = Stream::new(PLAIN);
    s.connect(
        1,
        0,
        0xFFFF,
        "nqn.2026-11.io.example:no-such-subsys",
        FUZZ_HOST,
    );
    assert_eq!(
        hx.session(&s.bytes, true).status_of(1),
        Some(SC_CONNECT_INVALID_PARAM)
    );
    let mut s = Stream::new(PLAIN);
    s.connect(1, 1, 0x4321, NQN, FUZZ_HOST);
    assert_eq!(
        hx.session(&s.bytes, true).status_of(1),
        Some(SC_CONNECT_INVALID_PARAM)
    );

    // Every refusal is logged with its reason.
    let lines = log_lines();
    let refused: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("refused Connect"))
        .collect();
    let has = |what: &[&str]| refused.iter().any(|l| what.iter().all(|w| l.contains(w)));
    assert!(
        has(&["host \"\"", "allowed_hosts"]),
        "empty host NQN refusal not logged: {refused:#?}"
    );
    assert!(
        has(&["nqn.2026-11.io.example:no-such-subsys", "subsystem"]),
        "wrong subsystem refusal not logged: {refused:#?}"
    );
    assert!(
        has(&["0x4321", "controller"]),
        "unknown controller refusal not logged: {refused:#?}"
    );
}

fn property_get(cid: u16, ofst: u32) -> Sqe {
    let mut q = Sqe::new(OPC_FABRICS, cid);
    q.0[4] = FCTYPE_PROPERTY_GET;
    put_u32(&mut q.0, 44, ofst);
    q
}

fn property_set_cc(cid: u16, cc: u32) -> Sqe {
    let mut q = Sqe::new(OPC_FABRICS, cid);
    q.0[4] = FCTYPE_PROPERTY_SET;
    put_u32(&mut q.0, 44, PROP_CC);
    put_u64(&mut q.0, 48, cc as u64);
    q
}

#[test]
fn command_reusing_an_outstanding_aer_id_retires_the_aer() {
    let h = Harness::new(mem(512, 4096), cfg()).unwrap();
    let mut s = Stream::new(PLAIN);
    s.connect(1, 0, 0xFFFF, NQN, FUZZ_HOST).enable(2);
    for cid in 10..14 {
        s.cmd(Sqe::new(ADM_ASYNC_EVENT, cid), &[], 0); // the AER limit: 4
    }
    // The host aborted AER 10 on its side and reuses its id, as a host does
    // at disconnect: Property Get CSTS, then the shutdown (CC.SHN normal)
    // and its status poll on the ids of AERs 11 and 12.
    s.cmd(property_get(10, PROP_CSTS), &[], 0);
    s.cmd(
        property_set_cc(11, 1 | (6 << 16) | (4 << 20) | (1 << 14)),
        &[],
        0,
    );
    s.cmd(property_get(12, PROP_CSTS), &[], 0);
    // Three AERs were retired: three new ones fit under the limit, a
    // fourth does not (AER 13 is still outstanding).
    for cid in 20..24 {
        s.cmd(Sqe::new(ADM_ASYNC_EVENT, cid), &[], 0);
    }
    let out = h.session(&s.bytes, true);
    let cqes = out.cqes();
    let of = |cid: u16| -> Vec<Cqe> { cqes.iter().filter(|c| c.cid == cid).copied().collect() };
    let get10 = of(10);
    assert_eq!(get10.len(), 1, "one completion for id 10: {cqes:?}");
    assert_eq!(get10[0].status, Status::SUCCESS, "Property Get ran");
    assert_eq!(get10[0].dw0 & 1, 1, "CSTS.RDY");
    let set11 = of(11);
    assert_eq!(set11.len(), 1);
    assert_eq!(set11[0].status, Status::SUCCESS, "shutdown ran");
    let get12 = of(12);
    assert_eq!(get12.len(), 1);
    assert_eq!(get12[0].status, Status::SUCCESS);
    assert_eq!((get12[0].dw0 >> 2) & 3, 2, "CSTS.SHST: shutdown complete");
    assert!(of(13).is_empty(), "AER 13 still outstanding");
    assert!((20..23).all(|cid| of(cid).is_empty()), "new AERs accepted");
    assert_eq!(of(23)[0].status, SC_AER_LIMIT);

    // A command colliding with an id that is not an AER still conflicts:
    // a write waiting for its data keeps its id.
    let vol = mem(512, 4096);
    let h = Harness::new(vol.clone(), cfg()).unwrap();
    let cntlid = h
        .session(&nvme_target::fuzz::admin_seed(NQN, PLAIN), false)
        .cqes()[0]
        .dw0 as u16;
    let mut s = Stream::new(PLAIN);
    s.connect(1, 1, cntlid, NQN, FUZZ_HOST);
    let mut w = rw_sqe(IO_WRITE, 1, 0, 1, false);
    w.set_cid(5);
    s.cmd(w, &[], 512); // R2T sent, no data yet
    s.cmd(Sqe::new(IO_FLUSH, 5).tap_nsid(1), &[], 0);
    let out = h.session(&s.bytes, true);
    assert_eq!(out.status_of(5), Some(SC_CID_CONFLICT));
    assert_eq!(writes(&vol), 0);
}

/// `Sqe::set_nsid` in expression position.
trait TapNsid {
    fn tap_nsid(self, nsid: u32) -> Self;
}

impl TapNsid for Sqe {
    fn tap_nsid(mut self, nsid: u32) -> Self {
        self.set_nsid(nsid);
        self
    }
}

#[test]
fn identify_controller_reports_128_bit_host_identifier() {
    let t = serve(mem(512, 4096));
    let c = connect(&t);
    let id = c.identify(CNS_CONTROLLER, 0).unwrap();
    // CTRATT (bytes 99:96) bit 0: 128-bit Host Identifier supported.
    assert_eq!(get_u32(&id, 96) & 1, 1, "CTRATT.HOSTID128");
    // The host identifier given in Connect, through Get Features Host
    // Identifier (81h) with EXHID = 1.
    let mut gf = Sqe::new(ADM_GET_FEATURES, 0);
    gf.set_cdw(10, 0x81);
    gf.set_cdw(11, 1);
    let r = c.admin_exec(gf, None, 16).unwrap();
    assert_eq!(r.status, Status::SUCCESS);
    assert_eq!(r.data, host().hostid.to_vec());
    // EXHID = 0 asks for a 64-bit identifier: not supported.
    let mut gf = Sqe::new(ADM_GET_FEATURES, 0);
    gf.set_cdw(10, 0x81);
    assert_eq!(c.admin_exec(gf, None, 16).unwrap().status, SC_INVALID_FIELD);
    c.disconnect();
    // The discovery controller reports it too (its Connect carries HOSTID).
    let mut d = host();
    d.subnqn = DISCOVERY_NQN.into();
    let dc = Controller::connect(t.local_addr(), &d).unwrap();
    let id = dc.identify(CNS_CONTROLLER, 0).unwrap();
    assert_eq!(get_u32(&id, 96) & 1, 1, "discovery CTRATT.HOSTID128");
    dc.disconnect();
    t.shutdown();
}

/// `key = value` lines of one `[section]` of a TOML file (no nesting).
fn section(text: &str, name: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.starts_with('[') {
            inside = line == format!("[{name}]");
            continue;
        }
        if let (true, Some((k, v))) = (inside, line.split_once('=')) {
            out.push((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
        }
    }
    out
}

fn field(sec: &[(String, String)], key: &str) -> Option<String> {
    sec.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

#[test]
fn shipped_configs_and_docs_name_the_peer_ports() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let (a, b) = (read("configs/primary.toml"), read("configs/backup.toml"));
    for (me, peer, name) in [(&a, &b, "primary"), (&b, &a, "backup")] {
        let (mn, pn) = (section(me, "nvme"), section(peer, "nvme"));
        assert_eq!(
            field(&mn, "peer_listen"),
            field(&pn, "listen"),
            "{name}.toml: nvme.peer_listen must be the peer's nvme.listen, or discovery lists one port"
        );
        assert_eq!(
            field(&mn, "peer_port_id"),
            field(&pn, "port_id"),
            "{name}.toml: nvme.peer_port_id must be the peer's nvme.port_id"
        );
        let (mi, pi) = (section(me, "iscsi"), section(peer, "iscsi"));
        assert_eq!(
            field(&mi, "peer_listen"),
            field(&pi, "listen"),
            "{name}.toml: iscsi.peer_listen must be the peer's iscsi.listen"
        );
    }
    // The configuration reference documents the fields.
    let ops = read("docs/operations.md");
    let table = |name: &str| -> String {
        let start = ops
            .find(&format!("### [{name}]"))
            .unwrap_or_else(|| panic!("operations.md: no [{name}] section"));
        let rest = &ops[start + 4..];
        rest[..rest.find("###").unwrap_or(rest.len())].to_string()
    };
    let nvme = table("nvme");
    assert!(
        nvme.contains("| `peer_listen` |"),
        "[nvme] peer_listen undocumented"
    );
    assert!(
        nvme.contains("| `peer_port_id` |"),
        "[nvme] peer_port_id undocumented"
    );
    assert!(
        table("iscsi").contains("| `peer_listen` |"),
        "[iscsi] peer_listen undocumented"
    );
}
