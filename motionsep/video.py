"""Video in and out: probe, sample, decode, resize, and write mp4/gif/png.

Decoding goes through PyAV; decord is used instead when it is installed and
``backend="auto"`` (it is an optional extra and is not exercised by the test
suite). Frames are always returned upright: the display matrix (or the older
``rotate`` tag) is applied, so a phone clip recorded in portrait comes out
taller than wide.

Frame indices count decoded frames in presentation order, starting at 0.
:func:`probe` counts frames by reading the container's packets without
decoding them (only the first frame is decoded, to check the stream and read
its rotation), so probing a long clip is cheap.

Tests and caches can see how often files were decoded through
:func:`decode_stats`.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import os
import statistics
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import av
import numpy as np

from motionsep.errors import MotionsepError, UsageError, VideoError
from motionsep.store import atomic_folder

if TYPE_CHECKING:
    import torch

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif"})
"""File name endings that :func:`find_videos` picks up inside folders."""

WRITE_FORMATS = ("mp4", "gif", "png")
"""Formats :func:`write_video` writes."""

BUCKET_ASPECTS: tuple[float, ...] = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)
"""Width/height ratios of the aspect buckets (``crop="bucket"``), besides the target's own."""

MP4_CRF = 17
"""x264 constant rate factor of written mp4s: visually lossless, not bit-exact."""

Backend = Literal["auto", "pyav", "decord"]
Crop = Literal["center", "bucket"]

_VIDEO_HINT = "give a video file (" + ", ".join(sorted(VIDEO_SUFFIXES)) + ")"
_CORRUPT_HINT = "re-export or re-download the clip; the file itself is damaged"

# Container signatures, to tell a damaged video from a file that never was one.
_SIGNATURES: tuple[tuple[int, bytes], ...] = (
    (4, b"ftyp"),  # mp4, mov
    (4, b"moov"),
    (4, b"mdat"),
    (4, b"wide"),
    (4, b"free"),
    (0, b"\x1a\x45\xdf\xa3"),  # matroska, webm
    (0, b"RIFF"),  # avi
    (0, b"GIF8"),
)


# ---------------------------------------------------------------------------
# decode statistics


@dataclass(frozen=True)
class DecodeStats:
    """How much decoding happened since the process started (or the last reset).

    Attributes:
        probes: Calls of :func:`probe` that opened a file.
        decodes: Files opened to decode frames (one per :func:`read_frames` or
            :func:`load_clip` call); probing is not counted here.
        frames: Frames decoded by those calls, skipped ones included.
        per_file: ``decodes`` per file, keyed by the resolved path as a string.
    """

    probes: int = 0
    decodes: int = 0
    frames: int = 0
    per_file: dict[str, int] = field(default_factory=dict)


_stats_lock = threading.Lock()
_probes = 0
_decodes = 0
_frames_decoded = 0
_per_file: Counter[str] = Counter()


def decode_stats() -> DecodeStats:
    """A snapshot of the decode counters.

    A cache test can assert that a second run decodes nothing::

        before = decode_stats().decodes
        prepare(...)
        assert decode_stats().decodes == before
    """
    with _stats_lock:
        return DecodeStats(_probes, _decodes, _frames_decoded, dict(_per_file))


def reset_decode_stats() -> None:
    """Sets every decode counter back to zero."""
    global _probes, _decodes, _frames_decoded
    with _stats_lock:
        _probes = _decodes = _frames_decoded = 0
        _per_file.clear()


def _count_probe() -> None:
    global _probes
    with _stats_lock:
        _probes += 1


def _count_decode(path: Path, frames: int) -> None:
    global _decodes, _frames_decoded
    with _stats_lock:
        _decodes += 1
        _frames_decoded += frames
        _per_file[str(path.resolve())] += 1


