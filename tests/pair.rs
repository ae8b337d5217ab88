//! Process-level tests: two real `deltamirror serve` processes on
//! 127.0.0.1, driven by real NBD clients (fio's nbd engine, qemu-io), with
//! kill -9, promotion, a cut link, a wrong key and a delta-queue overflow.
//!
//! These tests need fio and qemu-io (installed by scripts/test.sh); the
//! link-cut test also needs nft and root. Each test skips with a printed
//! reason only when a tool is truly absent.
//!
//! `DM_TEST_LINK=fabric` runs the pairs with `link.transport = "fabric"`
//! (libfabric's tcp provider); scripts/test.sh runs the kill -9, link-cut,
//! wrong-key and overflow tests that way too. Test l always uses fabric.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{block_of, images_identical, nbd_writer, need, oracle_block, u, Pair, EXE};
use serde_json::Value;

/// The tests share the machine's two cores: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The pair tests' own steps.
impl Pair {
    /// A formatted pair with the demo configuration, both nodes serving.
    fn up(name: &str, port_offset: u16) -> Pair {
        let mut p = Pair::new(name, port_offset, |_, t| t);
        p.start_pair();
        p
    }

    /// Starts both nodes and waits until the primary has its backup.
    fn start_pair(&mut self) {
        self.start(0);
        self.start(1);
        self.wait(0, "connected", 30, |s| {
            s["peer_state"] == "connected" && s["role"] == "primary"
        });
    }

