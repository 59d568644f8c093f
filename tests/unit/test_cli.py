"""memtrace.commands.main, run as a subprocess with bcc made unimportable: the paths
tested here must fail early, with one clear line and a documented exit code."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Block bcc (None in sys.modules makes `import bcc` raise ImportError), then run
# memtrace exactly as `python -m memtrace` would.
LAUNCH = (
    "import runpy, sys; sys.modules['bcc'] = None; "
    "runpy.run_module('memtrace', run_name='__main__', alter_sys=True)"
)


def memtrace(*args: str, code: str = LAUNCH) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="100")
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("memtrace: error: ")
    for w in words:
        assert w in lines[0]
    assert r.stdout == ""


def free_pid() -> int:
    pid = 999999
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def test_help():
    r = memtrace("--help")
    assert r.returncode == 0, r.stderr
    for word in ("watch", "run", "doctor", "Exit codes"):
        assert word in r.stdout
    assert r.stderr == ""


def test_plain_python_dash_m_help():
    r = subprocess.run(
        [sys.executable, "-m", "memtrace", "-h"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert r.returncode == 0 and "watch" in r.stdout


@pytest.mark.parametrize("cmd", ["watch", "run", "doctor"])
def test_subcommand_help(cmd):
    r = memtrace(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout


def test_version():
    r = memtrace("--version")
    assert r.returncode == 0
    assert "0.1.0" in r.stdout


def test_watch_without_pid_is_usage_error():
    r = memtrace("watch")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert "PIDS" in r.stderr or "Missing argument" in r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["watch", "a(b"],                  # neither a PID nor a valid name pattern
        ["watch", "--count", "0", "1"],
        ["watch", "--once", "--count", "3", "1"],
        ["watch", "--format", "xml", "1"],
        ["watch", "--interval", "0", "1"],
        ["no-such-command"],
    ],
)
def test_usage_errors(args):
    r = memtrace(*args)
    assert r.returncode == 2, (args, r.stderr)
    assert "Traceback" not in r.stderr


def test_watch_name_that_matches_nothing():
    """A name (not a number) is matched like pgrep; none found: one line, exit 6."""
    assert_one_line_error(memtrace("watch", "no-such-proc-mt"), 6,
                          "no process named 'no-such-proc-mt'")


def test_watch_missing_pid():
    pid = free_pid()
    r = memtrace("watch", str(pid))
    assert_one_line_error(r, 6, str(pid))


def test_watch_pid_zero():
    assert_one_line_error(memtrace("watch", "0"), 6, "invalid PID 0")


def test_watch_own_pid():
    code = "import os, sys; sys.argv[1:] = ['watch', str(os.getpid())]; " + LAUNCH
    assert_one_line_error(memtrace(code=code), 9)


def test_watch_kernel_thread():
    stat = Path("/proc/2/stat")
    if not stat.exists() or not int(stat.read_text().rsplit(")", 1)[1].split()[6]) & 0x00200000:
        pytest.skip("pid 2 is not a kernel thread here (pid namespace)")
    assert_one_line_error(memtrace("watch", "2"), 7, "kernel thread")


def test_watch_zombie():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "child did not become a zombie"
            time.sleep(0.01)
        assert_one_line_error(memtrace("watch", str(child.pid)), 8, "zombie")
    finally:
        child.wait()


def test_watch_thread_id():
    code = (
        "import os, sys, threading\n"
        "ev = threading.Event(); out = []\n"
        "t = threading.Thread(target=lambda: (out.append(threading.get_native_id()),"
        " ev.wait()))\n"
        "t.start()\n"
        "while not out: pass\n"
        "sys.argv[1:] = ['watch', str(out[0])]\n"
        "try:\n"
        "    exec(" + repr(LAUNCH) + ")\n"
        "finally:\n"
        "    ev.set()\n"
    )
    r = memtrace(code=code)
    assert_one_line_error(r, 6, "thread of process")


def test_run_nonexistent_command():
    assert_one_line_error(memtrace("run", "--", "/nonexistent"), 10, "/nonexistent")


def test_run_command_not_on_path():
    assert_one_line_error(
        memtrace("run", "--", "memtrace-no-such-cmd-xyz"), 10, "command not found"
    )


def test_run_directory(tmp_path):
    assert_one_line_error(memtrace("run", "--", str(tmp_path)), 10, "cannot execute")


def test_run_not_executable(tmp_path):
    f = tmp_path / "script.sh"
    f.write_text("#!/bin/sh\necho hi\n")
    f.chmod(0o644)
    assert_one_line_error(memtrace("run", "--", str(f)), 10, "not an executable")


def test_run_without_command_is_usage_error():
    r = memtrace("run")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", ["watch", "run"])
def test_unwritable_output_is_one_clear_line(cmd, tmp_path):
    out = str(tmp_path / "no-such-dir" / "out.json")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        args = ["-o", out, str(sleeper.pid)] if cmd == "watch" else ["-o", out, "--", "true"]
        r = memtrace(cmd, *args)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "Traceback" not in r.stderr
    assert r.returncode not in (0, 1)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and out in lines[0]


def test_format_none_reports_nothing_but_log_lines(capsys):
    from memtrace.commands.live import NullReporter, make_reporter

    reporter = make_reporter("none", None)
    assert isinstance(reporter, NullReporter)
    reporter.snapshot({"pid": 1, "mappings": []})
    reporter.message("pid 1 exited")
    out, err = capsys.readouterr()
    assert out == "" and "pid 1 exited" in err


# ---------------------------------------------------------------------------
# every option value checked at parse time (issue 16 item 10)

BAD_NUMBERS = ["inf", "-inf", "nan", "NaN", "-1", "-5G", "1e309", "99999999999999999999999",
               "", " ", "0x10", "1e400"]


def _numeric_options() -> list[tuple[str, str]]:
    """(subcommand, option) for every option taking a number, a size or an address."""
    import click

    from memtrace.commands.main import cli
    from memtrace.commands.options import ListenAddress, Seconds, Size

    numeric = (Seconds, Size, ListenAddress, click.IntRange, click.FloatRange)
    out = []
    for name, cmd in sorted(cli.commands.items()):
        for p in cmd.params:
            if isinstance(p, click.Option) and (isinstance(p.type, numeric)
                                                or p.type in (click.INT, click.FLOAT)):
                out.append((name, max(p.opts, key=len)))
    return out


NUMERIC_OPTIONS = _numeric_options()
# what each subcommand needs after the option so that, if a bad value got
# through, it would fail fast without BPF (and not with the option's name)
TAIL = {"watch": [str(free_pid())], "run": ["--", "/nonexistent/cmd"],
        "record": ["--", "/nonexistent/cmd"],
        "agent": ["--user", "no-such-user-memtrace"], "heap": [str(free_pid())],
        "check": ["/nonexistent/run.mtrace"],
        "report": ["/nonexistent/memtrace-report-test.mtrace"]}


def test_numeric_options_are_all_found():
    found = set(NUMERIC_OPTIONS)
    for cmd in ("watch", "run", "agent"):
        for opt in ("--interval", "--reconcile-interval", "--heap-interval", "--pss-interval",
                    "--web.listen-address", "--max-mapping-series"):
            assert (cmd, opt) in found
    assert {("agent", "--min-rss"), ("agent", "--sweep-interval"),
            ("agent", "--max-processes"), ("heap", "--retries")} <= found


def _main(monkeypatch, capsys, argv: list[str]) -> tuple[int, str, str]:
    """memtrace.commands.main.main in this process (bcc unimportable): exit code, out, err."""
    from memtrace.commands import main as cli

    monkeypatch.setitem(sys.modules, "bcc", None)
    monkeypatch.setattr(sys, "argv", ["memtrace", *argv])
    with pytest.raises(SystemExit) as ei:
        cli.main()
    out, err = capsys.readouterr()
    return int(ei.value.code or 0), out, err


@pytest.mark.parametrize("cmd, option", NUMERIC_OPTIONS)
def test_bad_numbers_are_one_usage_line(cmd, option, monkeypatch, capsys):
    values = BAD_NUMBERS + (["127.0.0.1:99999", "127.0.0.1:-1", "[::1]:65536", "1.2.3.4",
                             "host name:80", ":http", "a:1:2:3x"]
                            if option == "--web.listen-address" else [])
    for value in values:
        code, out, err = _main(monkeypatch, capsys, [cmd, option, value, *TAIL[cmd]])
        assert code == 2, (option, value, err)
        assert "Traceback" not in err and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1, (option, value, err)
        assert lines[0].startswith("memtrace: error: ") and f"'{option}'" in lines[0], lines


@pytest.mark.parametrize("args", [
    ["watch", "--interval", "0.001", "1"],
    ["watch", "--interval", "1e7", "1"],          # beyond 30 days
    ["agent", "--all", "--min-rss", "2E"],         # E is not a unit
    ["agent", "--all", "--min-rss", "1025P"],      # beyond 1 PiB
    ["agent", "--all", "--min-rss", "infG"],
    ["agent", "--sweep-interval", "0.01", "--all"],
    ["agent", "--max-processes", "0", "--all"],
])
def test_out_of_range_values_are_one_usage_line(args, monkeypatch, capsys):
    code, out, err = _main(monkeypatch, capsys, args)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_good_values_still_parse():
    from memtrace.commands.agent import agent
    from memtrace.commands.options import parse_size
    from memtrace.commands.run import run
    from memtrace.commands.watch import watch

    p = watch.make_context("watch", ["--interval", "0.5", "--pss-interval", "0",
                                     "--web.listen-address", "[::1]:0", "1"]).params
    assert p["interval"] == 0.5 and p["pss_interval"] == 0 and p["listen"] == "[::1]:0"
    p = run.make_context("run", ["--web.listen-address", ":9877", "--", "true"]).params
    assert p["listen"] == ":9877"
    p = agent.make_context("agent", ["--all", "--min-rss", "1.5G"]).params
    assert p["min_rss"] == 3 << 29
    assert agent.make_context("agent", ["--all"]).params["min_rss"] == 64 << 20
    assert [parse_size(s) for s in ("0", "4096", "64M", "2GiB", "1k", "1T")] == \
        [0, 4096, 64 << 20, 2 << 30, 1024, 1 << 40]


def test_usage_error_is_one_line_through_the_real_entry_point():
    r = memtrace("watch", "--interval", "inf", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "memtrace: error: Invalid value for '--interval': 'inf' is not a finite number of "
        "seconds (see 'memtrace watch --help')"]


def test_agent_config_that_is_binary(tmp_path):
    f = tmp_path / "bin.yml"
    f.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe" * 10)
    assert_one_line_error(memtrace("agent", "--config", str(f)), 2, "not UTF-8")


@pytest.mark.parametrize("text, words", [
    ("rules: [{comm: 5}]\n", "comm must be a string"),
    ("rules: [5]\n", "rule 0 is not a mapping"),
    ("rules: [{comm: x}]\nall_min_rss: -5G\n", "all_min_rss"),
    ("rules: [{comm: x}]\nall_min_rss: .nan\n", "all_min_rss"),
    ("rules: [{comm: x}]\nextra: 1\n", "unknown keys extra"),
    ("rules: [{comm: '(' }]\n", "bad comm regex"),
    ("rules: {comm: x}\n", "expected a mapping with a list"),
    ("{{{\n", "not valid YAML"),
])
def test_agent_config_bad_values(tmp_path, text, words):
    f = tmp_path / "agent.yml"
    f.write_text(text)
    assert_one_line_error(memtrace("agent", "--config", str(f)), 2, words)


def test_web_config_with_a_plain_password_is_refused_before_anything(tmp_path):
    f = tmp_path / "web.yml"
    f.write_text("basic_auth_users:\n  alice: plaintext\n")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        r = memtrace("watch", "--web.config.file", str(f), str(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()
    # exit 2, not 4 (BCC missing: the check comes before the probes)
    assert_one_line_error(r, 2, "not a bcrypt hash", "alice")


# ---------------------------------------------------------------------------
# exit codes: errors.py, the --help epilog and docs/exit-codes.md agree


def test_exit_codes_agree_everywhere():
    """ExitCode is the one list: the --help epilog is made from it, and the
    table of docs/exit-codes.md has exactly its codes, each with its text."""
    import re

    from memtrace.commands.options import EXIT_CODE_LINES, EXIT_CODES_HELP
    from memtrace.errors import DESCRIPTIONS, ExitCode

    want = {int(c): c.description for c in ExitCode}
    assert set(DESCRIPTIONS) == set(ExitCode)
    doc = (REPO / "docs" / "exit-codes.md").read_text()
    documented = {int(code): text
                  for code, text in re.findall(r"^\| (\d+) \| ([^|]+?) \| ", doc, re.M)}
    assert documented == want
    assert sorted(c for line in EXIT_CODE_LINES for c in line) == sorted(want)
    for code, text in want.items():
        assert re.search(rf"(?:^|[:;] ){code} {re.escape(text)}(?:;|\.$)", EXIT_CODES_HELP,
                         re.M), code
    helped = {int(m) for m in re.findall(r"(?:^|[:;,] ?)(\d+) [A-Za-z`]", EXIT_CODES_HELP, re.M)}
    assert helped == set(want), sorted(helped ^ set(want))


def test_exit_codes_help_is_unchanged():
    """The epilog made from ExitCode reads as the hand-written one did."""
    from memtrace.commands.options import EXIT_CODES_HELP

    assert EXIT_CODES_HELP == """\b
