//! Serves an in-memory volume over NBD until killed, for manual testing
//! and benchmarks: `cargo run --release -p nbd-target --example
//! nbd_mem_server -- 127.0.0.1:10809 256` (size in MiB).

use std::sync::Arc;

use nbd_target::{start, NbdConfig};
use volume::MemVolume;

fn main() {
    env_logger::init();
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let mib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(256);
    let vol = Arc::new(MemVolume::new(512, mib * 2048));
    let cfg = NbdConfig {
        listen: listen.parse().expect("listen address like 127.0.0.1:10809"),
        export_name: "vol0".into(),
        description: "in-memory test volume".into(),
        max_connections: 16,
    };
    let srv = start(cfg, vol).expect("start");
    println!("serving nbd://{}/vol0", srv.local_addr());
    loop {
        std::thread::park();
    }
}
