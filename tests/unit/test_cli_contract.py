"""The CLI contract: every subcommand's options and arguments (names, flags,
types, choices and ranges, defaults, help and epilog text) and the exit codes,
walked from the click command tree of memtrace.commands.main and compared with
tests/unit/golden/cli_options.json, so a refactor of the commands can prove the
command line did not change.

After an intended change to the command line, regenerate the file with

    .venv/bin/python -m pytest -q tests/unit/test_cli_contract.py --update-golden

(or MEMTRACE_UPDATE_GOLDEN=1) and review `git diff tests/unit/golden/`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from memtrace.commands import main as cli
from memtrace.errors import ExitCode
from tests.golden import check_golden

GOLDEN = Path(__file__).parent / "golden" / "cli_options.json"


def _plain(value: Any) -> Any:
    """JSON-able form of a default or a type attribute."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if type(value).__name__ == "Sentinel":      # click 8.3's UNSET: no default given
        return None
    raise AssertionError(f"a CLI default or type attribute that is not plain data: {value!r}")


def _type(param: click.Parameter) -> dict[str, Any]:
    info = dict(param.type.to_info_dict())
    # memtrace's own types (Seconds, Size, ...): their settings, e.g. Seconds.min
    if type(param.type).__module__.startswith("memtrace"):
        info.update({f"attr:{k}": _plain(v) for k, v in sorted(vars(param.type).items())
                     if not k.startswith("_")})
    return _plain(info)


def _param(param: click.Parameter) -> dict[str, Any]:
    info = param.to_info_dict()
    out: dict[str, Any] = {
        "kind": info["param_type_name"],
        "name": info["name"],
        "opts": info["opts"],
        "secondary_opts": info["secondary_opts"],
        "type": _type(param),
        "required": info["required"],
        "nargs": info["nargs"],
        "multiple": info["multiple"],
        "default": _plain(info["default"]),
        "envvar": info["envvar"],
        "expose_value": param.expose_value,
        "metavar": param.metavar,
    }
    if isinstance(param, click.Option):
        out.update({
            "is_flag": param.is_flag,
            "flag_value": _plain(param.flag_value) if param.is_flag else None,
            "count": param.count,
            "hidden": param.hidden,
            "show_default": _plain(param.show_default),
            "help": param.help,
        })
    return out


def _command(cmd: click.Command, ctx: click.Context) -> dict[str, Any]:
    out: dict[str, Any] = {
        "help": cmd.help,
        "epilog": cmd.epilog,
        "short_help": cmd.short_help,
        "hidden": cmd.hidden,
        # click caches each command's help option when first asked, with the names
        # of the context asking (a test that makes a subcommand's context without
        # its group gets --help alone): the names as `memtrace ...` gives them
        "help_option_names": list(ctx.help_option_names),
        "params": [_param(p) for p in cmd.get_params(ctx)
                   if p.name != "_click_default_help"],
    }
    if isinstance(cmd, click.Group):
        out["context_settings"] = _plain(cmd.context_settings)
        out["commands"] = {}
        for name in sorted(cmd.list_commands(ctx)):
            sub = cmd.get_command(ctx, name)
            assert sub is not None, name
            out["commands"][name] = _command(sub, click.Context(sub, parent=ctx,
                                                                info_name=name))
    return out


def contract() -> dict[str, Any]:
    # as `memtrace ...` makes them: with the group's context settings (-h), which
    # the subcommands' contexts inherit
    ctx = click.Context(cli.cli, info_name="memtrace", **cli.cli.context_settings)
    return {
        "memtrace": _command(cli.cli, ctx),
        "exit_codes": {code.name: int(code) for code in ExitCode},
    }


def test_cli_options_match_the_golden_file():
    check_golden(GOLDEN, json.dumps(contract(), indent=1, sort_keys=False,
                                    ensure_ascii=False) + "\n")


def test_every_subcommand_is_pinned_with_its_options():
    """The golden file is not trivially small: the eight subcommands and the
    options the docs name are there."""
    tree = json.loads(GOLDEN.read_text(encoding="utf-8"))["memtrace"]
    # at least these (other commands are added by their own branches)
    assert set(tree["commands"]) >= {"watch", "run", "record", "agent", "heap", "libs",
                                     "explain", "doctor", "rebuild", "report", "check",
                                     "diff"}
    opts = {name: {o for p in c["params"] for o in p["opts"]}
            for name, c in tree["commands"].items()}
    assert {"--comm", "--config", "--all", "--min-rss", "--group-by", "--max-processes",
            "--web.listen-address", "--pss-interval", "--heap-interval"} <= opts["agent"]
    assert {"--once", "--count", "--format", "--interval"} <= opts["watch"]
    assert {"--max-rss", "--max-pss", "--max-growth", "--junit", "--fail-fast"} <= opts["run"]
    assert {"--baseline", "--max-increase", "--junit", "--results"} <= opts["check"]
    assert {o for p in tree["params"] for o in p["opts"]} >= {"--version"}
