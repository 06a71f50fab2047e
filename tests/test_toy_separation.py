"""Toy separation instruments: continuous leakage, direction, nearest motion, pairing."""

from __future__ import annotations

import numpy as np
import pytest

from motionsep.toy import experiment, metrics, world

NAMED_LOOK = world.ClipSpec(*experiment.REFERENCE_LOOK, motion="diagonal")
UNNAMED_LOOK = world.ClipSpec(*experiment.LEAK_REFERENCE_LOOK, motion="diagonal")


def _blend(first: np.ndarray, second: np.ndarray, weight: float) -> np.ndarray:
    mixed = (1.0 - weight) * first.astype(np.float64) + weight * second.astype(np.float64)
    return np.rint(mixed).astype(np.uint8)


@pytest.mark.parametrize("reference_look", [NAMED_LOOK, UNNAMED_LOOK], ids=["named", "unnamed"])
@pytest.mark.parametrize("look", experiment.LEAK_PROMPT_LOOKS[:4])
def test_leakage_is_zero_for_the_prompts_look_and_one_for_the_references(
    reference_look: world.ClipSpec, look: tuple[str, str, str, str]
) -> None:
    prompt = world.ClipSpec(*look, motion="diagonal", seed=3)
    own = world.render(prompt).frames
    leaked = world.render(prompt.with_appearance(*reference_look.appearance)).frames
    at_prompt = metrics.leakage(own, prompt, reference_look)
    at_reference = metrics.leakage(leaked, prompt, reference_look)
    assert set(at_prompt) == {"color", "shade", "texture", "mean"}
    assert at_prompt["mean"] < 0.02
    assert at_reference["mean"] > 0.98
    # the background alone, half-way between the two looks, reads half-way
    background = _blend(own, leaked, 0.5)
    half = metrics.leakage(background, prompt, reference_look)
    assert 0.35 < half["shade"] < 0.65
    assert 0.35 < half["texture"] < 0.65


def test_leakage_sees_a_partial_tint_that_the_palette_label_misses() -> None:
    """A blue object tinted a third of the way to magenta still reads as blue."""
    prompt = world.ClipSpec("blue", "circle", "dark", "plain", "diagonal", seed=1)
    clip = world.render(prompt)
    tinted = clip.frames.astype(np.float64)
    shift = np.asarray(world.color_rgb("magenta"), dtype=np.float64) - world.COLORS["blue"]
    tinted[clip.masks > 0.5] += shift / 3
    frames = np.clip(np.rint(tinted), 0, 255).astype(np.uint8)
    reference = world.render(UNNAMED_LOOK)
    score = metrics.score(metrics.read_video(frames), prompt, reference, UNNAMED_LOOK, frames)
    assert score.color_ok  # the palette label is still the prompt's colour
    assert 0.2 < score.leakage["color"] < 0.45


def test_direction_error_and_speed_ratio_of_translations() -> None:
    diagonal = world.render(world.ClipSpec("red", "square", "white", "striped", "diagonal", 0))
    right = world.render(world.ClipSpec("blue", "circle", "dark", "plain", "right", 4))
    same = world.render(world.ClipSpec("blue", "circle", "dark", "plain", "diagonal", 4))
    angle, speed = metrics.direction_error(metrics.read_video(right.frames), diagonal)
    assert angle == pytest.approx(45.0, abs=4.0)
    # a right sweep covers 18 px, the diagonal 0.8 * 18 px along each axis
    assert speed == pytest.approx(1.0 / (0.8 * np.sqrt(2.0)), rel=0.1)
    angle, speed = metrics.direction_error(metrics.read_video(same.frames), diagonal)
    assert angle < 3.0 and speed == pytest.approx(1.0, rel=0.05)
    left = world.render(world.ClipSpec("blue", "circle", "dark", "plain", "left", 4))
    angle, _ = metrics.direction_error(metrics.read_video(left.frames), right)
    assert angle > 170.0