# ---------------------------------------------------------------------------
# probing


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` found out about a clip.

    Attributes:
        path: The file, as given.
        width: Width as displayed, i.e. after applying the rotation.
        height: Height as displayed, i.e. after applying the rotation.
        frame_count: Frames in the file, counted from its packets (frames the
            container marks as discarded, e.g. cut by an edit list, are not
            counted). Header counts are not trusted: webm/mkv lack them.
        fps: Average frame rate.
        duration_s: Duration of the video stream in seconds.
        rotation: Degrees (0, 90, 180 or 270) the stored frames are turned
            *clockwise* for display, the convention of the classic ``rotate``
            tag. Matrices that are not a multiple of 90 are rounded to one.
        codec: FFmpeg's name of the video codec, e.g. ``h264``.
        timestamps: Presentation time of every frame in seconds, counted
            from the first frame (so ``timestamps[0] == 0``); irregular for
            variable-frame-rate clips.
    """

    path: Path
    width: int
    height: int
    frame_count: int
    fps: float
    duration_s: float
    rotation: int
    codec: str
    timestamps: tuple[float, ...] = field(repr=False, default=())


def probe(path: str | Path) -> VideoInfo:
    """Reads a clip's size, frame count, frame rate, rotation and timestamps.

    Args:
        path: A video file.

    Returns:
        The clip's :class:`VideoInfo`.

    Raises:
        VideoError: naming the file, when it is missing or unreadable, is not
            a video, is corrupt or truncated, or has no frames.
    """
    path = Path(path)
    container = _open(path)
    _count_probe()
    try:
        stream = _video_stream(container, path)
        first = None
        packets = 0
        pts_values: list[int | None] = []
        durations: list[int] = []
        try:
            for packet in container.demux(stream):
                if packet.size > 0:
                    packets += 1
                    if not packet.is_discard:
                        pts_values.append(packet.pts if packet.pts is not None else packet.dts)
                        durations.append(packet.duration or 0)
                # The empty packet at the end flushes the decoder, which may
                # hold the first frame back until then.
                if first is None:
                    decoded = stream.decode(packet)
                    if decoded:
                        first = decoded[0]
        except av.FFmpegError as exc:
            raise VideoError(
                f"{path} is corrupt: FFmpeg cannot read it ({_ffmpeg_reason(exc)})",
                _CORRUPT_HINT,
                path=str(path),
            ) from exc

        declared = int(stream.frames or 0)
        if not pts_values:
            raise VideoError(
                f"{path} has a video stream with zero frames",
                f"{_VIDEO_HINT} that holds at least one frame",
                path=str(path),
            )
        if declared and packets < declared:
            raise VideoError(
                f"{path} is truncated or corrupt: its header declares {declared} frames "
                f"but only {packets} are in the file",
                _CORRUPT_HINT,
                path=str(path),
            )
        if first is None:
            raise VideoError(
                f"{path} is corrupt: none of its {packets} frames can be decoded",
                _CORRUPT_HINT,
                path=str(path),
            )

        rotation = _rotation_cw(first, stream)
        stored_w, stored_h = int(first.width), int(first.height)
        width, height = (stored_h, stored_w) if rotation in (90, 270) else (stored_w, stored_h)
        time_base = stream.time_base or Fraction(1, 1)
        fps = _average_fps(stream, len(pts_values), pts_values, time_base)
        timestamps = _timestamps(pts_values, time_base, fps)
        duration = _duration(stream, container, timestamps, durations, time_base, fps)
        return VideoInfo(
            path=path,
            width=width,
            height=height,
            frame_count=len(pts_values),
            fps=fps,
            duration_s=duration,
            rotation=rotation,
            codec=str(stream.codec_context.name),
            timestamps=timestamps,
        )
    finally:
        container.close()


def _open(path: Path) -> Any:
    """Opens a file for demuxing or raises a VideoError that says why not."""
    if not path.exists():
        raise VideoError(
            f"video not found: {path}", "check the path and the working directory", path=str(path)
        )
    if path.is_dir():
        raise VideoError(
            f"{path} is a folder, not a video file",
            f"{_VIDEO_HINT}, or pass the folder where a command accepts folders of clips",
            path=str(path),
        )
    try:
        return av.open(str(path), "r")
    except PermissionError as exc:
        raise VideoError(
            f"cannot read {path}: permission denied", "check the file's permissions", path=str(path)
        ) from exc
    except OSError as exc:
        # av's FileNotFoundError and friends derive from OSError as well as FFmpegError.
        if not isinstance(exc, av.FFmpegError):
            raise VideoError(f"cannot read {path}: {exc}", path=str(path)) from exc
        raise _unreadable(path, exc) from exc
    except av.FFmpegError as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: Exception) -> VideoError:
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError:
        head = b""
    if not head:
        return VideoError(f"{path} is empty (0 bytes), not a video", _VIDEO_HINT, path=str(path))
    if any(head[offset : offset + len(sig)] == sig for offset, sig in _SIGNATURES):
        return VideoError(
            f"{path} is corrupt or truncated: FFmpeg cannot read it ({_ffmpeg_reason(exc)})",
            _CORRUPT_HINT,
            path=str(path),
        )
    return VideoError(
        f"{path} is not a video FFmpeg recognises (or it is damaged beyond recognition)",
        _VIDEO_HINT,
        path=str(path),
    )


def _ffmpeg_reason(exc: Exception) -> str:
    return str(getattr(exc, "strerror", None) or exc)


def _video_stream(container: Any, path: Path) -> Any:
    if container.streams.video:
        return container.streams.video[0]
    if _mp4_index_missing(path):
        # FFmpeg opens such a file without complaint and simply finds no streams.
        raise VideoError(
            f"{path} is truncated: its index (the moov box) is missing or cut off, so the "
            "recording or download was probably interrupted",
            _CORRUPT_HINT,
            path=str(path),
        )
    if not container.streams:
        # The mp4 muxer drops a track that received no frames.
        raise VideoError(
            f"{path} holds no frames: it has no stream at all (written with zero frames?)",
            f"{_VIDEO_HINT} that holds at least one frame",
            path=str(path),
        )
    kinds = sorted({str(stream.type) for stream in container.streams})
    raise VideoError(
        f"{path} has no video stream, only {', '.join(kinds)}", _VIDEO_HINT, path=str(path)
    )


def _mp4_index_missing(path: Path) -> bool:
    """True for an mp4/mov file whose moov (or moof) index is absent or cut off."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        if handle.read(8)[4:8] != b"ftyp":
            return False
        offset = 0
        while offset + 8 <= size:
            handle.seek(offset)
            header = handle.read(16)
            box_size, kind = struct.unpack(">I4s", header[:8])
            if box_size == 1 and len(header) == 16:
                box_size = struct.unpack(">Q", header[8:16])[0]
            if kind in (b"moov", b"moof"):
                return box_size != 0 and offset + box_size > size  # 0: up to the end
            if box_size < 8:
                break
            offset += box_size
    return True


def _rotation_cw(frame: Any, stream: Any) -> int:
    """Clockwise display rotation from the frame's display matrix, else the rotate tag."""
    # PyAV reports the display matrix counter-clockwise.
    degrees = -float(frame.rotation or 0)
    if not degrees:
        tag = (stream.metadata or {}).get("rotate")
        try:
            degrees = float(tag) if tag is not None else 0.0
        except ValueError:
            degrees = 0.0
    return round(degrees / 90.0) % 4 * 90


def _average_fps(
    stream: Any, count: int, pts_values: Sequence[int | None], time_base: Fraction
) -> float:
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate:
            return float(rate)
    known = [p for p in pts_values if p is not None]
    if count > 1 and len(known) == count and max(known) > min(known):
        return (count - 1) / float((max(known) - min(known)) * time_base)
    return 25.0  # FFmpeg's own fallback rate when nothing says otherwise


def _timestamps(
    pts_values: Sequence[int | None], time_base: Fraction, fps: float
) -> tuple[float, ...]:
    if any(p is None for p in pts_values) or len(set(pts_values)) != len(pts_values):
        # Without usable timestamps (raw streams, some AVIs) assume a constant rate.
        return tuple(i / fps for i in range(len(pts_values)))
    ordered = sorted(p for p in pts_values if p is not None)
    return tuple(float((p - ordered[0]) * time_base) for p in ordered)


def _duration(
    stream: Any,
    container: Any,
    timestamps: Sequence[float],
    durations: Sequence[int],
    time_base: Fraction,
    fps: float,
) -> float:
    if stream.duration:
        return float(stream.duration * time_base)
    if container.duration:
        return float(container.duration) / av.time_base
    last = float(durations[-1] * time_base) if durations and durations[-1] else 1.0 / fps
    return timestamps[-1] + last


# ---------------------------------------------------------------------------
# sampling


def sample_indices(
    info_or_timestamps: VideoInfo | Sequence[float],
    frames: int,
    frame_step: int = 1,
    fps: float | None = None,
) -> list[int]:
    """Chooses which decoded frames of a clip to use.

    Without ``fps``: ``frames`` frames, every ``frame_step``-th from the first.
    With ``fps``: one frame per ``1/fps`` seconds from the first frame, each
    the frame whose real presentation time is nearest (earlier on a tie), so
    variable-frame-rate clips are sampled evenly in time. A target rate above
    the clip's repeats frames.

    Args:
        info_or_timestamps: The clip's :class:`VideoInfo`, or the presentation
            times of its frames in seconds (in presentation order).
        frames: How many frames to take (``data.frames``).
        frame_step: Take every N-th frame (``data.frame_step``).
        fps: Target frame rate (``data.fps``); excludes ``frame_step``.

    Returns:
        ``frames`` indices, non-decreasing.

    Raises:
        VideoError: when the clip is too short, saying how many frames (or
            seconds) it has, how many are needed and which setting to change.
        UsageError: for a non-positive ``frames``, ``frame_step`` or ``fps``,
            or ``fps`` together with a ``frame_step`` other than 1.
    """
    if isinstance(info_or_timestamps, VideoInfo):
        info: VideoInfo | None = info_or_timestamps
        timestamps: Sequence[float] = info_or_timestamps.timestamps
        name = str(info_or_timestamps.path)
    else:
        info = None
        timestamps = list(info_or_timestamps)
        name = "the clip"
    count = len(timestamps)
    if frames < 1:
        raise UsageError(f"data.frames must be at least 1, got {frames}")
    if frame_step < 1:
        raise UsageError(f"data.frame_step must be at least 1, got {frame_step}")
    if fps is not None and fps <= 0:
        raise UsageError(f"data.fps must be positive, got {fps}")
    if fps is not None and frame_step != 1:
        raise UsageError("data.fps and data.frame_step exclude each other: set only one")

    if fps is None:
        needed = (frames - 1) * frame_step + 1
        if count < needed:
            raise VideoError(
                f"{name} has {count} frames; data.frames={frames} with "
                f"data.frame_step={frame_step} needs {needed}",
                "lower data.frames or data.frame_step, or use a longer clip",
                path=name if info else None,
            )
        return [i * frame_step for i in range(frames)]

    if count == 0:
        raise VideoError(f"{name} has no frames", _VIDEO_HINT, path=name if info else None)
    start = timestamps[0]
    relative = [t - start for t in timestamps]
    intervals = [b - a for a, b in itertools.pairwise(relative) if b > a]
    # The last frame stays on screen for about one typical frame interval.
    if intervals:
        frame_time = statistics.median(intervals)
    else:
        frame_time = 1.0 / info.fps if info and info.fps else 1.0 / fps
    span = relative[-1] + frame_time
    last_target = (frames - 1) / fps
    if last_target >= span - 1e-9:
        raise VideoError(
            f"{name} lasts {span:.3g} s ({count} frames); data.frames={frames} at "
            f"data.fps={fps:g} needs more than {last_target:.3g} s",
            "lower data.frames, raise data.fps, or use a longer clip",
            path=name if info else None,
        )
    indices = []
    for k in range(frames):
        target = k / fps
        right = bisect.bisect_left(relative, target)
        if right >= count:
            indices.append(count - 1)
        elif right == 0 or relative[right] - target < target - relative[right - 1]:
            indices.append(right)
        else:
            indices.append(right - 1)
    return indices


# ---------------------------------------------------------------------------
# decoding


def read_frames(
    path: str | Path,
    indices: Sequence[int] | None = None,
    backend: Backend = "auto",
) -> np.ndarray:
    """Decodes frames of a clip, upright, as RGB.

    PyAV decodes from the start and stops after the last frame asked for.

    Args:
        path: A video file.
        indices: Decoded-frame indices to return, in the order given
            (repeats allowed); None for every frame.
        backend: ``pyav``, ``decord`` (needs the optional extra), or
            ``auto``: decord when it is installed, PyAV otherwise.

    Returns:
        A ``uint8`` array of shape ``(F, H, W, 3)``, with H and W as displayed.

    Raises:
        VideoError: naming the file, when it cannot be opened or decoded, or
            has fewer frames than an index asks for.
        UsageError: for an unknown backend, a negative index, or ``decord``
            when it is not installed.
    """
    path = Path(path)
    chosen = _choose_backend(backend)
    if indices is not None:
        indices = [int(i) for i in indices]
        if any(i < 0 for i in indices):
            raise UsageError(f"frame indices must not be negative, got {min(indices)}")
        if not indices:
            raise UsageError("read_frames needs at least one frame index (or None for all)")
    if chosen == "decord":
        return _read_decord(path, indices)
    return _read_pyav(path, indices)


def _choose_backend(backend: str) -> str:
    if backend not in ("auto", "pyav", "decord"):
        raise UsageError(f"unknown video backend {backend!r}", "use auto, pyav or decord")
    if backend == "pyav":
        return "pyav"
    try:
        import decord  # noqa: F401
    except ImportError as exc:
        if backend == "decord":
            raise UsageError(
                "the decord backend is not installed", "pip install 'motionsep[decord]'"
            ) from exc
        return "pyav"
    return "decord"


def _read_pyav(path: Path, indices: list[int] | None) -> np.ndarray:
    container = _open(path)
    wanted = None if indices is None else set(indices)
    last = None if indices is None else max(indices)
    kept: dict[int, np.ndarray] = {}
    seen = 0
    packets = [0]
    try:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        declared = int(stream.frames or 0)
        try:
            for frame in _decoded(container, stream, packets):
                if wanted is None or seen in wanted:
                    kept[seen] = _upright(
                        frame.to_ndarray(format="rgb24"), _rotation_cw(frame, stream)
                    )
                seen += 1
                if last is not None and seen > last:
                    break
        except av.FFmpegError as exc:
            if last is None or seen <= last:
                raise VideoError(
                    f"{path} is corrupt: decoding failed after frame {seen} "
                    f"({_ffmpeg_reason(exc)})",
                    _CORRUPT_HINT,
                    path=str(path),
                ) from exc
    finally:
        container.close()
        _count_decode(path, seen)
    if seen == 0:
        raise VideoError(f"{path} has a video stream with zero frames", _VIDEO_HINT, path=str(path))
    if last is None and declared and packets[0] < declared:
        # The decoder conceals a cut-off last frame instead of failing, so
        # compare with the header as probe() does.
        raise VideoError(
            f"{path} is truncated or corrupt: its header declares {declared} frames "
            f"but only {packets[0]} are in the file",
            _CORRUPT_HINT,
            path=str(path),
        )
    if last is not None and seen <= last:
        raise VideoError(
            f"{path} has {seen} frames, but frame {last} was asked for",
            "sample fewer frames (data.frames, data.frame_step, data.fps) or use a longer clip",
            path=str(path),
        )
    order = range(seen) if indices is None else indices
    return np.stack([kept[i] for i in order])


def _decoded(container: Any, stream: Any, packets: list[int]) -> Iterator[Any]:
    """Frames in presentation order; counts the stream's non-empty packets into ``packets[0]``."""
    for packet in container.demux(stream):
        if packet.size:
            packets[0] += 1
        # The empty packet at the end flushes the frames the decoder holds back.
        yield from stream.decode(packet)


def _read_decord(path: Path, indices: list[int] | None) -> np.ndarray:  # pragma: no cover
    # Not exercised by the tests: decord is an optional extra that is not installed here.
    import decord

    info = probe(path)
    if indices is not None and max(indices) >= info.frame_count:
        raise VideoError(
            f"{path} has {info.frame_count} frames, but frame {max(indices)} was asked for",
            "sample fewer frames (data.frames, data.frame_step, data.fps) or use a longer clip",
            path=str(path),
        )
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        chosen = list(range(len(reader))) if indices is None else indices
        batch = reader.get_batch(chosen).asnumpy()
    except decord.DECORDError as exc:
        raise VideoError(f"{path} is corrupt: {exc}", _CORRUPT_HINT, path=str(path)) from exc
    _count_decode(path, (max(chosen) + 1) if chosen else 0)
    # decord ignores rotation metadata.
    return np.stack([_upright(frame, info.rotation) for frame in batch])


def _upright(image: np.ndarray, rotation_cw: int) -> np.ndarray:
    if not rotation_cw:
        return image
    # np.rot90 turns counter-clockwise for positive k.
    return np.ascontiguousarray(np.rot90(image, k=-(rotation_cw // 90)))


# ---------------------------------------------------------------------------
# resizing


def bucket_size(src_width: int, src_height: int, width: int, height: int) -> tuple[int, int]:
    """The aspect bucket a clip of ``src_width x src_height`` goes into.

    Buckets keep roughly the pixel count of ``width x height``: for the
    target's own aspect ratio and each of :data:`BUCKET_ASPECTS`, the size
    ``sqrt(area * aspect) x sqrt(area / aspect)`` rounded to multiples of 8.
    The bucket whose aspect ratio is nearest the clip's (on a log scale) wins;
    the clip is then resized to cover it and center-cropped, which removes
    little.

    Returns:
        ``(width, height)`` of the bucket, both multiples of 8.
    """
    area = width * height
    aspects = (width / height, *BUCKET_ASPECTS)
    target = math.log(src_width / src_height)
    best = min(aspects, key=lambda aspect: abs(math.log(aspect) - target))
    if best == aspects[0]:
        return width, height
    return _round8(math.sqrt(area * best)), _round8(math.sqrt(area / best))


def _round8(value: float) -> int:
    return max(8, round(value / 8) * 8)


def resize_crop(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resizes frames to cover ``width x height`` keeping their aspect, then center-crops.

    Downscaling uses area averaging (anti-aliased); upscaling is bilinear.

    Args:
        frames: ``uint8`` array ``(F, H, W, 3)``.
        width: Output width.
        height: Output height.

    Returns:
        A ``uint8`` array ``(F, height, width, 3)``.
    """
    import cv2

    count, src_h, src_w = frames.shape[:3]
    if (src_w, src_h) == (width, height):
        return frames
    scale = max(width / src_w, height / src_h)
    new_w = max(width, round(src_w * scale))
    new_h = max(height, round(src_h * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    left = (new_w - width) // 2
    top = (new_h - height) // 2
    out = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        resized = cv2.resize(frames[i], (new_w, new_h), interpolation=interpolation)
        out[i] = resized[top : top + height, left : left + width]
    return out


def load_clip(
    path: str | Path,
    frames: int,
    frame_step: int = 1,
    fps: float | None = None,
    width: int = 384,
    height: int = 384,
    crop: Crop = "center",
    backend: Backend = "auto",
) -> torch.Tensor:
    """Probes, samples, decodes, resizes and crops a clip into model input.

    Args:
        path: A video file.
        frames: Frames to take (``data.frames``).
        frame_step: Take every N-th frame (``data.frame_step``).
        fps: Sample at this rate instead (``data.fps``).
        width: Output width, a multiple of 8 (``data.width``).
        height: Output height, a multiple of 8 (``data.height``).
        crop: ``center``: cover ``width x height`` and crop the middle;
            ``bucket``: keep the clip's aspect ratio in the nearest bucket of
            about the same pixel count (see :func:`bucket_size`), so the
            output size may differ from ``width x height``.
        backend: Decoder, as in :func:`read_frames`.

    Returns:
        A float32 tensor ``(F, 3, H, W)`` with values in [-1, 1].

    Raises:
        VideoError: as :func:`probe`, :func:`sample_indices` and :func:`read_frames`.
        UsageError: for a size that is not a positive multiple of 8 or an unknown crop.
    """
    import torch

    for name, value in (("data.width", width), ("data.height", height)):
        if value < 8 or value % 8:
            raise UsageError(f"{name} must be a positive multiple of 8, got {value}")
    if crop not in ("center", "bucket"):
        raise UsageError(f"unknown crop {crop!r}", "use center or bucket (data.crop)")
    info = probe(path)
    indices = sample_indices(info, frames, frame_step=frame_step, fps=fps)
    decoded = read_frames(path, indices, backend=backend)
    if crop == "bucket":
        width, height = bucket_size(decoded.shape[2], decoded.shape[1], width, height)
    fitted = resize_crop(decoded, width, height)
    tensor = torch.from_numpy(fitted).permute(0, 3, 1, 2).float()
    return (tensor / 127.5 - 1.0).contiguous()


# ---------------------------------------------------------------------------
# writing


def to_uint8_frames(
    frames: np.ndarray | torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)
) -> np.ndarray:
    """Turns frames into a ``uint8`` array ``(F, H, W, 3)``.

    Args:
        frames: ``uint8`` frames (numpy or torch), taken as they are, or float
            frames whose values span ``value_range``; shape ``(F, H, W, 3)``
            or ``(F, 3, H, W)``. Floats outside the range are clipped.
        value_range: The float values that mean black and white: ``(-1, 1)``
            for model output and :func:`load_clip`, ``(0, 1)`` for images.

    Raises:
        ValueError: for another shape or an integer type other than uint8.
        MotionsepError: when float frames hold NaN or infinite values.
    """
    if not isinstance(frames, np.ndarray):
        frames = frames.detach().cpu()
        if frames.is_floating_point():
            frames = frames.float()
        frames = frames.numpy()
    array = np.asarray(frames)
    if array.ndim != 4 or 3 not in (array.shape[1], array.shape[3]):
        raise ValueError(f"frames must have shape (F, H, W, 3) or (F, 3, H, W), got {array.shape}")
    if array.shape[3] != 3:
        array = array.transpose(0, 2, 3, 1)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"frames must be uint8 or floating point, got {array.dtype}")
    if not np.isfinite(array).all():
        raise MotionsepError(
            "frames to write contain NaN or infinite values",
            "the model produced invalid numbers; fp16 overflow is a common cause, "
            "try --set model.dtype=fp32",
        )
    low, high = value_range
    scaled = (array.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def write_video(
    frames: np.ndarray | torch.Tensor,
    path: str | Path,
    fps: float,
    format: str = "mp4",
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Writes frames as an H.264 mp4, a GIF, or a folder of PNGs, atomically.

    The result appears under ``path`` only when complete (temporary sibling,
    then rename); an existing file or folder there is replaced.

    - ``mp4``: H.264 (libx264, crf :data:`MP4_CRF`, yuv420p, BT.709 tagged),
      ``faststart`` for streaming. Odd sizes are padded by one pixel
      (repeating the edge) because yuv420p needs even sizes. Decoded frames
      are close to, not identical with, the input.
    - ``gif``: one global 256-color palette for the whole clip, Floyd-Steinberg
      dithered; every frame is kept, identical ones too.
    - ``png``: ``path`` is a folder holding ``00000.png``, ``00001.png``, ...
      (lossless).

    Args:
        frames: As :func:`to_uint8_frames` takes them.
        path: The file (mp4, gif) or folder (png) to write.
        fps: Frames per second (gif stores hundredths of a second per frame).
        format: ``mp4``, ``gif`` or ``png`` (a ``VideoFormat`` works too).
        value_range: The values of float frames that mean black and white.

    Returns:
        The written path.

    Raises:
        UsageError: for an unknown format, a non-positive fps, or a path
            whose video extension contradicts the format.
    """
    fmt = str(getattr(format, "value", format)).lower()
    if fmt not in WRITE_FORMATS:
        raise UsageError(f"unknown video format {format!r}", "use mp4, gif or png")
    if not fps or fps <= 0:
        raise UsageError(f"fps must be positive, got {fps}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES and suffix != f".{fmt}":
        raise UsageError(
            f"{path} ends in {suffix} but the format is {fmt}",
            f"name the file .{fmt} or choose the format {suffix[1:]}",
        )
    array = to_uint8_frames(frames, value_range)
    if len(array) == 0:
        raise ValueError("write_video needs at least one frame")
    rate = Fraction(fps).limit_denominator(1001)
    if fmt == "png":
        _write_png(array, path)
    else:
        with _atomic_file(path) as tmp:
            (_encode_gif if fmt == "gif" else _encode_mp4)(array, rate, tmp)
    return path


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` that replaces it if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _encode_mp4(array: np.ndarray, rate: Fraction, target: Path) -> None:
    from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

    height, width = array.shape[1:3]
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    # faststart moves the index to the front, which needs a named file to reopen.
    with av.open(str(target), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream(
            "libx264", rate=rate, options={"crf": str(MP4_CRF), "preset": "medium"}
        )
        stream.width, stream.height = width + pad_w, height + pad_h
        stream.pix_fmt = "yuv420p"
        context = stream.codec_context
        # Tag what we convert to, so players do not guess (HD players assume 709).
        context.colorspace = Colorspace.ITU709
        context.color_primaries = ColorPrimaries.BT709
        context.color_trc = ColorTrc.BT709
        context.color_range = ColorRange.MPEG
        for index, image in enumerate(array):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                format="yuv420p",
                dst_colorspace=Colorspace.ITU709,
                dst_color_range=ColorRange.MPEG,
            )
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _encode_gif(array: np.ndarray, rate: Fraction, target: Path) -> None:
    from PIL import Image

    height, width = array.shape[1:3]
    # One palette from a few frames keeps colors steady over time, unlike
    # per-frame palettes; Pillow's own GIF writer would merge identical frames.
    step = max(1, len(array) // 8)
    palette_image = Image.fromarray(array[::step].reshape(-1, width, 3)).quantize(
        256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
    )
    rgb = np.zeros((256, 3), dtype=np.uint8)
    colors = np.asarray(palette_image.getpalette() or [], dtype=np.uint8).reshape(-1, 3)[:256]
    rgb[: len(colors)] = colors
    argb = np.concatenate([np.full((256, 1), 255, dtype=np.uint8), rgb], axis=1)
    with av.open(str(target), "w", format="gif") as container:
        stream = container.add_stream("gif", rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "pal8"
        for index, image in enumerate(array):
            indexed = Image.fromarray(image).quantize(
                palette=palette_image, dither=Image.Dither.FLOYDSTEINBERG
            )
            frame = av.VideoFrame.from_ndarray((np.asarray(indexed), argb), format="pal8")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _write_png(array: np.ndarray, folder: Path) -> None:
    import cv2

    with atomic_folder(folder, overwrite=True) as tmp:
        for index, image in enumerate(array):
            target = tmp / f"{index:05d}.png"
            if not cv2.imwrite(str(target), image[..., ::-1]):
                raise MotionsepError(f"could not write {target}", "check free disk space")


# ---------------------------------------------------------------------------
# finding clips


def is_frame_folder(path: Path) -> bool:
    """Whether ``path`` is a folder of PNG frames (what ``format="png"`` writes)."""
    return path.is_dir() and any(path.glob("*.png"))


def find_videos(
    paths: str | Path | Iterable[str | Path],
    recursive: bool = False,
    frame_folders: bool = False,
) -> list[Path]:
    """Expands files and folders into a list of videos.

    Files are kept whatever their extension (probing tells later whether they
    are videos); folders contribute their files ending in
    :data:`VIDEO_SUFFIXES` (any case), hidden files excluded, in sorted order.
    Arguments keep their order; a file named twice is listed once.

    Args:
        paths: Files and folders.
        recursive: Also search the folders' subfolders.
        frame_folders: A folder of PNG frames counts as one video, given
            directly or found inside a folder (``evaluate`` reads those).

    Returns:
        The videos.

    Raises:
        VideoError: for a path that does not exist or a folder without videos.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    found: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise VideoError(
                f"no such file or folder: {path}",
                "check the path and the working directory",
                path=str(path),
            )
        if path.is_file() or (frame_folders and is_frame_folder(path)):
            candidates = [path]
        else:
            pattern = "**/*" if recursive else "*"
            candidates = sorted(
                p
                for p in path.glob(pattern)
                if not any(part.startswith(".") for part in p.relative_to(path).parts)
                and (
                    (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
                    or (frame_folders and is_frame_folder(p))
                )
            )
            if not candidates:
                kinds = ", ".join(sorted(VIDEO_SUFFIXES))
                raise VideoError(
                    f"{path} holds no videos ({kinds}"
                    + (" files or folders of PNG frames)" if frame_folders else ")"),
                    "check the folder, or pass recursive=True for subfolders"
                    if not recursive
                    else "check the folder",
                    path=str(path),
                )
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                found.append(candidate)
    return found
