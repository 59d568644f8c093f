"""Writing recordings from the command line (no root, no BPF): `memtrace record`,
`watch --record`, `run --record` and `agent --record` reach the loop with a Tee
of the live view and a RecordingWriter whose header names the mode, the
command or PIDs, the interval and the options; usage errors are one line."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import pytest

from memtrace.commands import agent as agent_mod
from memtrace.commands import main as cli
from memtrace.commands import record as record_mod
from memtrace.commands import run as run_mod
from memtrace.commands import watch as watch_mod
from memtrace.commands.live import NullReporter
from memtrace.record.reader import open_recording
from memtrace.record.writer import RecordingWriter, Tee
from memtrace.views.jsonl import JsonReporter


class _Stop(Exception):
    pass


class _NoForwarder:
    def __init__(self, stop: Any) -> None:
        self.early = None


def _capture(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[Any]:
    """The reporter the command gives its Session (then the command stops)."""
    seen: list[Any] = []

    def session(reporter: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(reporter)
        raise _Stop

    monkeypatch.setattr(module, "Session", session)
    return seen


def _invoke(command: Any, argv: list[str]) -> None:
    with pytest.raises(_Stop):
        command.main(argv, standalone_mode=False)


def _header_of(reporter: Any) -> dict[str, Any]:
    assert isinstance(reporter, Tee)
    writer = reporter.others[0]
    assert isinstance(writer, RecordingWriter)
    reporter.close()
    rec = open_recording(writer.stream_out.name)
    assert [r.kind for r in rec.records()] == ["end"] and rec.problem is None
    return rec.header


def test_record_is_run_with_a_recording_and_no_view(monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(run_mod, "_Forwarder", _NoForwarder)
    seen = _capture(monkeypatch, run_mod)
    path = str(tmp_path / "r.mtrace")
    _invoke(record_mod.record, ["-o", path, "--no-serve", "--interval", "0.5", "--stacks",
                                "--stacks-period", "64K", "--pss-interval", "0",
                                "--", "/bin/true", "a b"])
    reporter, = seen
    assert isinstance(reporter.view, NullReporter)      # --format none by default
    header = _header_of(reporter)
    assert header["mode"] == "run" and header["command"] == ["/bin/true", "a b"]
    assert header["pids"] == [] and header["interval_seconds"] == 0.5
    assert header["options"]["stacks"] is True
    assert header["options"]["stacks_period"] == 64 * 1024
    assert header["options"]["malloc"] is False and header["options"]["pss_interval"] == 0


def test_record_takes_run_options_and_a_view_on_stdout(monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(run_mod, "_Forwarder", _NoForwarder)
    seen = _capture(monkeypatch, run_mod)
    path = str(tmp_path / "r.mtrace")
    _invoke(record_mod.record, ["--output", path, "--format", "json", "--no-serve",
                                "--", "/bin/true"])
    assert isinstance(seen[0].view, JsonReporter)
    _header_of(seen[0])
    # every option of run is one of record's, but run's -o (the view's file)
    # and --record: record's -o is the recording
    run_names = {p.name for p in run_mod.run.params} - {"output", "record"}
    assert run_names <= {p.name for p in record_mod.record.params}
    assert "record" not in {p.name for p in record_mod.record.params}


def test_record_names_its_file_when_not_told(monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(run_mod, "_Forwarder", _NoForwarder)
    monkeypatch.chdir(tmp_path)
    seen = _capture(monkeypatch, run_mod)
    _invoke(record_mod.record, ["--no-serve", "--", "/bin/true"])
    _header_of(seen[0])
    names = os.listdir(tmp_path)
    assert len(names) == 1 and re.fullmatch(r"memtrace-true-\d{8}-\d{6}\.mtrace", names[0])
    assert record_mod.default_recording_name(("/x/my prog;rm",), 0).startswith(
        "memtrace-my_prog_rm-")


def test_run_record_keeps_the_view(monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(run_mod, "_Forwarder", _NoForwarder)
    seen = _capture(monkeypatch, run_mod)
    path = str(tmp_path / "r.mtrace")
    _invoke(run_mod.run, ["--record", path, "--format", "json", "--no-serve", "--",
                          "/bin/true"])
    assert isinstance(seen[0].view, JsonReporter)
    assert _header_of(seen[0])["mode"] == "run"


def test_run_without_record_has_no_tee(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(run_mod, "_Forwarder", _NoForwarder)
    seen = _capture(monkeypatch, run_mod)
    _invoke(run_mod.run, ["--format", "none", "--no-serve", "--", "/bin/true"])
    assert isinstance(seen[0], NullReporter)


def test_watch_record_names_the_pids(monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    seen = _capture(monkeypatch, watch_mod)
    monkeypatch.setattr(watch_mod, "_existing_targets", lambda procfs, pids: pids)
    monkeypatch.setattr(watch_mod, "resolve_targets", lambda procfs, t: (11, 12))
    path = str(tmp_path / "w.mtrace")
    _invoke(watch_mod.watch, ["--record", path, "--no-serve", "--interval", "2", "11", "12"])
    header = _header_of(seen[0])
    assert header["mode"] == "watch" and header["pids"] == [11, 12]
    assert header["command"] is None and header["interval_seconds"] == 2.0
    assert header["options"]["stacks"] is False


def test_agent_record_writes_into_a_directory(monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    seen = _capture(monkeypatch, agent_mod)
    directory = tmp_path / "recs" / "deeper"
    _invoke(agent_mod.agent, ["--record", str(directory), "--comm", "x"])
    header = _header_of(seen[0])
    assert header["mode"] == "agent"
    names = os.listdir(directory)
    assert len(names) == 1 and re.fullmatch(r"memtrace-[\w.-]+-\d{8}-\d{6}\.mtrace", names[0])
    # a second one in the same second does not overwrite it
    again = agent_mod.agent_recording_path(str(directory), 0)
    (directory / os.path.basename(again)).write_text("")
    assert agent_mod.agent_recording_path(str(directory), 0).endswith("-2.mtrace")


def _main(monkeypatch, capsys, argv: list[str]) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "bcc", None)
    monkeypatch.setattr(sys, "argv", ["memtrace", *argv])
    with pytest.raises(SystemExit) as ei:
        cli.main()
    out, err = capsys.readouterr()
    return int(ei.value.code or 0), out, err


def test_an_unwritable_recording_is_one_line_exit_14(monkeypatch, capsys, tmp_path):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(run_mod, "_Forwarder", _NoForwarder)
    _capture(monkeypatch, run_mod)
    code, out, err = _main(monkeypatch, capsys, ["record", "-o", str(tmp_path / "no" / "x"),
                                                 "--no-serve", "--", "/bin/true"])
    assert code == 14 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("argv, says", [
    (["record", "-o", "", "--no-serve", "--", "/bin/true"], "empty file name"),
    (["watch", "--record", "", "--format", "none", "--no-serve", "1"], "empty file name"),
    (["record", "-o", "x.mtrace"], "Missing argument"),
    (["run", "--record", "x", "-o", "./x", "--format", "json", "--no-serve", "--", "/bin/true"],
     "--record and -o both name"),
])
def test_record_usage_errors_are_one_line(monkeypatch, capsys, tmp_path, argv, says):  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_mod, "_Forwarder", _NoForwarder)
    monkeypatch.setattr(watch_mod, "_existing_targets", lambda procfs, pids: pids)
    _capture(monkeypatch, run_mod)
    _capture(monkeypatch, watch_mod)
    code, out, err = _main(monkeypatch, capsys, argv)
    assert code == 2 and out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines
    assert os.listdir(tmp_path) == []


def test_help_texts_name_the_recording(monkeypatch, capsys):  # type: ignore[no-untyped-def]
    for argv, words in ((["record", "--help"], ("-o, --output FILE", "docs/recording.md")),
                        (["run", "--help"], ("--record FILE",)),
                        (["watch", "--help"], ("--record FILE",)),
                        (["agent", "--help"], ("--record DIR",)),
                        (["--help"], ("record",))):
        monkeypatch.setattr(sys, "argv", ["memtrace", *argv])
        cli.main()      # --help returns (standalone_mode=False)
        out = capsys.readouterr().out
        assert all(w in out for w in words), (argv, out)
