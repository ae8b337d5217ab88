//! `deltamirror`: the node binary (format, serve), the operator's client
//! (status, promote, demote) and the embedded demo.

mod admin;
mod config;
mod demo;
mod failover;
mod nbdclient;
mod statusfmt;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use engine::core::{ConfirmMode, Role};
use engine::link::fabric::FabricOptions;
use engine::link::{LinkOptions, LinkTransport};
use engine::node::{FormatFlags, Node, NodeOptions, PollMode};
use volume::{Volume, VolumeIdentity};

use config::Config;

#[derive(Parser)]
#[command(
    name = "deltamirror",
    version,
    about = "Two-node synchronous block mirror with delta replay"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Prepare a node's persistent ring and state (and create a file volume).
    Format {
        #[arg(long)]
        config: PathBuf,
        /// Erase an already formatted node (its metadata and its ring, also
        /// a deltamirror ring on a ring device).
        #[arg(long)]
        force: bool,
        /// The disk is new or replaced: it receives a full remirror from the peer.
        #[arg(long)]
        replace: bool,
        /// Write the ring onto the block device ring.path names even though
        /// it holds a filesystem, partition table, LVM label or swap
        /// signature (docs/operations.md, "The ring on its own device").
        #[arg(long)]
        force_ring_device: bool,
    },
    /// Run one node.
    Serve {
        #[arg(long)]
        config: PathBuf,
        /// Serve this node's volume alone: no peer, no ring, no mirroring
        /// (the unmirrored baseline). Leaves a marker that makes a later
        /// mirrored start refuse until one side is reformatted.
        #[arg(long)]
        standalone: bool,
    },
    /// Show a node's status.
    Status {
        #[arg(long, default_value = "127.0.0.1:9400")]
        admin: String,
        #[arg(long)]
        json: bool,
        /// Refresh every second; shows a live progress line during a replay.
        #[arg(long)]
        watch: bool,
    },
    /// Make the node at ADMIN the primary. Refused when it could lose
    /// acknowledged writes or serve beside another primary; the reason says
    /// what to do.
    Promote {
        #[arg(long)]
        admin: String,
        /// Promote even so: the writes the old primary completed that this
        /// node lacks are lost, and the new generation is recorded as forced.
        #[arg(long)]
        force: bool,
    },
    /// Compare both replicas online (as `drbdadm verify`), from the primary
    /// at ADMIN, while host I/O runs: each chunk's digest is computed on each
    /// node and compared over the link. Exits 1 when chunks differ (and were
    /// not repaired).
    Verify {
        #[arg(long)]
        admin: String,
        /// First byte to compare (a multiple of the dirty-map chunk).
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Bytes to compare (0: to the end of the volume).
        #[arg(long, default_value_t = 0)]
        length: u64,
        /// Most bytes per second to read on each node (0: no limit).
        #[arg(long, default_value_t = 64 << 20)]
        rate: u64,
        /// Resync the mismatched chunks from the primary afterwards.
        #[arg(long)]
        repair: bool,
    },
    /// Make the node at ADMIN a backup.
    Demote {
        #[arg(long)]
        admin: String,
    },
    /// Run the embedded demonstration pair on 127.0.0.1.
    Demo {
        /// Keep the pair running until interrupted, printing the endpoints.
        #[arg(long)]
        serve: bool,
        /// Where to put the volumes and state (default: a new temporary dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Added to every demo port (to run several pairs side by side).
        #[arg(long, default_value_t = 0)]
        port_offset: u16,
        /// Automatic failover: start a local etcd (the `etcd` binary must
        /// be installed), kill the primary under writes and show the backup
        /// taking over by itself.
        #[arg(long, conflicts_with = "serve")]
        auto_failover: bool,
        /// The replication transport: "tcp" or "fabric" (libfabric).
        #[arg(long, value_enum, default_value_t = LinkArg::Tcp)]
        link: LinkArg,
        /// The libfabric provider with `--link fabric` ("tcp" here, "verbs" on RDMA hardware).
        #[arg(long, default_value = "tcp")]
        fabric_provider: String,
    },
    /// Print the demo configuration of node 1 or 2 (used by tests and as a template).
    ExampleConfig {
        #[arg(long)]
        node: u32,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 0)]
        port_offset: u16,
        /// The replication transport the config uses: "tcp" or "fabric".
        #[arg(long, value_enum, default_value_t = LinkArg::Tcp)]
        link: LinkArg,
        /// The libfabric provider with `--link fabric`.
        #[arg(long, default_value = "tcp")]
        fabric_provider: String,
    },
}

