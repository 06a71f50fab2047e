"""``motionsep motions list|show|rm|rename``: the motion library in the store."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from motionsep.config import Recipe
from motionsep.library import LIST_FIELDS
from motionsep.model import motion
from motionsep.store import Store, lock
from motionsep_cli import motions as motions_cli
from motionsep_cli.app import app

runner = CliRunner()

TARGETS = [
    "transformer_in.transformer_blocks.0.attn1.to_k",
    "transformer_in.transformer_blocks.0.attn2.to_k",
]


def make_motion(
    home: Path,
    name: str,
    *,
    clips: tuple[str, ...] = ("dolly.mp4",),
    preview: bool = False,
    recipe: Recipe = Recipe.PAPER,
) -> Path:
    """A small valid package (fake tensors: nothing here applies it to a U-Net)."""
    state = {}
    for target in TARGETS:
        state[f"{target}.lora_A.weight"] = torch.full((2, 8), 0.5)
        state[f"{target}.lora_B.weight"] = torch.full((8, 2), 0.25)
    metadata = motion.MotionMetadata(
        recipe=recipe,
        lora_targets=TARGETS,
        lora_rank=2,
        lora_alpha=2.0,
        base_model=motion.BaseModelRecord(id="tiny", revision="abc123", unet_config_hash="0" * 64),
        clips=[motion.ClipRecord(name=c, sha256="ab" * 32, frames=[0, 1]) for c in clips],
        prompts=["a person walking"],
        final_loss=0.25,
    )
    extra: dict[str, Path | bytes] = {"preview.mp4": b"\x00" * 100} if preview else {}
    return motion.save_motion(Store(home).motions_dir / name, state, metadata, extra_files=extra)


def invoke(*args: str, **kwargs: Any) -> Any:
    return runner.invoke(app, ["motions", *args], **kwargs)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture
def library(store_home: Path) -> Path:
    """A store with two good motions (created out of order), a damaged one, and clutter."""
    make_motion(store_home, "zoom-in", preview=True, clips=("a.mp4", "b.mp4"))
    make_motion(store_home, "dolly", recipe=Recipe.REFERENCE)
    broken = store_home / "motions" / "broken"
    broken.mkdir()
    (broken / motion.METADATA_FILE).write_text("{not json")
    # Neither a half-trained run nor a lock file is a motion; this lock was left
    # by a training that crashed (its process is gone), so it blocks nothing.
    (store_home / "motions" / ".partial-run").mkdir()
    dead = {"pid": _dead_pid(), "host": socket.gethostname(), "since": 0}
    (store_home / "motions" / ".dolly.lock").write_text(json.dumps(dead))
    return store_home


def _dead_pid() -> int:
    """A pid that no live process has: one of a process that has already exited."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
