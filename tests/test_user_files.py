"""Files and folders at paths the user names: nothing the user made is replaced without asking.

Each scenario runs the command again over what the first run (or the user)
left there and checks what a user would see: exit 2, a message naming the
path, every file that existed byte for byte as it was, nothing half-written
beside it, no "internal error". The library-level tests race several writers
for one name: exactly one wins.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from motionsep.config import Recipe
from motionsep.errors import OutputExistsError, UsageError
from motionsep.model import lora, motion, tap
from motionsep.model.components import load_unet, unet_config_hash
from motionsep.outputs import MEDIA_DIR, sidecar_path
from motionsep.sample import GeneratedVideo, VideoWriter
from motionsep.store import temporary_sibling
from motionsep.userfiles import (
    MARKER_FILE,
    OutputKind,
    new_folder,
    publish,
    write_new_file,
)
from motionsep.video import write_video
from motionsep_cli.app import app

runner = CliRunner()
SIZE, FRAMES = 16, 4


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (and ``root`` itself if a file) with its bytes."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.rglob(".tmp-*")], "a temporary file was left behind"


def _refused(result: Any, path: Path) -> None:
    """Exit 2 with a message naming ``path``, and no internal error."""
    text = " ".join(result.stderr.split())
    assert result.exit_code == 2, result.stderr
    assert str(path) in text, result.stderr
    assert "internal error" not in text and "Traceback" not in text


def _frames(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)


def _generated(seed: int, prompt: str = "a red square") -> GeneratedVideo:
    record = {"prompt": prompt, "seed": seed, "sample": {"frames": FRAMES}, "motion": None}
    return GeneratedVideo(prompt, 0, 0, seed, _frames(seed), torch.zeros(1), record)


def _video_with_sidecar(path: Path, seed: int, motion_name: str | None = None) -> Path:
    write_video(_frames(seed), path, fps=8, value_range=(0, 255))
    record = {
        "video": path.name,
        "prompt": f"a red square, take {seed}",
        "seed": seed,
        "sample": {"highway": False, "pli": None, "base_seed": 0, "num_videos": 1},
        "motion": {"name": motion_name, "recipe": "paper"} if motion_name else None,
    }
    sidecar_path(path).write_text(json.dumps(record))
    return path


# ---------------------------------------------------------------------------
# exclusive creation, at the library level


@pytest.mark.parametrize(
    ("as_folder", "links"),
    [(False, True), (False, False), (True, True)],
    ids=["file", "file-without-hard-links", "folder"],
)
def test_of_writers_racing_for_one_name_exactly_one_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_folder: bool, links: bool
) -> None:
    if not links:  # a file system without hard links (FAT, some network mounts): O_EXCL

        def no_link(*_: object) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    final = tmp_path / "video.mp4"
    writers, start = 8, threading.Barrier(8)
    won: list[int] = []
    lost: list[int] = []

    def write(index: int) -> None:
        tmp = temporary_sibling(final)
        if as_folder:
            tmp.mkdir()
            (tmp / "00000.png").write_text(str(index))
        else:
            tmp.write_text(str(index))
        start.wait()
        try:
            publish([(tmp, final)])
            won.append(index)
        except OutputExistsError:
            lost.append(index)
        finally:
            if tmp.is_file():
                tmp.unlink()
            elif tmp.is_dir():
                (tmp / "00000.png").unlink()
                tmp.rmdir()

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(lost) == writers - 1
    kept = (final / "00000.png") if as_folder else final
    assert kept.read_text() == str(won[0])
    _no_leftovers(tmp_path)


def test_a_video_and_its_sidecar_take_their_names_together_or_not_at_all(tmp_path: Path) -> None:
    video, sidecar = tmp_path / "a.mp4", tmp_path / "a.json"
    sidecar.write_text("the user's notes")
    video_tmp, sidecar_tmp = temporary_sibling(video), temporary_sibling(sidecar)
    video_tmp.write_bytes(b"frames")
    sidecar_tmp.write_text("{}")
    with pytest.raises(OutputExistsError, match=r"a\.json"):
        publish([(video_tmp, video), (sidecar_tmp, sidecar)])
    assert not video.exists()  # the name it had taken was given back
    assert sidecar.read_text() == "the user's notes"


def test_two_generate_runs_writing_one_file_cannot_both_succeed(tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    writers = [VideoWriter(out, "mp4", fps=8) for _ in range(2)]  # both checked before either wrote
    start = threading.Barrier(2)
    outcomes: dict[int, str] = {}

    def write(index: int) -> None:
        start.wait()
        try:
            writers[index].write(_generated(seed=index))
            outcomes[index] = "wrote"
        except OutputExistsError as exc:
            outcomes[index] = str(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, outcome in outcomes.items() if outcome == "wrote"]
    assert len(winners) == 1, outcomes
    loser = outcomes[1 - winners[0]]
    assert str(out) in loser or str(sidecar_path(out)) in loser
    record = json.loads(sidecar_path(out).read_text())
    assert record["video"] == out.name and record["seed"] == winners[0]
    _no_leftovers(tmp_path)


def test_two_runs_writing_into_one_folder_keep_both_videos(tmp_path: Path) -> None:
    writers = [VideoWriter(tmp_path, "mp4", fps=8, count=1) for _ in range(2)]
    start = threading.Barrier(2)
    saved: list[Path] = []

    def write(index: int) -> None:
        start.wait()
        saved.append(writers[index].write(_generated(seed=0)).path)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(p.name for p in saved) == ["a-red-square-0-2.mp4", "a-red-square-0.mp4"]
    for path in saved:
        assert json.loads(sidecar_path(path).read_text())["video"] == path.name
    _no_leftovers(tmp_path)


def test_a_failed_folder_write_leaves_nothing_and_keeps_the_old_one(tmp_path: Path) -> None:
    store = tmp_path / "store"
    final = tmp_path / "page"
    with new_folder(final, OutputKind.REPORT, force=False, store_home=store) as tmp:
        (tmp / "index.html").write_text("first")
    marker = json.loads((final / MARKER_FILE).read_text())
    assert marker["kind"] == "report" and marker["files"] == ["index.html"]

    def write_then_fail() -> None:
        with new_folder(final, OutputKind.REPORT, force=True, store_home=store) as tmp:
            (tmp / "index.html").write_text("half")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_then_fail()
    assert (final / "index.html").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page"]


def test_force_replaces_only_a_folder_of_its_own_kind(tmp_path: Path) -> None:
    store = tmp_path / "store"
    export = tmp_path / "export"
    with new_folder(export, OutputKind.EXPORT, force=False, store_home=store) as tmp:
        (tmp / "adapter.safetensors").write_bytes(b"weights")
    before = _files(export)
    with (
        pytest.raises(UsageError, match="motion export motionsep wrote, not a report page"),
        new_folder(export, OutputKind.REPORT, force=True, store_home=store),
    ):
        pass
    link = tmp_path / "link"
    link.symlink_to(export)
    with (
        pytest.raises(UsageError, match="symbolic link"),
        new_folder(link, OutputKind.EXPORT, force=True, store_home=store),
    ):
        pass
    assert _files(export) == before


def test_a_file_is_created_exclusively_and_replaced_only_with_force(tmp_path: Path) -> None:
    target = tmp_path / "scores.csv"
    write_new_file(target, b"first", force=False)
    with pytest.raises(OutputExistsError, match="--force"):
        write_new_file(target, b"second", force=False)
    assert target.read_bytes() == b"first"
    write_new_file(target, b"third", force=True)
    assert target.read_bytes() == b"third"
    _no_leftovers(tmp_path)


# ---------------------------------------------------------------------------
# generate --out FILE


def _generate(model: Path, out: Path, *extra: str) -> Any:
    return runner.invoke(
        app,
        [
            "generate", "--motion", "none", "a red car", "--model", str(model),
            "--size", "16x16", "--frames", "2", "--steps", "1", "--out", str(out), *extra,
        ],
    )  # fmt: skip


def test_generate_keeps_an_existing_video_and_an_unrelated_sidecar_name(
    store_home: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "one.mp4"
    first = _generate(tiny_model_dir, out, "--seed", "1")
    assert first.exit_code == 0, first.stderr
    before = _files(tmp_path)

    again = _generate(tiny_model_dir, out, "--seed", "2")
    _refused(again, out)
    assert "--force" in again.stderr and _files(tmp_path) == before

    forced = _generate(tiny_model_dir, out, "--seed", "2", "--force")
    assert forced.exit_code == 0, forced.stderr
    assert json.loads(sidecar_path(out).read_text())["seed"] == 2

    notes = tmp_path / "notes.json"  # not a sidecar: the user's own file
    notes.write_text('{"mine": true}')
    before = _files(tmp_path)
    for extra in ([], ["--force"]):
        kept = _generate(tiny_model_dir, tmp_path / "notes.mp4", *extra)
        _refused(kept, notes)
        assert _files(tmp_path) == before
    _no_leftovers(tmp_path)


def test_generate_writes_nothing_into_the_store(store_home: Path, tiny_model_dir: Path) -> None:
    (store_home / "motions").mkdir(parents=True)
    result = _generate(tiny_model_dir, store_home / "motions")
    _refused(result, store_home / "motions")
    assert _files(store_home) == {}


# ---------------------------------------------------------------------------
# toy clips OUT


def _toy_clips(out: Path, *extra: str) -> Any:
    return runner.invoke(app, ["toy", "clips", str(out), "--count", "1", *extra])


def test_toy_clips_run_twice_keeps_the_first_clips(store_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "refs"
    out.mkdir()  # an empty folder made for the clips is welcome
    assert _toy_clips(out).exit_code == 0
    before = _files(out)
    _refused(_toy_clips(out, "--color", "blue"), out)
    assert _files(out) == before

    assert _toy_clips(out, "--color", "blue", "--force").exit_code == 0
    assert "blue" in (out / "diagonal-00.txt").read_text()

    (out / "my-notes.txt").write_text("keep me")
    before = _files(out)
    result = _toy_clips(out, "--force")
    _refused(result, out / "my-notes.txt")
    assert _files(out) == before
    _no_leftovers(tmp_path)


def test_toy_clips_with_bad_input_leaves_no_folder(store_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "refs"
    result = _toy_clips(out, "--seed", "-1")
    assert result.exit_code == 2 and "internal error" not in result.stderr
    bad_colour = _toy_clips(out, "--color", "plaid")
    assert bad_colour.exit_code == 2 and "plaid" in bad_colour.stderr
    assert not out.exists()
    taken = tmp_path / "taken"
    taken.write_text("a file of the user's")
    _refused(_toy_clips(taken), taken)
    assert taken.read_text() == "a file of the user's"
    _no_leftovers(tmp_path)


def test_toy_snapshot_force_never_replaces_a_users_folder(store_home: Path, tmp_path: Path) -> None:
    run = tmp_path / "run.partial"
    run.mkdir()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.jpg").write_bytes(b"\xff\xd8")
    for target in (mine, store_home / "models" / "snap"):
        result = runner.invoke(app, ["toy", "snapshot", str(run), "--out", str(target), "--force"])
        _refused(result, target)  # before any checkpoint is looked for
    assert _files(mine) == {"photo.jpg": b"\xff\xd8"}
    assert not store_home.exists()


# ---------------------------------------------------------------------------
# motions export --out


@pytest.fixture(scope="module")
def package(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A paper motion on the tiny model (its LoRA weights as injected)."""
    unet = load_unet(tiny_model_dir)
    injection = tap.inject_motion_lora(unet, Recipe.PAPER, 2)
    metadata = motion.MotionMetadata(
        recipe=Recipe.PAPER,
        lora_targets=list(injection.adapted),
        lora_rank=injection.rank,
        lora_alpha=injection.alpha,
        base_model=motion.BaseModelRecord(
            id=str(tiny_model_dir),
            revision=None,
            unet_config_hash=unet_config_hash(dict(unet.config)),
        ),
    )
    folder = tmp_path_factory.mktemp("package") / "slide"
    return motion.save_motion(folder, lora.adapter_state_dict(unet), metadata)


