"""Metrics on constructed videos: motion fidelity, CLIP scores with the tiny CLIP.

Videos are 64x64 windows sliding over a smooth random texture (so Lucas-
Kanade has something to follow), 8 frames long.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from motionsep.errors import ModelFormatError, ModelNotFoundError
from motionsep.metrics import (
    ClipScorer,
    PointTracks,
    appearance_leakage,
    motion_fidelity,
    point_tracks,
    resolve_clip_model,
    temporal_consistency,
    text_alignment,
    track_similarity,
)
from motionsep.model.components import build_tiny_clip
from motionsep.store import Store

FRAMES = 8
SIZE = 64


def texture(seed: int, size: int = 200) -> np.ndarray:
    """A smooth random color texture (blobs of about 4 pixels)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)


def sliding(tex: np.ndarray, dx: int, dy: int, frames: int = FRAMES) -> np.ndarray:
    """A window moving by (dx, dy) pixels per frame over ``tex``: the content moves by -(dx, dy)."""
    return np.stack(
        [
            tex[60 + dy * t : 60 + dy * t + SIZE, 60 + dx * t : 60 + dx * t + SIZE]
            for t in range(frames)
        ]
    )


def still(tex: np.ndarray, frames: int = FRAMES) -> np.ndarray:
    return np.repeat(tex[None, :SIZE, :SIZE], frames, axis=0)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> ClipScorer:
    return ClipScorer(build_tiny_clip(tmp_path_factory.mktemp("tiny_clip")))


# -- motion fidelity ------------------------------------------------------------


def test_a_video_against_itself_scores_one() -> None:
    video = sliding(texture(1), 2, 1)
    assert motion_fidelity(video, video) == pytest.approx(1.0, abs=1e-3)


def test_same_motion_with_other_colors_and_textures_scores_above_0_9() -> None:
    reference = sliding(texture(1), 2, 1)
    other = sliding(255 - texture(7)[:, :, ::-1], 2, 1)  # other texture, inverted, channels swapped
    assert motion_fidelity(other, reference) > 0.9


def test_the_opposite_motion_scores_below_0_3() -> None:
    reference = sliding(texture(1), 2, 1)
    opposite = sliding(texture(1), -2, -1)
    assert motion_fidelity(opposite, reference) < 0.3


def test_static_videos_give_a_finite_number_and_no_motion_matches_no_motion() -> None:
    first, second = still(texture(3)), still(texture(4))
    assert motion_fidelity(first, second) == pytest.approx(1.0)
    blank = np.full((FRAMES, SIZE, SIZE, 3), 128, dtype=np.uint8)  # nothing to track at all
    assert np.isfinite(motion_fidelity(blank, blank))
    # A static video does not pass for a moving one, nor the reverse.
    moving = sliding(texture(1), 2, 1)
    assert motion_fidelity(first, moving) == pytest.approx(0.0)
    assert motion_fidelity(moving, first) == pytest.approx(0.0)


def test_videos_of_different_lengths_and_sizes_are_compared() -> None:
    reference = sliding(texture(1), 2, 1, frames=15)  # twice as long: every other frame is used
    generated = sliding(texture(2), 4, 2, frames=8)
    generated = np.stack([cv2.resize(f, (96, 80)) for f in generated])
    assert motion_fidelity(generated, reference) > 0.9


def test_stationary_steps_follow_the_documented_rule() -> None:
    moving = PointTracks(np.array([[[0, 0], [1, 0], [2, 0]]], dtype=np.float32), size=8)
    left = PointTracks(np.array([[[2, 0], [1, 0], [0, 0]]], dtype=np.float32), size=8)
    halted = PointTracks(np.array([[[0, 0], [1, 0], [1, 0]]], dtype=np.float32), size=8)
    parked = PointTracks(np.array([[[5, 5], [5, 5], [5.01, 5]]], dtype=np.float32), size=8)
    assert track_similarity(moving, moving)[0, 0] == pytest.approx(1.0)
    assert track_similarity(moving, left)[0, 0] == pytest.approx(-1.0)
    # one step both move (1), one step one of them stands (0)
    assert track_similarity(moving, halted)[0, 0] == pytest.approx(0.5)
    # one step one stands (0), one step both stand (1)
    assert track_similarity(halted, parked)[0, 0] == pytest.approx(0.5)


