//! Human rendering of a node's status for `deltamirror status`, and the
//! one-line replay progress shown by `status --watch` and the demo.

use std::fmt::Write;

use engine::status::{Latency, NodeStatus, ReactorLoad, ReplayStats};

/// The automatic failover summary: mode, lease holder, lease left.
pub fn failover_line(f: &engine::status::FailoverStatus) -> String {
    let holder = match (f.lease_holder_node_id, f.lease_generation) {
        (Some(id), Some(g)) => format!(
            "lease held by node {id} ({}) in generation {g}",
            f.lease_holder
        ),
        _ if f.etcd_reachable => "lease held by nobody".to_string(),
        _ => "lease holder unknown (etcd unreachable)".to_string(),
    };
    let mine = if f.holds_lease {
        format!(
            "; this node's lease: {} ms left, renewed {} ms ago",
            f.lease_left_ms,
            f.last_renewal_ms_ago.unwrap_or(0)
        )
    } else {
        String::new()
    };
    format!(
        "{} ({}){mine}{}",
        f.mode,
        holder,
        if f.fenced { "; FENCED" } else { "" }
    )
}

/// A compact multi-line block describing one node. Ends with a newline.
pub fn render(s: &NodeStatus) -> String {
    let mut out = String::new();
    let mut line = |label: &str, text: String| {
        let _ = writeln!(out, "{label:<10}{text}");
    };

    line(
        "node",
        format!(
            "{} ({})  {}  generation {}  pid {}  up {}",
            s.node_id,
            s.node_name,
            s.role,
            s.generation,
            s.pid,
            duration(s.uptime_seconds)
        ),
    );

    let mut peer = s.peer_state.clone();
    if let Some(reason) = &s.peer_refused_reason {
        let _ = write!(peer, ": {reason}");
    }
    line("peer", peer);
    match (&s.not_serving_reason, s.role.as_str()) {
        (None, _) => line("serving", "yes".into()),
        (Some(r), "primary") => line("serving", format!("NO: {r}")),
        (Some(_), _) => line(
            "promote",
            if s.current {
                "safe: caught up with the primary since this node started".into()
            } else {
                "refused: not caught up with the primary since this node started \
                 (`promote --force` would lose what it lacks)"
                    .into()
            },
        ),
    }
    if let Some(r) = &s.fenced_reason {
        line("", format!("FENCED: refused the peer ({r})"));
    }
    if let Some(r) = &s.self_fenced_reason {
        line("", format!("FENCED by the failover agent: {r}"));
    }
    if let Some(w) = &s.stale_mark_wanted {
        line(
            "",
            format!(
                "WRITES WAIT for etcd to record the backup stale from seq {} (for {} ms)",
                thousands(w.from_seq),
                w.waiting_ms
            ),
        );
    }
    if let Some(f) = &s.failover {
        line("failover", failover_line(f));
        if let Some(e) = &f.etcd_error {
            line("", format!("etcd: {e}"));
        }
        if let Some(m) = &f.stale_mark {
            line("", format!("etcd stale mark: {m}"));
        }
        if let Some(t) = &f.last_transition {
            line("", format!("last transition: {t}"));
        }
    }
    if s.degraded {
        let stale = match s.peer_stale_from_seq {
            Some(seq) => format!("peer stale from seq {}", thousands(seq)),
            None => "peer stale".to_string(),
        };
        line(
            "",
            format!("DEGRADED: serving writes without the peer; {stale}"),
        );
    }

    line(
        "seq",
        format!(
            "head {}  executed {}",
            thousands(s.head_seq),
            thousands(s.executed_seq)
        ),
    );
    line(
        "delta",
        format!(
            "{} entries  {}  ({} of {} ring)",
            thousands(s.delta_entries),
            bytes(s.delta_bytes),
            percent(s.delta_bytes, s.ring_capacity_bytes),
            bytes(s.ring_capacity_bytes)
        ),
    );
    if !s.ring_location.is_empty() {
        line("ring", s.ring_location.clone());
    }
    line(
        "acks",
        format!(
            "ack1 {}  ack2 {}  ack3 {}",
            thousands(s.ack1_seq),
            thousands(s.ack2_seq),
            thousands(s.ack3_seq)
        ),
    );
    line(
        "dirty",
        format!(
            "{} extents  {}  (map: {} chunks, {} in memory)",
            thousands(s.dirty_extents),
            bytes(s.dirty_bytes),
            bytes(s.dirty_granularity_bytes),
            bytes(s.dirty_map_memory_bytes)
        ),
    );
    line("remirrors", thousands(s.remirrors));
    if let Some(v) = &s.verify {
        line("verify", verify_line(v));
    }
    if let Some(r) = &s.replay_progress {
        line("replay", replay_fields(r));
    }
    let last = match &s.last_replay {
        Some(r) => format!(
            "{} entries  {} extents  {}  in {}{}",
            thousands(r.entries),
            thousands(r.extents),
            bytes(r.bytes),
            seconds(r.seconds),
            if r.full_remirror {
                "  (full remirror)"
            } else {
                ""
            }
        ),
        None => "none".to_string(),
    };
    line("last", format!("replay {last}"));

    let io = &s.io;
    line(
        "io",
        format!(
            "reads {} ({})  writes {} ({})  flushes {}  errors {}",
            thousands(io.reads),
            bytes(io.read_bytes),
            thousands(io.writes),
            bytes(io.write_bytes),
            thousands(io.flushes),
            thousands(io.errors)
        ),
    );
    line(
        "latency",
        format!(
            "read {}   write {}",
            latency(&io.read_latency),
            latency(&io.write_latency)
        ),
    );
    line(
        "stages",
        format!(
            "ring sync {}   disk write {}",
            latency(&io.ring_sync_latency),
            latency(&io.disk_write_latency)
        ),
    );
    if let Some(path) = write_path(&s.role, &io.stages) {
        line("path", path);
    }
    line(
        "link",
        format!(
            "sent {} msgs {}  received {} msgs {}  refused peers {}",
            thousands(s.link_msgs_sent),
            bytes(s.link_bytes_sent),
            thousands(s.link_msgs_received),
            bytes(s.link_bytes_received),
            thousands(s.link_peers_refused)
        ),
    );
    if !s.reactors.is_empty() {
        line("reactors", reactor_loads(&s.reactors));
    }
    if let Some(h) = &s.disk_handover {
        line("disk", disk_handover(h));
    }
    line("memory", format!("rss {}", bytes(s.rss_bytes)));
    let b = &s.buffers;
    // (A status from a node without a pool has none to show.)
    if b.pool_bytes > 0 {
        line(
        "buffers",
        format!(
            "pool {} in use of {}, {} misses, {}; payload copies {} (link receive {}, execute {}, link send {}), front-end receive {}",
            bytes(b.pool_in_use_bytes),
            bytes(b.pool_bytes),
            thousands(b.pool_misses),
            if b.pool_registered {
                format!("registered, {} fixed disk ops", thousands(b.fixed_disk_ops))
            } else {
                format!(
                    "not registered ({} failures)",
                    thousands(b.pool_registration_failures)
                )
            },
            bytes(b.payload_copy_bytes),
            bytes(b.link_receive_copy_bytes),
            bytes(b.execute_copy_bytes),
            bytes(b.link_send_copy_bytes),
            bytes(b.frontend_receive_copy_bytes)
        ),
    );
    }
    out
}