    /// The head once the status stops moving (status is published every 100 ms).
    fn settled_head(&self, i: usize) -> u64 {
        let mut last = u(&self.status(i).unwrap(), "head_seq");
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let h = u(&self.status(i).unwrap(), "head_seq");
            if h == last {
                return h;
            }
            last = h;
        }
    }

    fn admin_cmd(&self, i: usize, cmd: &str) -> bool {
        Command::new(EXE)
            .args([cmd, "--admin", &self.n[i].admin])
            .status()
            .unwrap()
            .success()
    }

    /// `deltamirror promote` on node `i`, run again (as an operator would)
    /// while it refuses only because the node has not yet seen its peer go
    /// or step down (the link closes a few milliseconds after a kill -9 or
    /// a demote). True when accepted.
    fn promote_once_peer_gone(&self, i: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (ok, err) = self.admin_args(i, &["promote"]);
            if ok {
                return true;
            }
            if !err.contains("the peer is primary and connected") || Instant::now() > deadline {
                eprintln!("promote on node {}: {err}", i + 1);
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn uri(&self, i: usize) -> String {
        format!("nbd://{}/deltamirror", self.n[i].nbd)
    }

    /// Both nodes up, backup caught up and every entry executed on both.
    /// Status snapshots are up to 100 ms old, so both are re-read together
    /// until they agree.
    fn wait_in_sync(&self, p: usize) -> (Value, Value) {
        let b = 1 - p;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = (None, None);
        while Instant::now() < deadline {
            if let (Some(sp), Some(sb)) = (self.status(p), self.status(b)) {
                let head = sp["head_seq"].as_u64();
                let ok = sp["role"] == "primary"
                    && sp["peer_state"] == "connected"
                    && sp["degraded"] == false
                    && sp["ack2_seq"] == sp["head_seq"]
                    && sp["executed_seq"] == sp["head_seq"]
                    && sb["executed_seq"].as_u64() == head
                    && sb["head_seq"].as_u64() == head;
                if ok {
                    return (sp, sb);
                }
                last = (Some(sp), Some(sb));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the pair never got in sync in 120 s; last statuses:\nprimary {}\nbackup {}\nlogs:\n{}\n{}",
            last.0.map(|s| s.to_string()).unwrap_or_default(),
            last.1.map(|s| s.to_string()).unwrap_or_default(),
            std::fs::read_to_string(&self.n[p].log).unwrap_or_default(),
            std::fs::read_to_string(&self.n[b].log).unwrap_or_default()
        );
    }
}

/// A bare HTTP POST to the admin endpoint; returns the whole response.
fn http_post(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// fio random 4 KiB writes through NBD for `secs`; returns the child.
fn fio_load(uri: &str, secs: u64, name: &str) -> Child {
    Command::new("fio")
        .args([
            &format!("--name={name}"),
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=128m",
            "--time_based",
            &format!("--runtime={secs}"),
            "--output-format=terse",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fio")
}

/// Writes `count` 4 KiB blocks through fio (a known number of writes).
fn fio_writes(uri: &str, count: u64, offset_mib: u64) {
    let st = Command::new("fio")
        .args([
            "--name=known",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            &format!("--offset={offset_mib}m"),
            "--size=64m",
            &format!("--number_ios={count}"),
            "--norandommap",
            "--output-format=terse",
        ])
        .stdout(Stdio::null())
        .status()
        .expect("fio");
    assert!(st.success(), "fio writes failed");
}

/// One qemu-io write of pattern `p` at block `blk`; true if it completed.
fn qemu_write(uri: &str, blk: u64, p: u8) -> bool {
    Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            uri,
            "-c",
            &format!("write -P {p} {} 4k", blk * 4096),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The seqs of the last `ring recovered: N records (seq F..NEXT)` line in a
/// node's log: the ring as the node found it at its latest start.
fn ring_recovered(log: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(log).unwrap();
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("ring recovered:"))
        .unwrap_or_else(|| panic!("no 'ring recovered' line in {}", log.display()));
    let r = &line[line.find("(seq ").unwrap() + 5..];
    let r = &r[..r.find(')').unwrap()];
    let (a, b) = r.split_once("..").unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

#[test]
fn a_backup_killed_under_load_gets_only_the_missed_writes() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["fio"]) {
        return;
    }
    // Node 2 keeps its ring outside its data directory (`ring.path`), as on
    // a machine with a separate fast device for it: the restart below must
    // recover the ring from there.
    let rings = std::env::temp_dir().join(format!("dm-test-a-rings-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&rings);
    std::fs::create_dir_all(&rings).unwrap();
    let ring2 = rings.join("node2.ring");
    // Rings large enough that the outage below never overflows them (the
    // dirty-map path is test e's): 3 s of QD8 load plus 2,000 writes.
    let mut p = Pair::new("a", 3000, |id, t| {
        assert!(t.contains("[ring]\nsize_bytes = 67108864"), "{t}");
        let t = t.replace(
            "[ring]\nsize_bytes = 67108864",
            "[ring]\nsize_bytes = 536870912",
        );
        if id == 2 {
            t.replace("[ring]", &format!("[ring]\npath = {:?}", ring2))
        } else {
            t
        }
    });
    p.start_pair();
    assert!(ring2.is_file(), "format created the ring at ring.path");
    assert!(
        !p.dir.join("node2").join("ring").exists(),
        "no ring in node 2's data_dir"
    );
    let mut load = fio_load(&p.uri(0), 3, "a-load");
    // Kill the backup once the load is well under way (fio's iodepth 8:
    // at most 8 writes are in flight when it dies).
    let s = p.status(0).unwrap();
    let w0 = u(&s["io"], "writes");
    p.wait(0, "load under way", 30, |s| {
        u(&s["io"], "writes") >= w0 + 500
    });
    p.kill9(1);
    let _ = load.wait();
    // Degraded: the primary recorded the first seq the backup may lack.
    let s = p.wait(0, "degraded", 30, |s| s["degraded"] == true);
    let stale_from = u(&s, "peer_stale_from_seq");
    let head_after_load = p.settled_head(0);
    // Keep writing: a known number of writes the backup misses entirely.
    fio_writes(&p.uri(0), 2000, 0);
    let head_before_restart = p.settled_head(0);
    assert!(head_before_restart >= head_after_load + 2000);
    p.start(1);
    let (sp, sb) = p.wait_in_sync(0);
    // The 2,000 writes of 4 KiB are below reactor.zero_copy_receive_min_bytes:
    // the primary's NBD front-end received them in bulk and copied each
    // once, and its status counts that; the backup serves no host.
    let fe = |s: &Value| u(&s["buffers"], "frontend_receive_copy_bytes");
    assert!(
        fe(&sp) >= 2000 * 4096,
        "primary's front-end receive copies {} < the 2,000 small writes' payloads",
        fe(&sp)
    );
    assert_eq!(fe(&sb), 0, "the backup's front-ends copied nothing");
    // The write path stages: the primary sampled mirrored writes through
    // to their disk writes, the backup REQs through to their ACK1s.
    let stage = |s: &Value, name: &str| {
        let l = &s["io"]["stages"][name];
        (u(l, "count"), l["p50_us"].as_f64().unwrap())
    };
    let (sent, sent_p50) = stage(&sp, "req_sent");
    let (done, done_p50) = stage(&sp, "executed");
    assert!(
        sent > 0 && done > 0,
        "primary stages: {}",
        sp["io"]["stages"]
    );
    assert!(
        sent_p50 <= done_p50,
        "primary stages: {}",
        sp["io"]["stages"]
    );
    assert!(stage(&sb, "ack1").0 > 0 && stage(&sb, "ring_durable").0 > 0);
    // What the backup held when it came back: its ring, as it recovered it.
    let (_, backup_next) = ring_recovered(&p.n[1].log);
    let r = &sp["last_replay"];
    let (first, last, entries) = (u(r, "first_seq"), u(r, "last_seq"), u(r, "entries"));
    println!(
        "replay: seqs {first}..={last}, {entries} entries, {} bytes, {} s; backup recovered \
         its ring through seq {}; primary degraded with backup stale from seq {stale_from}",
        u(r, "bytes"),
        r["seconds"],
        backup_next - 1
    );
    // Exactly the entries the backup did not hold were replayed: from the
    // first seq missing from its ring to the primary's head at reconnect
    // (no write arrived during the replay), every one of them.
    assert_eq!(
        first, backup_next,
        "the replay starts at the first write the backup's ring lacks"
    );
    assert_eq!(last, head_before_restart, "the replay ends at the head");
    assert_eq!(
        entries,
        last - first + 1,
        "replayed entries are the contiguous range"
    );
    // The backup held everything ACK1 covered when it died, and at most the
    // 8 writes in flight beyond that.
    assert!(
        stale_from <= first && first <= stale_from + 8,
        "the backup's ring ends between its ACK1 and ACK1 + fio's iodepth"
    );
    assert_eq!(
        u(&sp, "remirrors") + u(&sb, "remirrors"),
        0,
        "no full remirror"
    );
    assert_eq!(u(r, "extents"), 0, "no dirty-map resync");
    assert_eq!(
        u(r, "bytes"),
        entries * 4096,
        "replayed bytes are the missed writes' payloads"
    );
    assert!(
        images_identical(&p.n[0].volume, &p.n[1].volume),
        "images differ"
    );
    drop(p);
    let _ = std::fs::remove_dir_all(&rings);
}

#[test]
fn b_primary_killed_backup_promoted_old_primary_returns_as_backup() {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["fio", "qemu-io"]) {
        return;
    }
    let mut p = Pair::up("b", 3100);
    // Markers on the healthy pair: every one completes and must survive.
    let mut completed: Vec<(u64, u8)> = Vec::new();
    for k in 0..20u64 {
        assert!(
            qemu_write(&p.uri(0), 200_000 + k, (k + 1) as u8),
            "marker write {k} failed on the healthy pair"
        );
        completed.push((200_000 + k, (k + 1) as u8));
    }
    // Under load (fio, iodepth 8) and the oracle writer (4 in flight), the
    // primary dies. The oracle records a write only once its reply arrived.
    const FIO_QD: u64 = 8;
    const ORACLE_QD: u64 = 4;
    let mut load = fio_load(&p.uri(0), 10, "b-load");
    p.wait(0, "fio under way", 30, |s| {
        u(&s["io"], "writes") >= 20 + 1000
    });
    let stop = AtomicBool::new(false);
    let acks = AtomicU64::new(0);
    let nbd0 = p.n[0].nbd.clone();
    let before_kill = std::thread::scope(|sc| {
        let writer =
            sc.spawn(|| nbd_writer(&nbd0, 1, 100_000, 99_000, ORACLE_QD as usize, &stop, &acks));
        while acks.load(std::sync::atomic::Ordering::Acquire) < 300 && !writer.is_finished() {
            std::thread::sleep(Duration::from_millis(10));
        }
        p.kill9(0);
        // Ends it if the kill did not break its connection (it must).
        stop.store(true, std::sync::atomic::Ordering::Release);
        writer.join().unwrap()
    });
    // fio's job ends on the broken connection.
    let _ = load.wait();
    println!(
        "oracle before the kill: {} writes acknowledged, {} errors, ended by {:?}",
        before_kill.acked.len(),
        before_kill.errors,
        before_kill.broken
    );
    assert!(
        before_kill.acked.len() >= 300,
        "the oracle saw its writes acknowledged before the kill"
    );
    assert!(
        before_kill.broken.is_some(),
        "the kill ended the oracle's connection with writes in flight"
    );
    // As an operator would: promote once the backup saw its peer go.
    let s1 = p.wait(1, "peer gone", 20, |s| s["peer_state"] != "connected");
    assert_eq!(s1["current"], true, "the backup had caught up: {s1}");
    assert!(p.admin_cmd(1, "promote"), "promote refused");
    let s1 = p.wait(1, "serving as primary", 20, |s| {
        s["role"] == "primary" && s["serving"] == true && s["peer_stale_from_seq"].is_u64()
    });
    let gen_new = u(&s1, "generation");
    // The new generation starts at the seq after everything the backup held,
    // and the old primary is stale from there on: it misses exactly the
    // writes made from here.
    let gen_first = u(&s1, "peer_stale_from_seq");
    assert_eq!(u(&s1, "head_seq"), gen_first - 1);
    for k in 0..20u64 {
        assert!(
            qemu_write(&p.uri(1), 201_000 + k, (k + 101) as u8),
            "marker write {k} failed on the new primary"
        );
        completed.push((201_000 + k, (k + 101) as u8));
    }
    let no_stop = AtomicBool::new(false);
    let after = nbd_writer(&p.n[1].nbd, 2, 210_000, 1000, 8, &no_stop, &acks);
    assert!(
        after.broken.is_none() && after.errors == 0 && after.acked.len() == 1000,
        "writes on the new primary: {} acknowledged, {} errors, {:?}",
        after.acked.len(),
        after.errors,
        after.broken
    );
    let head_new = p.settled_head(1);
    assert_eq!(
        head_new,
        gen_first - 1 + 1020,
        "the new primary's head counts the 1,020 writes made on it"
    );
    p.start(0);
    let s0 = p.wait(0, "old primary became backup", 30, |s| {
        s["role"] == "backup"
    });
    assert_eq!(
        u(&s0, "generation"),
        gen_new,
        "it adopted the newer generation"
    );
    let (sp, sb) = p.wait_in_sync(1);
    let r = &sp["last_replay"];
    // The old primary's ring as it found it on restart: entries past
    // `gen_first - 1` never reached the new primary, so were never
    // acknowledged (to the old primary or to a host); each was a host write
    // in flight at the kill.
    let (_, old_next) = ring_recovered(&p.n[0].log);
    let tail = (old_next - 1).saturating_sub(gen_first - 1);
    println!(
        "failback replay: {r}; new generation from seq {gen_first}; old primary's ring \
         through seq {}: never-acknowledged tail of {tail}",
        old_next - 1
    );
    assert_eq!(
        u(&sp, "remirrors") + u(&sb, "remirrors"),
        0,
        "no full remirror"
    );
    // The ring's batches are written asynchronously: at the kill, entries
    // already sent may not have reached the old primary's ring file yet
    // (never acknowledged: a host write completes only once the primary's
    // ring is durable). The new primary replays those too.
    let missing = (gen_first - 1).saturating_sub(old_next - 1);
    assert!(
        missing <= FIO_QD + ORACLE_QD,
        "the old primary lacks {missing} entries the new primary received: more than were in \
         flight at the kill"
    );
    assert!(
        tail <= FIO_QD + ORACLE_QD,
        "the never-acknowledged tail is at most the writes in flight at the kill"
    );
    // Only the delta: the entries are exactly the writes made on the new
    // primary since promotion; the extents rewrite at most the old
    // primary's never-acknowledged tail.
    let (first, last, entries, extents) = (
        u(r, "first_seq"),
        u(r, "last_seq"),
        u(r, "entries"),
        u(r, "extents"),
    );
    assert_eq!(
        first,
        gen_first - missing,
        "the replay starts at the new generation, or at the first entry the old primary lacks"
    );
    assert_eq!(last, head_new, "the replay ends at the new primary's head");
    assert_eq!(
        entries,
        1020 + missing,
        "the replay is the writes since promotion and the entries the old primary lacks"
    );
    assert!(
        extents <= tail,
        "{extents} extents rewritten, more than the never-acknowledged tail of {tail}"
    );
    let granularity = 64 * 1024;
    assert!(
        u(r, "bytes") >= entries * 4096 + extents * 4096
            && u(r, "bytes") <= entries * 4096 + tail * granularity,
        "replay bytes: the entries' payloads plus the tail's extents"
    );
    if tail > 0 {
        let log0 = std::fs::read_to_string(&p.n[0].log).unwrap();
        assert!(
            log0.contains(&format!(
                "dropping ring entries {gen_first}..={} (never acknowledged",
                old_next - 1
            )),
            "the old primary dropped exactly its never-acknowledged tail"
        );
    }
    // Every acknowledged write is on both disks: the markers, the oracle's
    // writes acknowledged before and during the kill, and those made on the
    // new primary. The survivor first, the writes of the kill first.
    for i in [1, 0] {
        let img = &p.n[i].volume;
        for (salt, w) in [(1, &before_kill), (2, &after)] {
            for &blk in &w.acked {
                assert!(
                    block_of(img, blk) == oracle_block(salt, blk),
                    "node {}: acknowledged write to block {blk} (run {salt}) lost",
                    i + 1
                );
            }
        }
        for &(blk, pat) in &completed {
            assert!(
                block_of(img, blk).iter().all(|&b| b == pat),
                "node {}: completed marker at block {blk} lost",
                i + 1
            );
        }
    }
    assert!(
        images_identical(&p.n[0].volume, &p.n[1].volume),
        "images differ"
    );
}

#[test]
fn c_cut_link_degrades_and_heal_replays() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["fio", "nft"]) {
        return;
    }
    if unsafe_uid() != 0 {
        testskip::skip("cutting the link with nftables needs root (CI runs as root)");
        return;
    }
    let p = Pair::up("c", 3200);
    fio_writes(&p.uri(0), 500, 0);
    // Cut: drop every packet to or from node 2's link port on loopback, and
    // its fabric port (link port + 1) when the link runs on libfabric.
    let port = 7401 + p.offset;
    let fport = port + 1;
    let table = format!("dmtest{}", std::process::id());
    let nft = |args: &str| {
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!("nft {args}"))
            .status()
            .unwrap();
        assert!(st.success(), "nft {args}");
    };
    nft(&format!("add table inet {table}"));
    nft(&format!(
        "'add chain inet {table} out {{ type filter hook output priority 0 ; }}'"
    ));
    nft(&format!("add rule inet {table} out tcp dport {port} drop"));
    nft(&format!("add rule inet {table} out tcp sport {port} drop"));
    nft(&format!("add rule inet {table} out tcp dport {fport} drop"));
    nft(&format!("add rule inet {table} out tcp sport {fport} drop"));
    let cut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fio_writes(&p.uri(0), 1500, 64);
        p.wait(0, "degraded", 30, |s| {
            s["degraded"] == true && s["peer_state"] == "disconnected"
        })
    }));
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("nft delete table inet {table}"))
        .status();
    let s = cut.unwrap();
    println!(
        "while cut: generation {}, stale from {}",
        s["generation"], s["peer_stale_from_seq"]
    );
    fio_writes(&p.uri(0), 200, 128);
    let (sp, sb) = p.wait_in_sync(0);
    let r = &sp["last_replay"];
    println!("after heal: {r}");
    assert!(
        u(r, "entries") >= 1500,
        "the writes made during the cut were replayed"
    );
    assert_eq!(u(&sp, "remirrors") + u(&sb, "remirrors"), 0);
    assert!(
        images_identical(&p.n[0].volume, &p.n[1].volume),
        "images differ"
    );
}