Exit codes: 0 ok; 1 internal error (a bug); 2 usage; 3 not root; 4 BCC missing;
5 kernel headers missing; 6 no such process; 7 kernel thread; 8 zombie; 9 memtrace's own PID;
10 command cannot be executed; 11 BPF load failed; 12 tracefs not mounted;
13 heap: no consistent walk or unverified glibc layout;
14 output cannot be written (disk full, I/O error; a closed pipe quietly);
15 no C compiler to build the --malloc sampler;
16 recording unreadable, cut short or corrupt; 17 memory budget exceeded;
18 watch --malloc: the sampler could not be loaded.
`run` otherwise exits with the command's status (128+N if killed by signal N).
SIGINT, SIGTERM, SIGHUP: watch and agent detach and exit 0; run passes them on
to the command and exits with its status."""


# ---------------------------------------------------------------------------
# a full disk or a closed pipe on stdout: one line (or quiet) and exit 14


def test_one_shot_output_to_dev_full_is_one_line():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for args in (["explain"], ["--help"], ["doctor"]):
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, "-m", "memtrace", *args], cwd=REPO, env=env,
                               stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
        assert r.returncode == 14, (args, r.stderr)
        assert r.stderr.strip().splitlines() == [
            "memtrace: error: cannot write stdout: No space left on device"], args


def test_one_shot_output_to_a_closed_pipe_is_quiet():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r_fd, w_fd = os.pipe()
    os.close(r_fd)           # the reader is gone before anything is written
    try:
        r = subprocess.run([sys.executable, "-m", "memtrace", "explain"], cwd=REPO, env=env,
                           stdout=w_fd, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w_fd)
    assert r.returncode == 14 and r.stderr == "", r.stderr


# ---- the table's options (issue 11)

@pytest.mark.parametrize("cmd", ["watch", "run"])
@pytest.mark.parametrize("args", [
    ["--path", "("], ["--columns", "rss,bogus"], ["--columns", ","], ["--sort", "size"],
    ["--top", "0"], ["--kind", "heaps"],
])
def test_bad_table_options_are_one_usage_line(cmd, args, monkeypatch, capsys):
    code, out, err = _main(monkeypatch, capsys, [cmd, *args, *TAIL[cmd]])
    assert code == 2 and "Traceback" not in err and out == "", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"'{args[0]}'" in lines[0], lines


def test_table_options_reach_the_table(monkeypatch):
    import re

    from memtrace.commands import watch
    from memtrace.views.table import COLUMNS, DEFAULT_COLUMNS, TableOptions

    seen: list[TableOptions] = []
    monkeypatch.setattr(watch, "make_reporter",
                        lambda fmt, output, opts=None, pids=(): seen.append(opts)
                        or (_ for _ in ()).throw(SystemExit(0)))
    monkeypatch.setattr(watch, "_existing_targets", lambda procfs, pids: pids)
    for argv in (["1"], ["--sort", "delta", "--top", "7", "--kind", "heap", "--kind", "anon",
                         "--path", "^/usr", "--by-library", "--bytes",
                         "--columns", "rss,delta,path", "1"], ["--wide", "1"]):
        with pytest.raises(SystemExit):
            watch.watch.main(argv, standalone_mode=False)
    default, full, wide = seen
    assert default == TableOptions()
    assert default.columns == DEFAULT_COLUMNS and "range" not in default.columns
    assert (full.sort, full.top, full.kinds, full.by_library, full.exact, full.columns) == \
        ("delta", 7, frozenset({"heap", "anon"}), True, True, ("rss", "Δrss", "path"))
    assert full.path is not None and full.path.pattern == re.compile("^/usr").pattern
    assert wide.columns == COLUMNS


@pytest.mark.parametrize("cmd", ["heap", "libs"])
def test_bytes_flag_on_one_shot_tables(cmd):
    from memtrace.commands.main import cli

    command = cli.commands[cmd]
    assert command.make_context(cmd, ["--bytes", "1"]).params["exact"] is True
