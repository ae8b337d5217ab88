#!/usr/bin/env python3
"""deltamirror benchmark orchestrator (run through scripts/bench.sh).

Runs the same workloads against the floors (local disk, replication link),
deltamirror (one unmirrored node / mirrored pair, NBD / iSCSI / NVMe/TCP),
the peers (nbdkit, qemu-nbd, tgtd) and the protocol floors (each protocol's
client against targets with no disk I/O), samples per-thread CPU and placement
during every run, runs the engine bench's replay / remirror mode
(`target/release/bench --replay`), and writes BENCHMARKS.md,
docs/benchmarks.png and target/bench/results.json (a run with --only or
--no-busy writes target/bench/BENCHMARKS.md, benchmarks.png and
results-partial.json instead, leaving the full run's files). Exits 1 if any
workload failed.

--soak (scripts/soak.sh) runs the memory soak instead: a mirrored pair under
4 KiB randwrite QD128 for --seconds (default 600), both nodes' memory sampled,
judged against issue 10's aim, the volumes compared after sync.
"""
import argparse
import datetime
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REL = os.path.join(ROOT, "target", "release")
DM = os.path.join(REL, "deltamirror")
DM_NVME = os.path.join(REL, "dm-nvme")
ENGINE_BENCH = os.path.join(REL, "bench")
FIO = shutil.which("fio") or "fio"
FIO_ISCSI = os.path.join(ROOT, "target", "fio-libiscsi", "fio")
OUT_DIR = os.path.join(ROOT, "target", "bench")
CLK_TCK = os.sysconf("SC_CLK_TCK")

DM_IQN = "iqn.2026-11.io.deltamirror:demo"
# The core node 1's reactor is pinned to (`reactor.cores` of example-config).
REACTOR_CORE = 0
LOCAL_PINNED = f"local disk (fio io_uring, core {REACTOR_CORE})"
# The local disk again after every other target: this VM's disk drifted
# 0.8-1.2x within a run (more between runs), and every "/ local" ratio
# moves with it.
LOCAL_END = "local disk at the end of the run (fio io_uring)"
# fio on the unmirrored node's own volume file once the node has stopped: the
# same file, blocks and place on the disk as the node's rows (on this VM a
# file's blocks read at a rate that depends on how and when they were written).
LOCAL_VOLUME = "local disk, fio on the unmirrored node's volume file (node stopped)"
# The 128 KiB sequential row with a flush after every 8 writes (fio
# --fdatasync=8): the durability a mirrored batch pays on the one disk.
LOCAL_FLUSHED = "local disk, a flush per 8 writes (fio io_uring --fdatasync=8)"
# 4 KiB random writes at QD32 with a flush after every 32 (fio
# --fdatasync=32): a ring group commit of a whole round, the durability a
# mirrored QD32 row pays at best; two nodes share the disk, so half of it is
# what each could reach.
LOCAL_FLUSHED_QD32 = "local disk, 4 KiB QD32 with a flush per 32 writes (fio io_uring --fdatasync=32)"
# Two unmirrored nodes at once on the one disk, one per core, each written by
# its own client: the disk and CPU work of a mirrored pair's volume writes
# without its rings, link and protocol (the mirrored QD32 aim's floor here).
TWIN = "two unmirrored nodes at once, one per core (mean per node)"
DM_NQN = "nqn.2026-11.io.deltamirror:demo"
PEER_IQN = "iqn.2026-11.io.deltamirror:bench-tgtd"

# Port offsets (>= 5000, away from the tests' defaults). Each deltamirror
# configuration gets its own offset so that lingering sockets never collide.
OFF_ONE = 5300
OFF_MIRROR = 5310
OFF_BUSY = 5320
OFF_VARIANT = 5330  # + 10 per variant
OFF_SOAK = 5360
OFF_MEM = 5370
OFF_TWIN = 5380  # and OFF_TWIN + 10
PEER_NBDKIT_PORT = 10809 + 5400
PEER_QEMU_PORT = 10809 + 5401
NVME_MEM_PORT = 4420 + 5402
PEER_TGTD_PORT = 3260 + 5400
MEM_NBDKIT_PORT = 10809 + 5403
TGTD_CONTROL_PORT = 53  # tgtd -C: /var/run/tgtd/socket.53
ENGINE_BENCH_PORT = 17400 + 5000

# Workloads, in run order: the sequential write first fills the region, so the
# later random reads read written data on every target.
WORKLOADS = [
    dict(key="seqw128k", label="128 KiB seq write QD8", rw="write", bs=131072, qd=8),
    dict(key="randw4k_qd1", label="4 KiB randwrite QD1", rw="randwrite", bs=4096, qd=1),
    dict(key="randw4k_qd32", label="4 KiB randwrite QD32", rw="randwrite", bs=4096, qd=32),
    dict(key="randr4k_qd32", label="4 KiB randread QD32", rw="randread", bs=4096, qd=32),
]
WL = {w["key"]: w for w in WORKLOADS}

# Settings side by side: mirrored pairs over NBD that differ in one setting,
# started one after the other in the same run. QD128 is the depth DESIGN.md
# sets the memory aim at (a node under 256 MiB resident).
VARIANT_WORKLOADS = [
    WL["randw4k_qd1"], WL["randw4k_qd32"],
    dict(key="randw4k_qd128", label="4 KiB randwrite QD128", rw="randwrite", bs=4096, qd=128),
]
VARIANTS = [
    dict(key="dm-var-default", label="defaults (ack1 = \"persisted\")", edits={}),
    dict(key="dm-var-received", label="ack1 = \"received\"", edits={"ack1": '"received"'}),
    # Not a configuration to run: tmpfs makes the ring's fdatasync free and the
    # ring volatile. It shows what a ring device with a cheap flush (a
    # power-loss-protected SSD, persistent memory; `ring.path`) would approach.
    dict(key="dm-var-shm", label="ring.path on tmpfs (NOT durable: the free-flush ceiling)",
         edits={"[ring]": 'path = "/dev/shm/dm-bench-ring-{n}"'}, cleanup="/dev/shm/dm-bench-ring-*"),
]

# The protocol floors (--only mem-floors, and nvme-mem for NVMe/TCP): each
# protocol's client and target on loopback with no disk I/O at all, for the
# aims table's "what the machine allows" rows.
MEM_FLOOR_WORKLOADS = [WL["randw4k_qd1"], WL["randw4k_qd32"], WL["randr4k_qd32"]]
# The QD32 rows alone (the pinned and volume-file floors, the reader-thread
# host, the 9a3347c target).
QD32_WORKLOADS = [WL["randw4k_qd32"], WL["randr4k_qd32"]]
MEM_NBD = "nbdkit memory (NBD, no disk)"
MEM_ISCSI = "tgtd on tmpfs (iSCSI, no disk)"
MEM_NVME = "NVMe/TCP target on memory (dm-nvme serve-mem)"
# Our own front-ends and reactor, the disk taken away: `serve --standalone`
# with its volume file on tmpfs (O_DIRECT there is a memory copy).
MEM_DM = "deltamirror unmirrored, volume on tmpfs (no disk)"
# Per protocol, the no-disk targets measured; the aims table takes the
# lowest QD1 p50 and the highest QD32 IOPS among them.
MEM_FLOOR = {"NBD": [MEM_NBD, f"{MEM_DM}, NBD"], "NVMe/TCP": [MEM_NVME, f"{MEM_DM}, NVMe/TCP"],
             "iSCSI": [MEM_ISCSI, f"{MEM_DM}, iSCSI"]}
MEM_SHORT = {MEM_NBD: "nbdkit memory", MEM_ISCSI: "tgtd on tmpfs", MEM_NVME: "serve-mem"}
# The commit before issue 10's data-path change: its `dm-nvme serve-mem` and
# `dm-nvme io` are built from git (target/bench-old) and measured in the same
# run as today's, for the aims' "≥ 2× now" rows.
BEFORE_COMMIT = "9a3347c"
MEM_NVME_BEFORE = f"serve-mem at {BEFORE_COMMIT}, its own dm-nvme io"
MEM_NVME_BEFORE_HOST = f"serve-mem at {BEFORE_COMMIT}, this build's dm-nvme io"
# NVMe/TCP rows driven by `dm-nvme io --reader-thread` as well: the host as it
# was until session 15, a reader thread handing completions to the submitting
# one (the default host reads its one queue's socket on the submitting thread
# and refills at once, as SPDK's perf tool polls its qpairs).
THREADED = ", reader-thread host"


def log(*a):
    print("bench:", *a, flush=True)


def loud(msg):
    bar = "!" * 78
    print(f"\n{bar}\n!! {msg}\n{bar}\n", flush=True)


# ---------------------------------------------------------------- /proc sampling

def read_stat(path):
    """(comm, utime+stime ticks, last cpu) from a /proc/.../stat file."""
    with open(path) as f:
        s = f.read()
    lp, rp = s.index("("), s.rindex(")")
    comm = s[lp + 1:rp]
    rest = s[rp + 2:].split()
    # rest[0] is field 3 (state): field n is rest[n - 3].
    return comm, int(rest[11]) + int(rest[12]), int(rest[36])


def proc_cpu_ticks(pid):
    try:
        return read_stat(f"/proc/{pid}/stat")[1]
    except (OSError, ValueError, IndexError):
        return None


def threads_of(pid):
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out[int(tid)] = read_stat(f"/proc/{pid}/task/{tid}/stat")
        except (OSError, ValueError, IndexError):
            pass
    return out


def all_procs():
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                out[int(d)] = read_stat(f"/proc/{d}/stat")
            except (OSError, ValueError, IndexError):
                pass
    return out


def busy_processes(seconds=2.0, min_pct=5.0):
    """Processes using more than min_pct of a core over `seconds`, measured now."""
    a = all_procs()
    time.sleep(seconds)
    b = all_procs()
    busy = []
    for pid, (comm, t1, _) in b.items():
        if pid in a and a[pid][0] == comm:
            pct = 100.0 * (t1 - a[pid][1]) / CLK_TCK / seconds
            if pct >= min_pct:
                busy.append((pct, pid, comm, cmdline(pid)))
    busy.sort(reverse=True)
    return busy


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:100]
    except OSError:
        return ""


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def machine_check(label):
    la = loadavg()
    busy = busy_processes()
    ncpu = os.cpu_count() or 1
    total = sum(b[0] for b in busy)
    state = dict(label=label, loadavg=la, busy=[dict(pct=round(p, 1), pid=pid, comm=c, cmd=cmd)
                                               for p, pid, c, cmd in busy], busy_total_pct=round(total, 1))
    log(f"{label}: loadavg {' '.join(la)} on {ncpu} cores; processes using CPU now: "
        + (", ".join(f"{c}({pid}) {p:.0f}%" for p, pid, c, _ in busy) or "none"))
    if float(la[0]) > 0.5 * ncpu or total > 20.0:
        loud(f"MACHINE IS BUSY ({label}): 1-min loadavg {la[0]} on {ncpu} cores, "
             f"{total:.0f}% of a core used by other processes right now. Numbers will be noisy.")
        for p, pid, c, cmd in busy[:10]:
            print(f"   {p:5.1f}%  pid {pid:<7} {c:<16} {cmd}")
        print(flush=True)
        state["warning"] = True
    return state


# The block device under the bench's scratch directory (its
# /sys/dev/block/MAJ:MIN/stat), set by main(); None where it has none.
DISK_STAT = None


def disk_stat_path(directory):
    """/sys/dev/block/MAJ:MIN/stat of the device `directory` lives on, or None
    (tmpfs, overlay: no block device to count)."""
    dev = os.stat(directory).st_dev
    path = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat"
    return path if os.path.exists(path) else None


def disk_counters():
    """(sectors written, flush requests) of DISK_STAT so far, or None. Fields
    of the kernel's block stat file: 7 = sectors written, 16 = flush requests
    completed (Documentation/block/stat.rst)."""
    if not DISK_STAT:
        return None
    try:
        with open(DISK_STAT) as f:
            v = [int(x) for x in f.read().split()]
    except OSError:
        return None
    return (v[6], v[15]) if len(v) >= 16 else None


