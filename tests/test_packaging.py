"""The wheel: presets and the toy model ship inside it, and the console script is declared."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from motionsep.config import available_presets
from motionsep.store import builtin_model_path
from motionsep.toy.model import builtin_path
from tests.conftest import PROJECT_ROOT


def _build_wheel(folder: Path) -> Path:
    """Builds the wheel into ``folder``; returns its path."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(folder),
            str(PROJECT_ROOT),
        ],
        check=True,
        capture_output=True,
        cwd=folder,
        timeout=300,
    )
    return next(folder.glob("motionsep-*.whl"))


def test_wheel_ships_presets_and_the_console_script(tmp_path: Path) -> None:
    with zipfile.ZipFile(_build_wheel(tmp_path)) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    for preset in available_presets():
        assert f"motionsep/presets/{preset}.yaml" in names
    assert "motionsep_cli/app.py" in names
    assert "motionsep = motionsep_cli.app:main" in scripts
    assert not any(name.startswith("tests/") for name in names)


@pytest.mark.skipif(
    builtin_model_path("toy") is None,
    reason="the pretrained toy model is not shipped yet (issue 10)",
)
def test_wheel_ships_the_toy_model(tmp_path: Path) -> None:
    with zipfile.ZipFile(_build_wheel(tmp_path)) as archive:
        names = set(archive.namelist())
    weights = builtin_path()
    shipped = {
        "motionsep/toy/weights/" + path.relative_to(weights).as_posix()
        for path in weights.rglob("*")
        if path.is_file()
    }
    assert "motionsep/toy/weights/unet/diffusion_pytorch_model.safetensors" in shipped
    assert shipped <= names, sorted(shipped - names)
