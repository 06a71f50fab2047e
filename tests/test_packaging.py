"""The wheel: presets ship inside it, and the console script is declared."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from motionsep.config import available_presets
from tests.conftest import PROJECT_ROOT


def test_wheel_ships_presets_and_the_console_script(tmp_path: Path) -> None:
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
            str(tmp_path),
            str(PROJECT_ROOT),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
        timeout=300,
    )
    wheel = next(tmp_path.glob("motionsep-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    for preset in available_presets():
        assert f"motionsep/presets/{preset}.yaml" in names
    assert "motionsep_cli/app.py" in names
    assert "motionsep = motionsep_cli.app:main" in scripts
    assert not any(name.startswith("tests/") for name in names)