class Sampler:
    """Samples the threads of `pids` (and every other process) twice during a
    run, to report per-thread CPU and core, and the CPU other processes used,
    and the disk's written bytes and flushes between the two samples."""

    def __init__(self, pids, seconds):
        self.pids = {k: v for k, v in pids.items() if v}
        self.seconds = seconds
        self.result = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._t.start()
        return self

    def _snap(self):
        th = {name: threads_of(pid) for name, pid in self.pids.items()}
        return time.monotonic(), th, all_procs(), disk_counters()

    def _run(self):
        if self._stop.wait(min(1.5, self.seconds * 0.3)):
            return
        a = self._snap()
        if self._stop.wait(max(0.5, self.seconds * 0.5)):
            pass
        b = self._snap()
        pids = ",".join(str(p) for p in self.pids.values())
        try:
            ps = subprocess.run(["ps", "-Lo", "pid,tid,psr,pcpu,comm", "-p", pids],
                                capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            ps = ""
        dt = b[0] - a[0]
        threads = []
        for name, tb in b[1].items():
            ta = a[1].get(name, {})
            for tid, (comm, ticks, cpu) in tb.items():
                if tid in ta:
                    pct = 100.0 * (ticks - ta[tid][1]) / CLK_TCK / dt
                    threads.append(dict(proc=name, tid=tid, comm=comm, cpu=cpu,
                                        cpu_before=ta[tid][2], pct=round(pct, 1)))
        ours = set()
        for pid in self.pids.values():
            ours.add(pid)
            ours.update(children_of(pid))
        ours.add(os.getpid())
        other = 0.0
        other_list = []
        for pid, (comm, ticks, _) in b[2].items():
            if pid in ours or pid not in a[2] or a[2][pid][0] != comm:
                continue
            pct = 100.0 * (ticks - a[2][pid][1]) / CLK_TCK / dt
            other += pct
            if pct >= 5:
                other_list.append(f"{comm} {pct:.0f}%")
        threads.sort(key=lambda t: -t["pct"])
        self.result = dict(threads=threads, other_pct=round(other, 1), other=other_list, ps=ps)
        if a[3] and b[3]:
            self.result["disk"] = dict(write_mibs=round((b[3][0] - a[3][0]) * 512 / 1048576 / dt, 1),
                                       flushes_per_s=round((b[3][1] - a[3][1]) / dt))

    def stop(self):
        self._stop.set()
        self._t.join(timeout=5)
        return self.result


def children_of(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


# ---------------------------------------------------------------- clients

def fio_cmd(binary, engine_args, wl, seconds, region_mib):
    return [binary, "--name=bench", "--thread", "--group_reporting",
            f"--rw={wl['rw']}", f"--bs={wl['bs']}", f"--iodepth={wl['qd']}",
            f"--size={region_mib}m", "--time_based=1", "--ramp_time=1",
            f"--runtime={seconds}", "--lat_percentiles=1", "--randrepeat=0",
            "--norandommap=1", "--output-format=json"] + engine_args


def run_fio(binary, engine_args, wl, seconds, region_mib, tag):
    out = os.path.join(OUT_DIR, f"{tag}.json")
    cmd = fio_cmd(binary, engine_args, wl, seconds, region_mib) + [f"--output={out}"]
    if os.path.exists(out):
        os.remove(out)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return p, out, cmd


def parse_fio(out_path, wl, rc, text):
    try:
        with open(out_path) as f:
            raw = f.read()
        # fio writes notes ("fio: connected to NBD server", "note: ...") before the JSON.
        d = json.loads(raw[raw.index("\n{") + 1:] if not raw.startswith("{") else raw)
    except (OSError, ValueError) as e:
        return dict(ok=False, error=f"fio rc={rc}, no JSON ({e}): {text.strip()[-300:]}")
    job = d["jobs"][0]
    side = job["read" if "read" in wl["rw"] else "write"]
    lat = side.get("lat_ns", {}).get("percentile") or side.get("clat_ns", {}).get("percentile") or {}
    res = dict(ok=rc == 0 and job.get("error", 0) == 0 and side["total_ios"] > 0,
               iops=side["iops"], p50_us=lat.get("50.000000", 0) / 1000.0,
               p99_us=lat.get("99.000000", 0) / 1000.0,
               mibs=side["bw_bytes"] / 1048576.0, ios=side["total_ios"])
    if not res["ok"]:
        res["error"] = f"fio rc={rc} job error={job.get('error')} ios={side['total_ios']}: {text.strip()[-300:]}"
    return res


def run_nvme(addr, wl, seconds, region_mib, client=DM_NVME, extra=()):
    rw = wl["rw"]
    cmd = [client, "io", "--addr", addr, "--nqn", DM_NQN, "--rw", rw, "--bs", str(wl["bs"]),
           "--qd", str(wl["qd"]), "--seconds", str(seconds), "--region-mb", str(region_mib), "--json",
           *extra]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, cmd


def parse_nvme(rc, out, err):
    line = next((l for l in reversed(out.strip().splitlines()) if l.startswith("{")), None)
    if not line:
        return dict(ok=False, error=f"dm-nvme rc={rc}: {(err or out).strip()[-300:]}")
    d = json.loads(line)
    res = dict(ok=rc == 0 and d.get("errors", 0) == 0 and d.get("ops", 0) > 0,
               iops=d["iops"], p50_us=d["p50_us"], p99_us=d["p99_us"],
               mibs=d["mib_per_s"], ios=d.get("ops", 0))
    if not res["ok"]:
        res["error"] = f"dm-nvme rc={rc} errors={d.get('errors')}: {err.strip()[-300:]}"
    return res


def run_workload(target, proto, endpoint, wl, args, pids, tag, nvme_client=DM_NVME, nvme_extra=()):
    """Runs one workload; returns a result dict (never raises).
    `nvme_client`: the `dm-nvme` binary whose `io` drives an NVMe/TCP run;
    `nvme_extra`: more arguments for it (e.g. `--reader-thread`)."""
    seconds = args.seconds
    timeout = seconds + 60
    t0 = time.time()
    try:
        if proto == "nvme":
            p, cmd = run_nvme(endpoint, wl, seconds, args.region_mib, nvme_client, nvme_extra)
            out_path = None
        else:
            if proto in ("local", "local-pinned", "local-flushed"):
                binary, eargs = FIO, ["--ioengine=io_uring", "--direct=1", f"--filename={endpoint}"]
                if proto == "local-pinned":
                    eargs.append(f"--cpus_allowed={REACTOR_CORE}")
                if proto == "local-flushed":
                    eargs.append(f"--fdatasync={wl['qd']}")
            elif proto == "nbd":
                binary, eargs = FIO, ["--ioengine=nbd", f"--uri={endpoint}"]
            elif proto == "iscsi":
                if not os.access(FIO_ISCSI, os.X_OK):
                    return dict(ok=False, error=f"{FIO_ISCSI} missing (scripts/build-fio-libiscsi.sh)")
                binary, eargs = FIO_ISCSI, ["--ioengine=libiscsi", f"--filename={endpoint}"]
            else:
                raise ValueError(proto)
            p, out_path, cmd = run_fio(binary, eargs, wl, seconds, args.region_mib, tag)
        # fio spends its ramp second before measuring; the sampler skips it.
        sampler = Sampler(dict(pids, client=p.pid), seconds + (1 if proto != "nvme" else 0)).start()
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            sampler.stop()
            return dict(ok=False, error=f"timed out after {timeout} s: {' '.join(cmd)}")
        placement = sampler.stop()
        if proto == "nvme":
            res = parse_nvme(p.returncode, out, err or "")
        else:
            res = parse_fio(out_path, wl, p.returncode, (out or "") + (err or ""))
        res["placement"] = placement
        res["cmd"] = " ".join(cmd)
        res["wall_s"] = round(time.time() - t0, 1)
        return res
    except Exception as e:  # noqa: BLE001 - a failed workload must not stop the run
        return dict(ok=False, error=f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------- servers

def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_port(port, secs=20):
    deadline = time.time() + secs
    while time.time() < deadline:
        if port_open(port):
            return True
        time.sleep(0.05)
    return False


def stop_proc(p, sig=signal.SIGTERM, secs=10):
    if p is None or p.poll() is not None:
        return
    try:
        p.send_signal(sig)
        p.wait(timeout=secs)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


_STANDALONE = None


def dm_has_standalone():
    """True when `deltamirror serve --help` lists --standalone (one node, no
    peer, no ring: the unmirrored baseline)."""
    global _STANDALONE
    if _STANDALONE is None:
        try:
            r = subprocess.run([DM, "serve", "--help"], capture_output=True, text=True, timeout=10)
            _STANDALONE = "--standalone" in (r.stdout + r.stderr)
        except (OSError, subprocess.TimeoutExpired):
            _STANDALONE = False
    return _STANDALONE


class DmNodes:
    """deltamirror nodes from example-config: node 1 alone or both. Node 1
    alone runs `serve --standalone` when the binary has it, else it is
    promoted to serve without its peer (degraded mode)."""

    def __init__(self, name, workdir, offset, nodes, poll_mode, edits=None):
        self.name, self.offset, self.nodes, self.poll_mode = name, offset, nodes, poll_mode
        # {config key: TOML value} set on every node, e.g. {"ack1": '"received"'}.
        self.edits = edits or {}
        self.standalone = len(nodes) == 1 and dm_has_standalone()
        self.dir = os.path.join(workdir, name)
        self.procs = {}
        self.nbd_port = 10809 + offset
        self.iscsi_port = 3260 + offset
        self.nvme_port = 4420 + offset
        self.admin = {n: f"127.0.0.1:{9400 + offset + n - 1}" for n in nodes}

    def ports(self):
        ps = []
        for n in self.nodes:
            ps += [10809 + self.offset + n - 1, 3260 + self.offset + n - 1, 4420 + self.offset + n - 1,
                   9400 + self.offset + n - 1, 7400 + self.offset + n - 1]
        return ps

    def start(self):
        busy = [p for p in self.ports() if port_open(p)]
        if busy:
            raise RuntimeError(f"ports already in use: {busy}")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        for n in self.nodes:
            cfg = subprocess.run([DM, "example-config", "--node", str(n), "--dir", self.dir,
                                  "--port-offset", str(self.offset)],
                                 check=True, capture_output=True, text=True).stdout
            cfg, k = re.subn(r'(?m)^poll_mode\s*=.*$', f'poll_mode = "{self.poll_mode}"', cfg)
            if k != 1:
                raise RuntimeError("example-config has no poll_mode line")
            for key, value in self.edits.items():
                if key.startswith("["):  # a line added to a section; {n} = node id
                    cfg, k = re.subn(rf'(?m)^{re.escape(key)}$', f'{key}\n{value.format(n=n)}', cfg)
                else:
                    cfg, k = re.subn(rf'(?m)^{re.escape(key)}\s*=.*$', f'{key} = {value}', cfg)
                if k != 1:
                    raise RuntimeError(f"example-config has {k} lines for {key}")
            path = os.path.join(self.dir, f"node{n}.toml")
            with open(path, "w") as f:
                f.write(cfg)
            subprocess.run([DM, "format", "--config", path], check=True, capture_output=True, text=True)
        for n in self.nodes:
            logf = open(os.path.join(self.dir, f"node{n}.log"), "w")
            env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
            cmd = [DM, "serve", "--config", os.path.join(self.dir, f"node{n}.toml")]
            if self.standalone:
                cmd.append("--standalone")
            self.procs[n] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                             stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 30
        while self.status(1) is None:
            if time.time() > deadline or self.procs[1].poll() is not None:
                raise RuntimeError(f"node 1 admin never answered; see {self.dir}/node1.log")
            time.sleep(0.1)
        if self.standalone:
            pass
        elif len(self.nodes) == 1:
            r = subprocess.run([DM, "promote", "--admin", self.admin[1]], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"promote failed: {r.stdout}{r.stderr}")
        else:
            self.wait(1, lambda s: s["role"] == "primary" and s["peer_state"] == "connected", 30,
                      "primary with the backup connected")
        if not wait_port(self.nbd_port, 20):
            raise RuntimeError(f"NBD port {self.nbd_port} never opened; see {self.dir}/node1.log")

    def status(self, n):
        r = subprocess.run([DM, "status", "--json", "--admin", self.admin[n]], capture_output=True, text=True)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def wait(self, n, pred, secs, what):
        deadline = time.time() + secs
        while True:
            s = self.status(n)
            if s is not None and pred(s):
                return s
            if time.time() > deadline:
                raise RuntimeError(f"node {n} not '{what}' within {secs} s: {s}")
            time.sleep(0.1)

    def prefill(self, proto, ep, args, tag):
        """128 KiB sequential writes over the workloads' region through node
        1 (`args.seconds` long), then settle: random writes after it
        overwrite allocated blocks of the (sparse) volume file instead of
        allocating them. Raises if the fill failed."""
        fill = run_workload("prefill", proto, ep, WL["seqw128k"], args, self.pids(), tag)
        if not fill.get("ok"):
            raise RuntimeError(f"prefill: {fill.get('error')}")
        self.settle()

    def reactor_marks(self):
        """Each node's reactor threads' busy and idle µs since start and its
        host I/Os so far (status), for `reactor_use`."""
        out = {}
        for n in self.nodes:
            st = self.status(n) or {}
            io = st.get("io", {})
            out[str(n)] = dict(ops=io.get("reads", 0) + io.get("writes", 0),
                               reactors={r["thread"]: (r["busy_us"], r["idle_us"])
                                         for r in st.get("reactors", [])},
                               handover=st.get("disk_handover"))
        return out

    def reset_latency(self):
        """Starts every node's latency histograms afresh (POST /reset-latency)."""
        for n in self.nodes:
            try:
                req = urllib.request.Request(f"http://{self.admin[n]}/reset-latency", data=b"", method="POST")
                urllib.request.urlopen(req, timeout=5).read()
            except OSError as e:
                log(f"{self.name}: reset-latency on node {n}: {e}")
        time.sleep(0.15)  # the reactor publishes its status every 100 ms

    def server_latency(self):
        """Each node's own latency histograms since the last reset (µs)."""
        time.sleep(0.15)
        out = {}
        for n in self.nodes:
            st = self.status(n)
            if not st:
                continue
            io = st.get("io", {})
            out[str(n)] = {k: {"count": io.get(k, {}).get("count", 0), "p50_us": io.get(k, {}).get("p50_us"),
                               "p99_us": io.get(k, {}).get("p99_us")}
                           for k in ("write_latency", "read_latency", "ring_sync_latency", "disk_write_latency")}
            out[str(n)]["stages"] = {k: {"count": v.get("count", 0), "p50_us": v.get("p50_us")}
                                     for k, v in (io.get("stages") or {}).items()}
        return out

    def settle(self):
        """Waits (bounded) until the backup executed everything, between workloads."""
        if len(self.nodes) < 2:
            return
        try:
            self.wait(1, lambda s: s["ack2_seq"] >= s["head_seq"], 30, "backup caught up")
        except RuntimeError as e:
            log(f"{self.name}: {e}")

    def pids(self):
        return {f"node{n}": p.pid for n, p in self.procs.items() if p.poll() is None}

    def rss(self):
        out = {}
        for n in self.nodes:
            s = self.status(n)
            if s is not None:
                out[f"node{n}"] = s.get("rss_bytes")
        return out

    def alive(self):
        return all(p.poll() is None for p in self.procs.values())

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            stop_proc(p)


# The front-ends of a node, as (name in the report, protocol of `run_workload`).
DM_PROTOS = [("NBD", "nbd"), ("iSCSI", "iscsi"), ("NVMe/TCP", "nvme")]


def dm_endpoint(dm, proto):
    """Where a client of `proto` ("nbd", "iscsi", "nvme") reaches node 1 of `dm`."""
    if proto == "nbd":
        return f"nbd://127.0.0.1:{dm.nbd_port}/deltamirror"
    if proto == "iscsi":
        return "iscsi\\://127.0.0.1\\:%d/%s/0" % (dm.iscsi_port, DM_IQN.replace(":", "\\:"))
    return f"127.0.0.1:{dm.nvme_port}"


def reactor_use(before, after):
    """Each reactor thread's busy and idle time between two `reactor_marks`,
    and its busy µs per host I/O of node 1 (the backup's too: its work is
    per mirrored write). `1e6 / busy_us_per_io` is the most I/Os a second
    that thread could serve, fully busy, at the cost it had."""
    ops = after.get("1", {}).get("ops", 0) - before.get("1", {}).get("ops", 0)
    threads = {}
    for n, a in after.items():
        for th, (b, i) in a["reactors"].items():
            b0, i0 = before.get(n, {}).get("reactors", {}).get(th, (0, 0))
            db, di = b - b0, i - i0
            threads[f"node {n} {th}"] = dict(
                node=n, busy_us=db, idle_us=di,
                busy_frac=round(db / (db + di), 3) if db + di > 0 else None,
                busy_us_per_io=round(db / ops, 2) if ops > 0 else None)
    # reactor.disk_handover: the comparisons each node made during the row
    # and what the last one measured.
    handover = {}
    for n, a in after.items():
        h, h0 = a.get("handover"), before.get(n, {}).get("handover") or {}
        if h:
            handover[n] = dict(mode=h["mode"], adaptive=h["adaptive"],
                               comparisons=h["comparisons"] - h0.get("comparisons", 0),
                               chose_at_once=h["chose_at_once"] - h0.get("chose_at_once", 0),
                               at_once_ops_per_sec=h["at_once_ops_per_sec"],
                               in_chunks_ops_per_sec=h["in_chunks_ops_per_sec"])
    return dict(ops=ops, threads=threads, handover=handover)


def dm_one_label():
    return "deltamirror unmirrored (standalone)" if dm_has_standalone() else "deltamirror 1 node"


def idle_cpu(pids, secs):
    a = {k: proc_cpu_ticks(p) for k, p in pids.items()}
    time.sleep(secs)
    b = {k: proc_cpu_ticks(p) for k, p in pids.items()}
    per = {k: (b[k] - a[k]) / CLK_TCK for k in pids if a[k] is not None and b[k] is not None}
    return dict(seconds=secs, per_node=per, total_cpu_s=round(sum(per.values()), 3))


# ---------------------------------------------------------------- the run

class Run:
    def __init__(self, args):
        self.args = args
        self.results = []  # dicts: target, proto, group, workload, ...
        self.extra = {}
        self.failures = []
        self.work = args.workdir

    def record(self, target, group, proto, wl, res):
        res.update(target=target, group=group, proto=proto, workload=wl["key"])
        self.results.append(res)
        if res.get("ok"):
            log(f"  {target:<34} {wl['label']:<22} {res['iops']:>9.0f} IOPS  p50 {res['p50_us']:>7.0f} µs"
                f"  p99 {res['p99_us']:>7.0f} µs  {res['mibs']:>7.1f} MiB/s"
                f"  (others {res.get('placement', {}) and res['placement'].get('other_pct', 0):.0f}% CPU)")
        else:
            log(f"  {target:<34} {wl['label']:<22} FAILED: {res.get('error')}")
            self.failures.append(f"{target} / {wl['label']}: {res.get('error')}")

    def workloads(self, target, group, proto, endpoint, pids, settle=None, alive=None, server=None, wls=None,
                  nvme_client=DM_NVME, nvme_extra=()):
        """`server`: the deltamirror nodes, whose own latency histograms are
        reset before each workload and read after it; `wls`: the workloads
        (default all of WORKLOADS); `nvme_client`: the `dm-nvme` whose `io`
        drives NVMe/TCP, with `nvme_extra` added to its arguments."""
        for wl in wls or WORKLOADS:
            if alive is not None and not alive():
                self.record(target, group, proto, wl, dict(ok=False, error="server process exited"))
                continue
            tag = re.sub(r"[^a-z0-9]+", "-", f"{target}-{wl['key']}".lower())
            if server:
                server.reset_latency()
                marks = server.reactor_marks()
            res = run_workload(target, proto, endpoint, wl, self.args, pids(), tag, nvme_client=nvme_client,
                               nvme_extra=nvme_extra)
            if server and res.get("ok"):
                res["reactors"] = reactor_use(marks, server.reactor_marks())
                res["server"] = server.server_latency()
            self.record(target, group, proto, wl, res)
            if settle:
                settle()

    def want(self, name):
        return not self.args.only or name in self.args.only

    # floors -------------------------------------------------------------
    def local(self):
        path = os.path.join(self.work, "local.img")
        log("floor: local disk, fio io_uring O_DIRECT on", path)
        self.workloads("local disk (fio io_uring)", "floor", "local", path, lambda: {})
        # The same disk from the core our node's reactor is pinned to: on
        # this VM the disk interrupts the other core, and fio there drives
        # the disk harder than fio placed by the scheduler (context for the
        # QD32 aims, which compare with the unpinned row).
        log(f"floor: local disk, fio pinned to core {REACTOR_CORE} (node 1's reactor.cores)")
        self.workloads(LOCAL_PINNED, "floor", "local-pinned", path, lambda: {},
                       wls=QD32_WORKLOADS)
        log("floor: local disk, 128 KiB sequential with a flush after every 8 writes")
        self.workloads(LOCAL_FLUSHED, "floor", "local-flushed", path, lambda: {}, wls=[WL["seqw128k"]])
        log("floor: local disk, 4 KiB random QD32 with a flush after every 32 writes")
        self.workloads(LOCAL_FLUSHED_QD32, "floor", "local-flushed", path, lambda: {}, wls=[WL["randw4k_qd32"]])

    def local_end(self):
        """The local disk's QD1 and QD32 rows once more, last: their spread
        against the first measurement is the run's own noise band."""
        path = os.path.join(self.work, "local.img")
        log("floor: local disk again, at the end of the run")
        self.workloads(LOCAL_END, "floor", "local", path, lambda: {},
                       wls=[WL["seqw128k"], WL["randw4k_qd1"], WL["randw4k_qd32"], WL["randr4k_qd32"]])

    def fsync_floor(self):
        """4 KiB buffered write + fdatasync at QD1: the issue's floor for making
        a ring append durable (the ring itself makes a batch durable with one
        O_DIRECT RWF_DSYNC write, which can come in under it). Then the same
        with two writers on two files at once, as the pair's two rings are
        made durable on this machine's one disk: the flush a mirrored write
        waits for is then often queued behind the other node's."""
        for key, jobs, what in [("fsync_floor", 1, "the ring-durability floor"),
                                ("fsync_floor_shared", 2, "two writers at once: the pair's rings on one disk")]:
            log(f"floor: 4 KiB write + fdatasync (fio sync engine, {jobs} job(s)), {what}")
            path = os.path.join(self.work, "fsync")
            os.makedirs(path, exist_ok=True)
            out = os.path.join(OUT_DIR, f"{key.replace('_', '-')}.json")
            cmd = [FIO, "--name=fsync", "--ioengine=sync", "--rw=randwrite", "--bs=4k", "--size=64m",
                   f"--directory={path}", f"--numjobs={jobs}", "--group_reporting=1", "--fdatasync=1",
                   "--time_based=1", "--ramp_time=1", f"--runtime={self.args.seconds}", "--output-format=json",
                   f"--output={out}"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=self.args.seconds + 60)
            try:
                with open(out) as f:
                    raw = f.read()
                j = json.loads(raw[raw.index("{"):])["jobs"][0]
                sp = j["sync"]["lat_ns"]["percentile"]
                wp = j["write"]["clat_ns"]["percentile"]
                self.extra[key] = dict(
                    cmd=" ".join(cmd), jobs=jobs, iops=j["write"]["iops"],
                    sync_p50_us=sp["50.000000"] / 1000, sync_p99_us=sp["99.000000"] / 1000,
                    write_p50_us=wp["50.000000"] / 1000, write_p99_us=wp["99.000000"] / 1000)
                f = self.extra[key]
                log(f"  fdatasync p50 {f['sync_p50_us']:.0f} µs p99 {f['sync_p99_us']:.0f} µs "
                    f"(buffered write p50 {f['write_p50_us']:.0f} µs), {f['iops']:.0f} write+sync/s")
            except (OSError, ValueError, KeyError, IndexError) as e:
                self.failures.append(f"fdatasync floor ({jobs} job(s)): rc={r.returncode} {e} "
                                     f"{r.stderr.strip()[-200:]}")
            finally:
                shutil.rmtree(path, ignore_errors=True)

    def engine_bench(self):
        log("floor: replication link round trip (target/release/bench)")
        d = os.path.join(self.work, "engine")
        jpath = os.path.join(OUT_DIR, "engine.json")
        if os.path.exists(jpath):
            os.remove(jpath)
        cmd = [ENGINE_BENCH, "--dir", d, "--qd1-ops", "2000", "--seconds", "2", "--size-mib", "256",
               "--port", str(ENGINE_BENCH_PORT), "--json", jpath]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            self.failures.append("engine bench: timed out")
            return
        rows = {}
        try:
            with open(jpath) as f:
                for row in json.load(f)["rows"]:
                    rows[row.pop("name")] = row
        except (OSError, ValueError, KeyError):
            # An older binary without --json: parse its markdown table.
            for line in r.stdout.splitlines():
                m = re.match(r"^\| (.+?) \| (\d+) \| (\d+) \| (\d+) \| (\S+) \| (\d+) \|$", line)
                if m:
                    rows[m.group(1)] = dict(p50_us=float(m.group(2)), p99_us=float(m.group(3)),
                                            p999_us=float(m.group(4)),
                                            qd32_iops=None if m.group(5) == "-" else float(m.group(5)),
                                            rss_mib=float(m.group(6)))
        self.extra["engine_bench"] = dict(cmd=" ".join(cmd), rc=r.returncode, rows=rows,
                                          stdout=r.stdout, stderr=r.stderr[-2000:])
        for k, v in rows.items():
            log(f"  {k:<34} p50 {v['p50_us']:.0f} µs  p99 {v['p99_us']:.0f} µs"
                + (f"  QD32 {v['qd32_iops']:.0f} IOPS" if v["qd32_iops"] else ""))
        if r.returncode != 0 or not any(k.startswith("link round trip") for k in rows):
            self.failures.append(f"engine bench rc={r.returncode}: {r.stderr.strip()[-300:]}")
        shutil.rmtree(d, ignore_errors=True)

    def replay(self):
        """The engine bench's replay mode: replay time against outage size,
        foreground latency during a replay, full remirror bandwidth."""
        log("replay and remirror (target/release/bench --replay)")
        d = os.path.join(self.work, "replay")
        jpath = os.path.join(OUT_DIR, "replay.json")
        if os.path.exists(jpath):
            os.remove(jpath)
        cmd = [ENGINE_BENCH, "--replay", "--dir", d, "--port", str(ENGINE_BENCH_PORT), "--json", jpath]
        if self.args.replay_n:
            cmd += ["--replay-n", self.args.replay_n]
        if self.args.remirror_mib:
            cmd += ["--remirror-mib", str(self.args.remirror_mib)]
        if self.args.fg_entries:
            cmd += ["--fg-entries", str(self.args.fg_entries)]
        t0 = time.time()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired:
            self.failures.append(f"replay bench: timed out after 1200 s: {' '.join(cmd)}")
            shutil.rmtree(d, ignore_errors=True)
            return
        info = dict(cmd=" ".join(cmd), rc=r.returncode, wall_s=round(time.time() - t0, 1),
                    stdout=r.stdout, stderr=r.stderr[-2000:])
        try:
            with open(jpath) as f:
                info["data"] = json.load(f)
        except (OSError, ValueError) as e:
            info["data"] = None
            if r.returncode == 0:
                self.failures.append(f"replay bench: no JSON ({e})")
        self.extra["replay"] = info
        if r.returncode != 0:
            self.failures.append(f"replay bench rc={r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")
        data = info["data"] or {}
        for row in data.get("replay", []):
            log(f"  replay N={row['n']:<7} {row['replay_seconds']:.3f} s ({row['seconds_per_1k_entries']:.4f} s per "
                f"1k entries), bytes replayed / missed {row['bytes_ratio']:.3f}, extents {row['extents']}, "
                f"remirrors {row['remirrors']}")
        for row in data.get("foreground", []):
            log(f"  foreground QD1 p50, {row['label']}: idle {row['idle_p50_us']:.0f} µs, during replay "
                f"{row['during_p50_us']:.0f} µs ({row['p50_ratio']:.2f}x), replay {row['replay_mibs']:.0f} MiB/s")
        rm = data.get("remirror")
        if rm:
            log(f"  remirror {rm['mib']} MiB: {rm['mibs']:.0f} MiB/s; disk seq {rm['disk_seq_mibs']:.0f} MiB/s, "
                f"loopback {rm['loopback_mibs']:.0f} MiB/s, ratio {rm['ratio']:.2f}")
        shutil.rmtree(d, ignore_errors=True)

    # peers --------------------------------------------------------------
    def peer_image(self):
        img = os.path.join(self.work, "peer.img")
        if not os.path.exists(img):
            with open(img, "wb") as f:
                f.truncate(1 << 30)
            subprocess.run(["fallocate", "-l", str(1 << 30), img], check=False)
        return img

    def nbd_peer(self, name, argv, port, target, url, group="peer", wls=None):
        """One peer NBD server (`argv`, named `name`, listening on `port`)
        through the workloads; its stderr goes to `name`.log."""
        self.server_workloads(name, argv, port, target, group, "nbd", url, wls)

    def server_workloads(self, name, argv, port, target, group, proto, endpoint, wls, nvme_client=DM_NVME,
                         nvme_extra=()):
        """Starts `argv` (named `name`, its stderr in `name`.log), waits for
        it to listen on `port`, runs the workloads `wls` against it and
        stops it."""
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(self.work, f"{name}.log"), "w"))
        try:
            if not wait_port(port):
                raise RuntimeError(f"{name} did not start")
            self.workloads(target, group, proto, endpoint, lambda: {name: p.pid}, alive=lambda: p.poll() is None,
                           wls=wls, nvme_client=nvme_client, nvme_extra=nvme_extra)
        except Exception as e:  # noqa: BLE001
            self.failures.append(f"{target}: {e}")
        finally:
            stop_proc(p)

    def nbdkit(self):
        img = self.peer_image()
        log(f"peer: nbdkit file plugin on 127.0.0.1:{PEER_NBDKIT_PORT}")
        self.nbd_peer("nbdkit", ["nbdkit", "--foreground", "--exit-with-parent", "--ipaddr", "127.0.0.1",
                                 "--port", str(PEER_NBDKIT_PORT), "file", f"file={img}"],
                      PEER_NBDKIT_PORT, "nbdkit file (NBD)", f"nbd://127.0.0.1:{PEER_NBDKIT_PORT}/")

    def nvme_mem(self):
        """The NVMe/TCP target alone on an in-memory volume (`dm-nvme
        serve-mem`): the front-end and its connection reactor, no disk. Then
        the same target as it was before issue 10's change (BEFORE_COMMIT),
        driven by its own `dm-nvme io` (the issue's "now") and by this
        build's (how much of the gain is the target's)."""
        self.serve_mem(DM_NVME, MEM_NVME, MEM_FLOOR_WORKLOADS)
        self.serve_mem(DM_NVME, f"{MEM_NVME}{THREADED}", QD32_WORKLOADS, extra=["--reader-thread"])
        old = self.before_dm_nvme()
        if old:
            self.serve_mem(old, MEM_NVME_BEFORE, QD32_WORKLOADS, client=old)
            self.serve_mem(old, MEM_NVME_BEFORE_HOST, QD32_WORKLOADS)

    def before_dm_nvme(self):
        """`dm-nvme` of BEFORE_COMMIT, built from this repository's history
        into target/bench-old (once; later runs reuse it). None, with the
        reason logged, where the history or the build is missing (the aims
        table then uses --nvme-mem-before*, marked as recorded figures)."""
        base = os.path.join(ROOT, "target", "bench-old")
        src, tdir = os.path.join(base, f"src-{BEFORE_COMMIT}"), os.path.join(base, "target")
        binary = os.path.join(tdir, "release", "dm-nvme")
        log(f"serve-mem before the change: building dm-nvme at {BEFORE_COMMIT} in {base}")
        try:
            if not os.path.isdir(src):
                os.makedirs(base, exist_ok=True)
                tmp = src + ".tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
                arch = subprocess.run(["git", "-C", ROOT, "archive", BEFORE_COMMIT], capture_output=True)
                if arch.returncode != 0:
                    raise RuntimeError(f"git archive {BEFORE_COMMIT}: {arch.stderr.decode().strip()[-200:]}")
                subprocess.run(["tar", "-x", "-C", tmp], input=arch.stdout, check=True)
                os.rename(tmp, src)
            env = dict(os.environ, CARGO_TARGET_DIR=tdir)
            r = subprocess.run(["cargo", "build", "--release", "-p", "nvme-target"], cwd=src, env=env,
                               capture_output=True, text=True, timeout=900)
            if r.returncode != 0 or not os.access(binary, os.X_OK):
                raise RuntimeError(f"cargo build: {r.stderr.strip()[-300:]}")
            return binary
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log(f"  no {BEFORE_COMMIT} build ({e}); the aims table uses the recorded figures")
            return None

    def serve_mem(self, server, target, wls, client=DM_NVME, extra=()):
        """Runs `server`'s `dm-nvme serve-mem` and the workloads `wls`
        against it with `client`'s `dm-nvme io` (and `extra` arguments),
        recorded as `target`."""
        log(f"{target} on 127.0.0.1:{NVME_MEM_PORT}")
        argv = [server, "--nqn", DM_NQN, "serve-mem", "--listen", f"127.0.0.1:{NVME_MEM_PORT}",
                "--size-mb", str(max(self.args.region_mib, 256))]
        self.server_workloads("serve-mem", argv, NVME_MEM_PORT, target, "nvme-mem", "nvme",
                              f"127.0.0.1:{NVME_MEM_PORT}", wls, nvme_client=client, nvme_extra=extra)

    def qemu_nbd(self):
        img = self.peer_image()
        log(f"peer: qemu-nbd on 127.0.0.1:{PEER_QEMU_PORT}")
        self.nbd_peer("qemu-nbd", ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(PEER_QEMU_PORT),
                                   "-x", "bench", "--persistent", "--shared=8", img],
                      PEER_QEMU_PORT, "qemu-nbd (NBD)", f"nbd://127.0.0.1:{PEER_QEMU_PORT}/bench")

    def nbdkit_mem(self):
        """The NBD floor: nbdkit's memory plugin (no disk I/O at all) with the
        same fio nbd client as every NBD row."""
        log(f"floor: nbdkit memory plugin on 127.0.0.1:{MEM_NBDKIT_PORT}")
        size = max(self.args.region_mib, 256)
        self.nbd_peer("nbdkit-memory", ["nbdkit", "--foreground", "--exit-with-parent", "--ipaddr", "127.0.0.1",
                                        "--port", str(MEM_NBDKIT_PORT), "memory", f"size={size}M"],
                      MEM_NBDKIT_PORT, MEM_NBD, f"nbd://127.0.0.1:{MEM_NBDKIT_PORT}/", group="mem-floor",
                      wls=MEM_FLOOR_WORKLOADS)

    def tgtd_mem(self):
        """The iSCSI floor: tgtd with its LUN on a file in /dev/shm (tmpfs: no
        disk I/O), the same fio libiscsi client as every iSCSI row."""
        img = f"/dev/shm/dm-bench-tgtd-mem-{os.getpid()}.img"
        with open(img, "wb") as f:
            f.truncate(max(self.args.region_mib, 256) << 20)
        try:
            self.tgtd(img=img, target=MEM_ISCSI, group="mem-floor", wls=MEM_FLOOR_WORKLOADS)
        finally:
            os.remove(img)

    def tgtd(self, img=None, target="tgtd (iSCSI)", group="peer", wls=None):
        img = img or self.peer_image()
        cp = str(TGTD_CONTROL_PORT)
        log(f"{'peer' if group == 'peer' else 'floor'}: tgtd on 127.0.0.1:{PEER_TGTD_PORT} (control port {cp}), "
            f"LUN on {img}")
        if port_open(PEER_TGTD_PORT):
            self.failures.append(f"tgtd: port {PEER_TGTD_PORT} already in use")
            return
        p = subprocess.Popen(["tgtd", "-f", "-C", cp, "--iscsi", f"portal=127.0.0.1:{PEER_TGTD_PORT}"],
                             stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.work, "tgtd.log"), "w"))

        def adm(*a):
            subprocess.run(["tgtadm", "-C", cp, "--lld", "iscsi"] + list(a), check=True,
                           capture_output=True, text=True)
        try:
            if not wait_port(PEER_TGTD_PORT):
                raise RuntimeError("tgtd did not start")
            time.sleep(0.3)
            adm("--op", "new", "--mode", "target", "--tid", "1", "-T", PEER_IQN)
            adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", img)
            adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
            url = "iscsi\\://127.0.0.1\\:%d/%s/1" % (PEER_TGTD_PORT, PEER_IQN.replace(":", "\\:"))
            self.workloads(target, group, "iscsi", url, lambda: {"tgtd": p.pid},
                           alive=lambda: p.poll() is None, wls=wls)
        except Exception as e:  # noqa: BLE001
            self.failures.append(f"{target}: {e}")
        finally:
            # tgtd ignores SIGTERM.
            subprocess.run(["tgtadm", "-C", cp, "--op", "delete", "--mode", "system"], capture_output=True)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # deltamirror --------------------------------------------------------
    def deltamirror(self, key, label, offset, nodes, poll_mode, idle=False, edits=None, group=None, wls=None):
        log(f"deltamirror: {label} (nodes {nodes}, poll {poll_mode}, port offset {offset})")
        dm = DmNodes(key, self.work, offset, nodes, poll_mode, edits=edits)
        info = dict(label=label, nodes=nodes, poll_mode=poll_mode, rss=[], placement_idle=None)
        self.extra.setdefault("dm", {})[key] = info
        try:
            dm.start()
            info["status_start"] = {n: dm.status(n) for n in nodes}
            if idle:
                time.sleep(2)
                info["idle_cpu"] = idle_cpu(dm.pids(), self.args.idle_seconds)
                log(f"  idle CPU over {self.args.idle_seconds} s: {info['idle_cpu']['total_cpu_s']:.3f} CPU s"
                    f" {info['idle_cpu']['per_node']}")
            for pname, proto in DM_PROTOS:
                ep = dm_endpoint(dm, proto)
                self.workloads(f"{label}, {pname}", group or key, proto, ep, dm.pids, settle=dm.settle,
                               alive=dm.alive, server=dm, wls=wls)
                info["rss"].append(dict(after=pname, **dm.rss()))
            if key in ("dm-one", "dm-mirrored"):
                self.workloads(f"{label}, NVMe/TCP{THREADED}", group or key, "nvme", dm_endpoint(dm, "nvme"),
                               dm.pids, settle=dm.settle, alive=dm.alive, server=dm, wls=QD32_WORKLOADS,
                               nvme_extra=["--reader-thread"])
            info["status_end"] = {n: dm.status(n) for n in nodes}
        except Exception as e:  # noqa: BLE001
            self.failures.append(f"{label}: {e}")
            log(f"  {label}: FAILED: {e}")
        finally:
            dm.stop()
            if key == "dm-one":
                self.volume_file(dm)
            if not self.args.keep:
                shutil.rmtree(dm.dir, ignore_errors=True)

    def volume_file(self, dm):
        """fio's QD32 rows on node 1's volume file, the node stopped: the
        local floor on the very file the unmirrored rows served."""
        try:
            path = toml_value(os.path.join(dm.dir, "node1.toml"), "volume", "path")
        except (OSError, RuntimeError):
            path = None
        if not path or not os.path.isfile(path):
            self.failures.append(f"{LOCAL_VOLUME}: node 1's volume file {path or '(no volume.path)'} missing")
            return
        log(f"floor: local disk, fio on {path}")
        self.workloads(LOCAL_VOLUME, "floor", "local", path, lambda: {},
                       wls=QD32_WORKLOADS)

    def twin(self):
        """Two `serve --standalone` nodes at once, node 1's reactor on core
        0 and the other's on core 1 (as a mirrored pair's), each filled and
        then written at QD32 by its own client, per protocol: the volume
        writes, front-end and reactor work of a mirrored pair on this
        machine's one disk and two cores, without the rings, the link and
        the protocol. The mean per node is the mirrored QD32 row's floor."""
        wl = WL["randw4k_qd32"]
        for pname, proto in DM_PROTOS:
            log(f"floor: {TWIN}, {pname}")
            pair = [DmNodes(f"dm-twin-{i}", self.work, OFF_TWIN + 10 * i, [1], "adaptive",
                            edits={"cores": f"[{i}]"}) for i in (0, 1)]
            try:
                for d in pair:
                    d.start()
                eps = [dm_endpoint(d, proto) for d in pair]
                for d, ep in zip(pair, eps):
                    d.prefill(proto, ep, self.args, f"twin-fill-{d.name}")
                got = [None, None]

                def one(i):
                    got[i] = run_workload(TWIN, proto, eps[i], wl, self.args, pair[i].pids(),
                                          f"twin-{i}-{proto}")
                threads = [threading.Thread(target=one, args=(i,)) for i in (0, 1)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                bad = [r for r in got if not r.get("ok")]
                if bad:
                    res = dict(ok=False, error=bad[0].get("error"))
                else:
                    a, b = got
                    res = dict(a, iops=(a["iops"] + b["iops"]) / 2, mibs=(a["mibs"] + b["mibs"]) / 2,
                               p50_us=max(a["p50_us"], b["p50_us"]), p99_us=max(a["p99_us"], b["p99_us"]),
                               per_node_iops=[a["iops"], b["iops"]])
                self.record(f"{TWIN}, {pname}", "floor", proto, wl, res)
            except Exception as e:  # noqa: BLE001
                self.failures.append(f"{TWIN}, {pname}: {e}")
                log(f"  {TWIN}, {pname}: FAILED: {e}")
            finally:
                for d in pair:
                    d.stop()
                    if not self.args.keep:
                        shutil.rmtree(d.dir, ignore_errors=True)

    def variants(self):
        """Mirrored adaptive pairs over NBD, one per entry of VARIANTS: the
        cost of a setting, measured side by side with the defaults."""
        out = self.extra.setdefault("variants", [])
        for i, v in enumerate(VARIANTS):
            log(f"deltamirror: mirrored, {v['label']} (NBD)")
            dm = DmNodes(v["key"], self.work, OFF_VARIANT + 10 * i, [1, 2], "adaptive", edits=v["edits"])
            info = dict(key=v["key"], label=v["label"], edits=v["edits"], rows=[])
            out.append(info)
            try:
                dm.start()
                ep = dm_endpoint(dm, "nbd")
                # As in the main table, the sequential write first fills the region.
                dm.prefill("nbd", ep, self.args, f"{v['key']}-prefill")
                for wl in VARIANT_WORKLOADS:
                    if not dm.alive():
                        raise RuntimeError("a node exited")
                    dm.reset_latency()
                    tag = re.sub(r"[^a-z0-9]+", "-", f"{v['key']}-{wl['key']}")
                    res = run_workload(f"mirrored, {v['label']}", "nbd", ep, wl, self.args, dm.pids(), tag)
                    if res.get("ok"):
                        res["server"] = dm.server_latency()
                    else:
                        self.failures.append(f"mirrored, {v['label']} / {wl['label']}: {res.get('error')}")
                    res.pop("placement", None)
                    info["rows"].append(dict(wl=wl["key"], label=wl["label"], rss=dm.rss(), **res))
                    log(f"  {wl['label']}: {fmt(res.get('iops'))} IOPS, p50 {fmt(res.get('p50_us'))} µs")
                    dm.settle()
            except Exception as e:  # noqa: BLE001
                self.failures.append(f"mirrored, {v['label']}: {e}")
                log(f"  {v['label']}: FAILED: {e}")
            finally:
                dm.stop()
                if not self.args.keep:
                    shutil.rmtree(dm.dir, ignore_errors=True)
                for f in glob.glob(v.get("cleanup") or ""):
                    os.remove(f)

    def go(self):
        a = self.args
        os.makedirs(OUT_DIR, exist_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        t0 = time.time()
        self.extra["started"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self.extra["check_before"] = machine_check("before")
        deadline = time.time() + a.wait_quiet
        while self.extra["check_before"].get("warning") and time.time() < deadline:
            log(f"waiting for the machine to go quiet (--wait-quiet, {deadline - time.time():.0f} s left)")
            time.sleep(10)
            self.extra["check_before"] = machine_check("before")
        if self.want("local"):
            self.local()
        if self.want("local"):
            self.fsync_floor()
        if self.want("link"):
            self.engine_bench()
        if self.want("nbdkit"):
            self.nbdkit()
        if self.want("qemu-nbd"):
            self.qemu_nbd()
        if self.want("tgtd"):
            self.tgtd()
        if self.want("nvme-mem"):
            self.nvme_mem()
        if self.want("mem-floors"):
            self.nbdkit_mem()
            self.tgtd_mem()
            vol = f"/dev/shm/dm-bench-mem-{os.getpid()}.img"
            try:
                self.deltamirror("dm-mem", MEM_DM, OFF_MEM, [1], "adaptive", edits={"path": f'"{vol}"'},
                                 group="mem-floor", wls=MEM_FLOOR_WORKLOADS)
            finally:
                if os.path.exists(vol):
                    os.remove(vol)
        if os.path.exists(os.path.join(self.work, "peer.img")):
            os.remove(os.path.join(self.work, "peer.img"))
        if self.want("dm-one"):
            self.deltamirror("dm-one", dm_one_label(), OFF_ONE, [1], "adaptive")
        if self.want("twin"):
            self.twin()
        if self.want("dm-mirrored"):
            self.deltamirror("dm-mirrored", "deltamirror mirrored", OFF_MIRROR, [1, 2], "adaptive", idle=True)
        if self.want("dm-busy") and not a.no_busy:
            self.deltamirror("dm-busy", "deltamirror mirrored busy-poll", OFF_BUSY, [1, 2], "busy", idle=True)
        if self.want("variants"):
            self.variants()
        if self.want("replay"):
            self.replay()
        if self.want("local"):
            self.local_end()
        self.extra["check_after"] = machine_check("after")
        self.extra["duration_s"] = round(time.time() - t0)
        if not a.keep:
            shutil.rmtree(self.work, ignore_errors=True)


# ---------------------------------------------------------------- report

def fmt(v, nd=0):
    if v is None:
        return "–"
    return f"{v:,.{nd}f}"


def machine_desc():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model}), Linux {os.uname().release}"


def git_rev():
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--",
                                ":!BENCHMARKS.md", ":!docs/benchmarks.png"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes in the tree)" if dirty else "")
    except OSError:
        return "?"


