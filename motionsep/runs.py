"""Resumable runs: the run folder, its checkpoints, and the state a resume needs.

Motion training (``train``) and toy pretraining (``toy pretrain``) share this:

- a checkpoint is ``RUN/checkpoints/step-N/``: safetensors tensor files plus
  ``state.json``, written through :func:`motionsep.store.atomic_folder`, with
  ``state.json`` last and the sha256 of every tensor file in it, so a folder
  without a readable ``state.json`` is incomplete and one whose files no
  longer match is damaged. ``state.json`` also carries the sha256 of its own
  content (:func:`state_digest`), and its step must be the folder's ``N``: a
  state edited by hand (its step, say) is damaged too;
- only the newest :data:`KEEP_CHECKPOINTS` are kept;
- optimizer and RNG state become tensors plus JSON (no pickles);
- the first Ctrl-C asks the loop to checkpoint and stop
  (:class:`InterruptFlag`); :class:`TrainingInterruptedError` then carries
  the resume command and exit code 130.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from motionsep.errors import MotionsepError
from motionsep.store import atomic_folder, file_sha256

if TYPE_CHECKING:
    import torch

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "state.json"
STATE_DIGEST_KEY = "state_sha256"
KEEP_CHECKPOINTS = 2


class TrainingInterruptedError(MotionsepError):
    """Training stopped on request (Ctrl-C) after writing a checkpoint."""

    exit_code = 130


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Every complete checkpoint of a run (one with its ``state.json``), oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        number = path.name[len(CHECKPOINT_PREFIX) :]
        complete = (path / STATE_FILE).is_file()
        if path.name.startswith(CHECKPOINT_PREFIX) and number.isdigit() and complete:
            found.append((int(number), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    keep: int = KEEP_CHECKPOINTS,
) -> Path:
    """Writes checkpoint ``step`` atomically and prunes all but the newest ``keep``.

    Args:
        run_dir: The run folder.
        step: The step the checkpoint ends.
        tensors: File name -> the tensors to save in it (safetensors).
        state: JSON-ready state; ``step``, ``files`` (the sha256 of each
            tensor file) and the state's own digest are added to it.
        keep: How many checkpoints to keep.

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_file

    target = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    with atomic_folder(target, overwrite=True) as tmp:
        for name, values in tensors.items():
            save_file(values, str(tmp / name))
        record = {**state, "step": step, "files": {n: file_sha256(tmp / n) for n in tensors}}
        # the digest of what a reader gets back (JSON turns tuples and int keys into lists, str)
        record = json.loads(json.dumps(record))
        record[STATE_DIGEST_KEY] = state_digest(record)
        # state.json last: a checkpoint without it is incomplete and ignored
        (tmp / STATE_FILE).write_text(json.dumps(record))
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def state_digest(record: dict[str, Any]) -> str:
    """The sha256 of a checkpoint state's content, without its own digest entry.

    Computed over canonical JSON (sorted keys), so it does not depend on how
    the file is laid out, only on what it says.
    """
    content = {key: value for key, value in record.items() if key != STATE_DIGEST_KEY}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read_state(path: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint folder."""
    state: dict[str, Any] = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    return state


def checkpoint_problem(path: Path, tensor_files: tuple[str, ...]) -> str | None:
    """What is wrong with a checkpoint folder, or None when it is intact.

    Intact means: ``state.json`` readable, unchanged since it was written
    (its digest matches; checkpoints of older versions have none), and its
    step the folder's; every one of
    ``tensor_files`` present, matching the sha256 recorded when it was
    written (checkpoints of older versions have no record and are read
    instead), readable, and every floating-point tensor in it finite.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = read_state(path)
        step = state["step"]
        recorded = dict(state.get("files", {}))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{STATE_FILE} is unreadable ({exc})"
    digest = state.get(STATE_DIGEST_KEY)
    if digest is not None and digest != state_digest(state):
        return f"{STATE_FILE} was changed after it was written (its sha256 does not match)"
    folder_step = path.name.removeprefix(CHECKPOINT_PREFIX)
    if isinstance(step, bool) or not isinstance(step, int) or str(step) != folder_step:
        return f"{STATE_FILE} says step {str(step)[:40]} but the folder is {path.name}"
    for name in tensor_files:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if name in recorded and file_sha256(file) != recorded[name]:
            return f"{name} does not match the sha256 recorded when it was written"
    for name in tensor_files:
        try:
            tensors = load_file(path / name)
        except (SafetensorError, OSError, ValueError) as exc:
            return f"{name} is unreadable ({exc})"
        if any(t.is_floating_point() and not bool(t.isfinite().all()) for t in tensors.values()):
            return f"{name} holds NaN or infinite values"
    return None


def intact_checkpoint(
    run_dir: Path, tensor_files: tuple[str, ...], log: Callable[[str], None] | None = None
) -> tuple[int, Path] | None:
    """The newest checkpoint of a run that :func:`checkpoint_problem` finds intact.

    Each damaged newer checkpoint is passed over and reported to ``log``.
    """
    for step, path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path, tensor_files)
        if problem is None:
            return step, path
        if log is not None:
            log(f"checkpoint {path.name} is damaged ({problem}); trying an older one")
    return None


# ---------------------------------------------------------------------------
# optimizer and RNG state as tensors plus JSON


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's ``state_dict()`` as safetensors-ready tensors plus JSON."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_optimizer`: a ``state_dict()`` to load."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_states() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The torch (CPU and CUDA), Python and NumPy global RNG states, as tensors plus JSON."""
    import random

    import numpy as np
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    py_state = random.getstate()
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    meta = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Sets the global RNG states :func:`rng_states` saved."""
    import random

    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    version, values, gauss = meta["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


# ---------------------------------------------------------------------------
# Ctrl-C


class InterruptFlag:
    """Turns the first Ctrl-C into a request to checkpoint and stop; a second stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handles SIGINT inside the block (only on the main thread; elsewhere a no-op)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
