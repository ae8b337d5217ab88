//! dm-nvme: a command-line NVMe/TCP host for deltamirror (and any NVMe/TCP
//! target): identify, discovery, pipelined I/O with a latency histogram and
//! verification, and a multipath failover run that follows ANA.

use clap::{Parser, Subcommand};
use nvme_host::initiator::{Controller, HostConfig};
use nvme_host::load::{run_failover, run_io, IoSpec, Rw};
use nvme_target::pdu::Digests;
use nvme_target::spec::{ANA_INACCESSIBLE, ANA_NON_OPTIMIZED, ANA_OPTIMIZED, DISCOVERY_NQN};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "dm-nvme",
    about = "NVMe/TCP host: identify, discover, I/O benchmark, failover test"
)]
struct Cli {
    /// Subsystem NQN to connect to.
    #[arg(long, global = true, default_value = "nqn.2026-11.io.deltamirror:vol0")]
    nqn: String,
    /// Host NQN presented in Connect.
    #[arg(
        long,
        global = true,
        default_value = "nqn.2014-08.org.nvmexpress:uuid:dm-nvme-host"
    )]
    hostnqn: String,
    /// Enable header digests.
    #[arg(long, global = true)]
    hdgst: bool,
    /// Enable data digests.
    #[arg(long, global = true)]
    ddgst: bool,
    /// Keep-alive timeout asked for, in ms.
    #[arg(long, global = true, default_value_t = 10_000)]
    kato_ms: u32,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print Identify Controller / Namespace and the ANA log.
    Identify {
        #[arg(long, default_value = "127.0.0.1:4420")]
        addr: SocketAddr,
    },
    /// Print the discovery log page.
    Discover {
        #[arg(long, default_value = "127.0.0.1:4420")]
        addr: SocketAddr,
    },
    /// Run I/O and print IOPS and latency percentiles.
    Io {
        #[arg(long, default_value = "127.0.0.1:4420")]
        addr: SocketAddr,
        /// read | write | randread | randwrite | randrw
        #[arg(long, default_value = "randread")]
        rw: Rw,
        /// Bytes per command.
        #[arg(long, default_value_t = 4096)]
        bs: u32,
        /// Commands in flight (total, spread over the I/O queues).
        #[arg(long, default_value_t = 1)]
        qd: usize,
        /// I/O queues (connections).
        #[arg(long, default_value_t = 1)]
        queues: u16,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// MiB of the namespace to use (0 = all).
        #[arg(long, default_value_t = 1024)]
        region_mb: u64,
        /// Check read data and read back every written block at the end.
        #[arg(long)]
        verify: bool,
        /// Print one JSON object instead of the text line (for the bench).
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Give each queue a reader thread that hands the completions to
        /// the submitting thread. Without it (the default) a single queue
        /// is read by the submitting thread itself, which refills at once
        /// as SPDK's perf tool polls its qpairs: no hand-off and no second
        /// wake-up per round. More than one queue always has reader threads.
        #[arg(long)]
        reader_thread: bool,
    },
    /// Serve an in-memory volume (for trying hosts and measuring the transport).
    ServeMem {
        #[arg(long, default_value = "127.0.0.1:4420")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 256)]
        size_mb: u64,
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Write data of at least this many bytes per PDU is received
        /// straight into its buffer, smaller data in bulk and copied (0:
        /// all zero-copy); the node's reactor.zero_copy_receive_min_bytes.
        #[arg(long, default_value_t = nvme_target::DEFAULT_ZERO_COPY_RECEIVE_MIN_BYTES)]
        zero_copy_receive_min_bytes: usize,
        /// Microseconds the reactor keeps polling (yielding its core to
        /// other ready threads) after its last work before it sleeps; the
        /// node's reactor.adaptive_spin_us.
        #[arg(long, default_value_t = nvme_target::DEFAULT_ADAPTIVE_SPIN_US)]
        spin_us: u64,
        /// Poll without ever sleeping (the node's reactor.poll_mode = "busy").
        #[arg(long)]
        busy_poll: bool,
    },
    /// Keep writing with verification over two paths, following ANA.
    Failover {
        /// Comma separated addresses, e.g. 127.0.0.1:4420,127.0.0.1:4421
        #[arg(long, value_delimiter = ',')]
        paths: Vec<SocketAddr>,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        #[arg(long, default_value_t = 8)]
        qd: usize,
        #[arg(long, default_value_t = 4096)]
        bs: u32,
        #[arg(long, default_value_t = 64)]
        region_mb: u64,
    },
}