def _export(package: Path, out: Path, *extra: str, fmt: str = "peft") -> Any:
    return runner.invoke(
        app, ["motions", "export", str(package), "--format", fmt, "--out", str(out), *extra]
    )


def test_export_force_never_replaces_the_store_or_a_users_folder(
    package: Path, store_home: Path, tmp_path: Path
) -> None:
    import shutil

    shutil.copytree(package, store_home / "motions" / "slide")
    store_before = _files(store_home)
    for target in (store_home / "motions", store_home, store_home / "motions" / "new"):
        _refused(_export(package, target, "--force"), target)
    upstream = store_home / "motions" / "slide" / "lora.safetensors"
    _refused(_export(package, upstream, "--force", fmt="upstream"), upstream)
    assert _files(store_home) == store_before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    _refused(_export(package, mine, "--force"), mine)
    assert _files(mine) == {"thesis.tex": b"keep me"}
    _no_leftovers(tmp_path)


def test_export_force_replaces_its_own_export_and_nothing_beside_it(
    package: Path, store_home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "slide-peft"
    assert _export(package, out).exit_code == 0
    assert json.loads((out / MARKER_FILE).read_text())["kind"] == "export"
    before = _files(out)
    _refused(_export(package, out), out)
    assert _files(out) == before
    assert _export(package, out, "--force").exit_code == 0

    (out / "README.md").write_text("my notes on this export")
    before = _files(out)
    _refused(_export(package, out, "--force"), out / "README.md")
    assert _files(out) == before
    _no_leftovers(tmp_path)


# ---------------------------------------------------------------------------
# report --out, and the page evaluate writes


@pytest.fixture
def videos(tmp_path: Path) -> Path:
    folder = tmp_path / "outputs"
    folder.mkdir()
    _video_with_sidecar(folder / "a-0.mp4", 0)
    _video_with_sidecar(folder / "a-1.mp4", 1)
    return folder


def _report(*args: str) -> Any:
    return runner.invoke(app, ["report", *args])


def test_report_force_replaces_only_its_own_page(
    videos: Path, store_home: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"  # a folder of the user's that happens to hold an index.html
    site.mkdir()
    (site / "index.html").write_text("<h1>my home page</h1>")
    (site / "photo.jpg").write_bytes(b"\xff\xd8")
    before = _files(site)
    _refused(_report(str(videos), "--out", str(site), "--force"), site)
    assert _files(site) == before

    page = tmp_path / "page"
    assert _report(str(videos), "--out", str(page)).exit_code == 0
    assert _report(str(videos), "--out", str(page), "--force").exit_code == 0
    (page / MEDIA_DIR / "mine.mp4").write_bytes(b"a video of mine")
    before = _files(page)
    _refused(_report(str(videos), "--out", str(page), "--force"), page / MEDIA_DIR / "mine.mp4")
    assert _files(page) == before

    inside = store_home / "motions"
    _refused(_report(str(videos), "--out", str(inside), "--force"), inside)
    assert not store_home.exists() or _files(store_home) == {}
    _no_leftovers(tmp_path)


def test_evaluate_replaces_only_its_own_page_and_says_so(
    videos: Path, store_home: Path, tmp_path: Path
) -> None:
    reference = _video_with_sidecar(tmp_path / "reference.mp4", 9)
    args = ["evaluate", str(videos), "--metrics", "motion", "--reference", str(reference)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.stderr
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.stderr
    assert "replaces the page written there before" in " ".join(again.stderr.split())

    page = videos / "report"
    (page / "annotations.txt").write_text("mine")
    before = _files(videos)
    refused = runner.invoke(app, args)
    _refused(refused, page / "annotations.txt")
    assert "--no-report" in refused.stderr
    assert "motion fidelity" not in refused.stderr  # refused before any video was scored
    assert _files(videos) == before


def test_evaluate_keeps_an_existing_csv_and_plot_unless_forced(
    videos: Path, store_home: Path, tmp_path: Path
) -> None:
    csv_file, plot_file = tmp_path / "scores.csv", tmp_path / "scores.png"
    csv_file.write_text("my spreadsheet")
    reference = _video_with_sidecar(tmp_path / "reference.mp4", 9)
    base = ["evaluate", str(videos), "--metrics", "motion", "--reference", str(reference)]
    base.append("--no-report")
    _refused(runner.invoke(app, [*base, "--csv", str(csv_file)]), csv_file)
    assert csv_file.read_text() == "my spreadsheet"
    forced = runner.invoke(
        app, [*base, "--csv", str(csv_file), "--plot", str(plot_file), "--force"]
    )
    assert forced.exit_code == 0, forced.stderr
    assert csv_file.read_text().startswith("row,label,path")
    assert plot_file.read_bytes().startswith(b"\x89PNG")
    _no_leftovers(tmp_path)


# ---------------------------------------------------------------------------
# report reads only inside FOLDER and the store's motions


def test_report_reads_nothing_outside_the_folder(
    videos: Path, store_home: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    _video_with_sidecar(secret / "private.mp4", 7)
    (secret / "loss.png").write_bytes(b"\x89PNG private curve")
    (videos / "linked.mp4").symlink_to(secret / "private.mp4")
    (videos / "linked-folder").symlink_to(secret)
    _video_with_sidecar(videos / "b-0.mp4", 2, motion_name=str(secret))
    _video_with_sidecar(videos / "b-1.mp4", 3, motion_name="../../secret")
    curve = store_home / "motions" / "slide" / "loss.png"
    curve.parent.mkdir(parents=True)
    curve.write_bytes(b"\x89PNG the store's curve")
    _video_with_sidecar(videos / "c-0.mp4", 4, motion_name="slide")

    result = _report(str(videos))
    assert result.exit_code == 0, result.stderr
    copies = sorted((videos / "report" / MEDIA_DIR).iterdir())
    media = [p.read_bytes() for p in copies]
    assert b"\x89PNG private curve" not in media
    assert b"\x89PNG the store's curve" in media  # a valid motion name still shows its curve
    assert (secret / "private.mp4").read_bytes() not in media
    assert len([p for p in copies if p.suffix == ".mp4"]) == 5  # a-0, a-1, b-0, b-1, c-0
    html = (videos / "report" / "index.html").read_text()
    assert "take 7" not in html  # the outside video's sidecar was not read either
    stderr = " ".join(result.stderr.split())
    assert "leads out of" in stderr and "not a valid motion name" in stderr
