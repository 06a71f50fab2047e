"""Prepare throughput beside plain PyAV decoding of the same clips.

Decodes the reference clips with PyAV alone (every frame, RGB), then runs
``prepare`` on them cold (decode + resize + VAE encode + cache write, with the
tiny model) and warm (a cache hit), and prints frames per second::

    python bench/prepare.py [--clips ../shared/clips] [--size 384] [--frames 16] [--repeat 3]

The model is the tiny one built into a temporary store, so the VAE share is
small: the numbers show the data path's overhead over decoding, not a
ZeroScope VAE's speed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import av

from motionsep.config import load_settings
from motionsep.data import prepare
from motionsep.hub import install_tiny
from motionsep.store import Store
from motionsep.video import find_videos


def plain_decode(paths: list[Path], frames: int) -> int:
    decoded = 0
    for path in paths:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                frame.to_ndarray(format="rgb24")
                decoded += 1
                if index + 1 >= frames:
                    break
    return decoded


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=Path, default=root.parent / "shared" / "clips")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    clips = find_videos([args.clips])

    rows = []
    best = min(_timed(lambda: plain_decode(clips, args.frames)) for _ in range(args.repeat))
    total_frames = len(clips) * args.frames
    rows.append(("PyAV decode only", best, total_frames))

    cold, warm = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as home:
            store = Store(Path(home))
            model = install_tiny(store).path
            settings = load_settings(
                set_options=[
                    f"model.name={model}",
                    f"data.width={args.size}",
                    f"data.height={args.size}",
                    f"data.frames={args.frames}",
                    "model.device=cpu",
                ]
            )
            cold.append(_timed(lambda s=settings, st=store: prepare([args.clips], s, st)))
            warm.append(_timed(lambda s=settings, st=store: prepare([args.clips], s, st)))
    rows.append(("prepare, cold (tiny VAE)", min(cold), total_frames))
    rows.append(("prepare, cache hit", min(warm), total_frames))

    print(
        f"{len(clips)} clips x {args.frames} frames, {args.size}x{args.size}, best of {args.repeat}"
    )
    print(f"{'what':<28} {'seconds':>9} {'frames/s':>10}")
    for label, seconds, frames in rows:
        print(f"{label:<28} {seconds:>9.3f} {frames / seconds:>10.1f}")


def _timed(work) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