def compute_ratios(run):
    R = {(r["target"], r["workload"]): r for r in run.results if r.get("ok")}

    def g(t, w, f):
        r = R.get((t, w))
        return r[f] if r else None

    def div(a, b):
        return a / b if a is not None and b not in (None, 0) else None

    eb = run.extra.get("engine_bench", {}).get("rows", {})
    link_block = eb.get("link round trip (blocking)", {}).get("p50_us")
    link_busy = eb.get("link round trip (busy poll)", {}).get("p50_us")
    local_p50 = g("local disk (fio io_uring)", "randw4k_qd1", "p50_us")
    out = []

    def add(name, val, note, aim=""):
        out.append(dict(name=name, value=val, note=note, aim=aim))

    for proto in ["NBD", "iSCSI", "NVMe/TCP"]:
        m = g(f"deltamirror mirrored, {proto}", "randw4k_qd1", "p50_us")
        add(f"mirrored QD1 write p50 / (local p50 + link p50), {proto}, adaptive",
            div(m, (local_p50 or 0) + (link_block or 0)) if local_p50 and link_block else None,
            f"{fmt(m)} / ({fmt(local_p50)} + {fmt(link_block)}) µs", "≤ 1.10 (in busy poll)")
    fs = run.extra.get("fsync_floor", {}).get("sync_p50_us")
    for proto in ["NBD", "NVMe/TCP"]:
        m = g(f"deltamirror mirrored, {proto}", "randw4k_qd1", "p50_us")
        add(f"mirrored QD1 write p50 / (local p50 + fdatasync p50 + link p50), {proto}, adaptive",
            div(m, local_p50 + fs + link_block) if local_p50 and fs and link_block else None,
            f"{fmt(m)} / ({fmt(local_p50)} + {fmt(fs)} + {fmt(link_block)}) µs",
            "durable-ring floor (ack1 = persisted)" if proto == "NBD" else "")
    one = next((r["target"].rsplit(", ", 1)[0] for r in run.results if r["group"] == "dm-one"), dm_one_label())
    standalone = "standalone" in one
    for proto in ["NBD", "iSCSI", "NVMe/TCP"]:
        m = g(f"{one}, {proto}", "randw4k_qd1", "p50_us")
        if standalone:
            # No ring, no sync: what the front-end and the reactor add to the disk.
            add(f"unmirrored (standalone) QD1 write p50 / local p50, {proto}", div(m, local_p50),
                f"{fmt(m)} / {fmt(local_p50)} µs")
        else:
            add(f"{one.replace('deltamirror ', '')} QD1 write p50 / (local p50 + fdatasync p50), {proto}",
                div(m, local_p50 + fs) if local_p50 and fs else None,
                f"{fmt(m)} / ({fmt(local_p50)} + {fmt(fs)}) µs")
    for proto in ["NBD", "NVMe/TCP"]:
        m = g(f"deltamirror mirrored busy-poll, {proto}", "randw4k_qd1", "p50_us")
        add(f"mirrored QD1 write p50 / (local p50 + link p50), {proto}, busy poll",
            div(m, (local_p50 or 0) + (link_busy or 0)) if local_p50 and link_busy else None,
            f"{fmt(m)} / ({fmt(local_p50)} + {fmt(link_busy)}) µs", "≤ 1.10")
    for group in ["deltamirror mirrored busy-poll", "deltamirror mirrored"]:
        for proto in ["NBD", "iSCSI", "NVMe/TCP"]:
            p50 = g(f"{group}, {proto}", "randw4k_qd1", "p50_us")
            p99 = g(f"{group}, {proto}", "randw4k_qd1", "p99_us")
            add(f"{group.replace('deltamirror ', '')} QD1 write p99 / p50, {proto}", div(p99, p50),
                f"{fmt(p99)} / {fmt(p50)} µs", "≤ 1.5" if "busy" in group else "")
    for proto in ["NBD", "iSCSI", "NVMe/TCP"]:
        m = g(f"deltamirror mirrored, {proto}", "randw4k_qd32", "iops")
        u = g(f"{one}, {proto}", "randw4k_qd32", "iops")
        add(f"mirrored / unmirrored QD32 write IOPS, {proto}", div(m, u), f"{fmt(m)} / {fmt(u)}",
            "≥ 0.45 (the aims table: both nodes share one disk)")
    for wl in ["randw4k_qd32", "randw4k_qd1", "randr4k_qd32"]:
        m = g("deltamirror mirrored, NBD", wl, "iops")
        k = g("nbdkit file (NBD)", wl, "iops")
        add(f"NBD mirrored / nbdkit, {WL[wl]['label']} IOPS", div(m, k), f"{fmt(m)} / {fmt(k)}",
            "≥ 1.0" if wl == "randw4k_qd32" else "")
    for wl in ["randw4k_qd32", "randw4k_qd1", "randr4k_qd32"]:
        m = g("deltamirror mirrored, iSCSI", wl, "iops")
        t = g("tgtd (iSCSI)", wl, "iops")
        add(f"iSCSI mirrored / tgtd, {WL[wl]['label']} IOPS", div(m, t), f"{fmt(m)} / {fmt(t)}",
            "≥ 2.0" if wl == "randw4k_qd32" else "")
    for wl in ["randw4k_qd32", "randw4k_qd1", "randr4k_qd32"]:
        n = g("deltamirror mirrored, NVMe/TCP", wl, "iops")
        b = g("deltamirror mirrored, NBD", wl, "iops")
        add(f"NVMe/TCP / NBD (mirrored), {WL[wl]['label']} IOPS", div(n, b), f"{fmt(n)} / {fmt(b)}", "≥ 1.0")
    m = g("deltamirror mirrored, NBD", "randw4k_qd32", "iops")
    l = g("local disk (fio io_uring)", "randw4k_qd32", "iops")
    add("NBD mirrored / local disk, QD32 write IOPS", div(m, l), f"{fmt(m)} / {fmt(l)}")

    on = eb.get("mirrored volume (adaptive poll)", {})
    off = eb.get("mirrored volume (adaptive, ACK coalescing off)", {})
    if on or off:
        add("engine bench QD32 IOPS, ACK coalescing off / on", div(off.get("qd32_iops"), on.get("qd32_iops")),
            f"{fmt(off.get('qd32_iops'))} / {fmt(on.get('qd32_iops'))}; link msgs received per write "
            f"{fmt(off.get('link_msgs_received_per_write'), 2)} / {fmt(on.get('link_msgs_received_per_write'), 2)}")

    # The fabric link (libfabric; its tcp provider here, over the same loopback TCP)
    # beside the TCP link: it need not be faster here; on RoCE it is the point.
    for mode, tcp_name, fab_name in [
            ("busy poll", "link round trip (busy poll)", "fabric link round trip (busy poll)"),
            ("blocking / wait fd", "link round trip (blocking)", "fabric link round trip (wait fd)")]:
        f, t = eb.get(fab_name, {}).get("p50_us"), eb.get(tcp_name, {}).get("p50_us")
        if f or t:
            add(f"engine bench link round trip p50, fabric / TCP, {mode}", div(f, t), f"{fmt(f)} / {fmt(t)} µs",
                "loopback: need not be < 1")
    for mode in ["busy poll", "adaptive poll"]:
        f = eb.get(f"mirrored volume over fabric ({mode})", {})
        t = eb.get(f"mirrored volume ({mode})", {})
        if f:
            add(f"engine bench mirrored QD1 p50, fabric / TCP, {mode}", div(f.get("p50_us"), t.get("p50_us")),
                f"{fmt(f.get('p50_us'))} / {fmt(t.get('p50_us'))} µs", "loopback: need not be < 1")
            add(f"engine bench mirrored QD32 IOPS, fabric / TCP, {mode}", div(f.get("qd32_iops"), t.get("qd32_iops")),
                f"{fmt(f.get('qd32_iops'))} / {fmt(t.get('qd32_iops'))}; link msgs (ACKs) received per write "
                f"{fmt(f.get('link_msgs_received_per_write'), 2)} / {fmt(t.get('link_msgs_received_per_write'), 2)}")

    rp = (run.extra.get("replay") or {}).get("data") or {}
    rows = rp.get("replay") or []
    for r in rows:
        add(f"replay N={r['n']:,}: bytes replayed / bytes missed", r["bytes_ratio"],
            f"{fmt(r['bytes_replayed'])} / {fmt(r['bytes_missed'])} B, {r['extents']} extents, "
            f"{r['remirrors']} remirrors", "≤ 1.05")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        add(f"replay s per 1k entries, N={b['n']:,} / N={a['n']:,}",
            div(b["seconds_per_1k_entries"], a["seconds_per_1k_entries"]),
            ", ".join(f"N={r['n']:,}: {r['seconds_per_1k_entries']:.4f} s" for r in rows),
            "≈ 1 (time linear in N)")
    for f in rp.get("foreground") or []:
        add(f"foreground QD1 write p50 during replay / idle, {f['label']}", f["p50_ratio"],
            f"{fmt(f['during_p50_us'])} / {fmt(f['idle_p50_us'])} µs, replay {fmt(f['replay_mibs'])} MiB/s", "≤ 2")
    rm = rp.get("remirror")
    if rm:
        add("full remirror MiB/s / min(disk seq write, loopback TCP)", rm["ratio"],
            f"{fmt(rm['mibs'])} / min({fmt(rm['disk_seq_mibs'])}, {fmt(rm['loopback_mibs'])}) MiB/s", "≥ 0.8")
    return out