/// `--link`: which replication transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LinkArg {
    Tcp,
    Fabric,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        let thread = std::thread::current();
        log::error!(
            "fatal: thread {} panicked: {info}; the process stops now (panic = abort) so that a \
             broken invariant never limps on; if this node was the primary, promote its peer",
            thread.name().unwrap_or("?")
        );
    }));
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Format {
            config,
            force,
            replace,
            force_ring_device,
        } => cmd_format(
            &config,
            FormatFlags {
                force,
                replace,
                force_ring_device,
            },
        ),
        Cmd::Serve { config, standalone } => cmd_serve(&config, standalone),
        Cmd::Status { admin, json, watch } => cmd_status(&admin, json, watch),
        Cmd::Promote { admin, force } => {
            if force {
                eprintln!(
                    "warning: promote --force skips the checks that no acknowledged write is \
                     lost; writes the old primary completed that this node lacks are discarded \
                     when it rejoins"
                );
            }
            admin::post(&admin, &admin::promote_path(force)).map(|_| {
                println!("promoted {admin}");
                // Automatic failover: say what etcd could not record.
                if let Ok(s) = admin::get_status(&admin) {
                    if let Some(f) = s.failover.filter(|f| !f.etcd_reachable) {
                        eprintln!(
                            "warning: etcd is unreachable ({}): the new generation is not \
                             recorded there; this node claims the key once etcd answers",
                            f.etcd_error.unwrap_or_default()
                        );
                    }
                }
            })
        }
        Cmd::Verify {
            admin,
            offset,
            length,
            rate,
            repair,
        } => cmd_verify(&admin, offset, length, rate, repair),
        Cmd::Demote { admin } => {
            admin::post(&admin, "/demote").map(|_| println!("demoted {admin}"))
        }
        Cmd::Demo {
            serve,
            dir,
            port_offset,
            auto_failover,
            link,
            fabric_provider,
        } => {
            if auto_failover {
                demo::run_auto_failover(dir, port_offset)
            } else {
                demo::run(
                    serve,
                    dir,
                    port_offset,
                    (link == LinkArg::Fabric).then_some(fabric_provider.as_str()),
                )
            }
        }
        Cmd::ExampleConfig {
            node,
            dir,
            port_offset,
            link,
            fabric_provider,
        } => {
            if node != 1 && node != 2 {
                eprintln!("error: --node must be 1 or 2");
                std::process::exit(2);
            }
            let mut c = Config::example(node, &dir, port_offset);
            if link == LinkArg::Fabric {
                c = c.with_fabric_link(&fabric_provider);
            }
            print!("{}", c.to_toml_string());
            Ok(())
        }
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn load(path: &Path) -> Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Maps the configuration file onto the engine's options.
pub fn node_options(cfg: &Config) -> Result<NodeOptions> {
    let psk = cfg.psk_bytes().map_err(|e| anyhow::anyhow!("{e}"))?;
    let m = &cfg.mirror;
    let mut core = engine::node::default_core_config(cfg.node.id);
    core.confirm = match m.confirm {
        config::ConfirmMode::Ack => ConfirmMode::Ack,
        config::ConfirmMode::Timeout => ConfirmMode::Timeout {
            period_ms: m.confirm_timeout_ms,
        },
    };
    core.ack1_persisted = matches!(m.ack1, config::Ack1Mode::Persisted);
    core.dirty_granularity_bytes = m.dirty_granularity_bytes;
    core.max_unacked_entries = m.max_unacked_entries as u64;
    core.max_executing = cfg.reactor.queue_depth as usize;
    core.heartbeat_interval_ms = cfg.link.heartbeat_interval_ms;
    core.peer_timeout_ms = cfg.link.peer_timeout_ms;
    core.max_replay_bytes_per_sec = m.max_replay_bytes_per_sec;
    core.min_replay_bytes_per_sec = m.min_replay_bytes_per_sec;
    core.coalesce_acks = m.coalesce_acks;
    if cfg.failover.mode == config::FailoverMode::Etcd {
        core.stale_gate_ms = Some(cfg.failover.stale_mark_timeout_ms);
    }
    core.failover_id = cfg.failover_fingerprint();
    Ok(NodeOptions {
        node_id: cfg.node.id,
        node_name: cfg.node.name.clone(),
        data_dir: cfg.node.data_dir.clone(),
        ring_path: cfg.ring_path(),
        volume_path: cfg.volume.path.clone(),
        block_size: cfg.volume.block_size_bytes,
        keep_volume_space: cfg.volume.preallocate != config::Preallocate::None,
        identity: VolumeIdentity {
            uuid: cfg.volume_uuid_bytes(),
            serial: cfg.volume.serial.clone(),
            model: cfg.volume.model.clone(),
            node_index: cfg.node.id as u16,
        },
        core,
        link: LinkOptions {
            node_id: cfg.node.id,
            listen: cfg.link.listen,
            peer: cfg.link.peer,
            psk,
            connect_retry_ms: cfg.link.connect_retry_ms,
            handshake_timeout_ms: cfg.link.peer_timeout_ms.max(1000),
            transport: match cfg.link.transport {
                config::LinkTransportKind::Tcp => LinkTransport::Tcp,
                config::LinkTransportKind::Fabric => LinkTransport::Fabric(FabricOptions {
                    provider: cfg.link.fabric_provider.clone(),
                    ring_bytes: cfg.link.fabric_ring_bytes as usize,
                    listen: cfg
                        .link
                        .fabric_listen()
                        .expect("validated: link.fabric_port"),
                }),
            },
        },
        core_id: cfg.reactor.cores.first().copied(),
        poll_mode: match cfg.reactor.poll_mode {
            config::PollMode::Busy => PollMode::Busy,
            config::PollMode::Adaptive => PollMode::Adaptive,
        },
        adaptive_spin_us: cfg.reactor.adaptive_spin_us,
        disk_submit_hold_us: cfg.reactor.disk_submit_hold_us,
        disk_hand_over: cfg.reactor.disk_handover.policy(),
        queue_depth: cfg.reactor.queue_depth,
        max_io_bytes: cfg.reactor.max_io_bytes as u32,
        max_message_bytes: cfg.link.max_message_bytes as usize,
        buffer_pool_bytes: (cfg.reactor.buffer_pool_mib << 20) as usize,
    })
}

