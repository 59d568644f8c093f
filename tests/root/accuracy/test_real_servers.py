"""memtrace on real forked daemons from the distribution: nginx (a master and
2 workers) and PostgreSQL 15 (a postmaster, its helpers and pgbench
backends), started by scripts/servers.sh (loopback only), under bounded load
(pgbench -c 4 -T, wrk -d).

Compared with the kernel, on processes stopped with SIGSTOP (every thread in
state T while both sides are read; SIGCONT after):

* `memtrace watch` of every server process: per-mapping rss_bytes (and the
  mapping list, perms, offsets, paths, process totals) exactly as smaps and
  statm say (tests/groundtruth.py: compare_snapshot); per-mapping and
  per-process live pss_bytes/uss_bytes (PSS sampled by watch while it runs:
  a snapshot whose pss_refreshed_ts is after the stop) as smaps and
  smaps_rollup say (test_live_pss.py's figures, kB rounding only; each
  mapping judged on its own across attempts: PssTally).
* `memtrace libs`: every mapping's RSS/PSS/USS/swap and the process totals
  as smaps and smaps_rollup say (test_pss.py's comparison, memtrace's walk
  run in this process, so that its own mappings of libc do not change the
  map counts it reads), every library of every process listed with it; the
  `memtrace libs PIDS --format json` command's RSS per process as
  smaps_rollup's (RSS does not depend on who else maps a page).

Widely shared pages (libc) change their map count whenever any process on
the machine starts or exits, so PSS comparisons read smaps before and after
memtrace's reading and retry (as test_pss.py and test_live_pss.py do).

The servers are put in the state memtrace's own use leaves them (fixture
`daemons`): `memtrace heap` has read the masters' malloc state, which maps
the shared zero page in their libc bss, and every process forked after
that (pgbench backends, the workers of a reload) inherits those PTEs; smaps
and statm do not count them (test_the_daemons_map_the_zero_page checks
that they are there).

And the agent: `memtrace agent --comm '^(nginx|postgres)$'` (the README's
example) must attach to the backends that pgbench's connections make (the
postmaster forks them without exec) and to the workers a `nginx -s reload`
makes, within AGENT_FOLLOW_TIMEOUT seconds.

The servers are started if they are not running (and then stopped at the
end of the session); .ci/run starts them before the host suite so that every
test there meets real forked daemons on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import groundtruth as gt
from tests.root.harness import (
    ATTACH_TIMEOUT,
    REPO_ROOT,
    TIMEOUT_SCALE,
    Memtrace,
    compare_totals_with_smaps,
    statm_exact,
    wait_stopped,
)

from .test_live_pss import _fresh_snapshot, _got, _want
from .test_pss import (
    _compare_once,
    _library_inodes,
    _libs,
    _process_key,
    _rollup,
    _rollup_key,
)

SERVERS = REPO_ROOT / "scripts" / "servers.sh"
LOAD_SECONDS = 60           # upper bound of each load run (pgbench -T, wrk -d); ended sooner
PGBENCH_CLIENTS = 4
INTERVAL = 0.2
PSS_INTERVAL = 0.5
SETTLE_INTERVALS = 3
ATTEMPTS = 15               # PSS comparisons: tries for a clean read (see the docstring)
AGENT_FOLLOW_TIMEOUT = 15.0 * TIMEOUT_SCALE
SPAWN_TIMEOUT = 30.0 * TIMEOUT_SCALE   # for backends / reloaded workers to appear


# ---------------------------------------------------------------------------
# the servers

_TRANSIENT = ("autovacuum worker", "parallel worker")


@dataclass
class Servers:
    env: dict[str, str]

    @property
    def nginx_master(self) -> int:
        return int(self.env["NGINX_PID"])

    @property
    def postmaster(self) -> int:
        return int(self.env["PG_PID"])

    def nginx_pids(self) -> list[int]:
        return [self.nginx_master] + _children(self.nginx_master, "nginx")

    def postgres_pids(self) -> list[int]:
        return [self.postmaster] + _children(self.postmaster, "postgres")

    def all_pids(self) -> list[int]:
        """Every nginx and postgres process but the short-lived ones
        (autovacuum and parallel workers, which may exit at any time)."""
        return [p for p in self.nginx_pids() + self.postgres_pids()
                if not any(w in _cmdline(p) for w in _TRANSIENT)]

    def backends(self) -> list[int]:
        """The postmaster's children that serve pgbench's connections."""
        return [p for p in _children(self.postmaster, "postgres")
                if _cmdline(p).startswith(f"postgres: postgres {self.env['PG_DATABASE']} ")]

    def pgbench(self, log: Path, seconds: int = LOAD_SECONDS) -> subprocess.Popen[bytes]:
        cmd = [f"{self.env['PG_BINDIR']}/pgbench", "-n", "-c", str(PGBENCH_CLIENTS), "-j", "2",
               "-T", str(seconds), "-h", self.env["PG_SOCKDIR"], "-p", self.env["PG_PORT"],
               "-U", self.env["PG_USER"], self.env["PG_DATABASE"]]
        with open(log, "wb") as f:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f)

    def wrk(self, log: Path, seconds: int = LOAD_SECONDS) -> subprocess.Popen[bytes]:
        cmd = ["wrk", "-t", "2", "-c", "8", "-d", f"{seconds}s", "--timeout", "2s",
               f"http://127.0.0.1:{self.env['NGINX_PORT']}/big.html"]
        with open(log, "wb") as f:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f)

    def nginx_reload(self) -> None:
        subprocess.run([self.env["NGINX_BIN"], "-p", self.env["NGINX_PREFIX"], "-c",
                        self.env["NGINX_CONF"], "-s", "reload"], check=True, timeout=30)


def _servers_script(cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SERVERS), cmd], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def _parse_status(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _children(pid: int, comm: str) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(c) for c in f.read().split()]
    return sorted(c for c in set(out) if _comm(c) == comm)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    """nginx and PostgreSQL from scripts/servers.sh: started here unless
    already running (.ci/run starts them), and then stopped at the end."""
    st = _servers_script("status")
    started = False
    if st.returncode != 0:
        r = _servers_script("start")
        if r.returncode != 0:
            pytest.fail(f"scripts/servers.sh start failed (exit {r.returncode}):\n"
                        f"{r.stdout}{r.stderr}")
        started = True
        st = _servers_script("status")
    if st.returncode != 0:
        pytest.fail(f"servers not running after scripts/servers.sh start:\n{st.stdout}"
                    f"{st.stderr}")
    try:
        yield Servers(_parse_status(st.stdout))
    finally:
        if started:
            r = _servers_script("stop")
            assert r.returncode == 0, r.stderr


KPF_ZERO_PAGE = 24


def zero_page_ptes(pid: int) -> dict[str, int]:
    """PTEs of PID that map the shared zero page (/proc/kpageflags bit
    KPF_ZERO_PAGE), per mapping ("start-end path"): present in the page
    tables, resident in no counter of the kernel (smaps, statm)."""
    out = {}
    with open(f"/proc/{pid}/maps", "rb") as maps, open(f"/proc/{pid}/pagemap", "rb") as pm, \
            open("/proc/kpageflags", "rb") as kf:
        for line in maps:
            fields = line.split(None, 5)
            lo, hi = (int(x, 16) for x in fields[0].split(b"-"))
            if lo >= 1 << 47:                  # [vsyscall]
                continue
            pm.seek(lo // gt.PAGE_SIZE * 8)
            data = pm.read((hi - lo) // gt.PAGE_SIZE * 8)
            n = 0
            for (entry,) in struct.iter_unpack("<Q", data):
                pfn = entry & ((1 << 55) - 1)
                if entry >> 63 and pfn:
                    kf.seek(pfn * 8)
                    (flags,) = struct.unpack("<Q", kf.read(8))
                    n += flags >> KPF_ZERO_PAGE & 1
            if n:
                path = fields[5].strip().decode(errors="replace") if len(fields) > 5 else ""
                out[f"{fields[0].decode()} {path}".strip()] = n
    return out


def _zero_note(pid: int) -> str:
    """Where PID maps the zero page (for failure reports)."""
    try:
        z = zero_page_ptes(pid)
    except OSError:
        return ""
    return "\n  zero-page PTEs: " + (", ".join(
        f"{n} ({n * gt.PAGE_SIZE // 1024} KiB) in {m}" for m, n in z.items()) or "none")


@pytest.fixture(scope="module")
def daemons(servers) -> Servers:
    """The servers as memtrace's users leave them: `memtrace heap` (which
    `watch` and `agent` run every --heap-interval) has read the nginx master's
    and the postmaster's malloc state in libc's bss with process_vm_readv,
    which maps the shared zero page at the pages it reads that were never
    written (7 or 8 of libc's 13 bss pages here); every process they fork
    after that (pgbench backends; the workers of the `nginx -s reload` done
    here) inherits those PTEs. Any reader of process memory (a debugger,
    /proc/PID/mem, a profiler) does the same."""
    for pid in (servers.nginx_master, servers.postmaster):
        r = subprocess.run([sys.executable, "-m", "memtrace", "heap", str(pid), "--format",
                            "json"], capture_output=True, timeout=120, cwd=str(REPO_ROOT))
        assert r.returncode == 0, f"memtrace heap {pid}: exit {r.returncode}\n" + \
            r.stderr.decode(errors="replace")
    old = set(servers.nginx_pids())
    servers.nginx_reload()
    _wait_for(lambda: len(set(servers.nginx_pids()) - old) >= 2
              and not set(servers.nginx_pids()) & (old - {servers.nginx_master}),
              SPAWN_TIMEOUT,
              lambda: f"nginx pids {servers.nginx_pids()}, before the reload {sorted(old)}")
    return servers


def test_the_daemons_map_the_zero_page(daemons):
    """What the comparisons below cover: the masters and the workers forked
    after the heap walk have PTEs on the shared zero page (which smaps and
    statm do not count)."""
    pids = [daemons.nginx_master, daemons.postmaster] + _children(daemons.nginx_master, "nginx")
    counts = {_label(p): sum(zero_page_ptes(p).values()) for p in pids}
    assert all(counts.values()), counts


@contextlib.contextmanager
def _load(srv: Servers, tmp: Path, seconds: int = LOAD_SECONDS) -> Iterator[None]:
    """pgbench and wrk running (at most `seconds`, ended when the block ends),
    with PGBENCH_CLIENTS backends connected."""
    pg = srv.pgbench(tmp / "pgbench.log", seconds)
    http = srv.wrk(tmp / "wrk.log", seconds)
    try:
        _wait_for(lambda: len(srv.backends()) >= PGBENCH_CLIENTS, SPAWN_TIMEOUT,
                  lambda: f"pgbench backends: {srv.backends()}; pgbench exit {pg.poll()}; "
                          + (tmp / "pgbench.log").read_text(errors="replace")[-500:])
        yield
    finally:
        for p in (pg, http):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in (pg, http):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait_for(cond, timeout: float, what=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s: {what()}")
        time.sleep(0.1)


@contextlib.contextmanager
def _stopped(pids: list[int]) -> Iterator[None]:
    """Every process in PIDS stopped (SIGSTOP, all threads in T) for the
    block; SIGCONT after, whatever happens."""
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        for pid in pids:
            wait_stopped(pid)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _label(pid: int) -> str:
    return f"{pid} ({_cmdline(pid).strip()[:60]})"


# ---------------------------------------------------------------------------
# watch: RSS per mapping and live PSS/USS, on every server process under load


@dataclass
class WatchRound:
    pids: list[int]
    rss_diffs: dict[int, list[str]]
    pss_passed: dict[int, int]       # pid -> its mappings, each matched in some attempt
    pss_last: dict[int, str]         # pid -> what never matched (PssTally.report)
    seconds: dict[str, float]        # "attach", "pss" (the attempts), "all"


@pytest.fixture(scope="module")
def watch_round(daemons, tmp_path_factory) -> Iterator[WatchRound]:
    tmp = tmp_path_factory.mktemp("servers-watch")
    servers = daemons
    times: dict[str, float] = {}
    t_start = time.monotonic()
    with _load(servers, tmp):
        pids = servers.all_pids()
        mt = Memtrace(["watch", "--format", "json", "--interval", str(INTERVAL),
                       "--reconcile-interval", "0", "--pss-interval", str(PSS_INTERVAL),
                       "--heap-interval", "0", "--no-serve", *map(str, pids)],
                      tmp / "watch.log")
        try:
            for pid in pids:
                mt.stream.wait_snapshot(pid, 0, ATTACH_TIMEOUT, context=mt.stderr_tail)
            times["attach"] = time.monotonic() - t_start
            time.sleep(1.0)         # memtrace follows the load for a while
            rss_diffs: dict[int, list[str]] = {}
            passed: dict[int, int] = {}
            last: dict[int, str] = {}
            with _stopped(pids):
                t0 = time.time()
                for pid in pids:
                    snap = mt.stream.wait_snapshot(pid, t0 + SETTLE_INTERVALS * INTERVAL, 30,
                                                   context=mt.stderr_tail)
                    smaps = gt.read_smaps(pid)
                    if statm_exact():
                        diffs = gt.compare_snapshot(snap, smaps, gt.read_statm(pid),
                                                    gt.read_status_rss(pid))
                    else:
                        diffs = (compare_totals_with_smaps(snap, smaps)
                                 + gt.compare_snapshot(snap, smaps))
                    rss_diffs[pid] = diffs
                t_pss = time.monotonic()
                tallies = {p: PssTally() for p in pids}
                for _ in range(ATTEMPTS):
                    todo = [p for p in pids if not tallies[p].ok]
                    if not todo:
                        break
                    t1 = time.time()
                    before = {p: _want(p) for p in todo}
                    roll_before = {p: _rollup(p) for p in todo}
                    snaps = {p: _fresh_snapshot(mt, p, t1) for p in todo}
                    after = {p: _want(p) for p in todo}
                    roll_after = {p: _rollup(p) for p in todo}
                    for p in todo:
                        tallies[p].add(snaps[p], before[p], after[p], roll_before[p],
                                       roll_after[p])
                for p, tally in tallies.items():
                    if tally.ok:
                        passed[p] = len(tally.matched)
                    else:
                        last[p] = tally.report() + _zero_note(p)
                times["pss"] = time.monotonic() - t_pss
            assert mt.alive(), mt.stderr_tail()
        finally:
            mt.stop()
    times["all"] = time.monotonic() - t_start
    yield WatchRound(pids, rss_diffs, passed, last, times)


@dataclass
class PssTally:
    """Live PSS of one stopped process over the attempts. A mapping matches
    once an attempt found its smaps line the same before and after watch's
    snapshot and equal to the snapshot's (pss, uss, swap) in kB; the process
    total once smaps_rollup was the same before and after and equal to the
    snapshot's. Each mapping is judged on its own: libc's lines change with
    every process that starts or exits on the machine, and need not hold
    still in the same attempt as the rest."""
    starts: set[int] = field(default_factory=set)     # the snapshot's mappings
    matched: set[int] = field(default_factory=set)
    differs: dict[int, str] = field(default_factory=dict)   # last stable difference
    total_ok: bool = False
    total_diff: str = "smaps_rollup changed during every attempt"

    @property
    def ok(self) -> bool:
        return self.total_ok and bool(self.starts) and self.starts <= self.matched

    def add(self, snap: dict, before: dict, after: dict, roll_before: dict,
            roll_after: dict) -> None:
        for m in snap["mappings"]:
            start = m["start"]
            self.starts.add(start)
            want = before.get(start)
            if start in self.matched or want is None or want != after.get(start):
                continue
            if _got(m) == want:
                self.matched.add(start)
                self.differs.pop(start, None)
            else:
                self.differs[start] = (f"{start:x}-{m['end']:x} {m['perms']} {m['path']}: watch "
                                       f"(pss, uss, swap) kB {_got(m)} != smaps {want}")
        if not self.total_ok and _rollup_key(roll_before) == _rollup_key(roll_after):
            got = (snap["pss_bytes"] // 1024, snap["uss_bytes"] // 1024,
                   snap["swap_bytes"] // 1024)
            want_total = _rollup_key(roll_before)[1:]
            self.total_ok = got == want_total
            self.total_diff = f"process (pss, uss, swap) kB {got} != smaps_rollup {want_total}"

    def report(self) -> str:
        never = len(self.starts - self.matched - set(self.differs))
        lines = list(self.differs.values())[:12]
        if not self.total_ok:
            lines.append(self.total_diff)
        return (f"{len(self.matched)} of {len(self.starts)} mappings matched, {never} never "
                "held still during an attempt; differences:\n  " + "\n  ".join(lines))


def _summary(diffs: list[str], unstable: int) -> str:
    """The differences of one attempt, without the "(unstable: ...)" lines
    (mappings and rollups whose smaps changed during the attempt: counted)."""
    real = [d for d in diffs if not d.startswith("(unstable")]
    return f"{unstable} mappings/rollups changed during the reads; differences:\n  " + \
        "\n  ".join(real[:12])


def test_watch_rss_per_mapping_equals_smaps(watch_round):
    """Every mapping of every nginx and postgres process (pgbench backends
    included): rss_bytes, anon_bytes, bounds, perms, offset, path as smaps;
    the process totals as statm and status (or the smaps sums)."""
    pids = watch_round.pids
    assert len(pids) >= 3 + 5 + PGBENCH_CLIENTS
    bad = {p: d for p, d in watch_round.rss_diffs.items() if d}
    assert not bad, "\n".join(f"{_label(p)}:\n  " + "\n  ".join(d[:20]) for p, d in bad.items())
    t = watch_round.seconds
    print(f"\nwatch RSS exact for {len(pids)} server processes; watch round {t['all']:.1f} s"
          f" (attach {t['attach']:.1f} s, PSS attempts {t['pss']:.1f} s)")


def test_watch_live_pss_uss_equal_smaps(watch_round):
    """Per-mapping pss_bytes/uss_bytes/swap_bytes (kB floor) as smaps' Pss,
    Private_Clean + Private_Dirty and Swap, and the process's as
    smaps_rollup's, from a PSS refresh made after the processes stopped."""
    missing = [p for p in watch_round.pids if p not in watch_round.pss_passed]
    assert not missing, f"watch's live PSS/USS not as smaps after {ATTEMPTS} attempts for " \
        f"{len(missing)} of {len(watch_round.pids)} processes:\n" + "\n".join(
            f"{_label(p)}: {watch_round.pss_last.get(p)}" for p in missing)
    assert sum(watch_round.pss_passed.values()) > 100


# ---------------------------------------------------------------------------
# libs: the walk in this process (exact) and the command


def test_libs_equal_smaps_and_smaps_rollup(daemons, tmp_path):
    """Under load, then stopped: every mapping of every server process
    (library segments included) and the process totals from memtrace's walk
    (memtrace.pss.reader, which `libs` runs) as smaps and smaps_rollup say; `libs`'
    per-process totals as smaps_rollup; every library of every process listed
    with that process; the command's JSON for the same pids."""
    servers = daemons
    with _load(servers, tmp_path):
        time.sleep(1.0)
        pids = servers.all_pids()
        with _stopped(pids):
            # per mapping and rollup (test_pss.py's comparison, PAGEMAP_SCAN path)
            mapping_diffs: dict[int, str] = {}
            compared = 0
            for pid in pids:
                for _ in range(ATTEMPTS):
                    diffs, n, unstable = _compare_once(pid, use_scan=True)
                    if not diffs and not unstable:
                        compared += n
                        break
                    time.sleep(0.05)
                else:
                    mapping_diffs[pid] = _summary(diffs, unstable) + _zero_note(pid)
            # libs' process totals
            total_ok: set[int] = set()
            total_last: dict[int, str] = {}
            for _ in range(ATTEMPTS):
                todo = [pid for pid in pids if pid not in total_ok]
                if not todo:
                    break
                before = {pid: _rollup_key(_rollup(pid)) for pid in todo}
                doc = _libs(todo)
                after = {pid: _rollup_key(_rollup(pid)) for pid in todo}
                procs = {p["pid"]: p for p in doc["processes"]}
                assert sorted(procs) == sorted(todo), doc["skipped"]
                for pid in todo:
                    got = _process_key(procs[pid])
                    if before[pid] == after[pid] and got == before[pid]:
                        total_ok.add(pid)
                    else:
                        total_last[pid] = (f"{_label(pid)}: libs (rss, pss, uss, swap) kB {got} "
                                           f"vs smaps_rollup {before[pid]}, then {after[pid]}")
            total_diffs = [total_last[pid] for pid in pids if pid not in total_ok]
            doc = _libs(pids)
            # the command: RSS per process (independent of other mappers)
            out = subprocess.run([sys.executable, "-m", "memtrace", "libs", *map(str, pids),
                                  "--format", "json"], capture_output=True, timeout=120,
                                 cwd=str(REPO_ROOT))
            assert out.returncode == 0, out.stderr.decode(errors="replace")
            cli = {p["pid"]: p for p in json.loads(out.stdout)["processes"]}
            rolls = {pid: _rollup(pid) for pid in pids}
            cli_diffs = [f"{_label(pid)}: `libs` rss_bytes {cli[pid]['rss_bytes']} vs "
                         f"smaps_rollup Rss {rolls[pid]['Rss']} kB"
                         for pid in pids if cli[pid]["rss_bytes"] != rolls[pid]["Rss"] * 1024]
            assert sorted(cli) == sorted(pids)
            libraries = {(lib["dev"], lib["inode"]): lib for lib in doc["libraries"]}
            for pid in pids:
                for key, path in _library_inodes(pid).items():
                    assert key in libraries, f"{path} of {_label(pid)} missing from libs"
                    assert pid in {q["pid"] for q in libraries[key]["processes"]}
    problems = []
    if mapping_diffs:
        problems.append(f"per mapping, no clean attempt in {ATTEMPTS} for {len(mapping_diffs)}"
                        f" of {len(pids)} processes:\n" + "\n".join(
                            f"{_label(p)}: {d}" for p, d in mapping_diffs.items()))
    if total_diffs:
        problems.append(f"libs process totals, no clean attempt in {ATTEMPTS}:\n"
                        + "\n".join(total_diffs))
    if cli_diffs:
        problems.append("the command:\n" + "\n".join(cli_diffs))
    assert not problems, "\n".join(problems)
    assert compared > 100


# ---------------------------------------------------------------------------
# agent: follows what the daemons fork


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def agent(daemons, tmp_path_factory) -> Iterator[Memtrace]:
    """`memtrace agent --comm '^(nginx|postgres)$'`, attached to every server
    process running when it starts."""
    tmp = tmp_path_factory.mktemp("servers-agent")
    mt = Memtrace(["agent", "--comm", "^(nginx|postgres)$", "--format", "json",
                   "--interval", "0.5", "--heap-interval", "0", "--pss-interval", "0",
                   "--web.listen-address", f"127.0.0.1:{_free_port()}"], tmp / "agent.log")
    try:
        for pid in daemons.all_pids():
            mt.stream.wait_snapshot(pid, 0, ATTACH_TIMEOUT, context=mt.stderr_tail)
        yield mt
    finally:
        mt.stop()


def _not_followed(mt: Memtrace, pids: list[int]) -> list[int]:
    deadline = time.monotonic() + AGENT_FOLLOW_TIMEOUT
    while True:
        seen = set(mt.stream.pids_in_order)
        missing = [p for p in pids if p not in seen]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


def test_agent_follows_new_postgres_backends(daemons, agent, tmp_path):
    """pgbench's connections: the postmaster forks a backend for each (no
    exec); each must be attached while it serves the load."""
    servers = daemons
    old = set(servers.postgres_pids())
    with _load(servers, tmp_path):
        new = [p for p in servers.backends() if p not in old]
        assert len(new) >= PGBENCH_CLIENTS
        missing = _not_followed(agent, new)
        seen = sorted(set(agent.stream.pids_in_order))
    assert agent.alive(), agent.stderr_tail()
    assert not missing, (
        f"agent did not attach to {len(missing)} of {len(new)} new postgres backends within "
        f"{AGENT_FOLLOW_TIMEOUT:.0f} s: {missing}; pids in its output: {seen}\n"
        f"{agent.stderr_tail(10)}")


def test_agent_follows_reloaded_nginx_workers(daemons, agent, tmp_path):
    """`nginx -s reload` under load: the master forks new workers (no exec)
    and the old ones exit; the new ones must be attached."""
    servers = daemons
    old = set(servers.nginx_pids())
    with _load(servers, tmp_path):
        servers.nginx_reload()
        _wait_for(lambda: len(set(servers.nginx_pids()) - old) >= 2, SPAWN_TIMEOUT,
                  lambda: f"nginx pids {servers.nginx_pids()}, before the reload {sorted(old)}")
        new = sorted(set(servers.nginx_pids()) - old)
        missing = _not_followed(agent, new)
        seen = sorted(set(agent.stream.pids_in_order))
    assert agent.alive(), agent.stderr_tail()
    assert not missing, (
        f"agent did not attach to {len(missing)} of {len(new)} nginx workers made by the "
        f"reload within {AGENT_FOLLOW_TIMEOUT:.0f} s: {missing}; pids in its output: {seen}\n"
        f"{agent.stderr_tail(10)}")


def _heap_vmas(pid: int) -> int:
    with open(f"/proc/{pid}/maps", "rb") as f:
        return sum(1 for line in f if line.rstrip().endswith(b"[heap]"))


def test_heap_figures_of_the_workers_and_backends(daemons, tmp_path):
    """`memtrace heap` on every nginx worker and pgbench backend after they
    served load: a forked process that grows its heap has [heap] in two VMAs
    (the kernel keeps the growth apart from the VMA it shares an anon_vma
    with the parent through), and memtrace read only the first ("main arena
    top is not in [heap]": no heap figures for nginx's workers)."""
    srv = daemons
    # the load lasts until the block ends (at most 120 s): with 10 s, six heap
    # walks on a loaded CI machine outlasted it and the backends were gone
    with _load(srv, tmp_path, 120):
        time.sleep(3)
        pids = srv.nginx_pids()[1:] + srv.backends()
        r, split = {}, {}
        for pid in pids:
            r[pid] = subprocess.run([sys.executable, "-m", "memtrace", "heap", str(pid),
                                     "--format", "json"], capture_output=True, text=True,
                                    timeout=120, cwd=str(REPO_ROOT))
            split[pid] = _heap_vmas(pid)
    bad = {pid: (c.returncode, c.stderr[-300:]) for pid, c in r.items()
           if c.returncode != 0 or not json.loads(c.stdout).get("supported")}
    assert not bad, f"[heap] VMAs per pid {split}: {bad}"
    for pid, c in r.items():
        assert json.loads(c.stdout)["totals"]["in_use_bytes"] > 0, (pid, split[pid])


def test_watch_malloc_on_a_postgres_backend(daemons):
    """`watch --malloc` on a live PostgreSQL backend (glibc malloc under its
    memory contexts): the sampler goes in, the queries' allocations are
    sampled and netted, and the backend answers after memtrace detached."""
    env = daemons.env
    psql = subprocess.Popen([f"{env['PG_BINDIR']}/psql", "-h", env["PG_SOCKDIR"], "-p",
                             env["PG_PORT"], "-U", env["PG_USER"], "-At", "-q",
                             env["PG_DATABASE"]], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1)
    assert psql.stdin is not None and psql.stdout is not None

    def query(sql: str) -> str:
        assert psql.stdin is not None and psql.stdout is not None
        psql.stdin.write(sql + "\n")
        psql.stdin.flush()
        return psql.stdout.readline().strip()

    try:
        backend = int(query("select pg_backend_pid();"))
        watch = subprocess.Popen([sys.executable, "-m", "memtrace", "watch", "--format", "json",
                                  "--no-serve", "--interval", "0.5", "--count", "12",
                                  "--heap-interval", "0", "--pss-interval", "0", "--malloc",
                                  "--malloc-period", "64K", str(backend)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=str(REPO_ROOT))
        time.sleep(3 * TIMEOUT_SCALE)
        for _ in range(4):
            assert query("select count(*) from (select md5(g::text) from "
                         "generate_series(1, 200000) g order by 1) s;") == "200000"
        out, err = watch.communicate(timeout=120 * TIMEOUT_SCALE)
        assert watch.returncode == 0, err[-2000:]
        assert f"sampler loaded into pid {backend}" in err, err[-2000:]
        last = [json.loads(x) for x in out.splitlines() if '"malloc"' in x][-1]["malloc"]
        assert last["samples"] > 10 and last["frees"] > 0 and last["lost"] == 0, last
        assert query("select 41 + 1;") == "42"                  # the backend goes on
    finally:
        if psql.stdin is not None:
            psql.stdin.close()
        psql.wait(timeout=30)