@settings(max_examples=25, deadline=None)
@given(
    first=st.lists(
        st.lists(st.tuples(st.floats(-3, 3), st.floats(-3, 3)), min_size=5, max_size=5),
        min_size=1,
        max_size=4,
    ),
    second=st.lists(
        st.lists(st.tuples(st.floats(-3, 3), st.floats(-3, 3)), min_size=5, max_size=5),
        min_size=1,
        max_size=4,
    ),
)
def test_scores_stay_in_minus_one_to_one(
    first: list[list[tuple[float, float]]], second: list[list[tuple[float, float]]]
) -> None:
    a = PointTracks(np.cumsum(np.array(first, dtype=np.float32), axis=1), size=8)
    b = PointTracks(np.cumsum(np.array(second, dtype=np.float32), axis=1), size=8)
    similarity = track_similarity(a, b)
    assert np.isfinite(similarity).all()
    assert (similarity >= -1.0).all() and (similarity <= 1.0).all()
    assert -1.0 <= motion_fidelity(a, b) <= 1.0


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), dx=st.integers(-3, 3), dy=st.integers(-3, 3))
def test_scores_of_real_tracks_stay_in_range(seed: int, dx: int, dy: int) -> None:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    video = sliding(texture(seed % 5), dx, dy)
    for a, b in ((noise, video), (video, noise), (video, still(texture(9)))):
        value = motion_fidelity(a, b)
        assert np.isfinite(value) and -1.0 <= value <= 1.0


def test_tracks_follow_a_translation() -> None:
    tracks = point_tracks(sliding(texture(1), 2, 1), grid=8, size=128)
    steps = np.median(tracks.steps.reshape(-1, 2), axis=0)
    # The content moves by (-2, -1) pixels of 64 per frame: (-4, -2) at 128.
    assert steps == pytest.approx([-4.0, -2.0], abs=0.1)


# -- CLIP scores ------------------------------------------------------------------


def test_temporal_consistency_of_a_static_video_is_100_and_of_noise_lower(
    scorer: ClipScorer,
) -> None:
    static = temporal_consistency(scorer.image_embeddings(still(texture(2))))
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    noisy = temporal_consistency(scorer.image_embeddings(noise))
    assert static == pytest.approx(100.0, abs=0.1)
    assert noisy is not None and noisy < 99.0
    assert temporal_consistency(scorer.image_embeddings(noise[:1])) is None


def test_leakage_of_a_copy_is_higher_than_of_an_unrelated_video(scorer: ClipScorer) -> None:
    reference = scorer.image_embeddings(sliding(texture(1), 2, 1))
    copy = scorer.image_embeddings(sliding(texture(1), 2, 1))
    unrelated = scorer.image_embeddings(sliding(255 - texture(8), 1, 2))
    assert appearance_leakage(copy, reference) > appearance_leakage(unrelated, reference)


def test_text_alignment_is_a_scaled_cosine(scorer: ClipScorer) -> None:
    frames = scorer.image_embeddings(sliding(texture(1), 2, 1))
    texts = scorer.text_embeddings(["a red car", "a wolf on a snowy mountain"])
    assert texts.shape == (2, frames.shape[1])
    value = text_alignment(frames, texts[0])
    assert -100.0 <= value <= 100.0
    assert value == pytest.approx(float((frames @ texts[0]).mean()) * 100, abs=1e-4)


def test_clip_batches_do_not_change_embeddings(tmp_path: Path, scorer: ClipScorer) -> None:
    frames = sliding(texture(1), 2, 1)
    one_by_one = ClipScorer(scorer.folder, batch_size=1).image_embeddings(frames)
    assert np.allclose(one_by_one.numpy(), scorer.image_embeddings(frames).numpy(), atol=1e-5)


def test_a_missing_clip_model_names_the_download_command(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not in the store") as missing:
        resolve_clip_model("clip", Store(tmp_path))
    assert "motionsep download clip" in str(missing.value)
    (tmp_path / "not-clip").mkdir()
    (tmp_path / "not-clip" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelFormatError, match="not a CLIP model"):
        resolve_clip_model(str(tmp_path / "not-clip"), Store(tmp_path))