TARGET_ORDER = ["floor", "mem-floor", "nvme-mem", "peer", "dm-one", "dm-mirrored", "dm-busy"]


def compute_aims(run):
    """The aims of issue 10 (the SPDK-style data path), each with pass/fail:
    rows of (what, value, from, aim, passed)."""
    R = {(r["target"], r["workload"]): r for r in run.results if r.get("ok")}

    def g(t, w, f="iops"):
        r = R.get((t, w))
        return r[f] if r else None

    def div(a, b):
        return a / b if a is not None and b not in (None, 0) else None

    def reactor_ceiling(t, w, node="1"):
        """(1 s / busy µs per I/O of node `node`'s busiest reactor thread,
        that thread's figures) for row (t, w): the most I/Os a second the
        thread could serve, never idle, at the cost it had in the row."""
        r = R.get((t, w)) or {}
        ths = [v for v in r.get("reactors", {}).get("threads", {}).values()
               if v["node"] == node and v.get("busy_us_per_io")]
        if not ths:
            return None, None
        th = max(ths, key=lambda v: v["busy_us_per_io"])
        return 1e6 / th["busy_us_per_io"], th

    def busy_note(th):
        return (f"{th['busy_us_per_io']:.1f} µs busy per I/O, busy {100 * th['busy_frac']:.0f}% of the row"
                if th and th.get("busy_frac") is not None else "")

    out = []

    def add(what, val, note, aim, ok, kind="aim"):
        """kind: "aim" (pass / fail), "floor" (whether the machine's floors
        leave room for the aim) or "context" (no verdict)."""
        out.append(dict(name=what, value=val, note=note, aim=aim, kind=kind,
                        passed=None if val is None or ok is None else ok(val)))

    one = next((r["target"].rsplit(", ", 1)[0] for r in run.results if r["group"] == "dm-one"), dm_one_label())
    local = "local disk (fio io_uring)"
    for proto in ["NBD", "NVMe/TCP", "iSCSI"]:
        m, l = g(f"{one}, {proto}", "randw4k_qd1", "p50_us"), g(local, "randw4k_qd1", "p50_us")
        add(f"unmirrored QD1 write p50 / local O_DIRECT p50, {proto}", div(m, l), f"{fmt(m)} / {fmt(l)} µs",
            "≤ 1.5", lambda v: v <= 1.5)
    le, ls = g(LOCAL_END, "randw4k_qd1", "p50_us"), g(local, "randw4k_qd1", "p50_us")
    add("local disk QD1 write p50 at the end of the run / at its start", div(le, ls), f"{fmt(le)} / {fmt(ls)} µs",
        "context (the disk's drift within the run)", None, kind="context")
    for wl, label in [("randw4k_qd32", "write"), ("randr4k_qd32", "read")]:
        for proto in ["NBD", "NVMe/TCP", "iSCSI"]:
            m, l = g(f"{one}, {proto}", wl), g(local, wl)
            add(f"unmirrored QD32 {label} IOPS / local disk, {proto}", div(m, l), f"{fmt(m)} / {fmt(l)}",
                "≥ 0.8", lambda v: v >= 0.8)
        # The same NVMe/TCP target with the host a reader thread per queue
        # (the default until session 15): how much of the row is the host's loop.
        m, l, f = g(f"{one}, NVMe/TCP{THREADED}", wl), g(local, wl), g(f"{MEM_NVME}{THREADED}", wl)
        add(f"unmirrored QD32 {label} IOPS / local disk, NVMe/TCP with the reader-thread host "
            "(dm-nvme io --reader-thread)",
            div(m, l), f"{fmt(m)} / {fmt(l)}; the same host against serve-mem {fmt(f)}",
            "context (the host until session 15)", None, kind="context")
        lv = g(LOCAL_VOLUME, wl)
        add(f"floor: local disk QD32 {label} IOPS on the unmirrored node's volume file / on the bench's file",
            div(lv, l), f"{fmt(lv)} / {fmt(l)}",
            "context (the same disk, the node's own blocks)", None, kind="context")
        for proto in ["NBD", "NVMe/TCP", "iSCSI"]:
            m = g(f"{one}, {proto}", wl)
            add(f"unmirrored QD32 {label} IOPS / local disk on the node's own volume file, {proto}", div(m, lv),
                f"{fmt(m)} / {fmt(lv)}", "context (the aim's ratio on the node's own blocks)", None,
                kind="context")
        lp_ = g(LOCAL_PINNED, wl)
        for proto in ["NBD", "NVMe/TCP", "iSCSI"]:
            m = g(f"{one}, {proto}", wl)
            add(f"unmirrored QD32 {label} IOPS / local disk with fio on the reactor's core, {proto}", div(m, lp_),
                f"{fmt(m)} / {fmt(lp_)}", "context (the disk from core " + str(REACTOR_CORE) + ")", None,
                kind="context")
        # Whether the gap is the reactor's cost per I/O (its ceiling under
        # the aim: only less work per I/O closes it) or its idle time (the
        # ceiling above the aim: the requests were elsewhere — the disk, the
        # client — while it waited).
        for proto in ["NBD", "NVMe/TCP", "iSCSI"]:
            c, th = reactor_ceiling(f"{one}, {proto}", wl)
            add(f"unmirrored QD32 {label}: node reactor's ceiling (1 s / its busy µs per I/O) / local disk, {proto}",
                div(c, g(local, wl)), f"{fmt(c)} / {fmt(g(local, wl))}; {busy_note(th)}",
                "context (under 0.8: the reactor's work per I/O bounds the aim)", None, kind="context")
        # reactor.disk_handover = "adaptive": the share of the row's
        # comparisons that chose at once, and the last one's figures.
        for proto in ["NBD", "NVMe/TCP", "iSCSI"]:
            h = ((R.get((f"{one}, {proto}", wl)) or {}).get("reactors") or {}).get("handover", {}).get("1")
            if h and h.get("adaptive"):
                add(f"unmirrored QD32 {label}: disk hand-over comparisons that chose at once, {proto}",
                    div(h["chose_at_once"], h["comparisons"]),
                    f"{h['chose_at_once']} of {h['comparisons']}; the last: {fmt(h['at_once_ops_per_sec'])}/s "
                    f"at once, {fmt(h['in_chunks_ops_per_sec'])}/s in chunks",
                    "context (reactor.disk_handover = \"adaptive\")", None, kind="context")
        le = g(LOCAL_END, wl)
        add(f"local disk QD32 {label} IOPS at the end of the run / at its start", div(le, g(local, wl)),
            f"{fmt(le)} / {fmt(g(local, wl))}", "context (the disk's drift within the run)", None,
            kind="context")
        for proto, peer in [("NBD", "nbdkit file (NBD)"), ("NBD", "qemu-nbd (NBD)"), ("iSCSI", "tgtd (iSCSI)")]:
            m, p = g(f"{one}, {proto}", wl), g(peer, wl)
            add(f"unmirrored QD32 {label} IOPS / {peer}", div(m, p), f"{fmt(m)} / {fmt(p)}",
                "> 1", lambda v: v > 1.0)
    eb = run.extra.get("engine_bench", {}).get("rows", {})
    link = eb.get("link round trip (blocking)", {}).get("p50_us")
    fs = run.extra.get("fsync_floor", {}).get("sync_p50_us")
    lp = g(local, "randw4k_qd1", "p50_us")
    floor = lp + fs + link if lp and fs and link else None
    # Both nodes' rings flush the one disk here: the same floor with the
    # fdatasync measured beside a second writer (context rows below).
    fs2 = run.extra.get("fsync_floor_shared", {}).get("sync_p50_us")
    shared = lp + fs2 + link if lp and fs2 and link else None
    for proto in ["NBD", "NVMe/TCP", "iSCSI"]:
        m = g(f"deltamirror mirrored, {proto}", "randw4k_qd1", "p50_us")
        add(f"mirrored QD1 write p50 / durable floor (local + fdatasync + link), {proto}", div(m, floor),
            f"{fmt(m)} / ({fmt(lp)} + {fmt(fs)} + {fmt(link)}) µs", "≤ 1.3", lambda v: v <= 1.3)
    for proto in ["NBD", "NVMe/TCP", "iSCSI"]:
        m, u = g(f"deltamirror mirrored, {proto}", "randw4k_qd32"), g(f"{one}, {proto}", "randw4k_qd32")
        add(f"mirrored / unmirrored QD32 write IOPS, {proto}", div(m, u), f"{fmt(m)} / {fmt(u)}",
            "≥ 0.45 (0.5 is the ceiling on one disk)", lambda v: v >= 0.45)
        if proto == "NVMe/TCP":
            mp, up = (g(f"deltamirror mirrored, NVMe/TCP{THREADED}", "randw4k_qd32"),
                      g(f"{one}, NVMe/TCP{THREADED}", "randw4k_qd32"))
            add("mirrored / unmirrored QD32 write IOPS, NVMe/TCP with the reader-thread host", div(mp, up),
                f"{fmt(mp)} / {fmt(up)}", "context (both rows with dm-nvme io --reader-thread)", None,
                kind="context")
        t = g(f"{TWIN}, {proto}", "randw4k_qd32")
        add(f"floor: {TWIN} / unmirrored QD32 write IOPS, {proto}", div(t, u), f"{fmt(t)} / {fmt(u)}",
            "≥ 0.45 leaves room for the mirrored aim", lambda v: v >= 0.45, kind="floor")
        add(f"mirrored QD32 write IOPS / {TWIN}, {proto}", div(m, t), f"{fmt(m)} / {fmt(t)}",
            "context (1.0 = the floor: the rings, the link and the protocol cost the rest)", None,
            kind="context")
        lf = g(LOCAL_FLUSHED_QD32, "randw4k_qd32")
        add(f"mirrored QD32 write IOPS / half of local with a flush per 32 writes, {proto}",
            div(m, lf / 2 if lf else None), f"{fmt(m)} / ({fmt(lf)} / 2)",
            "context (each node needs a flush per ring batch on the shared disk: 1.0 = one flush per "
            "whole round on each node)", None, kind="context")
        for node, who in [("1", "primary"), ("2", "backup")]:
            c, th = reactor_ceiling(f"deltamirror mirrored, {proto}", "randw4k_qd32", node)
            add(f"mirrored QD32 write: {who}'s reactor ceiling (1 s / its busy µs per write) / mirrored IOPS, {proto}",
                div(c, m), f"{fmt(c)} / {fmt(m)}; {busy_note(th)}",
                "context (well above 1: the reactor waits, for the disk or the peer)", None, kind="context")
    for proto in ["NBD", "NVMe/TCP", "iSCSI"]:
        m, l = g(f"deltamirror mirrored, {proto}", "seqw128k"), g(local, "seqw128k")
        add(f"mirrored 128 KiB QD8 sequential write / local, {proto}", div(m, l), f"{fmt(m)} / {fmt(l)}",
            "≥ 0.2 (0.25 is the ceiling on one disk)", lambda v: v >= 0.2)
        lf = g(LOCAL_FLUSHED, "seqw128k")
        add(f"mirrored 128 KiB QD8 sequential write / local with a flush per 8 writes, {proto}", div(m, lf),
            f"{fmt(m)} / {fmt(lf)}", "context (each byte is written 4 times: 0.25 is the ceiling)", None,
            kind="context")
    le, ls = g(LOCAL_END, "seqw128k"), g(local, "seqw128k")
    add("local disk 128 KiB QD8 sequential write at the end of the run / at its start", div(le, ls),
        f"{fmt(le)} / {fmt(ls)}", "context (the disk's drift within the run)", None, kind="context")
    # Issue 10's "≥ 2× now" rows: BEFORE_COMMIT's serve-mem measured in this
    # run with its own dm-nvme io (the issue's "now"), and with this build's
    # (that client was itself the limit then: the second ratio is the
    # target's own share). Where it could not be built, the recorded figures
    # (--nvme-mem-before*), marked so.
    for old, opt, default, what, aim in [
            (MEM_NVME_BEFORE, "nvme_mem_before", [63000.0, 67000.0],
             f"NVMe/TCP on memory (serve-mem) QD32 4 KiB {{}} IOPS / before ({BEFORE_COMMIT})", "≥ 2"),
            (MEM_NVME_BEFORE_HOST, "nvme_mem_before_same_client", [97000.0, 130000.0],
             f"serve-mem QD32 4 KiB {{}} IOPS / the {BEFORE_COMMIT} target with this build's dm-nvme io",
             "≥ 2 (the target's own share)")]:
        recorded = dict(zip(["randw4k_qd32", "randr4k_qd32"], getattr(run.args, opt, None) or default))
        for wl, label in [("randw4k_qd32", "write"), ("randr4k_qd32", "read")]:
            m, b = g(MEM_NVME, wl), g(old, wl)
            src = f"{fmt(m)} / {fmt(b)}"
            if b is None:
                b = recorded[wl]
                src = f"{fmt(m)} / {fmt(b)} (recorded, not this run)"
            add(what.format(label), div(m, b), src, aim, lambda v: v >= 2.0)

    # What the machine allows: each protocol's client and a target with no
    # disk I/O (MEM_FLOOR; the best of those measured). QD1: the aim
    # "unmirrored p50 / local p50 <= 1.5" needs the protocol's round trip to
    # fit in 0.5 x local p50; QD32: the client with a target on memory is the
    # most IOPS it asks of any target on these cores.
    def best(proto, wl, field):
        got = [(g(t, wl, field), t) for t in MEM_FLOOR[proto] if g(t, wl, field)]
        if not got:
            return None, "no no-disk target measured"
        v, t = (min if field == "p50_us" else max)(got)
        return v, "best of: " + ", ".join(f"{MEM_SHORT.get(x[1], 'ours on tmpfs')} {fmt(x[0])}" for x in got)

    for proto in MEM_FLOOR:
        (f, fnote), l = best(proto, "randw4k_qd1", "p50_us"), g(local, "randw4k_qd1", "p50_us")
        m = g(f"{one}, {proto}", "randw4k_qd1", "p50_us")
        add(f"floor: (local p50 + {proto} no-disk p50) / local p50, QD1 write",
            div((l or 0) + (f or 0), l) if f and l else None, f"({fmt(l)} + {fmt(f)}) / {fmt(l)} µs; {fnote}",
            "≤ 1.5 leaves room for the QD1 aim", lambda v: v <= 1.5, kind="floor")
        add(f"unmirrored QD1 write p50 / (local p50 + {proto} no-disk p50)",
            div(m, l + f) if f and l else None, f"{fmt(m)} / ({fmt(l)} + {fmt(f)}) µs",
            "context (1.0 = the floor)", None, kind="context")
        mm = g(f"deltamirror mirrored, {proto}", "randw4k_qd1", "p50_us")
        add(f"mirrored QD1 write p50 / (durable floor + {proto} no-disk p50)",
            div(mm, floor + f) if floor and f else None,
            f"{fmt(mm)} / ({fmt(lp)} + {fmt(fs)} + {fmt(link)} + {fmt(f)}) µs", "context (1.0 = the floor)", None,
            kind="context")
        add(f"mirrored QD1 write p50 / (shared-disk durable floor + {proto} no-disk p50)",
            div(mm, shared + f) if shared and f else None,
            f"{fmt(mm)} / ({fmt(lp)} + {fmt(fs2)} + {fmt(link)} + {fmt(f)}) µs; fdatasync with a second "
            "writer on the disk", "context (1.0 = the floor)", None, kind="context")
    for wl, label in [("randw4k_qd32", "write"), ("randr4k_qd32", "read")]:
        for proto in MEM_FLOOR:
            (c, cnote), l = best(proto, wl, "iops"), g(local, wl)
            add(f"floor: {proto} no-disk QD32 {label} IOPS / local disk", div(c, l),
                f"{fmt(c)} / {fmt(l)}; {cnote}", "≥ 0.8 leaves room for the QD32 aim", lambda v: v >= 0.8,
                kind="floor")
            m = g(f"{one}, {proto}", wl)
            add(f"unmirrored QD32 {label} IOPS / {proto} no-disk (same client)", div(m, c),
                f"{fmt(m)} / {fmt(c)}", "context (1.0 = the client's ceiling)", None, kind="context")
    return out


