"""Where the default test suite's time goes: per test, per file, per worker.

Runs ``python -m pytest`` (the README's test command; extra arguments are passed
on) with a plugin that records each test's wall time, its CPU time in the
worker and the CPU time of the processes it started and waited for. Prints
the totals (how much of the test time was CPU work, how much waiting), the
time per file and per worker and the slowest tests, and writes
``bench/results/suite_time-cpu.json`` with the machine, library versions and
commit::

    python bench/suite_time.py [--top 15] [-- PYTEST ARGS]

With ``--py-spy`` the run is also sampled by py-spy (``pip install py-spy``;
every process the tests start included, which slows the run by about a
fifth) and the table adds the share of all samples spent in processes the
tests started, in ``load_components`` and in building the AnimateDiff
config. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench_common import RESULTS, environment

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# where py-spy samples are counted: a frame whose text contains the key
FRAMES = {
    "load_components": "load_components (",
    "building the AnimateDiff config": "unet_config (",
}


def _py_spy_shares(raw: Path) -> dict[str, float]:
    """Shares of all samples: in started processes, and under each of FRAMES."""
    total, started = 0, 0
    under: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        # frames[0] is pytest's process, then each xdist worker; a deeper
        # "process N:" frame is a process a test started
        if sum(frame.startswith("process ") for frame in frames) > 2:
            started += samples
        for name, key in FRAMES.items():
            if any(key in frame for frame in frames):
                under[name] += samples
    shares = {"processes the tests started": started / total}
    shares.update({name: under[name] / total for name in FRAMES})
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--top", type=int, default=15, help="slowest tests to list")
    parser.add_argument("--py-spy", action="store_true", help="also sample with py-spy")
    parser.add_argument("--out", type=Path, default=RESULTS / "suite_time-cpu.json")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rows_file, raw = Path(tmp) / "rows.jsonl", Path(tmp) / "suite.raw"
        env = dict(os.environ, SUITE_TIME_OUT=str(rows_file))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH), env.get("PYTHONPATH")]))
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "_suite_time_plugin"]
        pytest += ["-p", "no:cacheprovider", *args.pytest_args]
        spy = ["py-spy", "record", "--subprocesses", "-r", "40", "-f", "raw", "-o", str(raw)]
        command = [*spy, "--", *pytest] if args.py_spy else pytest
        started = time.monotonic()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.monotonic() - started
        summary = re.findall(r"\d+ passed[^\n]*", done.stdout)
        if done.returncode != 0:
            sys.exit(f"pytest failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
        shares = _py_spy_shares(raw) if args.py_spy else None

    test_wall = sum(r["wall"] for r in rows)
    cpu = sum(r["cpu"] for r in rows)
    child = sum(r["child_cpu"] for r in rows)
    per_file: dict[str, float] = defaultdict(float)
    per_worker: dict[str, float] = defaultdict(float)
    for r in rows:
        per_file[r["test"].split("::")[0]] += r["wall"]
        per_worker[r["worker"]] += r["wall"]
    record: dict[str, Any] = {
        "environment": environment(),
        "command": ["python", *pytest[1:]],
        "py_spy": args.py_spy,
        "pytest_summary": summary[-1] if summary else None,
        "run_seconds": round(wall, 1),
        "tests": len(rows),
        "test_seconds": round(test_wall, 1),
        "cpu_seconds": round(cpu, 1),
        "child_cpu_seconds": round(child, 1),
        "idle_seconds": round(test_wall - cpu - child, 1),
        "per_worker": {k: round(v, 1) for k, v in sorted(per_worker.items())},
        "per_file": {k: round(v, 1) for k, v in sorted(per_file.items(), key=lambda x: -x[1])},
        "slowest": [
            {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "start"}
            for r in sorted(rows, key=lambda r: -r["wall"])[: args.top]
        ],
        "sample_shares": shares,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")

    print(f"{record['pytest_summary']}; whole command {wall:.0f} s")
    print("| measure | seconds | share of test time |")
    print("|---|---|---|")
    for name, value in (("test time (sum over tests)", test_wall), ("CPU in the workers", cpu),
                        ("CPU of processes the tests started", child),
                        ("neither (waiting)", test_wall - cpu - child)):  # fmt: skip
        print(f"| {name} | {value:.1f} | {100 * value / test_wall:.0f} % |")
    print("\nper worker: " + ", ".join(f"{k} {v:.0f} s" for k, v in record["per_worker"].items()))
    print("\n| file | seconds |\n|---|---|")
    for name, value in list(record["per_file"].items())[:10]:
        print(f"| {name} | {value:.1f} |")
    print(f"\nslowest {args.top}:")
    for r in record["slowest"]:
        print(
            f"  {r['wall']:6.2f} s  (cpu {r['cpu']:.1f}, child {r['child_cpu']:.1f})  {r['test']}"
        )
    if shares:
        print("\n| py-spy samples in | share |\n|---|---|")
        for name, value in shares.items():
            print(f"| {name} | {100 * value:.1f} % |")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