#[test]
fn d_peer_with_the_wrong_key_is_refused() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut p = Pair::new("d", 3300, |id, t| {
        if id == 2 {
            t.replace(
                "deltamirror-demo-key-not-secret",
                "an-intruder-with-another-key",
            )
        } else {
            t
        }
    });
    p.start(0);
    p.start(1);
    std::thread::sleep(Duration::from_secs(3));
    let s0 = p.status(0).unwrap();
    let s1 = p.status(1).unwrap();
    assert_ne!(s0["peer_state"], "connected");
    assert_ne!(s1["peer_state"], "connected");
    assert_eq!(
        u(&s0, "link_msgs_received"),
        0,
        "no replication message crossed"
    );
    let log1 = std::fs::read_to_string(&p.n[1].log).unwrap();
    let log0 = std::fs::read_to_string(&p.n[0].log).unwrap();
    assert!(
        log1.contains("authentication failed") || log0.contains("authentication failed"),
        "the refusal is logged:\n{log0}\n{log1}"
    );
    assert!(
        u(&s0, "link_peers_refused") + u(&s1, "link_peers_refused") > 0,
        "status counts the refused peer"
    );
}

#[test]
fn e_delta_queue_overflow_resyncs_dirty_extents_without_remirror() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["fio"]) {
        return;
    }
    // A 16 MiB ring holds about 2,000 4 KiB entries (8 KiB each).
    let mut p = Pair::new("e", 3400, |_, t| {
        t.replace("size_bytes = 67108864", "size_bytes = 16777216")
    });
    p.start_pair();
    fio_writes(&p.uri(0), 300, 0);
    p.kill9(1);
    fio_writes(&p.uri(0), 12_000, 0);
    let s = p.wait(0, "dirty map used", 20, |s| u(s, "dirty_extents") > 0);
    println!(
        "overflow: {} dirty extents, {} entries in the ring",
        s["dirty_extents"], s["delta_entries"]
    );
    p.start(1);
    let (sp, sb) = p.wait_in_sync(0);
    let r = &sp["last_replay"];
    println!("resync: {r}");
    assert!(u(r, "extents") > 0, "dirty extents were resynced");
    assert_eq!(
        u(&sp, "remirrors") + u(&sb, "remirrors"),
        0,
        "no full remirror"
    );
    assert_eq!(u(&sp, "dirty_extents"), 0, "dirty map cleared");
    assert!(
        images_identical(&p.n[0].volume, &p.n[1].volume),
        "images differ"
    );
}