pub(crate) fn cmd_format(path: &Path, flags: FormatFlags) -> Result<()> {
    let cfg = load(path)?;
    let opts = node_options(&cfg)?;
    if !cfg.volume.path.exists() {
        if cfg.volume.size_bytes == 0 {
            bail!(
                "volume.path {} does not exist and volume.size_bytes = 0; set a size to create a file volume",
                cfg.volume.path.display()
            );
        }
        if let Some(d) = cfg.volume.path.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        if cfg.volume.preallocate == config::Preallocate::Full {
            eprintln!(
                "writing zeroes over the new volume {} ({} MiB, volume.preallocate = \"full\")",
                cfg.volume.path.display(),
                cfg.volume.size_bytes >> 20
            );
        }
        let made = storage::backend::create_file_device_as(
            &cfg.volume.path,
            cfg.volume.size_bytes,
            cfg.volume.preallocate.storage(),
        );
        if made.is_err() {
            // Nothing of this format stays behind (a file too big to reserve).
            let _ = std::fs::remove_file(&cfg.volume.path);
        }
        made.with_context(|| format!("creating the file volume {}", cfg.volume.path.display()))?;
    } else if cfg.volume.preallocate != config::Preallocate::None {
        // An existing file (one an operator made, perhaps sparse): its
        // holes reserved, its data untouched.
        let meta = std::fs::metadata(&cfg.volume.path)
            .with_context(|| format!("reading {}", cfg.volume.path.display()))?;
        if meta.is_file() {
            storage::backend::create_file_device_as(
                &cfg.volume.path,
                meta.len(),
                storage::backend::Preallocate::Space,
            )
            .with_context(|| format!("reserving the file volume {}", cfg.volume.path.display()))?;
        }
    }
    let role = match cfg.node.initial_role {
        config::Role::Primary => Role::Primary,
        config::Role::Backup => Role::Backup,
    };
    engine::node::format(&opts, cfg.ring.size_bytes, role, flags).map_err(anyhow::Error::msg)?;
    println!(
        "formatted node {} ({}) as {}{} in {}",
        cfg.node.id,
        cfg.node.name,
        role.as_str(),
        if flags.replace {
            ", new disk: it will receive a full remirror"
        } else {
            ""
        },
        cfg.node.data_dir.display()
    );
    Ok(())
}