fn ana_name(s: Option<u8>) -> &'static str {
    match s {
        Some(ANA_OPTIMIZED) => "optimized",
        Some(ANA_NON_OPTIMIZED) => "non-optimized",
        Some(ANA_INACCESSIBLE) => "inaccessible",
        _ => "unknown",
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let mut h = HostConfig::new(cli.nqn.clone());
    h.hostnqn = cli.hostnqn.clone();
    h.digests = Digests {
        header: cli.hdgst,
        data: cli.ddgst,
    };
    h.kato_ms = cli.kato_ms;
    match cli.cmd {
        Cmd::Identify { addr } => {
            let c = Controller::connect(addr, &h)?;
            let id = &c.id;
            println!(
                "controller {:#06x} at {addr}: subnqn {}",
                c.cntlid, id.subnqn
            );
            println!(
                "  serial {:?} model {:?} fw {:?} ver {:#x}",
                id.serial, id.model, id.firmware, id.ver
            );
            println!(
                "  mdts {} bytes, maxcmd {}, ioccsz {}, cmic {:#x}, oaes {:#x}, anacap {:#x}",
                id.mdts_bytes,
                id.maxcmd,
                id.ioccsz * 16,
                id.cmic,
                id.oaes,
                id.anacap
            );
            if let Some(ns) = &c.ns {
                let hex: String = ns.nguid.iter().map(|b| format!("{b:02x}")).collect();
                println!(
                    "  ns 1: {} blocks of {} bytes, nguid {hex}, ana group {}",
                    ns.num_blocks, ns.block_size, ns.anagrpid
                );
                let log = c.ana_log()?;
                println!(
                    "  ANA: {} (change count {})",
                    ana_name(log.state_of(1)),
                    log.chgcnt
                );
            }
            c.disconnect();
        }
        Cmd::Discover { addr } => {
            let mut d = h.clone();
            d.subnqn = DISCOVERY_NQN.into();
            d.kato_ms = 0;
            let c = Controller::connect(addr, &d)?;
            for e in c.discovery_log()? {
                println!(
                    "trtype tcp traddr {} trsvcid {} portid {} subnqn {} treq {:#x}",
                    e.traddr, e.trsvcid, e.portid, e.subnqn, e.treq
                );
            }
            c.disconnect();
        }
        Cmd::Io {
            addr,
            rw,
            bs,
            qd,
            queues,
            seconds,
            region_mb,
            verify,
            json,
            seed,
            reader_thread,
        } => {
            h.io_queues = queues.max(1);
            h.polled_io = h.io_queues == 1 && !reader_thread;
            // The target's default queue holds 128 entries: 127 commands.
            h.queue_depth = (qd.div_ceil(queues.max(1) as usize) as u16).clamp(1, 127);
            let c = Controller::connect(addr, &h)?;
            let spec = IoSpec {
                rw,
                block_bytes: bs,
                queue_depth: qd.max(1),
                duration: Duration::from_secs(seconds),
                region_bytes: region_mb << 20,
                verify,
                seed,
            };
            let r = run_io(&c, &spec)?;
            if json {
                println!(
                    "{{\"target\":\"{addr}\",\"rw\":\"{}\",\"bs\":{bs},\"qd\":{qd},\"queues\":{queues},\"seconds\":{:.3},\"ops\":{},\"iops\":{:.0},\"mib_per_s\":{:.2},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1},\"errors\":{},\"verify_errors\":{}}}",
                    format!("{rw:?}").to_lowercase(),
                    r.seconds, r.ops, r.iops, r.mib_per_s, r.p50_us, r.p99_us, r.p999_us, r.max_us, r.errors, r.verify_errors
                );
            } else {
                println!("{rw:?} bs={bs} qd={qd} queues={queues}: {r}");
            }
            c.disconnect();
            if r.verify_errors > 0 {
                return Err(format!("{} verification errors", r.verify_errors).into());
            }
        }
        Cmd::ServeMem {
            listen,
            size_mb,
            block_size,
            zero_copy_receive_min_bytes,
            spin_us,
            busy_poll,
        } => {
            let mut cfg = nvme_target::NvmeConfig::new(listen, cli.nqn.clone());
            // Payloads in pool buffers, as on a node (`reactor.buffer_pool_mib`
            // 64, buffers up to the transfer limit): no heap allocation per
            // write.
            let pool = volume::IoBufPool::new(64 << 20, cfg.mdts_bytes as usize);
            let vol = Arc::new(
                volume::MemVolume::new(block_size, (size_mb << 20) / block_size as u64)
                    .with_pool(pool),
            );
            cfg.zero_copy_receive_min_bytes = zero_copy_receive_min_bytes;
            let reactor = nvme_target::ReactorConfig {
                spin_us,
                busy: busy_poll,
                ..nvme_target::ReactorConfig::single("nvme-reactor")
            };
            let t = nvme_target::start_with(cfg, vol, &reactor)?;
            println!(
                "serving {} ({size_mb} MiB in memory) on {}",
                cli.nqn,
                t.local_addr()
            );
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Cmd::Failover {
            paths,
            seconds,
            qd,
            bs,
            region_mb,
        } => {
            if paths.len() < 2 {
                return Err(
                    "--paths needs at least two addresses, e.g. 127.0.0.1:4420,127.0.0.1:4421"
                        .into(),
                );
            }
            let stop = Arc::new(AtomicBool::new(false));
            let s2 = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(seconds));
                s2.store(true, Ordering::Release);
            });
            let r = run_failover(&paths, &h, qd.max(1), bs, region_mb << 20, stop)?;
            println!("failover: {r}");
            if r.lost_writes > 0 {
                return Err(format!("{} completed writes lost", r.lost_writes).into());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dm-nvme: {e}");
            ExitCode::FAILURE
        }
    }
}