def interactive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend a person sits at the terminal."""
    monkeypatch.setattr(motions_cli, "_stdin_is_interactive", lambda: True)


# ---------------------------------------------------------------------------
# help


@pytest.mark.parametrize("command", ["list", "show", "rm", "rename", "import", "export"])
def test_every_motions_command_has_help_with_an_example(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout
    assert f"motionsep motions {command}" in result.stdout


def test_motions_is_a_subcommand() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "motions" in result.stdout


# ---------------------------------------------------------------------------
# list


def test_list_json_is_stable_parseable_and_documented(library: Path) -> None:
    first = invoke("list", "--json")
    assert first.exit_code == 0, first.stderr
    assert invoke("list", "--json").stdout == first.stdout  # stable: same store, same bytes

    rows = json.loads(first.stdout, object_pairs_hook=lambda pairs: dict(pairs))
    assert [row["name"] for row in rows] == ["broken", "dolly", "zoom-in"]
    for row in rows:
        assert list(row) == sorted(LIST_FIELDS)  # exactly the documented keys, sorted
    broken, dolly, zoom = rows
    assert broken["error"].startswith("unreadable motion.json")
    assert broken["recipe"] is None and broken["clips"] == []
    assert dolly["error"] is None
    assert (dolly["recipe"], dolly["rank"], dolly["base_model"]) == ("reference", 2, "tiny")
    assert dolly["base_model_revision"] == "abc123"
    assert dolly["preview"] is None and dolly["imported_from"] is None
    assert dolly["lora_targets"] == 2 and dolly["final_loss"] == 0.25
    assert dolly["path"] == str((library / "motions" / "dolly").resolve())
    assert dolly["size_bytes"] > 0 and dolly["created"].endswith("Z")
    assert zoom["clips"] == ["a.mp4", "b.mp4"]
    assert zoom["preview"] == str((library / "motions" / "zoom-in" / "preview.mp4").resolve())


def test_list_json_reads_with_jq(library: Path) -> None:
    jq = shutil.which("jq")
    if jq is None:
        pytest.skip("jq is not installed (apt-get install jq); the JSON itself is tested above")
    output = invoke("list", "--json").stdout
    names = subprocess.run(
        [jq, "-r", '.[] | select(.error == null) | "\\(.name) \\(.recipe) \\(.rank)"'],
        input=output,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert names.splitlines() == ["dolly reference 2", "zoom-in paper 2"]


def test_list_prints_names_on_stdout_and_the_table_on_stderr(library: Path) -> None:
    result = invoke("list")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["broken", "dolly", "zoom-in"]
    assert "reference" in result.stderr and "damaged" in result.stderr


def test_list_names_unfinished_trainings_and_cut_off_writes(library: Path) -> None:
    (library / "motions" / ".partial-orbit" / "checkpoints").mkdir(parents=True)
    (library / "motions" / ".tmp-dolly-1a2b3c4d").mkdir()
    result = invoke("list")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["broken", "dolly", "zoom-in"]  # not motions
    stderr = " ".join(result.stderr.split())
    assert "unfinished training of 'orbit'" in stderr and "--name orbit --resume" in stderr
    assert "cut-off write" in stderr and ".tmp-dolly-1a2b3c4d" in stderr
    as_json = invoke("list", "--json")
    assert [row["name"] for row in json.loads(as_json.stdout)] == ["broken", "dolly", "zoom-in"]
    assert (library / "motions" / ".partial-orbit").is_dir()  # reported, never removed


def test_list_of_an_empty_store(store_home: Path) -> None:
    result = invoke("list", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []
    assert invoke("list").stdout == ""


# ---------------------------------------------------------------------------
# show


def test_show_verifies_and_describes(library: Path) -> None:
    result = invoke("show", "zoom-in")
    assert result.exit_code == 0, result.stderr
    assert "recipe:      paper" in result.stdout
    assert "clips:       a.mp4, b.mp4" in result.stdout
    assert "(verified)" in result.stdout

    details = json.loads(invoke("show", "zoom-in", "--json").stdout)
    assert details["verified"] is True
    assert details["lora"] == {"targets": TARGETS, "rank": 2, "alpha": 2.0}
    assert set(details["files"]) == {motion.ADAPTER_FILE, "preview.mp4"}


def test_show_reports_a_damaged_motion(library: Path) -> None:
    (library / "motions" / "zoom-in" / "preview.mp4").write_bytes(b"changed")
    result = invoke("show", "zoom-in")
    assert result.exit_code == 1
    assert "damaged" in result.stderr and "preview.mp4" in result.stderr
    assert invoke("show", "nope").exit_code == 2


# ---------------------------------------------------------------------------
# rm


def test_rm_without_a_terminal_needs_yes(library: Path) -> None:
    before = snapshot(library / "motions" / "dolly")
    result = invoke("rm", "dolly")
    assert result.exit_code == 2
    assert "--yes" in result.stderr
    assert snapshot(library / "motions" / "dolly") == before


def test_rm_asks_and_keeps_the_motion_on_no(library: Path, interactive: None) -> None:
    result = invoke("rm", "dolly", input="n\n")
    assert result.exit_code == 1
    assert "Remove motion 'dolly'" in result.stderr and "nothing removed" in result.stderr
    assert (library / "motions" / "dolly" / motion.METADATA_FILE).is_file()

    result = invoke("rm", "dolly", input="y\n")
    assert result.exit_code == 0, result.stderr
    # (CliRunner echoes the typed answer to stdout; a terminal would show it instead.)
    assert result.stdout.splitlines()[-1] == str(library / "motions" / "dolly")
    assert not (library / "motions" / "dolly").exists()


def test_rm_yes_removes_without_leftovers(library: Path) -> None:
    result = invoke("rm", "zoom-in", "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["removed"] is True
    left = sorted(p.name for p in (library / "motions").iterdir())
    assert left == [".dolly.lock", ".partial-run", "broken", "dolly"]  # no .tmp-*, no new lock
    assert invoke("rm", "zoom-in", "--yes").exit_code == 2  # gone: not in the store


def test_rm_removes_a_damaged_motion(library: Path) -> None:
    assert invoke("rm", "broken", "--yes").exit_code == 0
    assert not (library / "motions" / "broken").exists()


def test_rm_refuses_while_a_training_holds_the_lock(library: Path) -> None:
    folder = library / "motions" / "zoom-in"
    before = snapshot(folder)
    with lock(library / "motions" / ".zoom-in.lock", "training of motion 'zoom-in'"):
        result = invoke("rm", "zoom-in", "--yes")
    assert result.exit_code == 1
    assert "cannot remove motion 'zoom-in'" in result.stderr
    assert "already running" in result.stderr
    assert snapshot(folder) == before


# ---------------------------------------------------------------------------
# rename


def test_rename_moves_the_package_and_keeps_it_valid(library: Path) -> None:
    before = snapshot(library / "motions" / "zoom-in")
    result = invoke("rename", "zoom-in", "zoom-in-v1")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(library / "motions" / "zoom-in-v1")
    assert not (library / "motions" / "zoom-in").exists()
    assert snapshot(library / "motions" / "zoom-in-v1") == before
    assert invoke("show", "zoom-in-v1").exit_code == 0  # checksums still verify


def test_rename_never_overwrites(library: Path) -> None:
    zoom, dolly = snapshot(library / "motions" / "zoom-in"), snapshot(library / "motions" / "dolly")
    result = invoke("rename", "zoom-in", "dolly")
    assert result.exit_code == 2
    assert "already exists" in result.stderr
    assert snapshot(library / "motions" / "zoom-in") == zoom
    assert snapshot(library / "motions" / "dolly") == dolly

    # Not even onto an empty folder that is no motion.
    (library / "motions" / "empty").mkdir()
    assert invoke("rename", "zoom-in", "empty").exit_code == 2
    assert snapshot(library / "motions" / "zoom-in") == zoom


@pytest.mark.parametrize("locked", ["zoom-in", "zoom-out"])
def test_rename_refuses_while_either_name_is_locked(library: Path, locked: str) -> None:
    before = snapshot(library / "motions" / "zoom-in")
    with lock(library / "motions" / f".{locked}.lock", f"training of motion {locked!r}"):
        result = invoke("rename", "zoom-in", "zoom-out")
    assert result.exit_code == 1
    assert "already running" in result.stderr
    assert snapshot(library / "motions" / "zoom-in") == before
    assert not (library / "motions" / "zoom-out").exists()


@pytest.mark.parametrize("new", ["../escape", ".hidden", "a/b", "none", "None"])
def test_rename_refuses_bad_names(library: Path, new: str) -> None:
    result = invoke("rename", "dolly", new)
    assert result.exit_code == 2
    assert "invalid" in result.stderr
    assert (library / "motions" / "dolly" / motion.METADATA_FILE).is_file()


def test_training_a_motion_called_none_is_refused(store_home: Path, tmp_path: Path) -> None:
    """`--motion none` means the base model, so no motion may be named that."""
    from typer.testing import CliRunner

    from motionsep_cli.app import app

    result = CliRunner().invoke(app, ["train", str(tmp_path), "--name", "NONE", "--preset", "tiny"])
    assert result.exit_code == 2
    assert "means the base model alone" in result.output
    assert not (store_home / "motions").exists()
