//! Serves a MemVolume over iSCSI until killed: for manual testing with
//! libiscsi tools, e.g. `cargo run -p iscsi-target --example serve -- 127.0.0.1:3260 64`.

use std::sync::Arc;

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:3260".into());
    let mib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(64);
    let vol = Arc::new(volume::MemVolume::new(512, mib * 2048));
    let mut cfg = iscsi_target::IscsiConfig::new(
        listen.parse().expect("listen address"),
        "iqn.2026-01.io.deltamirror:vol0",
    );
    if let (Ok(u), Ok(s)) = (std::env::var("CHAP_USER"), std::env::var("CHAP_SECRET")) {
        // CHAP_MUTUAL_USER / CHAP_MUTUAL_SECRET: what the target answers
        // with when the initiator asks it to authenticate itself.
        let mutual = match (
            std::env::var("CHAP_MUTUAL_USER"),
            std::env::var("CHAP_MUTUAL_SECRET"),
        ) {
            (Ok(mu), Ok(ms)) => Some((mu, ms)),
            _ => None,
        };
        cfg.chap = Some(iscsi_target::ChapConfig {
            user: u,
            secret: s,
            mutual,
        });
    }
    let t = iscsi_target::start(cfg, vol).expect("start iscsi target");
    eprintln!("serving on {}", t.local_addr());
    loop {
        std::thread::park();
    }
}