def test_nearest_motion_names_what_a_video_does() -> None:
    candidates = (*world.PRETRAIN_MOTIONS, "diagonal")
    for motion in ("right", "up", "zoom-in", "static", "diagonal"):
        spec = world.ClipSpec("green", "square", "gray", "plain", motion, seed=2)
        reading = metrics.read_video(world.render(spec).frames)
        assert metrics.nearest_motion(reading, spec, candidates) == motion


def test_a_missing_object_is_counted_apart_from_fidelity() -> None:
    reference = world.render(NAMED_LOOK)
    prompt = world.ClipSpec("blue", "circle", "dark", "plain", "diagonal")
    blank = np.full((world.FRAMES, world.SIZE, world.SIZE, 3), 40, dtype=np.uint8)
    empty = metrics.score(metrics.read_video(blank), prompt, reference, NAMED_LOOK, blank)
    moving = world.render(prompt).frames
    good = metrics.score(metrics.read_video(moving), prompt, reference, NAMED_LOOK, moving)
    assert empty.missing and empty.motion_fidelity is None and empty.nearest is None
    assert "color" not in empty.leakage  # no object, no colour to compare
    summary = metrics.summarize([empty, good])
    assert summary["missing"] == 0.5
    assert summary["motion_fidelity"] == pytest.approx(good.motion_fidelity)


def test_unnamed_looks_have_no_words() -> None:
    spec = UNNAMED_LOOK
    assert not spec.named
    with pytest.raises(ValueError, match="no words"):
        _ = spec.prompt
    vocabulary = set(world.vocabulary())
    assert not {*world.UNNAMED_COLORS, *world.UNNAMED_TEXTURES} & vocabulary
    assert set(world.motion_caption("diagonal").split()) <= vocabulary
    # the dotted background is its own pattern, not a named texture
    dotted = world.background_image("white", "dotted")
    for texture in ("striped", "checked"):
        assert not np.allclose(dotted, world.background_image("white", texture))


def _run(label: str | None, seed: int, fidelities: list[float]) -> experiment.ToyRun:
    """A run whose videos have the given fidelities (and nothing else)."""
    run = experiment.ToyRun("diagonal", seed, label, False)
    spec = world.ClipSpec("blue", "circle", "dark", "plain", "diagonal")
    for value in fidelities:
        run.scores.append(
            metrics.Score(
                color_ok=True,
                shape_ok=True,
                background_ok=True,
                motion_ok=None,
                trajectory_error=1.0,
                motion_fidelity=value,
                leaked={},
                nearest="diagonal" if value > 0.5 else "right",
                leakage={"mean": 1.0 - value},
            )
        )
        run.specs.append(spec)
    return run


def test_recipe_rows_report_the_paired_difference_from_the_base_model() -> None:
    runs = [
        _run(None, 0, [0.0, 0.2]),
        _run(None, 1, [0.4, 0.4]),
        _run(None, 2, [0.1, 0.1]),
        _run("motiondirector", 0, [0.6, 0.8]),  # +0.6 over its base
        _run("motiondirector", 1, [0.6, 0.6]),  # +0.2
        _run("motiondirector", 2, [0.5, 0.5]),  # +0.4
    ]
    rows = {row["condition"]: row for row in experiment.summarize_runs(runs)["rows"]}
    paired = rows["motiondirector"]["vs_base"]["motion_fidelity"]
    assert paired["per_seed"] == pytest.approx([0.6, 0.2, 0.4])
    assert paired["mean"] == pytest.approx(0.4)
    # t(2) = 4.303, sd of (0.6, 0.2, 0.4) = 0.2
    assert paired["ci95"] == pytest.approx(4.303 * 0.2 / np.sqrt(3))
    assert rows["motiondirector"]["vs_base"]["leakage"]["mean"] == pytest.approx(-0.4)
    # nearest is "diagonal" where fidelity > 0.5: seeds 0 and 1 always, seed 2 never
    assert rows["motiondirector"]["nearest_target"]["per_seed"] == [1.0, 1.0, 0.0]
    assert "vs_base" not in rows["base model"]
    table = experiment.results_markdown({"rows": list(rows.values()), "settings": {"seeds": 3}})
    assert "+0.40 ± 0.50" in table