fn unsafe_uid() -> u32 {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(1)
}

/// The crate's own NVMe/TCP multipath host (`nvme_host::load::run_failover`,
/// what `dm-nvme failover` runs) writes at QD8 through whichever of the two
/// real nodes is ANA optimized, across a planned failover (demote node 1,
/// promote node 2) and then an unplanned one (kill -9 of node 2, promote
/// node 1). It keeps the latest acknowledged write of every 4 KiB chunk and
/// at the end reads each back through the surviving primary; the killed node
/// then returns, catches up, and both images must be identical.
#[test]
fn f_nvme_initiator_follows_ana_across_planned_and_unplanned_failover() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut p = Pair::up("f", 3500);
    let paths: Vec<SocketAddr> = [4420 + p.offset, 4421 + p.offset]
        .iter()
        .map(|port| format!("127.0.0.1:{port}").parse().unwrap())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let host = nvme_host::initiator::HostConfig::new("nqn.2026-11.io.deltamirror:demo");
    // 64 MiB of 4 KiB chunks: most chunks are written once, so nearly every
    // acknowledged write is checked on its own.
    let run = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            nvme_host::load::run_failover(&paths, &host, 8, 4096, 64 << 20, stop)
        })
    };
    p.wait(0, "NVMe writes on node 1", 60, |s| {
        u(&s["io"], "writes") >= 500
    });
    // Planned failover: the primary steps down, the backup takes over.
    assert!(p.admin_cmd(0, "demote"), "demote refused");
    p.wait(0, "demoted", 20, |s| s["role"] == "backup");
    assert!(p.promote_once_peer_gone(1), "promote refused");
    p.wait(1, "promoted", 20, |s| {
        s["role"] == "primary" && s["serving"] == true
    });
    let w = u(&p.status(1).unwrap()["io"], "writes");
    p.wait(1, "NVMe writes follow to node 2", 60, |s| {
        u(&s["io"], "writes") >= w + 500
    });
    // Node 1 is node 2's backup now; once it has caught up, node 2 dies.
    p.wait(0, "node 1 current", 30, |s| {
        s["role"] == "backup" && s["current"] == true
    });
    p.kill9(1);
    assert!(
        p.promote_once_peer_gone(0),
        "promote after the kill refused"
    );
    p.wait(0, "promoted again", 20, |s| {
        s["role"] == "primary" && s["serving"] == true
    });
    let w = u(&p.status(0).unwrap()["io"], "writes");
    p.wait(0, "NVMe writes follow back to node 1", 60, |s| {
        u(&s["io"], "writes") >= w + 500
    });
    stop.store(true, Ordering::Release);
    let r = run
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the NVMe host failed: {e}"));
    println!("NVMe failover on the mirrored pair: {r}");
    assert_eq!(r.lost_writes, 0, "completed writes lost: {r}");
    assert!(r.verified_chunks > 1000, "{r}");
    assert!(
        r.path_switches >= 2,
        "the host followed both failovers: {r}"
    );
    assert_eq!(r.final_path, 0, "the host ended on node 1: {r}");
    assert!(
        r.writes_retried > 0,
        "writes in flight at the kill were retried on the new primary: {r}"
    );
    // Failback: the killed node returns as backup and catches up.
    p.start(1);
    let (sp, sb) = p.wait_in_sync(0);
    assert_eq!(u(&sp, "remirrors") + u(&sb, "remirrors"), 0);
    assert!(
        images_identical(&p.n[0].volume, &p.n[1].volume),
        "images differ"
    );
}