AIM_VERDICT = {"aim": {True: "pass", False: "**fail**"},
               "floor": {True: "room", False: "**no room**"},
               "context": {None: "–"}}


def aim_verdict(r, md=True):
    """The pass column of an aims row (markdown, or plain for the terminal)."""
    if r["value"] is None:
        return "not measured"
    v = AIM_VERDICT[r.get("kind", "aim")].get(r["passed"], "–")
    return v if md else v.replace("**", "").upper() if "**" in v else v


def write_report(run, path_md, path_png):
    a = run.args
    L = []
    before, after = run.extra.get("check_before", {}), run.extra.get("check_after", {})
    # The soak (scripts/soak.sh) runs on its own and writes its own section:
    # a report written anew keeps the one already in the file.
    soak_kept = None
    try:
        with open(path_md) as f:
            old = f.read()
        span = md_section_span(old, SOAK_HEADER)
        if span:
            soak_kept = old[span[0]:span[1]].rstrip("\n") + "\n"
    except OSError:
        pass
    L.append("# deltamirror benchmarks\n")
    L.append("Generated by `scripts/bench.sh` (scripts/bench/bench.py); do not edit by hand. "
             "Methodology and what moved each number: [docs/performance.md](docs/performance.md).\n")
    L.append(f"- Run: {run.extra.get('started')}, {run.extra.get('duration_s')} s in all, "
             f"commit {run.extra.get('git_rev') or git_rev()}.")
    mt = lambda b: datetime.datetime.fromtimestamp(os.path.getmtime(b), datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC") if os.path.exists(b) else "missing"
    L.append(f"- Binaries: target/release/deltamirror built {mt(DM)}, dm-nvme {mt(DM_NVME)}, bench "
             f"{mt(ENGINE_BENCH)} (`cargo build --release` by scripts/bench.sh unless --no-build).")
    L.append(f"- Machine: {machine_desc()}; every client and server on 127.0.0.1.")
    L.append(f"- Each workload: {a.seconds} s (fio adds a 1 s ramp), over the first {a.region_mib} MiB of the "
             f"volume; the 128 KiB sequential write runs first so that reads read written blocks.")
    L.append(f"- Load before: loadavg {' '.join(before.get('loadavg', []))}, other processes "
             f"{before.get('busy_total_pct', '?')}% of a core"
             + (f" ({', '.join(b['comm'] + ' ' + str(round(b['pct'])) + '%' for b in before.get('busy', [])[:6])})"
                if before.get("busy") else "")
             + f". After: loadavg {' '.join(after.get('loadavg', []))}, other processes "
             f"{after.get('busy_total_pct', '?')}% of a core.")
    others = [(r.get("placement") or {}).get("other_pct") for r in run.results]
    others = [o for o in others if o is not None]
    if others:
        L.append(f"- During the measurements, other processes used on average {sum(others) / len(others):.0f}% "
                 f"of a core (max {max(others):.0f}%; per row in the column \"others %\").")
    # Judged by the CPU other processes used, not by the load average: the
    # load average lags, and right after scripts/bench.sh builds it still
    # counts the build.
    if before.get("busy_total_pct", 0) > 20 or after.get("busy_total_pct", 0) > 20 or any(
            (r.get("placement") or {}).get("other_pct", 0) > 20 for r in run.results):
        L.append("\n> **The machine was not quiet.** Other processes shared these cores during the run; "
                 "the column \"others %\" is the CPU that processes other than the client and server under "
                 "test used during each measurement (100% = one core). Treat rows with a high value as noisy, "
                 "and compare ratios rather than absolute numbers.")
    elif others:
        L.append("\nThe machine was quiet: no other process used more than 20% of a core during any "
                 "measurement. The load average above counts the release build that preceded the run.")
    L.append("")
    if run.failures:
        L.append("## Failures\n")
        for f in run.failures:
            L.append(f"- {f}")
        L.append("")
    else:
        L.append("All workloads completed.\n")

    rel = os.path.relpath(path_png, os.path.dirname(os.path.abspath(path_md)))
    L.append(f"![IOPS and latency per target]({rel})\n")

    L.append("## Results\n")
    L.append("Latency is per I/O, submission to completion, as the client saw it (fio `lat`, dm-nvme). "
             "MiB/s = 2^20 bytes per second.\n")
    for wl in WORKLOADS:
        L.append(f"### {wl['label']}\n")
        L.append("| target | IOPS | p50 µs | p99 µs | MiB/s | others % |")
        L.append("|---|---:|---:|---:|---:|---:|")
        rows = [r for r in run.results if r["workload"] == wl["key"]]
        rows.sort(key=lambda r: TARGET_ORDER.index(r["group"]) if r["group"] in TARGET_ORDER else 99)
        for r in rows:
            if r.get("ok"):
                L.append(f"| {r['target']} | {fmt(r['iops'])} | {fmt(r['p50_us'])} | {fmt(r['p99_us'])} | "
                         f"{fmt(r['mibs'], 1)} | {fmt((r.get('placement') or {}).get('other_pct'))} |")
            else:
                L.append(f"| {r['target']} | **failed** | | | | |")
        L.append("")

    L.append("## Floors\n")
    L.append("| floor | p50 µs | p99 µs | how |")
    L.append("|---|---:|---:|---|")
    R = {(r["target"], r["workload"]): r for r in run.results if r.get("ok")}
    lr = R.get(("local disk (fio io_uring)", "randw4k_qd1"))
    if lr:
        L.append(f"| local disk, 4 KiB O_DIRECT write QD1 | {fmt(lr['p50_us'])} | {fmt(lr['p99_us'])} | "
                 "fio io_uring, direct=1 |")
    fsf = run.extra.get("fsync_floor")
    if fsf:
        L.append(f"| 4 KiB buffered write + fdatasync, QD1 (sync part) | {fmt(fsf['sync_p50_us'])} | "
                 f"{fmt(fsf['sync_p99_us'])} | fio sync engine, fdatasync=1 ({fmt(fsf['iops'])} per s) |")
    fss = run.extra.get("fsync_floor_shared")
    if fss:
        L.append(f"| the same, two writers at once on two files (the pair's two rings on one disk) | "
                 f"{fmt(fss['sync_p50_us'])} | {fmt(fss['sync_p99_us'])} | as above, numjobs=2 "
                 f"({fmt(fss['iops'])} per s in all) |")
    for k, v in (run.extra.get("engine_bench") or {}).get("rows", {}).items():
        if k.startswith("link round trip"):
            L.append(f"| {k}, 4 KiB one way + 16 B back | {fmt(v['p50_us'])} | {fmt(v['p99_us'])} | "
                     "target/release/bench |")
    L.append("")
    L.append("With `ack1 = \"persisted\"` a mirrored write waits for a ring fdatasync on the backup (before "
             "ACK1) and on the primary, so the durable floor of a QD1 write is about "
             "local write + fdatasync + link round trip; the fdatasync row shows what that costs here.\n")

    eb = run.extra.get("engine_bench")
    if eb:
        L.append("## Floors from the engine bench (`target/release/bench`)\n")
        L.append(f"`{eb['cmd']}` — 4 KiB writes inside one process (no front-end protocol). The link round "
                 "trip is a 4 KiB frame one way and a 16-byte ACK back over loopback TCP.\n")
        L.append("| what | QD1 p50 µs | p99 µs | p99.9 µs | QD32 IOPS | RSS MiB |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for k, v in eb["rows"].items():
            L.append(f"| {k} | {fmt(v['p50_us'])} | {fmt(v['p99_us'])} | {fmt(v['p999_us'])} | "
                     f"{fmt(v['qd32_iops'])} | {fmt(v['rss_mib'])} |")
        L.append("")

    on = (eb or {}).get("rows", {}).get("mirrored volume (adaptive poll)")
    off = (eb or {}).get("rows", {}).get("mirrored volume (adaptive, ACK coalescing off)")
    if on and off:
        L.append("## ACK coalescing on vs off (QD32)\n")
        L.append("The engine bench's adaptive pair, run twice: with `core.coalesce_acks = true` (the default: "
                 "the backup sends one cumulative ACK per poll) and `false` (one ACK message per REQ) on both "
                 "nodes. Link messages are node 1's counters over the QD32 phase divided by the writes it "
                 "completed (heartbeats included).\n")
        L.append("| ACK coalescing | QD32 IOPS | node 1 link msgs received per write | node 1 link msgs sent per write "
                 "| QD1 p50 µs | RSS MiB |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for what, v in [("on (default)", on), ("off", off)]:
            L.append(f"| {what} | {fmt(v.get('qd32_iops'))} | {fmt(v.get('link_msgs_received_per_write'), 2)} | "
                     f"{fmt(v.get('link_msgs_sent_per_write'), 2)} | {fmt(v.get('p50_us'))} | "
                     f"{fmt(v.get('rss_mib'))} |")
        L.append("")

    var = run.extra.get("variants") or []
    if var:
        L.append("## Settings side by side (mirrored, NBD)\n")
        L.append("Mirrored adaptive pairs that differ in one setting, started one after the other in this run, "
                 "with the same fio workloads over NBD, each after the same 128 KiB sequential fill as the main table. `ack1 = \"received\"` lets the backup answer ACK1 before "
                 "its ring flush (the primary's own ring flush stays on the path, I2). The tmpfs rows are not a "
                 "configuration to run (the ring is volatile there): they show how far the ring's flush on this "
                 "disk sets the mirrored numbers, i.e. what a ring on a device with a cheap flush (`ring.path` on a "
                 "power-loss-protected SSD or persistent memory) would approach. The QD128 row is the depth "
                 "DESIGN.md sets the memory aim at: each node's resident set (mapped ring pages included) is read "
                 "from `status` right after the workload.\n")
        L.append("| setting | workload | IOPS | p50 µs | p99 µs | node 1 ring sync p50 µs | node 2 ring sync p50 µs "
                 "| RSS node 1 / node 2 MiB |")
        L.append("|---|---|---:|---:|---:|---:|---:|---|")
        for v in var:
            for r in v["rows"]:
                sv = r.get("server") or {}
                rs = [(sv.get(n) or {}).get("ring_sync_latency", {}).get("p50_us") for n in ("1", "2")]
                rss = r.get("rss") or {}
                mib = [fmt((rss.get(f"node{n}") or 0) / 1048576.0) if rss.get(f"node{n}") else "–" for n in (1, 2)]
                if not r.get("ok"):
                    L.append(f"| {v['label']} | {r['label']} | failed: {r.get('error', '')[:80]} | | | | | |")
                    continue
                L.append(f"| {v['label']} | {r['label']} | {fmt(r.get('iops'))} | {fmt(r.get('p50_us'))} | "
                         f"{fmt(r.get('p99_us'))} | {fmt(rs[0])} | {fmt(rs[1])} | {mib[0]} / {mib[1]} |")
        L.append("")

    rpi = run.extra.get("replay")
    rp = (rpi or {}).get("data") or {}
    if rpi:
        L.append("## Replay and remirror\n")
        L.append(f"`{rpi['cmd']}` ({rpi['wall_s']} s, rc {rpi['rc']}): an in-process pair as in the engine bench "
                 f"(adaptive poll, {fmt(rp.get('volume_mib'))} MiB volume, {fmt(rp.get('ring_mib'))} MiB ring "
                 "for the replay runs), a fresh pair per row.\n")
        rows = rp.get("replay") or []
        if rows:
            L.append("### Replay time against outage size\n")
            L.append("Node 2 stops; node 1 takes N random 4 KiB writes (degraded, after the 1 s peer timeout); "
                     "node 2 restarts. *replay s* is node 1's own `last_replay.seconds` (handshake to the last "
                     "entry acknowledged, 1 ms clock); the two *wall s* are node 2's restart to node 1 reporting the "
                     "replay done, and to ACK2 = head (the backup executed everything), polled from the status "
                     "node 1 publishes every 100 ms. Bytes missed = N × 4096.\n")
            L.append("| N | replay s | s per 1k entries | wall s: replay done / in sync | entries | "
                     "bytes replayed / missed | extents | full remirror | remirrors | degraded fill IOPS | RSS MiB |")
            L.append("|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
            for r in rows:
                L.append(f"| {r['n']:,} | {r['replay_seconds']:.3f} | {r['seconds_per_1k_entries']:.4f} | "
                         f"{fmt(r.get('wall_replay_seconds'), 2)} / {r['wall_seconds']:.2f} | {fmt(r['entries'])} | {r['bytes_ratio']:.3f} | "
                         f"{fmt(r['extents'])} | {'yes' if r['full_remirror'] else 'no'} | {r['remirrors']} | "
                         f"{fmt(r['fill_iops'])} | {fmt(r['rss_mib'])} |")
            L.append("")
        fg = rp.get("foreground") or []
        if fg:
            L.append("### Foreground writes during a replay\n")
            L.append(f"QD1 4 KiB random writes on node 1: first with the pair idle and in sync, then from node 2's "
                     f"restart until the replay of {fmt(fg[0].get('entries'))} entries finished. Once with no replay "
                     "rate limits and once with a ceiling (`core.max_replay_bytes_per_sec`) and a floor "
                     "(`core.min_replay_bytes_per_sec`).\n")
            L.append("| replay limits | idle p50 / p99 µs | during replay p50 / p99 µs | p50 during / idle | "
                     "writes during | replay s | replay MiB/s |")
            L.append("|---|---:|---:|---:|---:|---:|---:|")
            for f in fg:
                L.append(f"| {f['label']} | {fmt(f['idle_p50_us'])} / {fmt(f['idle_p99_us'])} | "
                         f"{fmt(f['during_p50_us'])} / {fmt(f['during_p99_us'])} | {f['p50_ratio']:.2f} | "
                         f"{fmt(f['during_writes'])} | {f['replay_seconds']:.2f} | {fmt(f['replay_mibs'])} |")
            L.append("")
        rm = rp.get("remirror")
        if rm:
            L.append("### Full remirror\n")
            L.append(f"Node 1's {rm['mib']} MiB volume is written end to end (1 MiB writes, mirrored); node 2 stops, "
                     "its data directory and volume are deleted and it is formatted as a new disk "
                     "(`format --replace`), then started. Node 1 sends the whole volume. The floors, measured in "
                     f"the same run: 1 MiB O_DIRECT sequential writes at QD8 to a new file of {rm['mib']} MiB on the "
                     "same disk, and 1 MiB buffers over a 127.0.0.1 TCP socket between two threads for 1 s. Both "
                     "nodes share the one disk, so the remirror reads and writes it at the same time.\n")
            sess = rp.get("remirror_sessions") or []
            L.append("*wall s* runs from node 2's start to node 1 reporting the remirror counted, no replay running, "
                     "the peer connected and ACK2 = head. *sessions* are the replays node 1 reported on the way "
                     "(seconds and bytes sent as last seen, 100 ms samples); a second session means the link "
                     "dropped and the source started over. MiB/s is from the core's own clock when the remirror "
                     "took one session, else from the wall clock (the volume size / wall s).\n")
            L.append("| MiB | MiB/s | from | wall s | sessions (s, MiB sent, full) | disk seq write MiB/s | "
                     "loopback TCP MiB/s | MiB/s / min(disk, loopback) | remirrors | data check |")
            L.append("|---:|---:|---|---:|---|---:|---:|---:|---|---|")
            st = "; ".join(f"{x['seconds']:.2f} s, {x['bytes'] / 1048576:,.0f}, {'full' if x['full_remirror'] else 'dirty map'}"
                           for x in sess) or "–"
            L.append(f"| {rm['mib']} | {fmt(rm['mibs'])} | {rm.get('mibs_basis', 'core')} | {rm['wall_seconds']:.2f} | "
                     f"{st} | {fmt(rm['disk_seq_mibs'])} | {fmt(rm['loopback_mibs'])} | {rm['ratio']:.2f} | "
                     f"{rm['remirrors_before']} → {rm['remirrors_after']} | "
                     f"{ {True: '16 pieces equal', False: '**differ**', None: 'not read'}[rm.get('data_check')] } |")
            L.append("")
            if len(sess) > 1:
                L.append(f"**The remirror took {len(sess)} sessions**: the link dropped after the first had sent "
                         f"{sess[0]['bytes'] / 1048576:,.0f} MiB, and the next one sent the dirty map again "
                         f"({sess[-1]['bytes'] / 1048576:,.0f} MiB).\n")
        if not rp:
            L.append(f"The replay bench produced no results (rc {rpi['rc']}): "
                     f"`{(rpi.get('stderr') or '').strip()[-300:]}`\n")

    L.append("## Aims of the SPDK-style data path (issue 10)\n")
    L.append("| what | value | from | aim | pass |")
    L.append("|---|---:|---|---|---|")
    for r in compute_aims(run):
        L.append(f"| {r['name']} | {fmt(r['value'], 2)} | {r['note']} | {r['aim']} | {aim_verdict(r)} |")
    L.append("")
    L.append("The rows marked *floor* and *context* are what the machine allows, measured in the same run. The local disk is measured again after every other target (the context rows *at the end of the run / at its start*): this disk drifts within a run, and every \"/ local\" ratio moves with it, so their spread is the noise band of those ratios. A "
             "*no-disk* target serves the protocol on the same loopback and cores with no disk I/O at all: "
             "nbdkit's memory plugin (NBD), tgtd with its LUN on a tmpfs file (iSCSI), `dm-nvme serve-mem` "
             "(NVMe/TCP), and for all three our own `serve --standalone` with its volume file on tmpfs; each "
             "through the same client as our rows (fio nbd, fio libiscsi, dm-nvme io). The *floor* rows take the "
             "best of them per protocol (lowest QD1 p50, highest QD32 IOPS; the column \"from\" lists each). "
             "Its QD1 write p50 is the protocol's round trip (client, network stack, a target) without the disk, "
             "so a front-end on the disk needs about local p50 + that: a *floor* row of (local + no-disk) / local "
             "above 1.5 means the QD1 aim has no room on this machine unless the front-end beats the best "
             "no-disk target measured. The *context* row ours / (local + no-disk) says how far our front-end is "
             "from that sum; p50s do not add exactly (each measurement carries its own client's costs, e.g. "
             "fio's io_uring submit and reap in the local row), so a value a little under 1.0 is possible. The "
             "QD32 IOPS of a no-disk target is the most the same client reaches on these two cores with no disk "
             "behind the target: a *floor* row under 0.8 of the local disk means the QD32 aim is bounded by the "
             "client and the shared cores rather than by the target. The serve-mem and tmpfs rows are our own "
             "code, so they include its costs; the nbdkit and tgtd rows are independent of deltamirror.\n")
    L.append("The *reactor ceiling* rows use each node's own accounting of its reactor threads (status "
             "`reactors`: a pass that found work is busy, one that found none is idle with its yield or sleep): "
             "the busy time during the row over node 1's host I/Os is that thread's cost per I/O, and 1 s / that "
             "cost is the most I/Os a second it could serve never idle. A ceiling far above the row (a reactor "
             "busy half the time) means the requests spent their time elsewhere — the disk, the client's loop, "
             "the peer — and the row is bound by latency; a ceiling under the aim means the work per I/O bounds "
             "it. The *two unmirrored nodes at once* floor runs two `serve --standalone` nodes together, node "
             "1's reactor on core 0 and the other's on core 1 as in the mirrored pair, each filled and written "
             "at QD32 by its own client: the volume writes and front-end work of a mirrored pair on this one "
             "disk and two cores without its rings, link and protocol; the mean per node is what a mirrored "
             "QD32 row could reach here. The 128 KiB local row *with a flush per 8 writes* (fio "
             "`--fdatasync=8`) pays the durability a mirrored batch pays; the 4 KiB QD32 row *with a flush "
             "per 32 writes* is the best a mirrored QD32 row's rings could do (one group commit per round), "
             "of which each node of a pair sharing the disk gets half. The rows *on the unmirrored "
             "node's volume file* run fio's QD32 rows on node 1's own volume file once that node has stopped: "
             "the same blocks the unmirrored rows served (on this VM a file's blocks read and write at a rate "
             "that depends on how and when they were written, so the bench's own file is not always the "
             "node's floor). The NVMe/TCP host, `dm-nvme io`, reads its "
             "one queue's socket on the submitting thread and refills at once, as SPDK's perf tool polls its "
             "qpairs; the rows *with the reader-thread host* drive the same targets with `dm-nvme io "
             "--reader-thread`, the host until session 15, where a reader thread hands each round of "
             "completions to the submitting one: they say how much of a row is the host's loop.\n")
    L.append(f"The serve-mem \"before\" rows are {BEFORE_COMMIT} (the commit before issue 10's data-path "
             "change), built from this repository's history into target/bench-old and run in this run: its "
             "`dm-nvme serve-mem` driven by its own `dm-nvme io` (the issue's \"now\") and by this build's "
             "(that client was itself the limit then, so the second ratio is the target's own share). A row "
             "marked *recorded* used `--nvme-mem-before*` instead because that build failed.\n")
    if soak_kept:
        L.append(soak_kept)
    L.append("## Ratios\n")
    L.append("The aim column carries the aims of earlier issues, kept so that runs compare. Several predate "
             "what later measurements showed: a mirrored QD1 write also waits for a ring fdatasync (the "
             "durable floor above), and a mirrored pair set against an unmirrored peer on this one disk has "
             "0.5 as its ceiling. Issue 10's aims, judged pass or fail, are the table above.\n")
    L.append("| ratio | value | from | aim |")
    L.append("|---|---:|---|---|")
    for r in compute_ratios(run):
        L.append(f"| {r['name']} | {fmt(r['value'], 2)} | {r['note']} | {r['aim']} |")
    L.append("")
    L.append("The latency floor uses the fio QD1 p50 on the local file and the engine bench's link p50: "
             "blocking sockets for the adaptive pair, busy-polled sockets for the busy-poll pair.\n")

    dm = run.extra.get("dm", {})
    if dm:
        L.append("## Resident memory of each deltamirror node\n")
        L.append("`rss_bytes` from `deltamirror status --json` after each protocol's workloads (mapped ring "
                 "pages that were touched count).\n")
        L.append("| configuration | after | node 1 MiB | node 2 MiB |")
        L.append("|---|---|---:|---:|")
        for k, info in dm.items():
            for r in info.get("rss", []):
                n1, n2 = r.get("node1"), r.get("node2")
                L.append(f"| {info['label']} | {r['after']} | {fmt(n1 / 1048576 if n1 else None, 1)} | "
                         f"{fmt(n2 / 1048576 if n2 else None, 1)} |")
        L.append("")
        srows = [r for r in run.results if r.get("ok") and r.get("server")]
        if srows:
            L.append("## Server-side latency per workload\n")
            L.append("Each node's own histograms, reset before the workload (`POST /reset-latency`) and read "
                     "after it: *host* is volume submit to completion on node 1 (no network, no client), "
                     "*ring sync* a ring batch's durable write (from its start to its report), *disk write* the O_DIRECT writes a node executed. "
                     "The client's p50 minus node 1's host p50 is what the protocol front-end, the "
                     "network stack and the client add.\n")
            L.append("| target | workload | client p50 µs | node 1 host p50 / p99 µs | node 1 ring sync p50 µs "
                     "| node 1 disk write p50 µs | node 2 ring sync p50 µs | node 2 disk write p50 µs |")
            L.append("|---|---|---:|---|---:|---:|---:|---:|")
            for r in srows:
                sv = r["server"]
                n1, n2 = sv.get("1", {}), sv.get("2", {})
                host = n1.get("read_latency" if r["workload"].startswith("randr") else "write_latency", {})

                def p50(n, k):
                    v = n.get(k, {})
                    return fmt(v.get("p50_us")) if v.get("count") else "–"
                L.append(f"| {r['target']} | {WL[r['workload']]['label']} | {fmt(r['p50_us'])} | "
                         f"{fmt(host.get('p50_us'))} / {fmt(host.get('p99_us'))} | {p50(n1, 'ring_sync_latency')} | "
                         f"{p50(n1, 'disk_write_latency')} | {p50(n2, 'ring_sync_latency')} | "
                         f"{p50(n2, 'disk_write_latency')} |")
            L.append("")
            prows = [r for r in srows if (r["server"].get("1", {}).get("stages", {}).get("executed") or {}).get("count")]
            if prows:
                L.append("## Where a mirrored write's time goes (status `path`)\n")
                L.append("The nodes' `path` stages over the same workloads: one sampled write at a time (every "
                         "write at QD1), p50 µs from its receipt by node 1's front-end to each stage, and on node 2 "
                         "from the REQ's arrival. A write completes to the host just after node 1's *disk done*; "
                         "the client's p50 minus it is the front-end, the network stack and the client.\n")
                L.append("| target | workload | client p50 | node 1 REQ sent | ring durable | ACK1 | execute | "
                         "disk done | node 2 ring durable | ACK1 sent | writes sampled |")
                L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
                for r in prows:
                    s1 = r["server"].get("1", {}).get("stages", {})
                    s2 = r["server"].get("2", {}).get("stages", {})

                    def st(d, k):
                        v = d.get(k) or {}
                        return fmt(v.get("p50_us")) if v.get("count") else "–"
                    L.append(f"| {r['target']} | {WL[r['workload']]['label']} | {fmt(r['p50_us'])} | "
                             f"{st(s1, 'req_sent')} | {st(s1, 'ring_durable')} | {st(s1, 'ack1')} | "
                             f"{st(s1, 'execute')} | {st(s1, 'executed')} | {st(s2, 'ring_durable')} | "
                             f"{st(s2, 'ack1')} | {fmt((s1.get('executed') or {}).get('count'))} |")
                L.append("")
        L.append("## Node state at the end of each configuration\n")
        L.append("From `deltamirror status --json` after the last workload. Server-side write latency is the "
                 "node's own histogram over all workloads of that configuration (volume submit to completion, "
                 "no network), to set against the client-side numbers above.\n")
        L.append("| configuration | node | role | degraded | head seq | delta entries | dirty extents (MiB) | "
                 "server write p50 / p99 µs | server read p50 / p99 µs |")
        L.append("|---|---|---|---|---:|---:|---:|---|---|")
        for k, info in dm.items():
            for n, st in (info.get("status_end") or {}).items():
                if not st:
                    continue
                io = st.get("io", {})
                wl_, rl_ = io.get("write_latency", {}), io.get("read_latency", {})
                L.append(f"| {info['label']} | {n} | {st.get('role')} | {st.get('degraded')} | "
                         f"{fmt(st.get('head_seq'))} | {fmt(st.get('delta_entries'))} | "
                         f"{fmt(st.get('dirty_extents'))} ({fmt((st.get('dirty_bytes') or 0) / 1048576)}) | "
                         f"{fmt(wl_.get('p50_us'))} / {fmt(wl_.get('p99_us'))} | "
                         f"{fmt(rl_.get('p50_us'))} / {fmt(rl_.get('p99_us'))} |")
        L.append("")
        if any(r["group"] == "dm-one" for r in run.results) and not dm_has_standalone():
            L.append("The 1-node configuration is degraded mode: its 64 MiB ring overflows during the first "
                     "workload, after which writes are recorded in the dirty map instead (see the dirty extents).\n")
        L.append("## Idle CPU of an idle pair\n")
        L.append("CPU seconds (user + system, from /proc/PID/stat) used by both `serve` processes over an idle "
                 "window right after start-up, before any I/O.\n")
        L.append("| configuration | window s | node 1 CPU s | node 2 CPU s | total CPU s | share of one core |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for k, info in dm.items():
            ic = info.get("idle_cpu")
            if ic:
                per = ic["per_node"]
                L.append(f"| {info['label']} ({info['poll_mode']}) | {ic['seconds']} | "
                         f"{fmt(per.get('node1'), 2)} | {fmt(per.get('node2'), 2)} | {fmt(ic['total_cpu_s'], 2)} | "
                         f"{fmt(100 * ic['total_cpu_s'] / ic['seconds'], 1)}% |")
        L.append("")

    disk_rows = [r for r in run.results if r.get("ok") and "write" in WL.get(r["workload"], {}).get("rw", "")
                 and (r["target"].startswith("local disk") or r["target"].startswith("deltamirror"))
                 and "no disk" not in r["target"]
                 and (r.get("placement") or {}).get("disk") and r.get("mibs")]
    if disk_rows:
        L.append("## Disk traffic per host write\n")
        L.append("What the disk under the scratch directory did while each write row ran: bytes written and "
                 "flush requests completed, from the kernel's block statistics "
                 f"(`{run.extra.get('disk_stat') or 'the block stat file'}`, fields 7 and 16) between the two "
                 "samples taken during the run, against the client's own MiB/s and IOPS. A mirrored write is "
                 "written four times on this one disk (each node's ring and volume): 4 bytes per host byte is its "
                 "floor, 1 for an unmirrored node. Every durable ring batch costs a flush (the disk has a volatile "
                 "cache and no FUA), so *host writes per flush* is the mirrored rows' group commit as the disk "
                 "saw it, both nodes' flushes counted (at QD1 one flush per node per write: 0.5). A ring "
                 "record of a 4 KiB write is its group block and its payload, so a QD1 mirrored write costs 6 "
                 "bytes per host byte. fio's rows with a flush per N writes show more flushes than the syncs "
                 "fio issues (its io_uring fdatasync on this file system); they are the disk's figures, not "
                 "the row's name.\n")
        L.append("| target | workload | host MiB/s | disk written MiB/s | disk bytes per host byte | "
                 "flushes per s | host writes per flush |")
        L.append("|---|---|---:|---:|---:|---:|---:|")
        for r in disk_rows:
            d = r["placement"]["disk"]
            fl = d["flushes_per_s"]
            L.append(f"| {r['target']} | {WL[r['workload']]['label']} | {fmt(r['mibs'], 1)} | "
                     f"{fmt(d['write_mibs'], 1)} | {fmt(d['write_mibs'] / r['mibs'], 2)} | {fmt(fl)} | "
                     f"{fmt(r['iops'] / fl if fl else None, 1)} |")
        L.append("")

    L.append("## Where threads ran (4 KiB randwrite QD32)\n")
    L.append("CPU per thread (100% = one core; threads of the same name in one process summed, ×N) and the "
             "cores they were seen on at the two samples taken during the run (from /proc/PID/task/TID/stat, "
             "the same psr that `ps -eLo pid,tid,psr,comm` shows). node1/node2 are the serve processes; "
             "dm-reactor-N is node N's pinned reactor; iou-wrk are io_uring kernel workers. Under 3% left "
             "out.\n")
    L.append("| target | process: thread core(s) CPU% | others % |")
    L.append("|---|---|---:|")
    for r in run.results:
        if r["workload"] != "randw4k_qd32" or not r.get("placement"):
            continue
        pl = r["placement"]
        groups = {}
        for t in pl["threads"]:
            g = groups.setdefault((t["proc"], t["comm"]), dict(n=0, pct=0.0, cores=set()))
            g["n"] += 1
            g["pct"] += t["pct"]
            g["cores"].update([t["cpu_before"], t["cpu"]])
        parts = []
        for (proc, comm), g in sorted(groups.items(), key=lambda kv: -kv[1]["pct"]):
            if g["pct"] < 3:
                continue
            many = f" ×{g['n']}" if g["n"] > 1 else ""
            cores = "c" + ",".join(str(c) for c in sorted(g["cores"]))
            parts.append(f"{proc}: {comm}{many} {cores} {g['pct']:.0f}%")
        L.append(f"| {r['target']} | {'; '.join(parts)} | {fmt(pl.get('other_pct'))} |")
    L.append("")

    ps_run = next((r for r in run.results if r["target"] == "deltamirror mirrored, NBD"
                   and r["workload"] == "randw4k_qd32" and (r.get("placement") or {}).get("ps")), None)
    if ps_run:
        L.append("`ps -Lo pid,tid,psr,pcpu,comm` of both serve processes and fio, in the middle of the mirrored "
                 "NBD 4 KiB randwrite QD32 run (pcpu is ps's lifetime average):\n")
        L.append("```")
        L.append(ps_run["placement"]["ps"].rstrip())
        L.append("```\n")

    L.append("## How each target was run\n")
    L.append("- local disk: `fio --ioengine=io_uring --direct=1` on a file under /var/tmp (ext4 on the VM disk), "
             "placed by the scheduler; the QD32 rows again with `--cpus_allowed=" + str(REACTOR_CORE) + "`, the core "
             "node 1's reactor is pinned to (the aims compare with the unpinned rows; the pinned ones are context).")
    L.append("- link round trip: `target/release/bench` (blocking and busy-polled sockets).")
    L.append("- nbdkit: `nbdkit file file=IMG` (default cache: page cache); qemu-nbd: `qemu-nbd -f raw "
             "--persistent --shared=8 IMG` (default writeback cache); tgtd: `tgtd -f --iscsi portal=...` with a "
             "file-backed LUN 1 (buffered). All three on a fallocated 1 GiB file under /var/tmp, driven by "
             "`fio --ioengine=nbd` and fio built with libiscsi (`target/fio-libiscsi/fio`).")
    L.append("- no-disk targets (the protocol floors of the aims table): `nbdkit memory size=…` (NBD, fio nbd), "
             "tgtd with its LUN on a sparse file in /dev/shm (iSCSI, fio libiscsi), `dm-nvme serve-mem` "
             "(NVMe/TCP, dm-nvme io), and `serve --standalone` with `volume.path` in /dev/shm (all three); "
             "4 KiB randwrite QD1 and QD32 and randread QD32 only.")
    L.append("- deltamirror: `deltamirror example-config --node N` configs (1 GiB file volume, 64 MiB ring, "
             "`ack1 = \"persisted\"`, node 1 reactor on core 0, node 2 on core 1), `format`, `serve`. "
             + ("\"unmirrored (standalone)\" is node 1 alone with `serve --standalone` (no peer, no ring). "
                if dm_has_standalone() else
                "\"1 node\" is node 1 alone, made to serve by `deltamirror promote` (degraded mode: every write "
                "still goes to the ring and the disk, with the backup recorded stale). ")
             + "\"mirrored\" is both "
             "nodes with `poll_mode = \"adaptive\"`; \"busy-poll\" with `poll_mode = \"busy\"`. NBD and iSCSI "
             "through fio (`--ioengine=nbd`, `--ioengine=libiscsi`), NVMe/TCP through "
             "`target/release/dm-nvme io --json` (one I/O queue). Between workloads the harness waits until "
             "the backup has executed everything (ACK2 = head).")
    L.append("- replay and remirror: `target/release/bench --replay --json target/bench/replay.json` (in-process "
             "pair, no front-end; see the section above). ACK coalescing rows: the engine bench's normal run.")
    L.append("- Raw results, commands and per-thread samples: `target/bench/results.json`.")
    L.append("")
    with open(path_md, "w") as f:
        f.write("\n".join(L))


def write_chart(run, path_png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no matplotlib: chart skipped")
        return False
    targets = []
    for r in run.results:
        if r["target"] not in targets:
            targets.append(r["target"])
    R = {(r["target"], r["workload"]): r for r in run.results if r.get("ok")}
    colors = {"floor": "#555555", "mem-floor": "#999999", "nvme-mem": "#bbbbbb", "peer": "#8da0cb", "dm-one": "#a6d854", "dm-mirrored": "#fc8d62",
              "dm-busy": "#e78ac3"}
    group_of = {r["target"]: r["group"] for r in run.results}
    ran = {(r["target"], r["workload"]) for r in run.results}
    panels = [("randw4k_qd1", "iops", "4 KiB randwrite QD1: IOPS"),
              ("randw4k_qd1", "p50_us", "4 KiB randwrite QD1: p50 latency (µs)"),
              ("randw4k_qd32", "iops", "4 KiB randwrite QD32: IOPS"),
              ("randr4k_qd32", "iops", "4 KiB randread QD32: IOPS"),
              ("seqw128k", "mibs", "128 KiB seq write QD8: MiB/s"),
              ("randw4k_qd32", "p99_us", "4 KiB randwrite QD32: p99 latency (µs)")]
    fig, axes = plt.subplots(3, 2, figsize=(14, 2 + 0.28 * len(targets) * 3), constrained_layout=True)
    ys = list(range(len(targets)))[::-1]
    for ax, (wl, field, title) in zip(axes.flat, panels):
        vals = [R[(t, wl)][field] if (t, wl) in R else 0 for t in targets]
        ax.barh(ys, vals, color=[colors.get(group_of[t], "#999") for t in targets])
        ax.set_yticks(ys)
        ax.set_yticklabels(targets, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        vmax = max(vals) if vals and max(vals) > 0 else 1
        for y, v, t in zip(ys, vals, targets):
            text = f"{v:,.0f}" if (t, wl) in R else "failed" if (t, wl) in ran else "not run"
            ax.text(v + vmax * 0.01, y, text, va="center", fontsize=7)
        ax.set_xlim(0, vmax * 1.18)
    fig.suptitle(f"deltamirror benchmarks, {run.extra.get('started')} (loopback, {os.cpu_count()} cores; "
                 f"loadavg before {run.extra.get('check_before', {}).get('loadavg', ['?'])[0]})", fontsize=11)
    fig.savefig(path_png, dpi=90)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- soak

# Issue 10: "RSS at QD128 <= 256 MiB per node (mapped ring pages aside) and
# flat over a 10-minute write soak". The rule the soak applies:
SOAK_QD = 128
SOAK_AIM_MIB = 256.0          # anonymous RSS of each node, at every sample
SOAK_FLAT_GROWTH_MIB = 8.0    # from the warm-up sample to the last one
SOAK_FLAT_SLOPE_MIB_MIN = 1.0  # least squares over the samples after the warm-up
SOAK_WARMUP_S = 60            # or a quarter of a shorter run
SOAK_SLOPE_MIN_WINDOW_S = 120  # the slope is judged over at least this long
SOAK_HEADER = "## Soak: resident memory over a mirrored write soak"
SOAK_RULE = (f"pass if, on each node, anonymous RSS (`RssAnon` of /proc/PID/status: file-backed pages such "
             f"as the mapped ring are not in it) is ≤ {SOAK_AIM_MIB:.0f} MiB at every sample, and flat: "
             f"from the first sample after the warm-up (the first {SOAK_WARMUP_S} s, or the first quarter of a "
             f"shorter run) to the last, it grows by ≤ {SOAK_FLAT_GROWTH_MIB:.0f} MiB and its least-squares "
             f"slope is ≤ {SOAK_FLAT_SLOPE_MIB_MIN:.0f} MiB/min (the slope is judged when those samples span "
             f"at least {SOAK_SLOPE_MIN_WINDOW_S} s: over a shorter window a few hundred KiB make it); fio and both nodes run to the end without an "
             f"error; and after the load stops and the pair is in sync, the two nodes' volume files have the "
             f"same sha256")


def proc_mem(pid, ring_path):
    """Resident memory of process `pid` in bytes: VmRSS, RssAnon, RssFile and
    RssShmem from /proc/PID/status, ring_map, the resident pages of its
    mappings of `ring_path` (/proc/PID/smaps), and anon_maps, the anonymous
    mappings with 64 KiB or more resident ({start address: [size KiB, Rss
    KiB, name]}: where a growth happened). None once it has exited."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0]) * 1024
        ring = 0
        anon = {}
        cur = None
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    parts = line.rstrip("\n").split(None, 5)
                    name = parts[5].strip() if len(parts) == 6 else ""
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    cur = (parts[0].split("-")[0], (hi - lo) // 1024, name)
                elif cur and line.startswith("Rss:"):
                    kib = int(line.split()[1])
                    if cur[2] == ring_path:
                        ring += kib * 1024
                    elif (cur[2] == "" or cur[2].startswith("[heap]") or cur[2].startswith("[anon")) and kib >= 64:
                        anon[cur[0]] = [cur[1], kib, cur[2] or "anon"]
        out["ring_map"] = ring
        out["anon_maps"] = anon
    except (OSError, ValueError, IndexError):
        return None
    return out


def cpu_busy_ticks():
    """User + nice + system ticks of the whole machine (/proc/stat), interrupt
    time left out (the loopback traffic's softirqs are not any process's)."""
    with open("/proc/stat") as f:
        v = f.readline().split()
    return int(v[1]) + int(v[2]) + int(v[3])


def lsq_slope(points):
    """Least-squares slope of [(x, y)], None with fewer than two distinct x."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def sha256_file(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def toml_value(path, section, key):
    """The string value of `key` in `[section]` of a TOML file (unquoted)."""
    cur = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                cur = line.strip("[]")
            elif cur == section and re.match(rf"^{re.escape(key)}\s*=", line):
                return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError(f"{path}: no {key} in [{section}]")


def wait_pair_in_sync(dm, secs=120):
    """Both nodes up, node 1 primary with the backup connected and not
    degraded, every entry acknowledged (ACK2) and executed on both: what the
    pair tests wait for before they compare images. Both statuses are re-read
    together until they agree (each is up to 100 ms old)."""
    deadline = time.time() + secs
    last = None
    while time.time() < deadline:
        sp, sb = dm.status(1), dm.status(2)
        if sp and sb:
            head = sp.get("head_seq")
            if (sp.get("role") == "primary" and sp.get("peer_state") == "connected" and sp.get("degraded") is False
                    and sp.get("ack2_seq") == head and sp.get("executed_seq") == head
                    and sb.get("executed_seq") == head and sb.get("head_seq") == head):
                return sp, sb
        last = (sp, sb)
        time.sleep(0.2)
    raise RuntimeError(f"the pair was not in sync within {secs} s; last statuses: {last}")


def soak_analyse(data):
    """Per-node figures and the verdict, from data['samples'] (in place)."""
    secs = data["seconds"]
    warm = min(SOAK_WARMUP_S, secs / 4.0)
    data["warmup_s"] = warm
    samples = [s for s in data["samples"] if s["t"] > 0]
    nodes = {}
    for n in ("node1", "node2"):
        pts = [(s["t"], s[n]["RssAnon"] / 1048576.0) for s in samples if s.get(n)]
        rss = [s[n]["status_rss"] / 1048576.0 for s in samples if s.get(n) and s[n].get("status_rss")]
        ring = [s[n]["ring_map"] / 1048576.0 for s in samples if s.get(n)]
        after = [(t, v) for t, v in pts if t >= warm]
        info = dict(samples=len(pts))
        if after:
            info.update(max_anon_mib=max(v for _, v in pts), max_rss_mib=max(rss) if rss else None,
                        max_ring_map_mib=max(ring) if ring else None,
                        warm_t=after[0][0], anon_at_warm_mib=after[0][1], anon_end_mib=after[-1][1],
                        growth_mib=after[-1][1] - after[0][1])
            sl = lsq_slope([(t / 60.0, v) for t, v in after])
            info["slope_mib_per_min"] = sl
            info["slope_judged"] = sl is not None and after[-1][0] - after[0][0] >= SOAK_SLOPE_MIN_WINDOW_S
            info["under_aim"] = info["max_anon_mib"] <= SOAK_AIM_MIB
            info["flat"] = (info["growth_mib"] <= SOAK_FLAT_GROWTH_MIB
                            and (not info["slope_judged"] or sl <= SOAK_FLAT_SLOPE_MIB_MIN))
            # Which anonymous mappings grew from the warm-up sample to the last.
            first = next(s[n] for s in samples if s.get(n) and s["t"] == after[0][0])
            last = next(s[n] for s in reversed(samples) if s.get(n))
            fm, lm = first.get("anon_maps") or {}, last.get("anon_maps") or {}
            grew = []
            for k in set(fm) | set(lm):
                a, b = (fm.get(k) or [0, 0, ""]), (lm.get(k) or [0, 0, ""])
                if abs(b[1] - a[1]) >= 1024:
                    grew.append(dict(start=k, size_mib=max(a[0], b[0]) / 1024.0, name=b[2] or a[2],
                                     from_mib=a[1] / 1024.0, to_mib=b[1] / 1024.0))
            grew.sort(key=lambda g: -(g["to_mib"] - g["from_mib"]))
            info["mappings_grown"] = grew
        nodes[n] = info
    data["nodes"] = nodes
    reasons = []
    for n, info in nodes.items():
        if "under_aim" not in info:
            reasons.append(f"{n}: no samples after the warm-up")
            continue
        if not info["under_aim"]:
            reasons.append(f"{n}: anonymous RSS reached {info['max_anon_mib']:.1f} MiB > {SOAK_AIM_MIB:.0f} MiB")
        if not info["flat"]:
            reasons.append(f"{n}: not flat (grew {info['growth_mib']:.1f} MiB from {info['warm_t']:.0f} s to the "
                           f"end, slope {fmt(info['slope_mib_per_min'], 2)} MiB/min)")
    if data.get("images_identical") is not True:
        reasons.append("the two volume images differ" if data.get("images_identical") is False
                       else "the images were not compared")
    reasons += data.get("errors", [])
    data["failures"] = reasons
    data["passed"] = not reasons
    return data


def soak_iops_per_minute(log_path, secs):
    """Per-minute mean of fio's 1 s IOPS log ([(minute, IOPS)]), the
    seconds past `secs` left out."""
    buckets = {}
    try:
        with open(log_path) as f:
            for line in f:
                parts = [p.strip() for p in line.split(",")]
                if len(parts) < 2:
                    continue
                t_ms, v = int(parts[0]), float(parts[1])
                if t_ms > secs * 1000:
                    continue
                buckets.setdefault(max(0, (t_ms - 1) // 60000), []).append(v)
    except (OSError, ValueError):
        return []
    return [(m, sum(v) / len(v)) for m, v in sorted(buckets.items())]


def soak(args):
    """Runs the soak: a mirrored adaptive pair, fio 4 KiB randwrite QD128 over
    NBD for args.seconds, both nodes' memory sampled every
    args.sample_seconds. Returns the result dict (also in soak.json)."""
    os.makedirs(OUT_DIR, exist_ok=True)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    data = dict(started=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                git_rev=git_rev(), machine=machine_desc(), seconds=args.seconds, sample_s=args.sample_seconds,
                region_mib=args.region_mib, qd=SOAK_QD, rule=SOAK_RULE, samples=[], errors=[],
                check_before=machine_check("before"))
    deadline = time.time() + args.wait_quiet
    while data["check_before"].get("warning") and time.time() < deadline:
        log(f"waiting for the machine to go quiet (--wait-quiet, {deadline - time.time():.0f} s left)")
        time.sleep(10)
        data["check_before"] = machine_check("before")
    dm = DmNodes("soak", work, OFF_SOAK, [1, 2], "adaptive")
    fio = None
    prefix = os.path.join(OUT_DIR, "soak-fio")
    for f in glob.glob(prefix + "*"):
        os.remove(f)
    try:
        dm.start()
        rings = {f"node{n}": toml_value(os.path.join(dm.dir, f"node{n}.toml"), "node", "data_dir") + "/ring"
                 for n in dm.nodes}
        vols = {f"node{n}": toml_value(os.path.join(dm.dir, f"node{n}.toml"), "volume", "path") for n in dm.nodes}
        ep = dm_endpoint(dm, "nbd")
        log(f"soak: mirrored adaptive pair, NBD {ep}; prefill: 128 KiB sequential writes over "
            f"{args.region_mib} MiB for 5 s (as the bench's QD128 row)")
        dm.prefill("nbd", ep, argparse.Namespace(**dict(vars(args), seconds=5)), "soak-prefill")
        pids = dm.pids()
        if len(pids) != 2:
            raise RuntimeError("a node exited during the prefill")
        cmd = [FIO, "--name=soak", "--thread", "--ioengine=nbd", f"--uri={ep}", "--rw=randwrite", "--bs=4096",
               f"--iodepth={SOAK_QD}", f"--size={args.region_mib}m", "--time_based=1",
               f"--runtime={args.seconds + 3}", "--randrepeat=0", "--norandommap=1",
               f"--write_iops_log={prefix}", "--log_avg_msec=1000", "--output-format=json",
               f"--output={prefix}.json"]
        data["fio_cmd"] = " ".join(cmd)
        log(f"soak: {args.seconds} s of fio 4 KiB randwrite QD{SOAK_QD}; memory of both nodes every "
            f"{args.sample_seconds} s")
        print(f"  {'t s':>5} | {'node1 rss':>9} {'anon':>7} {'ring':>7} | {'node2 rss':>9} {'anon':>7} {'ring':>7} "
              f"| {'writes/s':>9}   (MiB; rss = status rss_bytes, anon = RssAnon, ring = mapped ring pages)",
              flush=True)

        def sample(t, prev):
            s = dict(t=t)
            for name, pid in pids.items():
                m = proc_mem(pid, rings[name])
                st = dm.status(int(name[-1]))
                if m is not None:
                    m["status_rss"] = (st or {}).get("rss_bytes")
                    if name == "node1":
                        s["head_seq"] = (st or {}).get("head_seq")
                s[name] = m
            if prev and s.get("head_seq") is not None and prev.get("head_seq") is not None:
                s["writes_per_s"] = (s["head_seq"] - prev["head_seq"]) / max(1e-9, t - prev["t"])
            data["samples"].append(s)
            mib = lambda v: f"{v / 1048576:7.1f}" if v is not None else "      –"
            cols = []
            for name in ("node1", "node2"):
                m = s.get(name) or {}
                cols.append(f"{mib(m.get('status_rss')):>9} {mib(m.get('RssAnon'))} {mib(m.get('ring_map'))}")
            print(f"  {t:>5.0f} | {cols[0]} | {cols[1]} | {fmt(s.get('writes_per_s')):>9}", flush=True)
            return s

        cpu_a = cpu_busy_ticks(), {p: proc_cpu_ticks(p) for p in pids.values()}
        prev = sample(0, None)
        t0 = time.monotonic()
        fio = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        prev["t"] = 0.0
        k = 1
        while k * args.sample_seconds <= args.seconds:
            due = t0 + k * args.sample_seconds
            while time.monotonic() < due and fio.poll() is None:
                time.sleep(min(0.2, max(0.0, due - time.monotonic())))
            if fio.poll() is not None:
                data["errors"].append(f"fio exited after {time.monotonic() - t0:.0f} s of {args.seconds}")
                break
            if not dm.alive():
                data["errors"].append(f"a node exited after {time.monotonic() - t0:.0f} s")
                break
            prev = sample(time.monotonic() - t0, prev)
            k += 1
        cpu_b = cpu_busy_ticks(), {p: proc_cpu_ticks(p) for p in pids.values()}
        fio_ticks = proc_cpu_ticks(fio.pid) or 0
        dt = time.monotonic() - t0
        try:
            out, _ = fio.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            fio.kill()
            out, _ = fio.communicate()
            data["errors"].append("fio did not finish within 60 s of its runtime")
        # The machine's user + system time less the nodes' and fio's: what
        # other processes (builds, tests) took from the two cores meanwhile.
        nodes_ticks = sum((cpu_b[1][p] or 0) - (cpu_a[1][p] or 0) for p in pids.values())
        data["nodes_cpu_pct"] = round(100.0 * nodes_ticks / CLK_TCK / dt, 1)
        data["fio_cpu_pct"] = round(100.0 * fio_ticks / CLK_TCK / dt, 1)
        data["others_cpu_pct"] = round(max(0.0, 100.0 * (cpu_b[0] - cpu_a[0] - nodes_ticks - fio_ticks)
                                           / CLK_TCK / dt), 1)
        res = parse_fio(f"{prefix}.json", dict(rw="randwrite"), fio.returncode, out or "")
        data["fio"] = {k: v for k, v in res.items() if k != "placement"}
        if not res.get("ok"):
            data["errors"].append(f"fio: {res.get('error')}")
        data["iops_per_minute"] = soak_iops_per_minute(f"{prefix}_iops.1.log", args.seconds)
        if not dm.alive():
            if "a node exited" not in " ".join(data["errors"]):
                data["errors"].append("a node exited during the soak")
        else:
            log("soak: load stopped; waiting for the pair to be in sync, then comparing the volume files")
            sp, sb = wait_pair_in_sync(dm)
            data["status_end"] = {"1": sp, "2": sb}
            dm.stop()
            sums = {n: sha256_file(v) for n, v in vols.items()}
            data["sha256"] = sums
            data["images_identical"] = sums["node1"] == sums["node2"]
            log(f"soak: sha256 node1 {sums['node1'][:16]}…, node2 {sums['node2'][:16]}… "
                + ("identical" if data["images_identical"] else "DIFFER"))
    except Exception as e:  # noqa: BLE001 - reported as a failure of the soak
        data["errors"].append(f"{type(e).__name__}: {e}")
        log(f"soak: FAILED: {e}")
    finally:
        if fio is not None and fio.poll() is None:
            fio.kill()
            fio.wait()
        dm.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    data["check_after"] = machine_check("after")
    soak_analyse(data)
    with open(os.path.join(OUT_DIR, "soak.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    return data


def soak_maps_text(grown):
    return "; ".join(f"{g['name']} mapping of {g['size_mib']:,.1f} MiB at 0x{g['start']}: {g['from_mib']:,.1f} → "
                     f"{g['to_mib']:,.1f} MiB" for g in grown[:6])


def soak_section(data):
    """The Soak section of BENCHMARKS.md, as lines."""
    L = [SOAK_HEADER + "\n"]
    L.append(f"Written by `scripts/soak.sh --seconds {data['seconds']}` (`bench.py --soak`), run on its own: "
             f"{data['started']}, commit {data['git_rev']}, {data['machine']}. A mirrored adaptive pair from "
             f"`example-config` (as scripts/bench.sh starts them), a 5 s 128 KiB sequential fill of the first "
             f"{data['region_mib']} MiB, then `fio --ioengine=nbd` 4 KiB randwrite QD{data['qd']} over those "
             f"{data['region_mib']} MiB for {data['seconds']} s. Every {data['sample_s']} s: each node's "
             "`rss_bytes` (`deltamirror status --json`, mapped ring pages included), its `RssAnon` "
             "(/proc/PID/status) and the resident pages of its ring mapping (/proc/PID/smaps). CPU during the "
             f"load (100% = one core): the two nodes {fmt(data.get('nodes_cpu_pct'))}%, fio "
             f"{fmt(data.get('fio_cpu_pct'))}%, other processes {fmt(data.get('others_cpu_pct'))}% (loadavg before "
             f"{' '.join(data.get('check_before', {}).get('loadavg', []))}). Raw samples: `target/bench/soak.json`.\n")
    if (data.get("others_cpu_pct") or 0) > 20:
        L.append("> **The machine was not quiet** during this soak: other processes took the CPU above, so the "
                 "IOPS are lower and noisier than on a quiet machine. The memory figures do not depend on it.\n")
    L.append(f"Rule: {data['rule']}.\n")
    L.append(f"**Verdict: {'pass' if data['passed'] else 'FAIL'}**"
             + ("" if data["passed"] else ": " + "; ".join(data["failures"])) + "\n")
    L.append("| node | max rss_bytes MiB | max ring mapping MiB | max RssAnon MiB | RssAnon after the warm-up MiB (at) "
             "| at the end MiB | growth MiB | slope MiB/min | ≤ 256 MiB | flat |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    yn = {True: "yes", False: "**no**", None: "–"}
    for n, i in data["nodes"].items():
        L.append(f"| {n} | {fmt(i.get('max_rss_mib'), 1)} | {fmt(i.get('max_ring_map_mib'), 1)} | "
                 f"{fmt(i.get('max_anon_mib'), 1)} | {fmt(i.get('anon_at_warm_mib'), 1)} ({fmt(i.get('warm_t'))} s) | "
                 f"{fmt(i.get('anon_end_mib'), 1)} | {fmt(i.get('growth_mib'), 1)} | "
                 f"{fmt(i.get('slope_mib_per_min'), 2)}{'' if i.get('slope_judged') else ' (not judged)'} | "
                 f"{yn[i.get('under_aim')]} | {yn[i.get('flat')]} |")
    L.append("")
    for n, i in data["nodes"].items():
        if i.get("mappings_grown"):
            L.append(f"{n}: anonymous mappings (/proc/PID/smaps) whose resident set moved by 1 MiB or more from the "
                     f"warm-up sample to the last: {soak_maps_text(i['mappings_grown'])}.\n")
    fio_ = data.get("fio") or {}
    ipm = data.get("iops_per_minute") or []
    L.append(f"fio: {fmt(fio_.get('iops'))} IOPS over the whole run (p50 {fmt(fio_.get('p50_us'))} µs, "
             f"p99 {fmt(fio_.get('p99_us'))} µs); per minute: "
             + (", ".join(f"{m + 1}: {fmt(v)}" for m, v in ipm) or "–") + ". Images after the load: "
             + {True: "identical (sha256)", False: "**differ**", None: "not compared"}[data.get("images_identical")]
             + ".\n")
    rows = data["samples"]
    if data["seconds"] > 180:
        rows = [s for i, s in enumerate(rows) if i == 0 or i == len(rows) - 1 or round(s["t"]) % 60 < data["sample_s"]]
    L.append("Samples (MiB; " + ("one a minute, " if len(rows) < len(data["samples"]) else "")
             + "t = 0 is just before the load; writes/s from node 1's head seq):\n")
    L.append("| t s | node 1 rss_bytes | node 1 RssAnon | node 1 ring | node 2 rss_bytes | node 2 RssAnon "
             "| node 2 ring | writes/s |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    mib = lambda v: fmt(v / 1048576.0, 1) if v is not None else "–"
    for s in rows:
        c = []
        for n in ("node1", "node2"):
            m = s.get(n) or {}
            c += [mib(m.get("status_rss")), mib(m.get("RssAnon")), mib(m.get("ring_map"))]
        L.append(f"| {s['t']:.0f} | " + " | ".join(c) + f" | {fmt(s.get('writes_per_s'))} |")
    L.append("")
    return L


def md_section_span(text, header):
    """(start, end) of the '## ' section whose heading line starts with
    `header` in a markdown text, up to the next '## ' heading; None if absent."""
    m = re.search(rf"(?m)^{re.escape(header)}.*$", text)
    if not m:
        return None
    n = re.search(r"(?m)^## ", text[m.end():])
    return m.start(), (m.end() + n.start()) if n else len(text)


def put_soak_section(path, lines):
    """Writes the Soak section into the report at `path`, replacing an older
    one; a new one goes before the Ratios section. The rest of the file is
    left as it is."""
    body = "\n".join(lines).rstrip("\n") + "\n\n"
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# deltamirror benchmarks\n\n"
    span = md_section_span(text, SOAK_HEADER)
    if span:
        text = text[:span[0]] + body + text[span[1]:]
    else:
        i = text.find("\n## Ratios\n")
        text = text[:i + 1] + body + text[i + 1:] if i >= 0 else text.rstrip("\n") + "\n\n" + body
    with open(path, "w") as f:
        f.write(text)


def soak_main(args):
    data = soak(args)
    print()
    print(f"soak rule: {SOAK_RULE}.")
    for n, i in data["nodes"].items():
        if "under_aim" in i:
            print(f"  {n}: max rss_bytes {fmt(i['max_rss_mib'], 1)} MiB (ring mapping up to "
                  f"{fmt(i['max_ring_map_mib'], 1)}), max RssAnon {i['max_anon_mib']:.1f} MiB; RssAnon at "
                  f"{i['warm_t']:.0f} s {i['anon_at_warm_mib']:.1f} MiB, at the end {i['anon_end_mib']:.1f} MiB "
                  f"(growth {i['growth_mib']:+.1f} MiB), slope {fmt(i['slope_mib_per_min'], 2)} MiB/min"
                  + ("" if i["slope_judged"] else f" (not judged: under {SOAK_SLOPE_MIN_WINDOW_S} s of samples)"))
    for n, i in data["nodes"].items():
        g = i.get("mappings_grown")
        if g:
            print(f"  {n}: mappings whose resident set moved by 1 MiB or more since the warm-up: " + soak_maps_text(g))
    ipm = data.get("iops_per_minute") or []
    print("  IOPS per minute: " + (", ".join(f"{m + 1}: {v:,.0f}" for m, v in ipm) or "–"))
    print(f"  images: {({True: 'identical', False: 'DIFFER', None: 'not compared'})[data.get('images_identical')]}")
    print(f"  CPU during the load (100% = one core): nodes {fmt(data.get('nodes_cpu_pct'))}%, fio "
          f"{fmt(data.get('fio_cpu_pct'))}%, other processes {fmt(data.get('others_cpu_pct'))}%")
    if (data.get("others_cpu_pct") or 0) > 20:
        loud("OTHER PROCESSES SHARED THE CORES during the soak: the IOPS are noisy (the memory figures are not)")
    put_soak_section(args.out, soak_section(data))
    log(f"wrote {OUT_DIR}/soak.json and the Soak section of {args.out}")
    if not data["passed"]:
        print("\nsoak: FAIL:")
        for r in data["failures"]:
            print("  -", r)
        sys.exit(1)
    log("soak: pass")


ONLY_PARTS = ["local", "link", "nbdkit", "qemu-nbd", "tgtd", "nvme-mem", "mem-floors", "dm-one", "twin",
              "dm-mirrored", "dm-busy", "variants", "replay"]


def only_parts(text):
    """--only's comma list, each part checked against ONLY_PARTS."""
    parts = [p for p in text.split(",") if p]
    bad = [p for p in parts if p not in ONLY_PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(bad) or '(none given)'}: "
                                         f"choose from {','.join(ONLY_PARTS)}")
    return parts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=None,
                    help="measured seconds per workload (default 5); with --soak, the soak's length (default 600)")
    ap.add_argument("--region-mib", type=int, default=256, help="MiB of each volume the workloads touch")
    ap.add_argument("--idle-seconds", type=int, default=10, help="idle-CPU window per pair (default 10)")
    ap.add_argument("--wait-quiet", type=int, default=0, metavar="S",
                    help="wait up to S seconds for the machine to be quiet before starting")
    ap.add_argument("--no-busy", action="store_true", help="skip the busy-poll pair")
    ap.add_argument("--only", type=only_parts, default=None,
                    help=f"comma list of: {','.join(ONLY_PARTS)} (mem-floors: nbdkit memory and tgtd on "
                         "tmpfs, the protocol floors; the NVMe/TCP floor is nvme-mem; twin: two unmirrored nodes "
                         "at once, the mirrored QD32 floor)")
    ap.add_argument("--nvme-mem-before", type=lambda s: [float(x) for x in s.split(",")],
                    default=[63000.0, 67000.0], metavar="W,R",
                    help="serve-mem QD32 write,read IOPS before the data-path change, used only where "
                         f"the {BEFORE_COMMIT} build fails (for the aims table)")
    ap.add_argument("--nvme-mem-before-same-client", type=lambda s: [float(x) for x in s.split(",")],
                    default=[97000.0, 130000.0], metavar="W,R",
                    help=f"the {BEFORE_COMMIT} serve-mem's QD32 write,read IOPS with this build's dm-nvme io, "
                         "used only where that build fails")
    ap.add_argument("--replay-n", default=None, metavar="N,N,...",
                    help="replay: outage sizes in 4 KiB writes (bench default 1000,10000,100000)")
    ap.add_argument("--remirror-mib", type=int, default=None,
                    help="replay: MiB written and then remirrored to a new node 2 (bench default 1024)")
    ap.add_argument("--fg-entries", type=int, default=None,
                    help="replay: entries replayed while measuring foreground latency (bench default 100000)")
    ap.add_argument("--workdir", default=None,
                    help="scratch directory on the disk to measure (not tmpfs; default /var/tmp/deltamirror-bench, "
                         "with --soak /var/tmp/deltamirror-soak)")
    ap.add_argument("--out", default=None,
                    help="report path (default BENCHMARKS.md; target/bench/BENCHMARKS.md with --only)")
    ap.add_argument("--chart", default=None,
                    help="chart path (default docs/benchmarks.png; target/bench/benchmarks.png with --only)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory and node logs")
    ap.add_argument("--report-from", default=None, metavar="JSON",
                    help="write the report and chart again from a saved results.json, without measuring")
    ap.add_argument("--soak", action="store_true",
                    help="instead of the tables: the memory soak (scripts/soak.sh): a mirrored pair under fio "
                         f"4 KiB randwrite QD{SOAK_QD} over NBD for --seconds, both nodes' RSS sampled; writes "
                         "target/bench/soak.json and the Soak section of --out (default BENCHMARKS.md for a run "
                         "of 600 s or more, else target/bench/BENCHMARKS.md)")
    ap.add_argument("--sample-seconds", type=int, default=10, help="soak: seconds between samples (default 10)")
    args = ap.parse_args()
    if args.seconds is None:
        args.seconds = 600 if args.soak else 5
    if args.workdir is None:
        args.workdir = "/var/tmp/deltamirror-soak" if args.soak else "/var/tmp/deltamirror-bench"
    if args.seconds < 1 or args.sample_seconds < 1:
        sys.exit("bench: --seconds and --sample-seconds must be at least 1")
    if args.soak:
        if args.only or args.report_from:
            sys.exit("bench: --soak runs on its own: drop --only / --report-from")
        if args.seconds < 2 * args.sample_seconds:
            sys.exit(f"bench: --seconds {args.seconds} is too short for a soak: give at least two samples "
                     f"(2 × --sample-seconds {args.sample_seconds})")
        for b in (DM,):
            if not os.access(b, os.X_OK):
                sys.exit(f"bench: {b} missing: run scripts/soak.sh (it builds the release binaries)")
        if args.out is None:
            args.out = (os.path.join(ROOT, "BENCHMARKS.md") if args.seconds >= 600
                        else os.path.join(OUT_DIR, "BENCHMARKS.md"))
        soak_main(args)
        return
    if args.report_from:
        with open(args.report_from) as f:
            saved = json.load(f)
        run = Run(argparse.Namespace(**saved["args"]))
        run.results, run.extra, run.failures = saved["results"], saved["extra"], saved["failures"]
        out = args.out or saved["args"]["out"]
        chart = args.chart or saved["args"]["chart"]
        write_chart(run, chart)
        write_report(run, out, chart)
        log(f"wrote {out} and {chart} from {args.report_from}")
        return
    partial = bool(args.only) or args.no_busy
    if args.out is None:
        args.out = os.path.join(OUT_DIR, "BENCHMARKS.md") if partial else os.path.join(ROOT, "BENCHMARKS.md")
    if args.chart is None:
        args.chart = (os.path.join(OUT_DIR, "benchmarks.png") if partial
                      else os.path.join(ROOT, "docs", "benchmarks.png"))
    need = set()
    for t in (args.only or ["all"]):
        if t in ("all", "dm-one", "dm-mirrored", "dm-busy", "nvme-mem", "mem-floors"):
            need.update([DM, DM_NVME])
        if t in ("all", "link", "replay"):
            need.add(ENGINE_BENCH)
    for b in sorted(need):
        if not os.access(b, os.X_OK):
            sys.exit(f"bench: {b} missing: run scripts/bench.sh (it builds the release binaries)")
    global DISK_STAT
    os.makedirs(args.workdir, exist_ok=True)
    DISK_STAT = disk_stat_path(args.workdir)
    run = Run(args)
    run.extra["disk_stat"] = DISK_STAT
    run.extra["git_rev"] = git_rev()  # the tree the binaries were built from
    interrupted = False
    try:
        run.go()
    except KeyboardInterrupt:
        interrupted = True
        run.failures.append("interrupted")
    results = os.path.join(OUT_DIR, "results-partial.json" if partial else "results.json")
    with open(results, "w") as f:
        json.dump(dict(args=vars(args), results=run.results, extra=run.extra, failures=run.failures), f,
                  indent=1, default=str)
    write_chart(run, args.chart)
    write_report(run, args.out, args.chart)
    log(f"wrote {args.out}, {args.chart}, {results}")
    print()
    for r in compute_aims(run):
        print(f"  {r['name']:<80} {fmt(r['value'], 2):>6}  {r['aim'][:44]:<44} {aim_verdict(r, md=False)}")
    print()
    for r in compute_ratios(run):
        print(f"  {r['name']:<70} {fmt(r['value'], 2):>6}   {r['note']}")
    if run.failures or interrupted:
        print(f"\nbench: {len(run.failures)} FAILURE(S):")
        for f in run.failures:
            print("  -", f)
        sys.exit(1)
    log("all workloads completed")


if __name__ == "__main__":
    main()
