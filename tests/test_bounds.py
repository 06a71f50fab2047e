"""Out-of-range numbers are refused at validation: exit 2 naming the field, nothing written."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from motionsep_cli.app import app

CASES = [
    (["train", "CLIP", "--name", "x", "--steps", "99999999999999999999"], "train.steps"),
    (["train", "CLIP", "--name", "x", "--lr", "nan"], "optim.lr"),
    (["train", "CLIP", "--name", "x", "--set", "train.debias_alpha=inf"], "train.debias_alpha"),
    (["train", "CLIP", "--name", "x", "--set", "data.frames=100000000"], "data.frames"),
    (["generate", "a prompt", "--steps", "1001"], "sample.steps"),
    (["generate", "a prompt", "--size", "80000x80000"], "sample.width"),
    (["generate", "a prompt", "--guidance", "1e30"], "sample.guidance"),
    (["generate", "a prompt", "--lora-scale", "nan"], "sample.lora_scale"),
    (["generate", "a prompt", "-n", "100000000"], "sample.num_videos"),
    (["generate", "a prompt", "--set", "sample.seed=-1"], "sample.seed"),
]


@pytest.mark.parametrize(("args", "field"), CASES, ids=[field for _, field in CASES])
def test_out_of_range_values_exit_2_naming_the_field(
    args: list[str], field: str, store_home: Path, tmp_path: Path
) -> None:
    clip = tmp_path / "clip.mp4"
    args = [str(clip) if a == "CLIP" else a for a in args]
    if args[0] == "generate":
        args += ["--motion", "none", "--out", str(tmp_path / "out"), "--preset", "tiny"]
    else:
        args += ["--preset", "tiny"]
    started = time.monotonic()
    result = CliRunner().invoke(app, args)
    elapsed = time.monotonic() - started
    assert result.exit_code == 2, result.output
    assert field in result.output
    assert elapsed < 2.0
    assert not (tmp_path / "out").exists() and not store_home.exists()