/// One line of live replay progress, e.g.
/// `replay: 12,345/100,000 entries  45.2/400.0 MiB  3.1 s  ETA 24 s`.
pub fn replay_progress_line(r: &ReplayStats) -> String {
    format!("replay: {}", replay_fields(r))
}

fn replay_fields(r: &ReplayStats) -> String {
    let total_entries = r.entries + r.remaining_entries;
    let total_bytes = r.bytes + r.remaining_bytes;
    let (scale, unit) = byte_unit(total_bytes);
    let mut s = format!(
        "{}/{} entries  {}/{} {unit}  {}  ETA {}",
        thousands(r.entries),
        thousands(total_entries),
        scaled(r.bytes, scale),
        scaled(total_bytes, scale),
        seconds(r.seconds),
        eta(r)
    );
    if r.extents > 0 {
        let _ = write!(s, "  ({} dirty extents)", thousands(r.extents));
    }
    if r.full_remirror {
        s.push_str("  (full remirror)");
    }
    s
}

/// Time left at the average rate so far: by bytes when any moved, else by
/// entries; "?" before anything moved.
fn eta(r: &ReplayStats) -> String {
    if r.remaining_bytes == 0 && r.remaining_entries == 0 {
        return "0 s".to_string();
    }
    let fraction_left = if r.bytes > 0 {
        r.remaining_bytes as f64 / r.bytes as f64
    } else if r.entries > 0 {
        r.remaining_entries as f64 / r.entries as f64
    } else {
        return "?".to_string();
    };
    if r.seconds <= 0.0 {
        return "?".to_string();
    }
    duration(r.seconds * fraction_left)
}

