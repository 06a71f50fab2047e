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

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SHUTDOWN_GRACE = 45.0
"""Seconds a launcher may take to stop its workers after a signal (torchrun waits 30)."""
_LINUX = sys.platform.startswith("linux")
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_POLL_SECONDS = 0.2


def in_distributed_run() -> bool:
    """Whether this process was started by torchrun, ``accelerate launch`` or a relaunch."""
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that prints and writes shared files."""
    return os.environ.get("RANK", "0") == "0"


def relaunch(processes: int, argv: Sequence[str] | None = None) -> int:
    """Runs this same command (``argv``, default ``sys.argv[1:]``) as N processes; their status.

    Each process gets one CPU thread unless ``OMP_NUM_THREADS`` says otherwise.
    The processes are supervised (see :func:`run_supervised`): a Ctrl-C or
    SIGTERM to this process stops every one of them.
    """
    args = sys.argv[1:] if argv is None else argv
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return run_supervised(torchrun_command(processes, ["-m", "motionsep_cli", *args]), env)


def torchrun_command(processes: int, program: Sequence[str]) -> list[str]:
    """The ``torch.distributed.run`` command line that starts ``program`` N times.

    It runs torchrun through this module (:func:`_launcher`), which ends
    quietly when a signal stops the run.
    """
    return [
        sys.executable,
        "-m",
        __name__,
        "--standalone",
        f"--nproc_per_node={processes}",
        *program,
    ]


def _launcher(argv: list[str]) -> int:
    """torchrun with ``argv``; a signal that stops it is an exit status, not a traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main

    try:
        main(argv)
    except SignalException as exc:
        # torchrun has stopped its workers; skip the interpreter's teardown, which
        # waits seconds on the rendezvous store's threads
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + int(exc.sigval))
    return 0


def run_supervised(
    command: Sequence[str], env: dict[str, str] | None = None, grace: float = SHUTDOWN_GRACE
) -> int:
    """Runs a launcher (torchrun) so that no process of it outlives this one.

    The launcher runs in a session of its own, so a terminal's Ctrl-C reaches
    it only through here, once: the first SIGINT or SIGTERM this process gets
    is passed on to the launcher, which passes it to its workers and waits
    for them (they stop and keep what they finished, see
    :func:`bind_worker_to_launcher`). A launcher still running ``grace``
    seconds later is killed, with its whole session. On Linux the launcher is
    also tied to this process's life (``PR_SET_PDEATHSIG``): if this process
    is killed outright, the launcher gets SIGTERM and stops its workers.

    Returns:
        The launcher's exit status; ``128 + signal`` when a signal stopped the run.
    """
    parent, prctl = os.getpid(), _prctl()  # libc is looked up here, not in the forked child
    child = subprocess.Popen(
        list(command),
        env=env,
        start_new_session=True,
        preexec_fn=None if prctl is None else lambda: _die_with(parent, prctl),
    )
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        if not received:  # one signal is enough; a second could cut the launcher's shutdown
            child.send_signal(signum)
        received.append(signum)

    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = (
        {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS} if on_main_thread else {}
    )
    deadline = None
    try:
        while True:
            try:
                status = child.wait(timeout=_POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                if received and deadline is None:
                    deadline = time.monotonic() + grace
                if deadline is not None and time.monotonic() > deadline:
                    _kill_session(child.pid)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # an error here: never leave the launcher behind
            _kill_session(child.pid)
            child.wait()
    return 128 + received[0] if received else status


def _kill_session(leader: int) -> None:
    """SIGKILL to every process of the session (and process group) ``leader`` started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader, signal.SIGKILL)


def bind_worker_to_launcher() -> None:
    """Makes this launched worker stop cleanly on SIGTERM and whenever its launcher dies.

    SIGTERM then does what SIGINT does (a ``KeyboardInterrupt``, or whatever
    handler the command installed for SIGINT, such as training's
    checkpoint-and-stop), so a worker stopped by its launcher keeps the files
    it finished. On Linux the worker also gets SIGTERM when the launcher dies
    (``PR_SET_PDEATHSIG``); elsewhere a thread watches the parent's pid.
    Call it once, early, in each launched process.
    """
    signal.signal(signal.SIGTERM, _as_sigint)
    launcher, prctl = os.getppid(), _prctl()
    if prctl is not None:
        _die_with(launcher, prctl)
    else:
        threading.Thread(target=_watch_parent, args=(launcher,), daemon=True).start()


def _as_sigint(signum: int, frame: Any) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def _prctl() -> Any:
    """libc's ``prctl`` on Linux, else None."""
    return ctypes.CDLL(None, use_errno=True).prctl if _LINUX else None


def _die_with(parent: int, prctl: Any) -> None:
    """SIGTERM to this process when the thread that started it (``parent``) ends.

    If the parent is gone already (it died before this ran), stop now.
    """
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


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


if __name__ == "__main__":
    sys.exit(_launcher(sys.argv[1:]))
