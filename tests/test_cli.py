"""The command line: subcommands, help, error mapping, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from motionsep import __version__
from motionsep_cli.app import app

runner = CliRunner()

SUBCOMMANDS = ["download", "prepare", "train", "generate", "evaluate", "inspect-attention"]


def test_help_lists_the_six_subcommands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help_with_an_example(name: str) -> None:
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.stdout
    assert f"motionsep {name}" in result.stdout


def test_preset_help_names_every_builtin_preset() -> None:
    from motionsep.config import available_presets

    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    preset_line = next(line for line in result.stdout.splitlines() if "Preset name" in line)
    for name in available_presets():
        assert name in preset_line, name


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"motionsep {__version__}"


def test_bad_settings_list_every_field_and_exit_2() -> None:
    result = runner.invoke(app, ["config", "--set", "train.steps=0", "--set", "sample.guidance=-1"])
    assert result.exit_code == 2
    assert "2 invalid settings" in result.stderr
    assert "train.steps" in result.stderr and "sample.guidance" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_shows_the_resolved_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOTIONSEP_SAMPLE__STEPS", "12")
    result = runner.invoke(app, ["config", "--preset", "tiny", "--set", "train.steps=3", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["train"]["steps"] == 3
    assert data["sample"]["steps"] == 12
    assert data["model"]["name"] == "tiny"


def test_unknown_preset_is_a_usage_error() -> None:
    result = runner.invoke(app, ["config", "--preset", "nope"])
    assert result.exit_code == 2
    assert "unknown preset 'nope'" in result.stderr
    assert "dolly" in result.stderr


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "motionsep_cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_tracebacks_only_with_motionsep_debug() -> None:
    args = ["config", "--preset", "no-such-preset"]
    plain = _run_cli(args, {})
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr
    debug = _run_cli(args, {"MOTIONSEP_DEBUG": "1"})
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "UsageError" in debug.stderr


def test_download_list_json_is_parseable(store_home: Path) -> None:
    result = runner.invoke(app, ["download", "--list", "--json"])
    assert result.exit_code == 0
    from motionsep.store import builtin_model_path

    rows = json.loads(result.stdout)
    assert {row["name"] for row in rows} >= {"zeroscope", "modelscope", "clip", "tiny"}
    # an empty store: only the toy models, which ship inside the package, are there
    shipped = {"toy", "toy-animatediff"}
    assert not any(row["installed"] for row in rows if row["name"] not in shipped)
    for name in shipped:
        toy = next(row for row in rows if row["name"] == name)
        assert toy["installed"] and Path(toy["path"]) == builtin_model_path(name)
