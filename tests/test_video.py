"""Decoding, sampling, resizing and writing videos (motionsep.video).

Synthetic clips are written here with PyAV directly, not with write_video, so
that the reader is not checked against its own writer: a white 8x8 square on
black moves 6 pixels right per frame, so a decoded frame tells which source
frame it was by where its square is.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from motionsep import video
from motionsep.errors import MotionsepError, UsageError, VideoError

STEP = 6  # pixels the square moves per frame
SQUARE = 8


def _square_frames(count: int, width: int = 128, height: int = 32) -> np.ndarray:
    frames = np.zeros((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        frames[i, 12 : 12 + SQUARE, STEP * i : STEP * i + SQUARE] = 255
    return frames


def _square_index(frame: np.ndarray) -> int:
    """Which source frame this is, from the square's left edge."""
    columns = np.nonzero(frame[..., 0].max(axis=0) > 128)[0]
    return round(int(columns.min()) / STEP)


def _write_clip(
    path: Path,
    frames: np.ndarray,
    fps: int = 10,
    pts_ms: list[int] | None = None,
    rotation_ccw: int | None = None,
    faststart: bool = False,
) -> Path:
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "12"})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation_ccw is not None:
            stream.set_display_rotation(rotation_ccw)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def square_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 frames of the moving square at 10 fps, 128x32."""
    return _write_clip(tmp_path_factory.mktemp("clips") / "square.mp4", _square_frames(20))


# ---------------------------------------------------------------------------
# the real reference clips


REFERENCE = {
    "car-turn.mp4": (480, 480, 8.0),
    "dolly.mp4": (256, 256, 10.0),
    "zoom-in.mp4": (256, 256, 10.0),
    "zoom-out.mp4": (256, 256, 10.0),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_probe_reference_clips(clips_dir: Path, name: str) -> None:
    width, height, fps = REFERENCE[name]
    info = video.probe(clips_dir / name)
    assert (info.width, info.height, info.fps) == (width, height, fps)
    assert info.frame_count == 16
    assert len(info.timestamps) == 16
    assert info.duration_s == pytest.approx(16 / fps)
    assert info.rotation == 0
    assert info.codec == "h264"


def test_find_videos_lists_the_reference_clips(clips_dir: Path) -> None:
    assert [p.name for p in video.find_videos(clips_dir)] == sorted(REFERENCE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_load_clip_reference_clips(clips_dir: Path, name: str) -> None:
    clip = video.load_clip(clips_dir / name, 16, width=384, height=256)
    assert clip.shape == (16, 3, 256, 384)
    assert clip.dtype == torch.float32
    assert clip.min() >= -1.0
    assert clip.max() <= 1.0
    assert clip.max() - clip.min() > 0.5  # real content, not a flat frame


def test_load_clip_at_native_size_is_the_decoded_frames(clips_dir: Path) -> None:
    path = clips_dir / "dolly.mp4"
    clip = video.load_clip(path, 8, frame_step=2, width=256, height=256)
    decoded = video.read_frames(path, range(0, 16, 2))
    expected = torch.from_numpy(decoded).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(clip, expected)


# ---------------------------------------------------------------------------
# sampling


def test_frame_step_takes_every_nth_frame(square_clip: Path) -> None:
    info = video.probe(square_clip)
    assert (info.width, info.height, info.frame_count, info.fps) == (128, 32, 20, 10.0)
    indices = video.sample_indices(info, 5, frame_step=3)
    assert indices == [0, 3, 6, 9, 12]
    frames = video.read_frames(square_clip, indices)
    assert [_square_index(f) for f in frames] == indices


def test_load_clip_frame_step_and_fps(square_clip: Path) -> None:
    stepped = video.load_clip(square_clip, 4, frame_step=4, width=128, height=32)
    as_uint8 = video.to_uint8_frames(stepped)
    assert [_square_index(f) for f in as_uint8] == [0, 4, 8, 12]
    # 10 fps sampled at 5 fps: every second frame.
    resampled = video.load_clip(square_clip, 6, fps=5, width=128, height=32)
    assert [_square_index(f) for f in video.to_uint8_frames(resampled)] == [0, 2, 4, 6, 8, 10]


def test_variable_frame_rate_is_sampled_by_time(tmp_path: Path) -> None:
    pts_ms = [0, 40, 80, 200, 240, 400, 410, 420, 600, 800, 1000]
    path = _write_clip(tmp_path / "vfr.mp4", _square_frames(len(pts_ms)), pts_ms=pts_ms)
    info = video.probe(path)
    assert info.frame_count == len(pts_ms)
    assert info.timestamps == pytest.approx([t / 1000 for t in pts_ms])
    # Targets 0, 0.2, ..., 1.0 s; the nearest frames by real time.
    indices = video.sample_indices(info, 6, fps=5)
    assert indices == [0, 3, 5, 8, 9, 10]
    frames = video.read_frames(path, indices)
    assert [_square_index(f) for f in frames] == indices

    with pytest.raises(VideoError) as caught:
        video.sample_indices(info, 7, fps=5)
    message = str(caught.value)
    assert str(path) in message
    assert "data.fps" in message
    assert "data.frames" in message


def test_sample_indices_from_timestamps() -> None:
    assert video.sample_indices([0.0, 0.1, 0.2, 0.3], 2, frame_step=3) == [0, 3]
    # Upsampling repeats frames: 2 fps sampled at 4 fps.
    assert video.sample_indices([0.0, 0.5, 1.0], 5, fps=4) == [0, 0, 1, 1, 2]
    with pytest.raises(UsageError, match="exclude each other"):
        video.sample_indices([0.0, 0.1], 2, frame_step=2, fps=5)


def test_too_few_frames_says_what_to_lower(tmp_path: Path) -> None:
    path = _write_clip(tmp_path / "short.mp4", _square_frames(10))
    info = video.probe(path)
    with pytest.raises(VideoError) as caught:
        video.sample_indices(info, 16)
    assert caught.value.exit_code == 2
    message = str(caught.value)
    assert str(path) in message
    assert "has 10 frames" in message
    assert "needs 16" in message
    assert "data.frames" in message

    with pytest.raises(VideoError, match=r"data.frame_step=2 needs 11"):
        video.sample_indices(info, 6, frame_step=2)
    with pytest.raises(VideoError, match=r"short\.mp4"):
        video.load_clip(path, 16, width=128, height=32)


def test_read_frames_keeps_the_requested_order(square_clip: Path) -> None:
    frames = video.read_frames(square_clip, [7, 2, 2])
    assert frames.shape == (3, 32, 128, 3)
    assert frames.dtype == np.uint8
    assert [_square_index(f) for f in frames] == [7, 2, 2]
    with pytest.raises(VideoError, match=r"has 20 frames, but frame 25"):
        video.read_frames(square_clip, [25])


# ---------------------------------------------------------------------------
# rotation


# PyAV's rotation is counter-clockwise; VideoInfo.rotation is clockwise.
@pytest.mark.parametrize(
    ("rotation_ccw", "rotation_cw", "marker_corner"),
    [(90, 270, "bottom-left"), (-90, 90, "top-right"), (180, 180, "bottom-right")],
)
def test_rotation_metadata_is_applied(
    tmp_path: Path, rotation_ccw: int, rotation_cw: int, marker_corner: str
) -> None:
    frames = np.zeros((4, 32, 64, 3), dtype=np.uint8)
    frames[:, :8, :8] = 255  # marker in the stored top-left corner
    path = _write_clip(tmp_path / "rotated.mp4", frames, rotation_ccw=rotation_ccw)

    info = video.probe(path)
    assert info.rotation == rotation_cw
    upright = video.read_frames(path)
    if rotation_cw == 180:
        assert (info.width, info.height) == (64, 32)
        assert upright.shape == (4, 32, 64, 3)
    else:  # wider than tall on disk, taller than wide on screen
        assert (info.width, info.height) == (32, 64)
        assert upright.shape == (4, 64, 32, 3)

    height, width = upright.shape[1:3]
    ys, xs = np.nonzero(upright[0, ..., 0] > 128)
    vertical = "top" if ys.mean() < height / 2 else "bottom"
    horizontal = "left" if xs.mean() < width / 2 else "right"
    assert f"{vertical}-{horizontal}" == marker_corner

    # OpenCV applies the display matrix itself: an independent opinion.
    import cv2

    capture = cv2.VideoCapture(str(path))
    ok, bgr = capture.read()
    capture.release()
    if ok:
        assert bgr.shape == upright.shape[1:]
        assert np.abs(bgr[..., ::-1].astype(int) - upright[0]).mean() < 3


# ---------------------------------------------------------------------------
# bad input


def _zero_frame_mp4(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        container.start_encoding()
    return path


def _zero_frame_avi(path: Path) -> Path:
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        container.start_encoding()
    return path


def _truncated(path: Path, faststart: bool) -> Path:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(16, 32, 64, 3), dtype=np.uint8)
    full = _write_clip(path.with_name("full.mp4"), noise, faststart=faststart)
    data = full.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


BAD_INPUTS = {
    "missing": (lambda p: p, "video not found"),
    "empty": (lambda p: (p.write_bytes(b""), p)[1], "is empty"),
    "text renamed": (lambda p: (p.write_text("a prompt, not a video\n"), p)[1], "not a video"),
    "random bytes": (
        lambda p: (p.write_bytes(np.random.default_rng(1).bytes(4096)), p)[1],
        "not a video",
    ),
    "truncated, index at the end": (lambda p: _truncated(p, faststart=False), "truncated"),
    "truncated, index first": (lambda p: _truncated(p, faststart=True), "truncated"),
    "zero frames mp4": (_zero_frame_mp4, "no frames"),
    "zero frames avi": (lambda p: _zero_frame_avi(p.with_suffix(".avi")), "zero frames"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_a_typed_error_naming_the_file(tmp_path: Path, case: str) -> None:
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path / "clip.mp4")
    for call in (video.probe, video.read_frames, lambda p: video.load_clip(p, 2)):
        with pytest.raises(VideoError) as caught:
            call(path)
        error = caught.value
        assert error.exit_code == 2
        assert str(path) in error.message
        assert expected in error.message
        assert error.hint
        assert error.path == str(path)


def test_a_folder_is_not_a_video(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="is a folder"):
        video.probe(tmp_path)


# ---------------------------------------------------------------------------
# resizing


def test_center_crop_and_buckets(tmp_path: Path) -> None:
    path = _write_clip(tmp_path / "wide.mp4", _square_frames(4, width=128, height=64))
    assert video.load_clip(path, 4, width=64, height=64).shape == (4, 3, 64, 64)
    # 2:1 with 64x64 worth of pixels: the 16:9 bucket, 88x48.
    assert video.bucket_size(128, 64, 64, 64) == (88, 48)
    bucketed = video.load_clip(path, 4, width=64, height=64, crop="bucket")
    assert bucketed.shape == (4, 3, 48, 88)
    # A clip that matches the target's aspect keeps the target size.
    assert video.bucket_size(1920, 1080, 576, 320) == (576, 320)
    assert video.bucket_size(1080, 1920, 384, 384) == (288, 512)
    with pytest.raises(UsageError, match=r"data.width must be a positive multiple of 8"):
        video.load_clip(path, 4, width=60, height=64)


def test_downscaling_is_antialiased() -> None:
    # One-pixel stripes alias to stripes under nearest-neighbour; area averaging gives gray.
    stripes = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    stripes[:, :, ::2] = 255
    small = video.resize_crop(stripes, 16, 16)
    assert small.shape == (1, 16, 16, 3)
    assert np.abs(small.astype(int) - 128).max() <= 2


# ---------------------------------------------------------------------------
# writing


def _gradient_frames(count: int, width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    frames = np.zeros((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        frames[i, ..., 0] = x * 200 // max(width - 1, 1) + 6 * i
        frames[i, ..., 1] = y * 255 // max(height - 1, 1)
        frames[i, ..., 2] = 128
    return frames


def test_mp4_round_trip(tmp_path: Path) -> None:
    frames = _gradient_frames(9, 64, 48)
    written = video.write_video(frames, tmp_path / "out.mp4", fps=8)
    assert written == tmp_path / "out.mp4"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temporary left over
    info = video.probe(written)
    assert (info.frame_count, info.width, info.height, info.fps) == (9, 64, 48, 8.0)
    assert info.codec == "h264"
    decoded = video.read_frames(written)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3  # close, not bit-exact


def test_mp4_from_a_float_tensor_and_odd_size(tmp_path: Path) -> None:
    frames = _gradient_frames(5, 33, 21)
    tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    written = video.write_video(tensor, tmp_path / "odd.mp4", fps=10)
    info = video.probe(written)
    assert (info.frame_count, info.width, info.height) == (5, 34, 22)  # padded to even
    decoded = video.read_frames(written)[:, :21, :33]
    # Steep gradients on a tiny frame lose a little more to 4:2:0 chroma.
    assert np.abs(decoded.astype(int) - frames).mean() < 5
    unit = torch.from_numpy(frames).float() / 255  # channels-last in [0, 1]
    assert np.array_equal(video.to_uint8_frames(unit, value_range=(0.0, 1.0)), frames)


def test_gif_round_trip_keeps_every_frame(tmp_path: Path) -> None:
    frames = _gradient_frames(8, 40, 24)
    frames[4] = frames[3]  # identical neighbours must stay two frames
    written = video.write_video(frames, tmp_path / "out.gif", fps=10, format="gif")
    info = video.probe(written)
    assert (info.frame_count, info.width, info.height) == (8, 40, 24)
    assert info.fps == pytest.approx(10.0)
    decoded = video.read_frames(written)
    assert np.abs(decoded.astype(int) - frames).mean() < 6


def test_png_round_trip_is_lossless_and_replaces(tmp_path: Path) -> None:
    import cv2

    frames = _gradient_frames(3, 40, 24)
    target = tmp_path / "frames"
    target.mkdir()
    (target / "stale.png").write_bytes(b"old")
    written = video.write_video(frames, target, fps=8, format="png")
    assert written == target
    assert sorted(p.name for p in target.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["frames"]
    for i, png in enumerate(sorted(target.iterdir())):
        assert np.array_equal(cv2.imread(str(png))[..., ::-1], frames[i])


def test_write_video_rejects_bad_requests(tmp_path: Path) -> None:
    frames = _gradient_frames(2, 16, 16)
    with pytest.raises(UsageError, match="unknown video format"):
        video.write_video(frames, tmp_path / "x.avi", fps=8, format="avi")
    with pytest.raises(UsageError, match=r"ends in \.gif but the format is mp4"):
        video.write_video(frames, tmp_path / "x.gif", fps=8)
    with pytest.raises(MotionsepError, match="NaN"):
        video.write_video(torch.full((2, 3, 16, 16), float("nan")), tmp_path / "x.mp4", fps=8)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# decode counting and finding files


def test_decode_stats_count_decodes_not_probes(square_clip: Path) -> None:
    before = video.decode_stats()
    video.probe(square_clip)
    video.read_frames(square_clip, [2])
    video.load_clip(square_clip, 2, width=128, height=32)
    after = video.decode_stats()
    key = str(square_clip.resolve())
    assert after.probes - before.probes == 2  # probe, and load_clip's own
    assert after.decodes - before.decodes == 2
    assert after.per_file[key] - before.per_file.get(key, 0) == 2
    # Decoding stops at the last frame asked for: 3 frames for [2], 2 for load_clip.
    assert after.frames - before.frames == 5

    video.reset_decode_stats()
    assert video.decode_stats() == video.DecodeStats()


def test_find_videos(tmp_path: Path) -> None:
    for name in ["b.mp4", "A.MOV", "c.webm", "notes.txt", ".hidden.mp4", "sub/d.mkv"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in video.find_videos(tmp_path)] == ["A.MOV", "b.mp4", "c.webm"]
    assert [p.relative_to(tmp_path).as_posix() for p in video.find_videos([tmp_path], True)] == [
        "A.MOV",
        "b.mp4",
        "c.webm",
        "sub/d.mkv",
    ]
    # Named files are kept as given (and once), in the order given.
    named = video.find_videos([tmp_path / "notes.txt", tmp_path, tmp_path / "b.mp4"])
    assert [p.name for p in named] == ["notes.txt", "A.MOV", "b.mp4", "c.webm"]
    with pytest.raises(VideoError, match="no such file or folder"):
        video.find_videos([tmp_path / "missing.mp4"])
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no videos here")
    with pytest.raises(VideoError, match="holds no videos"):
        video.find_videos(tmp_path / "docs")