/// libiscsi's conformance suite through the mirrored primary, held to the
/// bar of the in-memory LUN (iscsi-target/tests/conformance.rs): at most 1
/// failure and at least 204 real passes (CUnit counts a test that only
/// printed [SKIPPED] as passed; those count apart).
///
/// The volume has the in-memory LUN's geometry (64 MiB of 512-byte logical
/// blocks, 4 KiB physical), so any difference is the mirrored path's. With
/// the default 4 KiB logical blocks a LUN mirrored or not (`serve
/// --standalone`) scores 199 real passes, 30 skips and 1 failure: five
/// tests need two or more logical blocks per physical block and skip
/// ("LBPPB < 2": CompareAndWrite, WriteSame10 and WriteSame16
/// InvalidDataOutSize, WriteSame10 and WriteSame16 UnmapUnaligned), and
/// WriteSame16.Unmap sends one 65,536-block WRITE16, 256 MiB at 4 KiB,
/// beyond the 32 MiB MAXIMUM TRANSFER LENGTH of the Block Limits page, and
/// fails on the refusal; GetLBAStatus.UnmapSingle, the 512-byte LUN's one
/// failure, passes there.
#[test]
fn g_iscsi_conformance_against_the_mirrored_primary() {
    const MIN_REAL_PASSES: usize = 204;
    const MAX_FAILURES: usize = 1;
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["iscsi-test-cu"]) {
        return;
    }
    let mut p = Pair::new("g", 3600, |_, t| {
        let geometry = "size_bytes = 1073741824\nblock_size_bytes = 4096";
        assert!(t.contains(geometry), "the example's volume geometry moved");
        t.replace(geometry, "size_bytes = 67108864\nblock_size_bytes = 512")
    });
    p.start_pair();
    let url = format!(
        "iscsi://127.0.0.1:{}/iqn.2026-11.io.deltamirror:demo/0",
        3260 + p.offset
    );
    let out = Command::new("timeout")
        .args(["900", "iscsi-test-cu", "-d", "-t", "ALL", &url])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let log = p.dir.join("iscsi-test-cu.log");
    std::fs::write(&log, &text).unwrap();
    // Per test: skipped (printed [SKIPPED]) and failed (CUnit's list of
    // failures: "  N. file:line  - assertion" under "Suite X, Test Y had
    // failures:"), then the summary "tests   230   230   N    F    n/a".
    let (mut suite, mut test) = (String::new(), String::new());
    let mut skipped = std::collections::BTreeSet::new();
    let mut failed_tests = std::collections::BTreeSet::new();
    let mut summary = None;
    for line in text.lines() {
        if let Some(s) = line.strip_prefix("Suite: ") {
            suite = s.trim().to_string();
        }
        if let Some(t) = line.strip_prefix("  Test: ") {
            test = format!("{suite}.{}", t.split(" ...").next().unwrap_or(t));
        }
        // A test's verdict ends its output: "...passed" or "FAILED", on the
        // Test line or on a line of its own after what the test printed
        // (which may itself contain "[FAILED]" for expected errors).
        if !test.is_empty() && (line.trim() == "FAILED" || line.ends_with(" ...FAILED")) {
            failed_tests.insert(test.clone());
        }
        if line.contains("[SKIPPED]") && !test.is_empty() {
            skipped.insert(test.clone());
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 5 && f[0] == "tests" && f[1].parse::<usize>().is_ok() {
            summary = Some((
                f[2].parse::<usize>().unwrap(),
                f[3].parse::<usize>().unwrap(),
                f[4].parse::<usize>().unwrap(),
            ));
        }
    }
    let (run, passed, failed) =
        summary.unwrap_or_else(|| panic!("no CUnit summary (crash or hang); log in {log:?}"));
    let real = passed - skipped.len().min(passed);
    println!(
        "iscsi-test-cu against the mirrored primary: run {run}, real passes {real}, \
         skips {}, failures {failed} (in-memory LUN: 204 / 25 / 1; tgtd: 160 / 62 / 8); \
         failed: {failed_tests:?}; log {log:?}",
        skipped.len()
    );
    assert!(
        failed <= MAX_FAILURES,
        "{failed} failures (allowed {MAX_FAILURES}): {failed_tests:?}; see {log:?}"
    );
    assert!(
        real >= MIN_REAL_PASSES,
        "{real} real passes (want {MIN_REAL_PASSES}); see {log:?}"
    );
    let (sp, _) = p.wait_in_sync(0);
    assert_eq!(u(&sp, "remirrors"), 0);
    assert!(
        images_identical(&p.n[0].volume, &p.n[1].volume),
        "the conformance writes are mirrored: images differ"
    );
}

