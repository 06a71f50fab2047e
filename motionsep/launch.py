"""Running one command as several processes: the relaunch and each process's share.

``train``, ``generate`` and ``evaluate --ablation`` take ``--num-processes N``:
the command starts itself again under ``torch.distributed.run`` with N
processes (or is started by ``accelerate launch`` / ``torchrun`` directly),
and each process finds its place with :func:`current_shard`. Training splits
batches (accelerate); generation splits whole batches of videos, so every
video is denoised with the same batch mates as in one process and written by
exactly one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def in_distributed_run() -> bool:
    """Whether this process was started by torchrun, ``accelerate launch`` or a relaunch."""
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that prints and writes shared files."""
    return os.environ.get("RANK", "0") == "0"


def relaunch(processes: int, argv: Sequence[str] | None = None) -> int:
    """Runs this same command (``argv``, default ``sys.argv[1:]``) as N processes; their status.

    Each process gets one CPU thread unless ``OMP_NUM_THREADS`` says otherwise.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "motionsep_cli",
        *(sys.argv[1:] if argv is None else argv),
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(command, env=env)


@dataclass
class Shard:
    """This process's share of a list of work: items ``index % count == rank``.

    Attributes:
        rank: This process's index.
        count: How many processes share the work.
        state: accelerate's process state (None in a single process).
    """

    rank: int = 0
    count: int = 1
    state: Any = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, index: int) -> bool:
        """Whether work item ``index`` is this process's."""
        return index % self.count == self.rank

    def take(self, items: Sequence[T]) -> list[T]:
        """This process's items of ``items``, in order."""
        return [item for index, item in enumerate(items) if self.mine(index)]

    def barrier(self) -> None:
        """Waits until every process gets here (nothing to wait for in a single process)."""
        if self.state is not None:
            self.state.wait_for_everyone()


SINGLE = Shard()
"""The share of a process that works alone."""


def current_shard(device_type: str = "cpu") -> Shard:
    """This process's share: the whole work alone, else its rank among the launched processes.

    Args:
        device_type: ``cpu`` or ``cuda`` (which backend the processes talk over).
    """
    if not in_distributed_run() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return SINGLE
    from accelerate import PartialState

    state = PartialState(cpu=device_type == "cpu")
    return Shard(state.process_index, state.num_processes, state)
