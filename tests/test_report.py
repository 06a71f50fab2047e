"""``motionsep report``: the static HTML page, read as HTML and opened in a real browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from motionsep import sample as sampling
from motionsep.report import write_report
from motionsep.video import probe, write_video
from motionsep_cli.app import app

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
FRAMES, SIZE, FPS = 8, 48, 8
# evaluate's group labels of the two groups below (motion, recipe, highway, seeds)
HIGHWAY, PLAIN = "slide (reference) +AH seeds 0-1", "slide (reference) seeds 0-1"


def _frames(seed: int) -> np.ndarray:
    """A square sliding right over noise, uint8 (F, H, W, 3)."""
    rng = np.random.default_rng(seed)
    video = np.repeat(rng.integers(0, 80, (1, SIZE, SIZE, 3), dtype=np.uint8), FRAMES, axis=0)
    for t in range(FRAMES):
        video[t, 16:32, 4 + 4 * t : 20 + 4 * t] = (230, 40, 40)
    return video


def _generated(path: Path, seed: int, highway: bool, fmt: str = "mp4") -> Path:
    write_video(_frames(seed), path, fps=FPS, format=fmt, value_range=(0, 255))
    record = {
        "video": path.name,
        "prompt": f"a red square, take {seed}",
        "seed": seed,
        "sample": {"highway": highway, "pli": None, "base_seed": 0, "num_videos": 2},
        "motion": {"name": "slide", "recipe": "reference"},
    }
    sampling.sidecar_path(path).write_text(json.dumps(record))
    return path


def _mpeg4(path: Path) -> Path:
    """A video a browser cannot play: MPEG-4 part 2, not H.264."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for image in _frames(9):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """Two groups (highway on and off), one of them with a PNG-frame video, and a reference."""
    folder = tmp_path / "outputs"
    folder.mkdir()
    _generated(folder / "a-0.mp4", 0, True)
    _generated(folder / "a-1", 1, True, fmt="png")
    _generated(folder / "b-0.mp4", 2, False)
    _generated(folder / "b-1.mp4", 3, False)
    _mpeg4(tmp_path / "reference.mp4")
    scores = {
        "videos": [
            {"path": str(folder / "a-0.mp4"), "motion_fidelity": 0.91},
            {"path": str(folder / "b-0.mp4"), "motion_fidelity": -0.2},
        ],
        "groups": [
            {"label": HIGHWAY, "count": 2, "mean": {"motion_fidelity": 0.9}, "std": {}},
            {"label": PLAIN, "count": 2, "mean": {"motion_fidelity": -0.1}, "std": {}},
        ],
    }
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    return folder


class _Page(HTMLParser):
    """Collects the media, group headings and table rows of a report page."""

    def __init__(self) -> None:
        super().__init__()
        self.videos: list[dict[str, str | None]] = []
        self.images: list[str] = []
        self.groups: list[str] = []
        self.rows: list[list[str]] = []
        self.status = ""
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "video":
            self.videos.append(values)
        elif tag == "img" and values.get("class") == "media":
            self.images.append(str(values["src"]))
        elif tag == "h2" and values.get("class") == "group":
            self._in = "group"
        elif tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self._in = "td"
        elif tag == "p" and values.get("id") == "status":
            self._in = "status"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h2", "td", "p"):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "group":
            self.groups.append(data.strip())
        elif self._in == "td":
            self.rows[-1].append(data.strip())
        elif self._in == "status":
            self.status += data


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_every_group_and_video_is_on_a_self_contained_page(
    outputs: Path, tmp_path: Path, store_home: Path
) -> None:
    from PIL import Image

    curve = store_home / "motions" / "slide" / "loss.png"  # the motion the sidecars name
    curve.parent.mkdir(parents=True)
    Image.new("RGB", (40, 20), "white").save(curve)
    maps = outputs / "attention" / "slide-a-cat-0"  # what inspect-attention writes
    maps.mkdir(parents=True)
    (maps / "summary.json").write_text("{}")
    Image.new("RGB", (30, 30), "gray").save(maps / "difference.png")
    page_file = write_report(
        outputs,
        tmp_path / "report",
        scores=tmp_path / "scores.json",
        references=[tmp_path / "reference.mp4"],
    )
    page = _parse(page_file.read_text())
    assert page.groups == [f"{HIGHWAY} (2 videos)", f"{PLAIN} (2 videos)"]
    # 3 mp4 outputs and the re-encoded reference play as video; the PNG frames became a GIF
    assert len(page.videos) == 4 and len(page.images) == 1
    for source in [v["src"] for v in page.videos] + page.images:
        assert source is not None and not source.startswith(("/", "http"))  # relative links
        media = page_file.parent / source
        assert media.is_file()
        if source.endswith(".mp4"):
            assert probe(media).codec == "h264"  # the mpeg4 reference was re-encoded
    assert [row[0] for row in page.rows if row] == [HIGHWAY, PLAIN]
    text = page_file.read_text()
    assert "0.91" in text  # a video's score beside it
    assert "training loss of motion slide" in text
    assert "temporal attention, difference: slide-a-cat-0" in text
    # the page and its media are one folder: moved elsewhere, nothing breaks
    moved = shutil.move(str(page_file.parent), str(tmp_path / "elsewhere"))
    assert (Path(moved) / "index.html").is_file()


def test_report_refuses_to_overwrite_what_is_not_its_own_and_names_an_empty_folder(
    outputs: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    first = runner.invoke(app, ["report", str(outputs)])
    assert first.exit_code == 0, first.stderr
    assert Path(first.stdout.strip()) == outputs / "report" / "index.html"
    again = runner.invoke(app, ["report", str(outputs)])
    assert again.exit_code == 2 and "--force" in again.stderr
    assert runner.invoke(app, ["report", str(outputs), "--force"]).exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    kept = runner.invoke(app, ["report", str(outputs), "--out", str(mine), "--force"])
    assert kept.exit_code == 2 and (mine / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = runner.invoke(app, ["report", str(empty)])
    assert nothing.exit_code == 2 and str(empty) in nothing.stderr


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--mute-audio",
        "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run(
        [str(shutil.which("chromium")), *flags, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


@pytest.mark.skipif(
    shutil.which("chromium") is None and not os.environ.get("MOTIONSEP_REQUIRE_BROWSER"),
    reason="Debian's chromium is not installed (CI installs it and requires this test)",
)
def test_a_real_browser_loads_every_video_with_its_size_and_length(
    outputs: Path, tmp_path: Path
) -> None:
    page_file = write_report(outputs, tmp_path / "report", references=[tmp_path / "reference.mp4"])
    url = page_file.resolve().as_uri()
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", url, profile=tmp_path / "p1")
    page = _parse(dom.stdout)
    assert len(page.videos) == 4
    for video in page.videos:
        assert video.get("data-loaded") == "1", video  # the browser decoded its metadata
        assert (video["data-width"], video["data-height"]) == (str(SIZE), str(SIZE))
        assert float(str(video["data-duration"])) == pytest.approx(FRAMES / FPS, abs=0.05)
    assert page.status.strip() == "4 of 4 videos loaded"
    assert page.groups == [f"{HIGHWAY} (2 videos)", f"{PLAIN} (2 videos)"]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    _chromium(
        "--hide-scrollbars",
        "--window-size=1200,1000",
        "--virtual-time-budget=4000",
        f"--screenshot={shot}",
        url,
        profile=tmp_path / "p2",
    )
    assert shot.stat().st_size > 10_000


def test_evaluate_writes_the_page_into_the_folder_and_does_not_evaluate_it_again(
    outputs: Path, store_home: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    reference = str(tmp_path / "reference.mp4")
    args = ["evaluate", str(outputs), "--reference", reference, "--metrics", "motion", "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.stderr
    assert (outputs / "report" / "index.html").is_file()
    again = runner.invoke(app, args)  # the page's media are not videos to score
    assert again.exit_code == 0, again.stderr
    assert len(json.loads(again.stdout)["videos"]) == 4
    skipped = runner.invoke(app, [*args[:-1], "--no-report"])
    assert skipped.exit_code == 0
