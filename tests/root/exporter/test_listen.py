"""The /metrics listener of the live commands (issue 11 item 3; root).

- Two `memtrace watch` at once with the default --web.listen-address: both run;
  the one that finds 127.0.0.1:9877 in use serves on a free port and says which.
- A --web.listen-address that is in use: one line, exit 2, before the probes
  compile (timed).
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
import urllib.request

from memtrace.exporter.web import DEFAULT_LISTEN, parse_listen
from tests.root.harness import MEMTRACE, TIMEOUT_SCALE

QUIET = ["--format", "json", "--interval", "0.2", "--pss-interval", "0",
         "--heap-interval", "0"]
READY_TIMEOUT = 90.0 * TIMEOUT_SCALE
SERVING = re.compile(r"serving metrics on (http://\S+/metrics)")


class _Watch:
    """`memtrace watch PID` (or another command) in the background, stderr
    collected line by line."""

    def __init__(self, *argv: str, command: str = "watch") -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([*MEMTRACE, command, *argv], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: re.Pattern[str]) -> re.Match[str]:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = pattern.search(line)
                if m:
                    return m
            assert self.proc.poll() is None, (self.proc.returncode, self.lines)
            time.sleep(0.05)
        raise AssertionError(f"no {pattern.pattern!r} in {self.lines}")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        finally:
            self._reader.join(5)


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def test_two_watches_with_the_default_address_both_serve():
    target = subprocess.Popen(["sleep", "600"])
    holder = socket.socket()
    watches: list[_Watch] = []
    try:
        # Hold the default port as a first memtrace watch would (when another
        # memtrace on this machine holds it already, it is busy all the same).
        with contextlib.suppress(OSError):
            holder.bind(parse_listen(DEFAULT_LISTEN))
            holder.listen()
        first = _Watch(*QUIET, str(target.pid))
        second = _Watch(*QUIET, str(target.pid))
        watches = [first, second]
        urls = [w.wait_for(SERVING).group(1) for w in watches]
        assert len(set(urls)) == 2 and f"http://{DEFAULT_LISTEN}/metrics" not in urls, urls
        for w in watches:
            said = [line for line in w.lines if "serving metrics" in line]
            assert said == [f"memtrace: {DEFAULT_LISTEN} is in use (another memtrace?): "
                            f"serving metrics on {SERVING.search(said[0]).group(1)} "  # type: ignore[union-attr]
                            "instead (--web.listen-address chooses; --no-serve turns it "
                            "off)"], w.lines
            w.wait_for(re.compile("first snapshot"))
        for url in urls:
            text = _scrape(url)
            assert f'memtrace_process_virtual_bytes{{pid="{target.pid}",comm="sleep"}}' in text
        assert [w.stop() for w in watches] == [0, 0]
    finally:
        for w in watches:
            if w.proc.poll() is None:
                w.proc.kill()
        holder.close()
        target.kill()
        target.wait()


def test_given_busy_address_fails_at_once_while_another_watch_runs():
    """The second of two watches asks for the first one's address: one line,
    exit 2, in well under the probes' compile time."""
    target = subprocess.Popen(["sleep", "600"])
    first = _Watch(*QUIET, "--web.listen-address", "127.0.0.1:0", str(target.pid))
    try:
        url = first.wait_for(SERVING).group(1)
        address = url.removeprefix("http://").removesuffix("/metrics")
        t0 = time.monotonic()
        p = subprocess.run([*MEMTRACE, "watch", *QUIET, "--web.listen-address", address,
                            str(target.pid)], capture_output=True, text=True, timeout=60)
        seconds = time.monotonic() - t0
        assert p.returncode == 2, p.stderr
        assert p.stderr.splitlines() == [
            f"memtrace: error: cannot listen on {address}: Address already in use (another "
            "memtrace or exporter holds it: choose another port, or port 0 for any free one)"]
        assert seconds < 1.0 * TIMEOUT_SCALE + 1.0, seconds   # measured ~0.3 s
        assert first.stop() == 0
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
        target.kill()
        target.wait()
