"""Shared fixtures: an offline hub, a tiny model built once per session, clips."""

from __future__ import annotations

import os

# Read by huggingface_hub at import time: set before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MOTIONSEP_DEBUG", None)
# One thread per process: the suite runs in two workers on 2 cores, and the command
# lines the tests start (subprocesses) inherit this; oversubscribed threads make the
# tiny models' small operations many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_CLIPS = PROJECT_ROOT.parent / "shared" / "clips"


@pytest.fixture(autouse=True)
def _isolated_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """No test sees the user's store or MOTIONSEP_* settings."""
    for name in list(os.environ):
        if name.startswith("MOTIONSEP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_session() -> Iterator[None]:
    """Tiny-model ops are too small for intra-op threads: on a shared 2-core box
    oversubscribed threads make a forward pass up to 10x slower, and one thread
    keeps CPU results reproducible. Session-scoped, so module fixtures (which run
    before any function-scoped fixture) compute with one thread too, like the
    tests that compare against them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread(_one_thread_per_session: None) -> Iterator[None]:
    """A test that changes the thread count leaves one thread behind for the next."""
    import torch

    yield
    torch.set_num_threads(1)


@pytest.fixture
def store_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty store root, set as MOTIONSEP_HOME."""
    home = tmp_path / "store"
    monkeypatch.setenv("MOTIONSEP_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, built once per session, as a diffusers folder (do not modify)."""
    from motionsep.hub import install_tiny
    from motionsep.store import Store

    store = Store(tmp_path_factory.mktemp("tiny_store"))
    return install_tiny(store).path


@pytest.fixture(scope="session")
def tiny_animatediff_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny AnimateDiff model (SD-style U-Net + motion adapter), built once per
    session, as an AnimateDiffPipeline folder (do not modify)."""
    from motionsep.hub import install_tiny
    from motionsep.store import Store

    store = Store(tmp_path_factory.mktemp("tiny_animatediff_store"))
    return install_tiny(store, name="tiny-animatediff").path


@pytest.fixture
def tiny_animatediff_unet(tiny_animatediff_dir: Path):
    """A fresh copy of the tiny AnimateDiff UNetMotionModel in fp32 on the CPU, frozen."""
    from motionsep.model.components import load_unet

    return load_unet(tiny_animatediff_dir)


@pytest.fixture
def tiny_unet(tiny_model_dir: Path):
    """A fresh copy of the tiny U-Net in fp32 on the CPU, frozen, in eval mode."""
    from motionsep.model.components import load_unet

    return load_unet(tiny_model_dir)


@pytest.fixture(scope="session")
def clips_dir() -> Path:
    """The real reference clips of ../shared/clips (skips when absent)."""
    if not SHARED_CLIPS.is_dir():
        pytest.skip(f"reference clips not found at {SHARED_CLIPS}")
    return SHARED_CLIPS