#[test]
fn h_fio_libiscsi_verified_io_against_the_mirrored_primary() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fio = root.join("target/fio-libiscsi/fio");
    if !fio.exists() {
        if unsafe_uid() != 0 {
            testskip::skip("building fio with libiscsi needs root for apt (CI runs as root)");
            return;
        }
        let st = Command::new(root.join("scripts/build-fio-libiscsi.sh"))
            .status()
            .unwrap();
        assert!(st.success(), "scripts/build-fio-libiscsi.sh failed");
    }
    let p = Pair::up("h", 3700);
    // fio splits --filename at ':', so every colon of the URL is escaped.
    let url = format!(
        "iscsi://127.0.0.1:{}/iqn.2026-11.io.deltamirror:demo/0",
        3260 + p.offset
    );
    let file = url.replace(':', "\\:");
    for (rw, qd) in [
        ("randwrite", 1),
        ("randwrite", 32),
        ("randread", 1),
        ("randread", 32),
    ] {
        let out = Command::new(&fio)
            .args([
                &format!("--name={rw}-qd{qd}"),
                "--ioengine=libiscsi",
                &format!("--filename={file}"),
                &format!("--rw={rw}"),
                "--bs=4k",
                &format!("--iodepth={qd}"),
                "--size=32m",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--output-format=terse",
                "--terse-version=3",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "fio libiscsi {rw} QD{qd} failed:\n{text}"
        );
        let f: Vec<&str> = text
            .lines()
            .find(|l| l.starts_with("3;"))
            .unwrap_or("")
            .split(';')
            .collect();
        if f.len() > 50 {
            let (riops, wiops) = (f[7], f[48]);
            println!(
                "fio libiscsi {rw} QD{qd} (crc32c verified): read IOPS {riops}, write IOPS {wiops}"
            );
        }
    }
    let (sp, _) = p.wait_in_sync(0);
    assert_eq!(u(&sp, "remirrors"), 0);
    assert!(
        images_identical(&p.n[0].volume, &p.n[1].volume),
        "images differ"
    );
}

