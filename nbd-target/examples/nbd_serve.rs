//! Serves a volume over NBD until killed, for manual testing and
//! benchmarks. Not the product: the deltamirror binary serves the mirror.
//!
//!     cargo run --release -p nbd-target --example nbd_serve -- 127.0.0.1:10809 mem:256
//!     cargo run --release -p nbd-target --example nbd_serve -- 127.0.0.1:10809 /path/disk.img
//!
//! `mem:N` is an N MiB in-memory volume; a path is a file (its size rounded
//! down to 512 bytes) served by `NBD_SERVE_WORKERS` (default 4) threads
//! doing pread/pwrite, standing in for the asynchronous engine; with
//! `NBD_SERVE_WORKERS=0` requests run inline on the connection's reader.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};

use nbd_target::{start, NbdConfig};
use volume::{
    Completion, Geometry, IoBuf, IoError, MemVolume, PathCell, PathState, Volume, VolumeIdentity,
    VolumeOp,
};

struct FileVolume {
    file: File,
    geometry: Geometry,
    path: PathCell,
    /// Work queue of the I/O threads; `None` runs requests inline.
    queue: Option<Mutex<Sender<(VolumeOp, Completion)>>>,
}

impl FileVolume {
    fn execute(&self, op: VolumeOp) -> Result<IoBuf, IoError> {
        let io = |e: std::io::Error| IoError::Io(e.raw_os_error().unwrap_or(libc::EIO));
        match op {
            VolumeOp::Read { offset, len } => {
                self.geometry.check_range(offset, len as u64)?;
                let mut buf = IoBuf::new(len as usize);
                self.file.read_exact_at(&mut buf, offset).map_err(io)?;
                Ok(buf)
            }
            VolumeOp::Write { offset, data, fua } => {
                self.geometry.check_range(offset, data.len() as u64)?;
                self.file.write_all_at(&data, offset).map_err(io)?;
                if fua {
                    self.file.sync_data().map_err(io)?;
                }
                Ok(IoBuf::empty())
            }
            VolumeOp::Flush => self.file.sync_data().map(|_| IoBuf::empty()).map_err(io),
            VolumeOp::Discard { offset, len } | VolumeOp::WriteZeroes { offset, len } => {
                self.geometry.check_range(offset, len)?;
                let zeros = vec![0u8; 1 << 20];
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(zeros.len() as u64) as usize;
                    self.file.write_all_at(&zeros[..n], at).map_err(io)?;
                    at += n as u64;
                }
                Ok(IoBuf::empty())
            }
        }
    }
}

impl Volume for FileVolume {
    fn geometry(&self) -> Geometry {
        self.geometry
    }
    fn identity(&self) -> VolumeIdentity {
        VolumeIdentity {
            uuid: *b"deltamirror-file",
            serial: "DMFILE0001".into(),
            model: "deltamirror".into(),
            node_index: 1,
        }
    }
    fn path_state(&self) -> PathState {
        self.path.get()
    }
    fn path_epoch(&self) -> u64 {
        self.path.epoch()
    }
    fn max_io_bytes(&self) -> u32 {
        1 << 20
    }
    fn submit(&self, op: VolumeOp, done: Completion) {
        match &self.queue {
            Some(q) => {
                let _ = q.lock().unwrap().send((op, done));
            }
            None => done(self.execute(op)),
        }
    }
}

/// Starts `n` I/O threads for `vol` (which must not have a queue yet).
fn with_workers(mut vol: FileVolume, n: usize) -> Arc<FileVolume> {
    if n == 0 {
        return Arc::new(vol);
    }
    let (tx, rx) = mpsc::channel::<(VolumeOp, Completion)>();
    vol.queue = Some(Mutex::new(tx));
    let vol = Arc::new(vol);
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..n {
        let (vol, rx) = (vol.clone(), rx.clone());
        std::thread::spawn(move || loop {
            let next = rx.lock().unwrap().recv();
            match next {
                Ok((op, done)) => done(vol.execute(op)),
                Err(_) => return,
            }
        });
    }
    vol
}

fn main() {
    env_logger::init();
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let backing = args.next().unwrap_or_else(|| "mem:256".into());
    let vol: Arc<dyn Volume> = match backing.strip_prefix("mem:") {
        Some(mib) => {
            let mib: u64 = mib.parse().expect("mem:<MiB>");
            Arc::new(MemVolume::new(512, mib * 2048))
        }
        None => {
            let file = File::options()
                .read(true)
                .write(true)
                .open(&backing)
                .expect("open file");
            let size = file.metadata().expect("stat file").len();
            let workers = std::env::var("NBD_SERVE_WORKERS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(4);
            let vol = FileVolume {
                file,
                geometry: Geometry {
                    block_size: 512,
                    num_blocks: size / 512,
                },
                path: PathCell::new(PathState::Optimized),
                queue: None,
            };
            with_workers(vol, workers)
        }
    };
    let cfg = NbdConfig {
        listen: listen.parse().expect("listen address like 127.0.0.1:10809"),
        export_name: "vol0".into(),
        description: format!("nbd_serve {backing}"),
        max_connections: 16,
        zero_copy_receive_min_bytes: nbd_target::DEFAULT_ZERO_COPY_RECEIVE_MIN_BYTES,
    };
    let srv = start(cfg, vol).expect("start");
    println!("serving nbd://{}/vol0", srv.local_addr());
    loop {
        std::thread::park();
    }
}