/// The node's control as the admin endpoint sees it: the node's (or the
/// failover agent's) status, with the front-ends' receive copies added
/// (the targets start after the endpoint, so their counters join later).
struct WithFrontends {
    inner: Arc<dyn engine::status::Control>,
    copied: Mutex<Vec<Arc<AtomicU64>>>,
    /// The connection reactors (their own threads' loads join the node's).
    reactors: Mutex<Option<Arc<netreactor::Reactors>>>,
}

impl engine::status::Control for WithFrontends {
    fn status(&self) -> engine::status::NodeStatus {
        let mut s = self.inner.status();
        s.buffers.frontend_receive_copy_bytes = self
            .copied
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        if let Some(r) = self.reactors.lock().unwrap().as_ref() {
            // The hosted reactor runs in the node's reactor thread, whose
            // load the node reports.
            for st in r.stats().iter().filter(|st| !st.hosted) {
                s.reactors.push(engine::status::ReactorLoad {
                    thread: st.thread.clone(),
                    core: st.core,
                    busy_us: st.busy_ns / 1000,
                    idle_us: st.idle_ns / 1000,
                });
            }
        }
        s
    }
    fn promote(&self, force: bool) -> Result<(), String> {
        self.inner.promote(force)
    }
    fn demote(&self) -> Result<(), String> {
        self.inner.demote()
    }
    fn reset_latency(&self) -> Result<(), String> {
        self.inner.reset_latency()
    }
    fn verify(&self, req: engine::status::VerifyRequest) -> Result<(), String> {
        self.inner.verify(req)
    }
}

/// Running front-ends of a node.
struct Targets {
    /// The connection reactors the targets' connections live on.
    reactors: Arc<netreactor::Reactors>,
    nbd: Option<nbd_target::NbdServer>,
    nvme: Option<nvme_target::NvmeTarget>,
    iscsi: Option<iscsi_target::IscsiTarget>,
}