#[test]
fn i_standalone_serves_alone_and_a_mirrored_start_refuses_until_reformatted() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["qemu-io"]) {
        return;
    }
    let mut p = Pair::new("i", 3800, |_, t| t);
    // Node 1 alone, no peer running: it serves at once.
    let log = std::fs::File::create(&p.n[0].log).unwrap();
    p.n[0].child = Some(
        Command::new(EXE)
            .args(["serve", "--standalone", "--config"])
            .arg(&p.n[0].cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let s = p.wait(0, "standalone", 20, |s| s["role"] == "standalone");
    assert_eq!(s["peer_state"], "none");
    for blk in 0..8 {
        assert!(
            qemu_write(&p.uri(0), blk * 3, 0x60 + blk as u8),
            "write {blk}"
        );
    }
    let s = p.wait(0, "writes counted", 10, |s| u(&s["io"], "writes") >= 8);
    assert_eq!(u(&s["io"], "errors"), 0);
    assert!(u(&s["io"]["write_latency"], "count") >= 8);
    // The latency histograms start afresh on request (counters stay).
    assert!(http_post(&p.n[0].admin, "/reset-latency").starts_with("HTTP/1.1 200"));
    let s = p.wait(0, "latency reset", 10, |s| {
        u(&s["io"]["write_latency"], "count") == 0
    });
    assert!(
        u(&s["io"], "writes") >= 8,
        "counters survive a latency reset"
    );
    assert_eq!(block_of(&p.n[0].volume, 21), vec![0x67; 4096]);
    p.kill9(0);

    // The peer lacks those writes: a mirrored start must refuse, with the fix.
    let out = Command::new(EXE)
        .args(["serve", "--config"])
        .arg(&p.n[0].cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mirrored start after standalone ran");
    assert!(
        err.contains("standalone") && err.contains("format --replace"),
        "unhelpful refusal: {err}"
    );

    // Keep node 1's data: reformat it, replace the peer, which gets a full copy.
    for (i, args) in [
        (0, &["format", "--force"][..]),
        (1, &["format", "--force", "--replace"]),
    ] {
        let out = Command::new(EXE)
            .args(args)
            .arg("--config")
            .arg(&p.n[i].cfg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    p.start_pair();
    // With nothing written since the format, "in sync" can read true before
    // the full copy has finished (heads are equal from the start): wait for
    // the receiver to record the copy, then check both sides.
    p.wait(1, "full copy received", 60, |s| u(s, "remirrors") >= 1);
    let (sp, sb) = p.wait_in_sync(0);
    // One full copy, counted by the sender and by the receiver.
    assert_eq!(u(&sp, "remirrors"), 1, "primary sent one full copy");
    assert_eq!(u(&sb, "remirrors"), 1, "the replaced peer received it");
    assert_eq!(block_of(&p.n[1].volume, 21), vec![0x67; 4096]);
    assert!(
        images_identical(&p.n[0].volume, &p.n[1].volume),
        "images differ"
    );
}

/// Issue 11 items 1 and 2, the sequence that lost writes: the backup is
/// down, the primary completes writes alone (degraded), the backup restarts
/// but the primary dies before the two ever handshake. `promote` on the
/// backup must refuse (it cannot know what it lacks); `promote --force`
/// is accepted and recorded; the old primary, when it returns, refuses the
/// split brain and stays fenced (NBD refuses its writes, status says why)
/// until the operator reformats it; then it receives a full copy and both
/// images match, holding every write completed on the forced primary.
#[test]
fn j_promote_refuses_a_restarted_backup_and_a_refused_node_never_serves() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["qemu-io"]) {
        return;
    }
    let mut p = Pair::up("j", 3900);
    assert!(qemu_write(&p.uri(0), 10, 1), "write while mirrored");
    p.wait_in_sync(0);
    p.kill9(1);
    // Degraded writes on the primary: only it holds them.
    for k in 0..8u64 {
        assert!(qemu_write(&p.uri(0), 100 + k, 7), "degraded write {k}");
    }
    p.wait(0, "degraded", 20, |s| s["degraded"] == true);
    p.kill9(0);
    p.start(1);
    let s1 = p.wait(1, "backup up", 20, |s| s["role"] == "backup");
    assert_eq!(s1["current"], false, "a restarted backup is not current");
    let (ok, err) = p.admin_args(1, &["promote"]);
    assert!(!ok, "promote of a backup that never caught up was accepted");
    assert!(
        err.contains("has not caught up with the primary since it started")
            && err.contains("--force"),
        "the refusal names why and what to do: {err}"
    );
    let (ok, err) = p.admin_args(1, &["promote", "--force"]);
    assert!(ok, "promote --force refused: {err}");
    assert!(err.contains("warning"), "--force warns: {err}");
    let s1 = p.wait(1, "forced primary serves", 20, |s| s["serving"] == true);
    let gen = u(&s1, "generation");
    assert_eq!(s1["forced_generations"], serde_json::json!([gen]));
    let mut completed = vec![(10u64, 1u8)];
    for k in 0..8u64 {
        assert!(
            qemu_write(&p.uri(1), 200 + k, 9),
            "write on the forced primary"
        );
        completed.push((200 + k, 9));
    }
    // The old primary returns: it completed writes the forced primary lacks.
    p.start(0);
    let s0 = p.wait(0, "refused and fenced", 30, |s| {
        s["peer_state"] == "refused" && s["fenced_reason"].is_string()
    });
    assert_eq!(s0["serving"], false, "a refused node serves: {s0}");
    assert!(
        s0["not_serving_reason"]
            .as_str()
            .unwrap()
            .contains("fenced"),
        "{s0}"
    );
    // It stays fenced: two seconds later still not serving, writes refused.
    std::thread::sleep(Duration::from_secs(2));
    let s0 = p.status(0).unwrap();
    assert_eq!(
        s0["serving"], false,
        "the refused node started serving: {s0}"
    );
    assert!(
        !qemu_write(&p.uri(0), 300, 5),
        "the fenced node took a write"
    );
    let text = Command::new(EXE)
        .args(["status", "--admin", &p.n[0].admin])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("FENCED"), "status text: {text}");
    // The forced primary (the operator's choice) keeps serving.
    assert_eq!(p.status(1).unwrap()["serving"], true);
    assert!(qemu_write(&p.uri(1), 208, 9));
    completed.push((208, 9));
    // Resolve as operations.md says: reformat the other node.
    p.kill9(0);
    let out = Command::new(EXE)
        .args(["format", "--replace", "--force", "--config"])
        .arg(&p.n[0].cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p.start(0);
    p.wait_in_sync(1);
    assert!(
        images_identical(&p.n[0].volume, &p.n[1].volume),
        "images differ"
    );
    for (blk, pat) in completed {
        assert!(
            block_of(&p.n[0].volume, blk).iter().all(|&b| b == pat),
            "completed write at block {blk} lost"
        );
    }
}

/// Issue 11 item 8: `deltamirror verify` compares both replicas while host
/// I/O runs. One block of the backup's volume is corrupted behind its back:
/// verify finds exactly that chunk (and exits 1), `--repair` resyncs it from
/// the primary, and the images are identical again.
#[test]
fn k_online_verify_finds_a_corrupted_block_and_repair_fixes_it() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["fio"]) {
        return;
    }
    let p = Pair::up("k", 4000);
    fio_writes(&p.uri(0), 2000, 0);
    p.wait_in_sync(0);
    // Corrupt the block at 200 MiB, outside the 128 MiB fio writes below.
    let bad: u64 = 200 << 20;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p.n[1].volume)
            .unwrap();
        f.seek(SeekFrom::Start(bad + 123)).unwrap();
        f.write_all(b"bit rot").unwrap();
        f.sync_all().unwrap();
    }
    let verify = |repair: bool| {
        let mut c = Command::new(EXE);
        c.args([
            "verify",
            "--admin",
            &p.n[0].admin,
            "--length",
            &(256u64 << 20).to_string(),
        ]);
        if repair {
            c.arg("--repair");
        }
        c.output().unwrap()
    };
    // Host writes go on meanwhile (the first 128 MiB).
    let mut load = fio_load(&p.uri(0), 3, "k-load");
    let out = verify(false);
    let _ = load.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("{bad}+4096")), "{text}");
    let v = &p.status(0).unwrap()["verify"];
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["mismatched_chunks"], 1, "{v}");
    assert_eq!(v["mismatches"], serde_json::json!([[bad, 4096]]), "{v}");
    assert_eq!(v["done_bytes"], 256u64 << 20, "{v}");
    assert!(!images_identical(&p.n[0].volume, &p.n[1].volume));
    // Repair: resynced from the primary, images identical, verify clean.
    let out = verify(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    p.wait_in_sync(0);
    assert!(
        images_identical(&p.n[0].volume, &p.n[1].volume),
        "images differ after the repair"
    );
    let out = verify(false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(p.status(0).unwrap()["verify"]["mismatched_chunks"], 0);
    let m = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&p.n[0].admin).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(m.contains("deltamirror_verify_mismatched_chunks 0"), "{m}");
}

