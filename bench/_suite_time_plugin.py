"""pytest plugin for bench/suite_time.py: wall, CPU and child-process CPU time of each test.

Loaded with ``-p _suite_time_plugin`` (``bench/`` on ``PYTHONPATH``); appends one
JSON line per test to the file named by ``SUITE_TIME_OUT``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    started, before = time.time(), os.times()
    yield
    after, ended = os.times(), time.time()
    row = {
        "test": item.nodeid,
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "start": started,
        "wall": ended - started,
        "cpu": (after.user - before.user) + (after.system - before.system),
        "child_cpu": (after.children_user - before.children_user)
        + (after.children_system - before.children_system),
    }
    with Path(os.environ["SUITE_TIME_OUT"]).open("a") as out:
        out.write(json.dumps(row) + "\n")