/// The `disk` line: the hand-over mode in use and, when it is adaptive,
/// its comparisons and the last one's figures.
fn disk_handover(h: &engine::status::DiskHandOverStatus) -> String {
    if !h.adaptive {
        return format!("operations handed to the kernel {} (fixed)", h.mode);
    }
    let mut t = format!(
        "operations handed to the kernel {} (adaptive; {} comparisons, {} chose at-once",
        h.mode,
        thousands(h.comparisons),
        thousands(h.chose_at_once)
    );
    if h.at_once_ops_per_sec + h.in_chunks_ops_per_sec > 0 {
        t += &format!(
            "; last: {}/s at once, {}/s in chunks",
            thousands(h.at_once_ops_per_sec),
            thousands(h.in_chunks_ops_per_sec)
        );
    }
    t + ")"
}

/// Each reactor's share of busy time since the node started, e.g.
/// `dm-reactor-1 (core 0) busy 63.2%   dm-conn-1 (core 1) busy 4.0%`.
fn reactor_loads(rs: &[ReactorLoad]) -> String {
    rs.iter()
        .map(|r| {
            let total = r.busy_us + r.idle_us;
            let core = r.core.map(|c| format!(" (core {c})")).unwrap_or_default();
            if total == 0 {
                format!("{}{core} busy -", r.thread)
            } else {
                format!(
                    "{}{core} busy {:.1}%",
                    r.thread,
                    r.busy_us as f64 * 100.0 / total as f64
                )
            }
        })
        .collect::<Vec<_>>()
        .join("   ")
}

/// 1234567 -> "1,234,567".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

/// The binary unit that keeps `n` below 1024 of it.
fn byte_unit(n: u64) -> (u64, &'static str) {
    let mut scale = 1u64;
    let mut i = 0;
    while i + 1 < UNITS.len() && n >= scale * 1024 {
        scale *= 1024;
        i += 1;
    }
    (scale, UNITS[i])
}

fn scaled(n: u64, scale: u64) -> String {
    if scale == 1 {
        n.to_string()
    } else {
        format!("{:.1}", n as f64 / scale as f64)
    }
}

