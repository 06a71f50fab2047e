"""``evaluate``: reports from videos and sidecars, the CLI, and the ablation on the tiny model.

CLIP is the tiny random one, imported into the store as ``clip`` the way
``motionsep download clip --from PATH`` would; generation runs the tiny model
at 16x16 pixels, 4 frames, 3 DDIM steps.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from motionsep import sample as sampling
from motionsep.config import Recipe, load_settings
from motionsep.evaluate import ABLATION_ROWS, evaluate_videos, run_ablation
from motionsep.hub import import_folder
from motionsep.metrics import ClipScorer
from motionsep.model import lora, motion, tap
from motionsep.model.components import build_tiny_clip, load_unet, unet_config_hash
from motionsep.outputs import group_key
from motionsep.store import Store
from motionsep.video import write_video
from motionsep_cli.app import app

runner = CliRunner()
SIZE = 16
FRAMES = 4


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture
def clip_store(store_home: Path, tiny_clip_dir: Path) -> Path:
    """The store with the tiny CLIP installed as ``clip``."""
    import_folder(Store(store_home), tiny_clip_dir, "clip")
    return store_home


def _texture(seed: int, size: int = 160) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)


def _sliding(seed: int, dx: int, frames: int = 8, size: int = 64) -> np.ndarray:
    tex = _texture(seed)
    return np.stack([tex[40 : 40 + size, 40 + dx * t : 40 + dx * t + size] for t in range(frames)])


def _write_with_sidecar(
    path: Path, frames: np.ndarray, prompt: str, seed: int, highway: bool, fmt: str = "mp4"
) -> Path:
    write_video(frames, path, fps=8, format=fmt)
    record = {
        "video": path.name,
        "prompt": prompt,
        "seed": seed,
        "sample": {"highway": highway, "pli": None, "base_seed": 0, "num_videos": 2},
        "motion": {"name": "dolly", "recipe": "paper"},
    }
    sampling.sidecar_path(path).write_text(json.dumps(record))
    return path


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """Four videos of two groups (highway on/off), one of them PNG frames, plus a reference."""
    folder = tmp_path / "outputs"
    folder.mkdir()
    _write_with_sidecar(folder / "a-0.mp4", _sliding(1, 2), "a red car", 0, True)
    _write_with_sidecar(folder / "a-1", _sliding(2, 2), "a red car", 1, True, fmt="png")
    _write_with_sidecar(folder / "b-0.mp4", _sliding(3, -2), "a wolf", 0, False)
    _write_with_sidecar(folder / "b-1.mp4", _sliding(4, -2), "a wolf", 1, False)
    write_video(_sliding(5, 2, frames=12), tmp_path / "reference.mp4", fps=8)
    return folder


def test_report_groups_videos_by_their_sidecars(
    outputs: Path, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    settings = load_settings(set_options=["data.frames=8"])
    report = evaluate_videos(
        [outputs],
        settings,
        references=[tmp_path / "reference.mp4"],
        scorer=ClipScorer(tiny_clip_dir),
    )
    assert [v.path.name for v in report.videos] == ["a-0.mp4", "a-1", "b-0.mp4", "b-1.mp4"]
    assert [g.count for g in report.groups] == [2, 2]
    highway, plain = report.groups
    assert highway.key.highway is True and plain.key.highway is False
    assert highway.key.seeds == "0-1"
    # The reference slides like the a-videos and against the b-videos.
    assert highway.mean["motion_fidelity"] > 0.9 > 0.3 > plain.mean["motion_fidelity"]
    for video in report.videos:
        assert video.prompt in {"a red car", "a wolf"}
        assert video.text_alignment is not None and video.appearance_leakage is not None
        assert video.fidelity_reference == "reference.mp4"


def test_inspect_attention_maps_beside_the_videos_are_not_scored_as_videos(
    outputs: Path,
) -> None:
    from motionsep.errors import VideoError
    from motionsep.outputs import find_eval_videos

    maps = outputs / "attention-a-red-car"  # what inspect-attention --out writes
    maps.mkdir()
    (maps / "summary.json").write_text("{}")
    for name in ("base", "motion", "difference"):
        Image.new("RGB", (30, 30), "gray").save(maps / f"{name}.png")
    names = [p.name for p in find_eval_videos([outputs])]
    assert names == ["a-0.mp4", "a-1", "b-0.mp4", "b-1.mp4"]  # the PNG video is still one
    with pytest.raises(VideoError, match="inspect-attention maps only"):
        find_eval_videos([maps])


def test_group_key_of_a_video_without_sidecar() -> None:
    assert group_key(None).label == "no sidecar"


def _cli(*args: str) -> Any:
    return runner.invoke(app, ["evaluate", *args])


def test_cli_json_csv_and_plot(clip_store: Path, outputs: Path, tmp_path: Path) -> None:
    csv_file, plot_file = tmp_path / "scores.csv", tmp_path / "scores.png"
    result = _cli(
        str(outputs),
        "--reference",
        str(tmp_path / "reference.mp4"),
        "--json",
        "--csv",
        str(csv_file),
        "--plot",
        str(plot_file),
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["videos"]) == 4 and len(data["groups"]) == 2
    assert all(-1 <= v["motion_fidelity"] <= 1 for v in data["videos"])
    with csv_file.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["row"] for r in rows] == ["video"] * 4 + ["group"] * 2
    assert float(rows[-1]["text_alignment_std"]) >= 0
    with Image.open(plot_file) as image:
        assert image.format == "PNG" and image.size == (1200, 400)


def test_cli_prompt_flag_and_plain_summary(clip_store: Path, outputs: Path) -> None:
    result = _cli(str(outputs / "a-0.mp4"), "--prompt", "something else")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "text_alignment=" in lines[0]
    assert "motion_fidelity=-" in lines[0]  # no reference, no fidelity


def test_cli_missing_clip_model_says_how_to_get_it(store_home: Path, outputs: Path) -> None:
    result = _cli(str(outputs))
    assert result.exit_code == 2
    assert "motionsep download clip" in result.stderr
    assert result.stdout == ""


def test_without_clip_motion_fidelity_is_computed_and_the_rest_say_why(
    store_home: Path, outputs: Path, tmp_path: Path
) -> None:
    reference = str(tmp_path / "reference.mp4")
    result = _cli(str(outputs), "--reference", reference, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert all(-1 <= v["motion_fidelity"] <= 1 for v in data["videos"])
    assert all(v["text_alignment"] is None for v in data["videos"])
    assert set(data["skipped"]) == {"text_alignment", "temporal_consistency", "appearance_leakage"}
    assert all("motionsep download clip" in why for why in data["skipped"].values())
    assert "CLIP-T not computed" in result.stderr
    # asked for by name, a CLIP metric without CLIP is an error with the fix
    asked = _cli(str(outputs), "--reference", reference, "--metrics", "motion,clip-t")
    assert asked.exit_code == 2 and "motionsep download clip" in asked.stderr
    unknown = _cli(str(outputs), "--metrics", "fvd")
    assert unknown.exit_code == 2 and "clip-t" in unknown.stderr


def test_metrics_compute_only_what_was_asked(
    clip_store: Path, outputs: Path, tmp_path: Path
) -> None:
    result = _cli(
        str(outputs),
        "--reference",
        str(tmp_path / "reference.mp4"),
        "--metrics",
        "consistency",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    videos = json.loads(result.stdout)["videos"]
    assert all(v["temporal_consistency"] is not None for v in videos)
    assert all(v["motion_fidelity"] is None and v["text_alignment"] is None for v in videos)


def test_cli_names_an_input_that_is_not_a_video(clip_store: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video")
    result = _cli(str(notes))
    assert result.exit_code == 2
    assert "notes.txt" in result.stderr
    missing = _cli(str(tmp_path / "nope.mp4"))
    assert missing.exit_code == 2 and "nope.mp4" in missing.stderr


# -- ablation -------------------------------------------------------------------

TRAINED_SETTINGS: dict[str, Any] = {
    "model": {"name": "tiny", "dtype": "fp32"},
    "sample": {"steps": 3, "guidance": 6.0, "width": SIZE, "height": SIZE, "frames": FRAMES},
}


def _install_motion(store_home: Path, model_dir: Path, name: str, recipe: Recipe) -> None:
    unet = load_unet(model_dir)
    torch.manual_seed(0)
    injection = tap.inject_motion_lora(unet, recipe, 4)
    with torch.no_grad():
        for param in lora.adapter_parameters(unet, tap.MOTION_ADAPTER):
            param.normal_(std=0.3)
    metadata = motion.MotionMetadata(
        recipe=recipe,
        lora_targets=list(injection.adapted),
        lora_rank=injection.rank,
        lora_alpha=injection.alpha,
        base_model=motion.BaseModelRecord(
            id=str(model_dir), revision=None, unet_config_hash=unet_config_hash(dict(unet.config))
        ),
        clips=[motion.ClipRecord(name="clip.mp4", sha256="0" * 64, frames=[0, 1, 2, 3])],
        settings={**TRAINED_SETTINGS, "lora": {"recipe": recipe.value, "rank": 4}},
    )
    motion.save_motion(store_home / "motions" / name, lora.adapter_state_dict(unet), metadata)


def test_ablation_runs_end_to_end_and_reuses_its_videos(
    clip_store: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _install_motion(clip_store, tiny_model_dir, "dolly", Recipe.PAPER)
    _install_motion(clip_store, tiny_model_dir, "dolly-motiondirector", Recipe.MOTIONDIRECTOR)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red car\na wolf on a snowy mountain\n")
    reference = write_video(_sliding(5, 1, frames=FRAMES, size=SIZE), tmp_path / "ref.mp4", fps=8)

    generated: list[int] = []
    real = sampling.generate_videos

    def counting(*args: Any, **kwargs: Any) -> list[sampling.GeneratedVideo]:
        videos = real(*args, **kwargs)
        generated.append(len(videos))
        return videos

    monkeypatch.setattr(sampling, "generate_videos", counting)
    args = [
        "--ablation",
        "--motion",
        "dolly",
        "--prompts-file",
        str(prompts),
        "--seeds",
        "1",
        "--out",
        str(tmp_path / "ablation"),
        "--reference",
        str(reference),
        "--json",
    ]
    first = _cli(*args)
    assert first.exit_code == 0, first.stderr
    data = json.loads(first.stdout)
    assert data["rows"] == list(ABLATION_ROWS)
    assert [g["label"] for g in data["groups"]] == list(ABLATION_ROWS)
    assert all(g["count"] == 2 for g in data["groups"])
    assert sum(generated) == data["generated"] == 10 and data["reused"] == 0
    pli_row = json.loads(sampling.sidecar_path(Path(data["videos"][-1]["path"])).read_text())
    assert pli_row["sample"]["pli"] == 0.5 and pli_row["sample"]["highway"] is True

    second = _cli(*args)
    assert second.exit_code == 0, second.stderr
    again = json.loads(second.stdout)
    assert sum(generated) == 10  # nothing generated the second time
    assert again["generated"] == 0 and again["reused"] == 10
    assert [v["path"] for v in again["videos"]] == [v["path"] for v in data["videos"]]


def test_ablation_without_baseline_leaves_its_row_out(
    clip_store: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    _install_motion(clip_store, tiny_model_dir, "zoom", Recipe.PAPER)
    package = motion.load_motion(clip_store / "motions" / "zoom")
    settings = sampling.generation_settings(package, set_options=["sample.steps=1"])
    result = run_ablation(
        package,
        ["a cup"],
        settings,
        out=tmp_path / "ablation",
        scorer=ClipScorer(clip_store / "models" / "clip"),
    )
    assert "MotionDirector" not in result.rows and len(result.rows) == 4
    assert "zoom-motiondirector" in result.notes[0]
    assert result.report.videos[0].motion_fidelity is None  # no references given


def test_ablation_refuses_a_motiondirector_motion(
    clip_store: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    _install_motion(clip_store, tiny_model_dir, "md", Recipe.MOTIONDIRECTOR)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cup\n")
    result = _cli("--ablation", "--motion", "md", "--prompts-file", str(prompts))
    assert result.exit_code == 2
    assert "recipe motiondirector" in result.stderr


def test_cli_usage_errors(clip_store: Path) -> None:
    assert _cli().exit_code == 2
    assert "--motion" in _cli("--ablation").stderr
    assert "do not pass VIDEOS" in _cli("--ablation", "x.mp4").stderr


@pytest.mark.slow
def test_ablation_shared_by_two_processes_writes_the_same_files_as_one(
    clip_store: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """evaluate --ablation --num-processes 2 (torchrun): the same videos, scored once."""
    import os
    import subprocess
    import sys

    _install_motion(clip_store, tiny_model_dir, "zoom", Recipe.PAPER)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cup\na red car\na dog\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOTIONSEP_")}
    env.update(MOTIONSEP_HOME=str(clip_store), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def run(out: Path, *extra: str) -> dict[str, Any]:
        command = [
            sys.executable, "-m", "motionsep_cli", "evaluate", "--ablation", "--motion", "zoom",
            "--prompts-file", str(prompts), "--out", str(out), "--batch-size", "2",
            "--set", "sample.steps=1", "--no-report", "--json", *extra,
        ]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # one JSON document: only the first process prints

    alone = run(tmp_path / "one")
    shared = run(tmp_path / "two", "--num-processes", "2")
    assert shared["generated"] == alone["generated"] == 12 and shared["reused"] == 0
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.mp4"))
    assert len(files) == 12
    assert files == sorted(
        p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.mp4")
    )
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert [Path(v["path"]).name for v in shared["videos"]] == [
        Path(v["path"]).name for v in alone["videos"]
    ]
