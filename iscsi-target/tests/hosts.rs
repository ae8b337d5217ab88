//! Discovery as libiscsi's own tools and open-iscsi see it on a pair
//! (issue 11, item 6): `iscsi-ls -s` against the primary lists the target
//! and its LUN without an error; the peer's portal carries the peer's
//! portal group tag; a wildcard listener lists the address the initiator
//! reached.

mod common;
use common::*;
use iscsi_target::{pdu, IscsiConfig, IscsiTarget};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use volume::{Completion, Geometry, MemVolume, PathState, Volume, VolumeIdentity, VolumeOp};

/// One node of a pair: the shared data, this node's index and path state.
struct NodeVol {
    inner: Arc<MemVolume>,
    node_index: u16,
    state: PathState,
}

impl Volume for NodeVol {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn identity(&self) -> VolumeIdentity {
        VolumeIdentity {
            node_index: self.node_index,
            ..self.inner.identity()
        }
    }
    fn path_state(&self) -> PathState {
        self.state
    }
    fn path_epoch(&self) -> u64 {
        0
    }
    fn max_io_bytes(&self) -> u32 {
        self.inner.max_io_bytes()
    }
    fn submit(&self, op: VolumeOp, done: Completion) {
        if self.state != PathState::Optimized {
            return done(Err(volume::IoError::NotPrimary));
        }
        self.inner.submit(op, done)
    }
}

/// Node 1 (primary, tag 1) and node 2 (standby, tag 2), each naming the
/// other's portal as `iscsi.peer_listen` does, with the tags derived.
fn pair(listen: &str) -> (IscsiTarget, IscsiTarget) {
    let data = Arc::new(MemVolume::new(512, 8192));
    let node = |i: u16, state| {
        Arc::new(NodeVol {
            inner: data.clone(),
            node_index: i,
            state,
        })
    };
    let mut c2 = IscsiConfig::new(listen.parse().unwrap(), IQN);
    c2.portal_group_tag = 2;
    let t2 = iscsi_target::start(c2, node(2, PathState::Inaccessible)).unwrap();
    let mut c1 = IscsiConfig::new(listen.parse().unwrap(), IQN);
    c1.portal_group_tag = 1;
    c1.peer_portals = vec![local(&t2)];
    let t1 = iscsi_target::start(c1, node(1, PathState::Optimized)).unwrap();
    // Node 2 learns node 1's port only now (both bind port 0 here).
    let t2 = restart_with_peer(t2, local(&t1), node(2, PathState::Inaccessible));
    (t1, t2)
}

fn local(t: &IscsiTarget) -> SocketAddr {
    SocketAddr::new("127.0.0.1".parse().unwrap(), t.local_addr().port())
}

fn restart_with_peer(t: IscsiTarget, peer: SocketAddr, vol: Arc<NodeVol>) -> IscsiTarget {
    let addr = t.local_addr();
    t.shutdown();
    let mut c = IscsiConfig::new(addr, IQN);
    c.portal_group_tag = 2;
    c.peer_portals = vec![peer];
    iscsi_target::start(c, vol).unwrap()
}

/// SendTargets=All in a discovery session: the TargetAddress values.
fn send_targets(addr: SocketAddr) -> Vec<String> {
    let mut i = Initiator::connect(addr);
    let k = kv(&[
        ("InitiatorName", INITIATOR),
        ("SessionType", "Discovery"),
        ("AuthMethod", "None"),
    ]);
    assert_eq!(i.login_step(0, 1, true, &k).0, 0);
    assert_eq!(
        i.login_step(1, 3, true, &kv(&[("HeaderDigest", "None")])).0,
        0
    );
    let mut p = pdu::Pdu::new(pdu::OP_TEXT_REQ);
    p.bhs[0] |= 0x40;
    p.bhs[1] = 0x80;
    p.set_u32(16, 7);
    p.set_u32(20, pdu::RSVD_TAG);
    p.set_u32(24, i.cmd_sn);
    p.data = pdu::encode_text(&kv(&[("SendTargets", "All")]));
    i.send(&mut p);
    let r = i.recv().unwrap();
    assert_eq!(r.opcode(), pdu::OP_TEXT_RESP);
    let keys = pdu::parse_text(&r.data).unwrap();
    assert!(keys.contains(&("TargetName".into(), IQN.into())));
    keys.into_iter()
        .filter(|(k, _)| k == "TargetAddress")
        .map(|(_, v)| v)
        .collect()
}

#[test]
fn send_targets_on_a_pair() {
    let (t1, t2) = pair("127.0.0.1:0");
    let (a1, a2) = (local(&t1), local(&t2));
    // The primary lists its own portal: a host (or iscsi-ls -s) that logs
    // in to every listed portal finds the LU there, not a standby port.
    assert_eq!(send_targets(a1), vec![format!("{a1},1")]);
    // The standby lists its own portal and the primary's, each with its
    // own portal group tag (node 1's is 1).
    assert_eq!(send_targets(a2), vec![format!("{a2},2"), format!("{a1},1")]);
    t1.shutdown();
    t2.shutdown();
    // A wildcard listener lists the address the initiator connected to.
    let (t1, t2) = pair("0.0.0.0:0");
    let a1 = local(&t1);
    assert_eq!(send_targets(a1), vec![format!("{a1},1")]);
    t1.shutdown();
    t2.shutdown();
}

#[test]
fn iscsi_ls_shows_the_primary_target_and_lun() {
    if !testskip::on_path("iscsi-ls") {
        testskip::skip("iscsi-ls is not installed (scripts/test.sh installs libiscsi-bin)");
        return;
    }
    let (t1, t2) = pair("127.0.0.1:0");
    let a1 = local(&t1);
    let out = Command::new("timeout")
        .args(["60", "iscsi-ls", "-s", &format!("iscsi://{a1}")])
        .output()
        .expect("run iscsi-ls");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    t1.shutdown();
    t2.shutdown();
    assert!(out.status.success(), "iscsi-ls -s failed:\n{text}");
    assert!(
        text.contains(&format!("Target:{IQN} Portal:{a1},1")),
        "primary portal not listed:\n{text}"
    );
    assert!(text.contains("Lun:0"), "LUN not listed:\n{text}");
    assert!(
        !text.to_lowercase().contains("fail"),
        "error printed:\n{text}"
    );
}