#[test]
fn l_fabric_port_refuses_peers_without_the_handshake() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let p = Pair::new_on("l", 4100, true, |_, t| t);
    let mut p = p;
    p.start_pair();
    let before = p.status(0).unwrap();
    // Node 2 listens for the fabric connection on its link port + 1.
    let fabric_port = SocketAddr::from(([127, 0, 0, 1], 7402 + p.offset));
    let cfg = rdma::ChannelConfig {
        provider: "tcp".into(),
        ring_bytes: 1 << 20,
        wait_fd: false,
    };
    // No token at all, then a made-up one (as from an old connection).
    for token in [&[][..], &[0x5a; rdma::TOKEN_BYTES][..]] {
        let r = rdma::connect(&cfg, fabric_port, token, Duration::from_secs(5));
        assert!(r.is_err(), "a peer without the handshake was accepted");
    }
    // The refusal is logged just after the peer sees it.
    let mut log1 = String::new();
    for _ in 0..100 {
        log1 = std::fs::read_to_string(&p.n[1].log).unwrap();
        if log1.matches("rejected, nothing written").count() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        log1.contains("without a handshake token: rejected, nothing written"),
        "the stray is logged:\n{log1}"
    );
    assert!(
        log1.contains("not the current handshake's (stale or forged): rejected, nothing written"),
        "the stale token is logged:\n{log1}"
    );
    // Status counts both refusals on the node that listens.
    let mut refused = 0;
    for _ in 0..100 {
        refused = u(&p.status(1).unwrap(), "link_peers_refused");
        if refused >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(refused, 2, "status counts the refused fabric peers");
    // The pair never noticed: still connected, no reconnection.
    let after = p.status(0).unwrap();
    assert_eq!(after["peer_state"], "connected");
    assert_eq!(after["generation"], before["generation"]);
    assert_eq!(
        log1.matches("replication link up").count(),
        1,
        "the pair's own connection was not disturbed:\n{log1}"
    );
}

#[test]
fn m_fabric_start_above_rlimit_memlock_fails_naming_the_limit_and_the_fix() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let p = Pair::new_on("m", 4200, true, |_, t| t);
    // The example's 2 MiB rings need 4 MiB + 4 KiB locked: allow 1 MiB.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -l 1024 && exec {EXE} serve --config {}",
            p.n[1].cfg.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the node started: {err}");
    for want in ["RLIMIT_MEMLOCK", "link.fabric_ring_bytes", "LimitMEMLOCK"] {
        assert!(err.contains(want), "no {want:?} in: {err}");
    }
}