fn start_targets(
    cfg: &Config,
    vol: Arc<dyn Volume>,
    reactors: Arc<netreactor::Reactors>,
) -> Result<Targets> {
    let nbd = if cfg.nbd.enabled {
        let c = nbd_target::NbdConfig {
            listen: cfg.nbd.listen,
            export_name: cfg.nbd.export_name.clone(),
            description: format!("deltamirror volume on {}", cfg.node.name),
            max_connections: 64,
            zero_copy_receive_min_bytes: cfg.reactor.zero_copy_receive_min_bytes as usize,
        };
        Some(
            nbd_target::start_on(c, vol.clone(), reactors.clone())
                .with_context(|| format!("starting NBD on nbd.listen = {}", cfg.nbd.listen))?,
        )
    } else {
        None
    };
    let nvme = if cfg.nvme.enabled {
        let mut c = nvme_target::NvmeConfig::new(cfg.nvme.listen, cfg.nvme.subnqn.clone());
        c.allowed_hosts = cfg.nvme.allowed_hosts.clone();
        c.port_id = cfg.nvme.port_id;
        // One ANA group for the namespace on both nodes; only its state differs.
        c.ana_group_id = 1;
        c.zero_copy_receive_min_bytes = cfg.reactor.zero_copy_receive_min_bytes as usize;
        c.mdts_bytes = (cfg.reactor.max_io_bytes as u32)
            .next_power_of_two()
            .max(4096);
        c.discovery_ports = vec![nvme_target::DiscoveryPort {
            addr: cfg.nvme.listen,
            port_id: cfg.nvme.port_id,
        }];
        if let Some(p) = cfg.nvme.peer_listen {
            c.discovery_ports.push(nvme_target::DiscoveryPort {
                addr: p,
                port_id: cfg.nvme.peer_port_id,
            });
        }
        Some(
            nvme_target::start_on(c, vol.clone(), reactors.clone()).with_context(|| {
                format!("starting NVMe/TCP on nvme.listen = {}", cfg.nvme.listen)
            })?,
        )
    } else {
        None
    };
    let iscsi = if cfg.iscsi.enabled {
        let mut c = iscsi_target::IscsiConfig::new(cfg.iscsi.listen, cfg.iscsi.target_iqn.clone());
        c.portal_group_tag = cfg.iscsi.portal_group_tag;
        c.zero_copy_receive_min_bytes = cfg.reactor.zero_copy_receive_min_bytes as usize;
        c.peer_portals = cfg.iscsi.peer_listen.into_iter().collect();
        c.peer_portal_group_tag = cfg.iscsi.peer_portal_group_tag;
        if let (Some(u), Some(s)) = (&cfg.iscsi.chap_user, &cfg.iscsi.chap_secret) {
            c.chap = Some(iscsi_target::ChapConfig {
                user: u.clone(),
                secret: s.clone(),
                mutual: None,
            });
        }
        Some(
            iscsi_target::start_on(c, vol, reactors.clone()).with_context(|| {
                format!("starting iSCSI on iscsi.listen = {}", cfg.iscsi.listen)
            })?,
        )
    } else {
        None
    };
    Ok(Targets {
        reactors,
        nbd,
        nvme,
        iscsi,
    })
}