/// 47409971 -> "45.2 MiB".
fn bytes(n: u64) -> String {
    let (scale, unit) = byte_unit(n);
    format!("{} {unit}", scaled(n, scale))
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".to_string()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

/// Elapsed seconds with one decimal: "3.1 s".
fn seconds(s: f64) -> String {
    format!("{s:.1} s")
}

/// Whole durations: "24 s", "3 m 05 s", "2 h 07 m", "3 d 04 h".
fn duration(secs: f64) -> String {
    let t = if secs.is_finite() && secs > 0.0 {
        secs.round() as u64
    } else {
        0
    };
    match t {
        0..=59 => format!("{t} s"),
        60..=3599 => format!("{} m {:02} s", t / 60, t % 60),
        3600..=86_399 => format!("{} h {:02} m", t / 3600, t % 3600 / 60),
        _ => format!("{} d {:02} h", t / 86_400, t % 86_400 / 3600),
    }
}

fn latency(l: &Latency) -> String {
    if l.count == 0 {
        return "-".to_string();
    }
    format!(
        "p50 {} p99 {} p99.9 {}",
        micros(l.p50_us),
        micros(l.p99_us),
        micros(l.p999_us)
    )
}

/// Where a sampled mirrored write's time goes, as p50s from its start:
/// on the primary from the front-end's receipt, on the backup from the
/// REQ's arrival. `None` before any write was sampled.
fn write_path(role: &str, st: &engine::status::WriteStages) -> Option<String> {
    let (from, stages): (&str, Vec<(&str, &Latency)>) = if role == "primary" {
        (
            "from receipt",
            vec![
                ("REQ sent", &st.req_sent),
                ("ring durable", &st.ring_durable),
                ("ACK1", &st.ack1),
                ("execute", &st.execute),
                ("disk done", &st.executed),
            ],
        )
    } else {
        (
            "from the REQ's arrival",
            vec![("ring durable", &st.ring_durable), ("ACK1 sent", &st.ack1)],
        )
    };
    let parts: Vec<String> = stages
        .iter()
        .filter(|(_, l)| l.count > 0)
        .map(|(name, l)| format!("{name} {}", micros(l.p50_us)))
        .collect();
    let sampled = stages.iter().map(|(_, l)| l.count).max().unwrap_or(0);
    (!parts.is_empty()).then(|| {
        format!(
            "p50 {from}: {}  ({} writes sampled)",
            parts.join(", "),
            thousands(sampled)
        )
    })
}

/// `running 12.0/64.0 MiB, 1 mismatched chunk: 4096+4096` and the like.
pub fn verify_line(v: &engine::status::VerifyStatus) -> String {
    let mut t = format!(
        "{} {}/{}  {}",
        v.state,
        bytes(v.done_bytes),
        bytes(v.length),
        seconds(v.seconds)
    );
    let _ = write!(
        t,
        "  {} mismatched chunk{} of {}",
        thousands(v.mismatched_chunks),
        if v.mismatched_chunks == 1 { "" } else { "s" },
        bytes(v.chunk_bytes)
    );
    if !v.mismatches.is_empty() {
        let shown: Vec<String> = v
            .mismatches
            .iter()
            .take(4)
            .map(|(o, l)| format!("{o}+{l}"))
            .collect();
        let _ = write!(
            t,
            ": {}{}",
            shown.join(", "),
            if v.mismatches.len() > 4 { ", ..." } else { "" }
        );
    }
    if v.repair_chunks > 0 {
        let _ = write!(
            t,
            "  ({} resent from the primary)",
            thousands(v.repair_chunks)
        );
    }
    if let Some(r) = &v.reason {
        let _ = write!(t, "  ({r})");
    }
    t
}

fn micros(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} us")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::status::{BufferStats, IoStats};

    fn sample() -> NodeStatus {
        NodeStatus {
            pid: 4242,
            node_id: 1,
            node_name: "store-a".into(),
            role: "primary".into(),
            generation: 7,
            peer_state: "replaying".into(),
            peer_refused_reason: None,
            serving: true,
            not_serving_reason: None,
            fenced_reason: None,
            self_fenced_reason: None,
            stale_mark_wanted: None,
            failover: None,
            current: false,
            forced_generations: vec![],
            degraded: false,
            peer_stale_from_seq: None,
            head_seq: 1_234_567,
            executed_seq: 1_234_560,
            delta_entries: 12_345,
            delta_bytes: 47_409_971,
            ring_capacity_bytes: 256 << 20,
            ring_location: "/dev/nvme1n1: block device of 274877906944 bytes (logical blocks of 4096 bytes), O_DIRECT".into(),
            ack1_seq: 1_234_567,
            ack2_seq: 1_222_222,
            ack3_seq: 1_234_560,
            dirty_extents: 0,
            dirty_bytes: 0,
            dirty_granularity_bytes: 4096,
            dirty_map_memory_bytes: 32 << 10,
            verify: None,
            remirrors: 0,
            last_replay: Some(ReplayStats {
                entries: 500,
                bytes: 2 << 20,
                extents: 0,
                seconds: 0.42,
                remaining_entries: 0,
                remaining_bytes: 0,
                full_remirror: false,
                ..ReplayStats::default()
            }),
            replay_progress: Some(progress()),
            io: IoStats {
                reads: 1000,
                writes: 2000,
                flushes: 10,
                read_bytes: 4 << 20,
                write_bytes: 8 << 20,
                errors: 0,
                read_latency: Latency {
                    count: 1000,
                    p50_us: 85.0,
                    p99_us: 210.4,
                    p999_us: 12_500.0,
                },
                write_latency: Latency::default(),
                ..IoStats::default()
            },
            link_msgs_sent: 3000,
            link_msgs_received: 2990,
            link_bytes_sent: 8_500_000,
            link_bytes_received: 120_000,
            link_peers_refused: 1,
            uptime_seconds: 3725.0,
            rss_bytes: 88_293_990,
            buffers: BufferStats {
                pool_bytes: 64 << 20,
                pool_in_use_bytes: 1 << 20,
                pool_misses: 2,
                pool_registered: true,
                pool_registration_failures: 0,
                fixed_disk_ops: 1200,
                payload_copy_bytes: 0,
                link_receive_copy_bytes: 0,
                execute_copy_bytes: 0,
                link_send_copy_bytes: 0,
                frontend_receive_copy_bytes: 8192,
            },
            reactors: vec![
                ReactorLoad {
                    thread: "dm-reactor-1".into(),
                    core: Some(2),
                    busy_us: 632,
                    idle_us: 368,
                },
                ReactorLoad {
                    thread: "dm-conn-1".into(),
                    core: Some(3),
                    busy_us: 40,
                    idle_us: 960,
                },
                ReactorLoad {
                    thread: "dm-conn-2".into(),
                    core: None,
                    busy_us: 0,
                    idle_us: 0,
                },
            ],
            disk_handover: None,
        }
    }

    fn progress() -> ReplayStats {
        let mib = 1u64 << 20;
        ReplayStats {
            entries: 12_345,
            bytes: (45.2 * mib as f64) as u64,
            extents: 0,
            seconds: 3.1,
            remaining_entries: 100_000 - 12_345,
            remaining_bytes: 400 * mib - (45.2 * mib as f64) as u64,
            full_remirror: false,
            ..ReplayStats::default()
        }
    }

    #[test]
    fn progress_line_matches_the_documented_shape() {
        assert_eq!(
            replay_progress_line(&progress()),
            "replay: 12,345/100,000 entries  45.2/400.0 MiB  3.1 s  ETA 24 s"
        );
    }

    #[test]
    fn progress_line_before_anything_moved_and_when_done() {
        let mut r = ReplayStats {
            remaining_entries: 10,
            remaining_bytes: 40_960,
            ..ReplayStats::default()
        };
        assert_eq!(
            replay_progress_line(&r),
            "replay: 0/10 entries  0.0/40.0 KiB  0.0 s  ETA ?"
        );
        r = ReplayStats {
            entries: 10,
            bytes: 40_960,
            extents: 3,
            seconds: 0.5,
            full_remirror: true,
            ..ReplayStats::default()
        };
        assert_eq!(
            replay_progress_line(&r),
            "replay: 10/10 entries  40.0/40.0 KiB  0.5 s  ETA 0 s  (3 dirty extents)  (full remirror)"
        );
    }

    #[test]
    fn render_sample() {
        let text = render(&sample());
        let expected = "\
node      1 (store-a)  primary  generation 7  pid 4242  up 1 h 02 m
peer      replaying
serving   yes
seq       head 1,234,567  executed 1,234,560
delta     12,345 entries  45.2 MiB  (17.7% of 256.0 MiB ring)
ring      /dev/nvme1n1: block device of 274877906944 bytes (logical blocks of 4096 bytes), O_DIRECT
acks      ack1 1,234,567  ack2 1,222,222  ack3 1,234,560
dirty     0 extents  0 B  (map: 4.0 KiB chunks, 32.0 KiB in memory)
remirrors 0
replay    12,345/100,000 entries  45.2/400.0 MiB  3.1 s  ETA 24 s
last      replay 500 entries  0 extents  2.0 MiB  in 0.4 s
io        reads 1,000 (4.0 MiB)  writes 2,000 (8.0 MiB)  flushes 10  errors 0
latency   read p50 85 us p99 210 us p99.9 12.5 ms   write -
stages    ring sync -   disk write -
link      sent 3,000 msgs 8.1 MiB  received 2,990 msgs 117.2 KiB  refused peers 1
reactors  dm-reactor-1 (core 2) busy 63.2%   dm-conn-1 (core 3) busy 4.0%   dm-conn-2 busy -
memory    rss 84.2 MiB
buffers   pool 1.0 MiB in use of 64.0 MiB, 2 misses, registered, 1,200 fixed disk ops; payload copies 0 B (link receive 0 B, execute 0 B, link send 0 B), front-end receive 8.0 KiB
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn render_write_path() {
        let mut s = sample();
        let l = |p50_us, count| Latency {
            count,
            p50_us,
            p99_us: p50_us * 2.0,
            p999_us: p50_us * 3.0,
        };
        s.io.stages = engine::status::WriteStages {
            req_sent: l(6.0, 1_000),
            ring_durable: l(242.0, 1_000),
            ack1: l(246.0, 1_000),
            execute: l(247.0, 1_000),
            executed: l(328.0, 999),
        };
        let text = render(&s);
        assert!(
            text.contains(
                "path      p50 from receipt: REQ sent 6 us, ring durable 242 us, ACK1 246 us, \
                 execute 247 us, disk done 328 us  (1,000 writes sampled)\n"
            ),
            "{text}"
        );
        s.role = "backup".into();
        s.io.stages.req_sent = l(0.0, 0);
        s.io.stages.execute = l(0.0, 0);
        s.io.stages.executed = l(0.0, 0);
        let text = render(&s);
        assert!(
            text.contains(
                "path      p50 from the REQ's arrival: ring durable 242 us, ACK1 sent 246 us  \
                 (1,000 writes sampled)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn render_disk_handover() {
        let mut s = sample();
        assert!(!render(&s).contains("\ndisk "));
        let mut h = engine::status::DiskHandOverStatus {
            mode: "in-chunks".into(),
            adaptive: true,
            comparisons: 12,
            chose_at_once: 4,
            at_once_ops_per_sec: 33_597,
            in_chunks_ops_per_sec: 50_854,
        };
        s.disk_handover = Some(h.clone());
        assert!(
            render(&s).contains(
                "\ndisk      operations handed to the kernel in-chunks (adaptive; 12 comparisons, \
                 4 chose at-once; last: 33,597/s at once, 50,854/s in chunks)\n"
            ),
            "{}",
            render(&s)
        );
        h.adaptive = false;
        h.mode = "at-once".into();
        s.disk_handover = Some(h);
        assert!(
            render(&s).contains("\ndisk      operations handed to the kernel at-once (fixed)\n")
        );
    }

    #[test]
    fn render_failover() {
        let mut s = sample();
        assert!(!render(&s).contains("failover"));
        s.serving = false;
        s.not_serving_reason = Some("fenced by the failover agent: lost both".into());
        s.self_fenced_reason = Some("lost both etcd and the backup".into());
        s.stale_mark_wanted = Some(engine::status::StaleMarkWanted {
            generation: 8,
            from_seq: 1_000_001,
            waiting_ms: 250,
        });
        s.failover = Some(engine::status::FailoverStatus {
            mode: "etcd".into(),
            key: "/deltamirror/x/leader".into(),
            lease_holder: "store-a".into(),
            lease_holder_node_id: Some(1),
            lease_generation: Some(7),
            holds_lease: true,
            lease_left_ms: 2400,
            last_renewal_ms_ago: Some(600),
            etcd_reachable: true,
            stale_mark: Some("backup node 2 stale from seq 1000001".into()),
            last_transition: Some("won the leader key in generation 7".into()),
            ..Default::default()
        });
        let text = render(&s);
        for want in [
            "FENCED by the failover agent: lost both etcd and the backup\n",
            "WRITES WAIT for etcd to record the backup stale from seq 1,000,001 (for 250 ms)\n",
            "failover  etcd (lease held by node 1 (store-a) in generation 7); this node's lease: \
             2400 ms left, renewed 600 ms ago\n",
            "etcd stale mark: backup node 2 stale from seq 1000001\n",
            "last transition: won the leader key in generation 7\n",
        ] {
            assert!(text.contains(want), "{want:?} missing in:\n{text}");
        }
    }

    #[test]
    fn render_degraded_and_refused() {
        let mut s = sample();
        s.replay_progress = None;
        s.last_replay = None;
        s.degraded = true;
        s.peer_state = "refused".into();
        s.peer_refused_reason = Some("split brain: both nodes primary in generation 8".into());
        s.peer_stale_from_seq = Some(1_000_001);
        s.serving = false;
        s.not_serving_reason = Some("fenced after refusing the peer (split brain)".into());
        s.fenced_reason = Some("split brain: both nodes primary in generation 8".into());
        let text = render(&s);
        assert!(text.contains(
            "peer      refused: split brain: both nodes primary in generation 8\n\
             serving   NO: fenced after refusing the peer (split brain)\n\
             \x20         FENCED: refused the peer (split brain: both nodes primary in generation 8)\n\
             \x20         DEGRADED: serving writes without the peer; peer stale from seq 1,000,001\n"
        ), "{text}");
        // A backup says whether a promote is safe.
        s.role = "backup".into();
        s.fenced_reason = None;
        s.not_serving_reason = Some("backup: the peer serves".into());
        assert!(
            render(&s).contains("promote   refused: not caught up"),
            "{}",
            render(&s)
        );
        s.current = true;
        assert!(render(&s).contains("promote   safe"), "{}", render(&s));
        assert!(text.contains("last      replay none\n"), "{text}");
        assert!(!text.contains("replay    "), "{text}");
    }

    #[test]
    fn number_helpers() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(u64::MAX), "18,446,744,073,709,551,615");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(percent(1, 0), "-");
        assert_eq!(duration(59.4), "59 s");
        assert_eq!(duration(185.0), "3 m 05 s");
        assert_eq!(duration(90_000.0), "1 d 01 h");
        assert_eq!(duration(f64::NAN), "0 s");
    }
}
