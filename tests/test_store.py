"""The store: atomic folders, locks, model resolution."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from motionsep.errors import ModelNotFoundError, StoreLockedError, UsageError
from motionsep.store import Store, atomic_folder, lock


def test_failed_write_leaves_nothing_and_keeps_the_old_entry(tmp_path: Path) -> None:
    final = tmp_path / "motions" / "dolly"
    final.mkdir(parents=True)
    (final / "adapter.safetensors").write_bytes(b"old")

    def write_then_fail() -> None:
        with atomic_folder(final, overwrite=True) as tmp:
            (tmp / "adapter.safetensors").write_bytes(b"new, half written")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_then_fail()
    assert (final / "adapter.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in final.parent.iterdir()) == ["dolly"]


def test_existing_entry_is_refused_without_overwrite(tmp_path: Path) -> None:
    final = tmp_path / "x"
    final.mkdir()
    with pytest.raises(UsageError, match="already exists"), atomic_folder(final):
        pass


def test_completed_write_replaces_the_entry(tmp_path: Path) -> None:
    final = tmp_path / "x"
    with atomic_folder(final) as tmp:
        (tmp / "a").write_text("1")
    with atomic_folder(final, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_lock_refuses_a_second_holder_and_releases(tmp_path: Path) -> None:
    path = tmp_path / "dolly.lock"
    with (
        lock(path, "training of motion 'dolly'"),
        pytest.raises(StoreLockedError, match=rf"training of motion 'dolly' .*pid {os.getpid()}"),
        lock(path, "training of motion 'dolly'"),
    ):
        pass
    assert not path.exists() and not path.with_name("dolly.lock.owner").exists()
    with lock(path, "training"):  # released: the next run takes it
        pass


_HOLD = """
import sys, time
from pathlib import Path
from motionsep.store import lock
with lock(Path(sys.argv[1]), "training"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_lock_dies_with_the_process_that_held_it(tmp_path: Path) -> None:
    path = tmp_path / "dolly.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"), lock(path, "training"):
            pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    assert path.exists()  # the file stays behind, the lock does not
    with lock(path, "training"):
        pass


def test_unknown_model_name_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        Store(tmp_path).resolve_model("zeroscope")
    assert "motionsep download zeroscope" in (info.value.hint or "")
    assert info.value.exit_code == 2


def test_a_folder_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no model_index\.json"):
        Store(tmp_path / "store").resolve_model(str(tmp_path))


def test_unsafe_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="invalid model name"):
        Store(tmp_path).model_path("../escape")


def test_store_files_are_readable_by_others_under_umask_022(
    store_home: Path, clips_dir: Path, tmp_path: Path
) -> None:
    """A store shared on one GPU box: models, prepared entries and motions are 0644."""
    from motionsep.config import load_settings
    from motionsep.hub import install_tiny
    from motionsep.store import Store, atomic_folder
    from motionsep.train import train_motion

    previous = os.umask(0o022)
    try:
        store = Store(store_home)
        install_tiny(store)
        settings = load_settings(preset="tiny", set_options=["train.steps=2"])
        train_motion([clips_dir / "dolly.mp4"], "shared", settings, store)
        outside = tmp_path / "mine.txt"
        outside.write_text("x")
        outside.chmod(0o600)
        with atomic_folder(store_home / "linked") as folder:
            os.link(outside, folder / "mine.txt")  # a hard link keeps its owner's mode
    finally:
        os.umask(previous)
    files = [p for p in store_home.rglob("*") if p.is_file() and p.name != "mine.txt"]
    assert any(p.suffix == ".safetensors" for p in files)
    private = [str(p) for p in files if p.stat().st_mode & 0o044 != 0o044]
    assert not private, private
    assert outside.stat().st_mode & 0o777 == 0o600