fn cmd_serve(path: &Path, standalone: bool) -> Result<()> {
    let cfg = load(path)?;
    let opts = node_options(&cfg)?;
    let stop = engine::sys::stop_on_signals();
    let node = if standalone {
        log::warn!(
            "standalone: serving {} with no peer and no mirroring",
            cfg.volume.path.display()
        );
        Node::start_standalone(opts)
    } else {
        Node::start(opts)
    }
    .map_err(anyhow::Error::msg)?;
    let vol: Arc<dyn Volume> = node.volume.clone();
    // Automatic failover: the agent's control thread, and the admin
    // endpoint's view through it.
    let (control, agent): (Arc<dyn engine::status::Control>, _) = if cfg.failover.mode
        == config::FailoverMode::Etcd
        && !standalone
    {
        let agent =
            failover::Failover::start(failover::Settings::from_config(&cfg), node.control.clone())
                .context("starting the failover agent")?;
        let c = Arc::new(failover::FailoverControl {
            node: node.control.clone(),
            agent,
        });
        (c.clone(), Some(c))
    } else {
        (node.control.clone(), None)
    };
    let control = Arc::new(WithFrontends {
        inner: control,
        copied: Mutex::new(Vec::new()),
        reactors: Mutex::new(None),
    });
    let adm = admin::start(cfg.admin.listen, control.clone()).with_context(|| {
        format!(
            "starting the admin endpoint on admin.listen = {}",
            cfg.admin.listen
        )
    })?;
    // One connection reactor per core of reactor.cores: the first runs in
    // the node's (mirror) reactor thread, which is pinned to cores[0]; the
    // others on threads of their own, reactor i pinned to cores[i], which
    // reach the mirror through its mailbox.
    let (reactors, hosted) = netreactor::Reactors::start_hosted(&netreactor::ReactorConfig {
        name: "dm-conn".into(),
        threads: cfg.reactor.cores.len().max(1),
        cores: cfg.reactor.cores.clone(),
        busy: cfg.reactor.poll_mode == config::PollMode::Busy,
        spin_us: cfg.reactor.adaptive_spin_us,
        max_connections_per_reactor: 256,
    })
    .context("starting the connection reactors (io_uring)")?;
    node.host_connections(hosted);
    *control.reactors.lock().unwrap() = Some(reactors.clone());
    let targets = start_targets(&cfg, vol, reactors)?;
    control.copied.lock().unwrap().extend(
        [
            targets.nbd.as_ref().map(|t| t.payload_copied_counter()),
            targets.nvme.as_ref().map(|t| t.payload_copied_counter()),
            targets.iscsi.as_ref().map(|t| t.payload_copied_counter()),
        ]
        .into_iter()
        .flatten(),
    );
    log::info!(
        "node {} ({}) listening: admin http://{}{}{}{} (whether it serves is logged as \
         'path state' and shown by `deltamirror status`)",
        cfg.node.id,
        cfg.node.name,
        adm.local_addr(),
        targets
            .nbd
            .as_ref()
            .map(|s| format!(", nbd://{}", s.local_addr()))
            .unwrap_or_default(),
        targets
            .nvme
            .as_ref()
            .map(|s| format!(", nvme-tcp {}", s.local_addr()))
            .unwrap_or_default(),
        targets
            .iscsi
            .as_ref()
            .map(|s| format!(", iscsi {}", s.local_addr()))
            .unwrap_or_default(),
    );
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
    }
    log::info!("stopping");
    if let Some(t) = targets.nbd {
        t.shutdown();
    }
    if let Some(t) = targets.nvme {
        t.shutdown();
    }
    if let Some(t) = targets.iscsi {
        t.shutdown();
    }
    targets.reactors.shutdown();
    adm.shutdown();
    if let Some(c) = agent.and_then(Arc::into_inner) {
        c.agent.shutdown();
    }
    node.shutdown();
    Ok(())
}

fn cmd_verify(addr: &str, offset: u64, length: u64, rate: u64, repair: bool) -> Result<()> {
    let before = admin::get_status(addr)?.verify;
    admin::post(
        addr,
        &admin::verify_path(&engine::status::VerifyRequest {
            offset,
            length,
            repair,
            bytes_per_sec: rate,
        }),
    )?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let s = admin::get_status(addr)?;
        let Some(v) = s
            .verify
            .filter(|v| Some(v) != before.as_ref() || v.state == "running")
        else {
            continue;
        };
        if v.state == "running" {
            if tty {
                print!("\r{}\x1b[K", statusfmt::verify_line(&v));
                let _ = std::io::Write::flush(&mut std::io::stdout());
            }
            continue;
        }
        if tty {
            println!();
        }
        println!("verify {}", statusfmt::verify_line(&v));
        if v.state != "done" {
            anyhow::bail!("verify did not finish");
        }
        if v.mismatched_chunks > 0 && v.repair_chunks == 0 {
            std::process::exit(1);
        }
        return Ok(());
    }
}

fn cmd_status(addr: &str, json: bool, watch: bool) -> Result<()> {
    loop {
        let s = admin::get_status(addr)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", statusfmt::render(&s));
            if let Some(p) = &s.replay_progress {
                println!("{}", statusfmt::replay_progress_line(p));
            }
        }
        if !watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
