"""Settings: precedence of the five layers, presets, and the bad-value message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from motionsep.config import (
    Recipe,
    Settings,
    available_presets,
    load_settings,
    parse_set_options,
    preset_dir,
)
from motionsep.errors import SettingsError, UsageError
from tests.conftest import SHARED_CLIPS


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_the_upstream_training_recipe() -> None:
    settings = load_settings()
    assert settings.lora.recipe is Recipe.REFERENCE  # what the authors' released code runs
    assert (settings.data.width, settings.data.height, settings.data.frames) == (384, 384, 16)
    assert (settings.lora.rank, settings.lora.dropout) == (32, 0.1)
    assert (settings.optim.lr, settings.optim.betas, settings.optim.weight_decay) == (
        5e-4,
        (0.9, 0.999),
        1e-2,
    )
    assert (settings.train.steps, settings.train.checkpoint_every) == (1000, 200)
    assert (settings.sample.steps, settings.sample.guidance) == (30, 12.0)


def test_preset_overrides_defaults() -> None:
    settings = load_settings(preset="tiny")
    assert settings.model.name == "tiny"
    assert settings.train.steps == 30
    # a field the preset does not set keeps its default
    assert settings.train.batch_size == 1


def test_config_file_overrides_preset(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.yaml", "train:\n  steps: 77\n")
    settings = load_settings(preset="tiny", config_file=config)
    assert settings.train.steps == 77
    assert settings.model.name == "tiny"  # from the preset, untouched by the file


def test_toml_config_file_is_read(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", "[optim]\nlr = 0.002\n[lora]\nrecipe = 'paper'\n")
    settings = load_settings(config_file=config)
    assert settings.optim.lr == 0.002
    assert settings.lora.recipe is Recipe.PAPER


def test_environment_overrides_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _write(tmp_path / "c.yaml", "train:\n  steps: 77\n  seed: 5\n")
    monkeypatch.setenv("MOTIONSEP_TRAIN__STEPS", "88")
    settings = load_settings(preset="tiny", config_file=config)
    assert settings.train.steps == 88
    assert settings.train.seed == 5  # the env var changed one field, not the section


def test_cli_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOTIONSEP_TRAIN__STEPS", "88")
    settings = load_settings(overrides={"train": {"steps": 99, "seed": None}})
    assert settings.train.steps == 99
    assert settings.train.seed == 42  # a flag left at None does not override


def test_set_overrides_flags_and_parses_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOTIONSEP_TRAIN__STEPS", "88")
    settings = load_settings(
        overrides={"train": {"steps": 99}},
        set_options=["train.steps=111", "optim.betas=[0.8, 0.9]", "sample.highway=false"],
    )
    assert settings.train.steps == 111
    assert settings.optim.betas == (0.8, 0.9)
    assert settings.sample.highway is False


def test_motionsep_home_sets_the_store_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOTIONSEP_HOME", str(tmp_path / "h"))
    assert load_settings().store.home == tmp_path / "h"


@pytest.mark.parametrize("name", available_presets())
def test_every_preset_validates_and_documents_itself(name: str) -> None:
    text = (preset_dir() / f"{name}.yaml").read_text()
    assert text.startswith("# "), "a preset starts with a comment saying what it is for"
    assert "motionsep " in text.split("\n\n")[0], "the comment shows the command that uses it"
    settings = load_settings(preset=name)
    assert isinstance(settings, Settings)


def test_builtin_presets_are_the_ones_the_docs_promise() -> None:
    assert {"car-turn", "zoom-in", "zoom-out", "dolly", "tiny"} <= set(available_presets())


@pytest.mark.parametrize("name", ["car-turn", "zoom-in", "zoom-out", "dolly"])
def test_clip_presets_carry_the_clip_prompt(name: str) -> None:
    sidecar = SHARED_CLIPS / f"{name}.txt"
    if not sidecar.is_file():
        pytest.skip(f"reference clips not found at {SHARED_CLIPS}")
    settings = load_settings(preset=name)
    assert settings.data.prompt == sidecar.read_text().strip()
    assert settings.train.mixed_precision == "fp16"
    assert settings.sample.prompts, "the preset names a validation prompt"


def test_preset_can_be_a_path(tmp_path: Path) -> None:
    preset = _write(tmp_path / "mine.yaml", "# mine\nlora:\n  rank: 8\n")
    assert load_settings(preset=str(preset)).lora.rank == 8


def test_unknown_preset_lists_the_builtin_ones() -> None:
    with pytest.raises(UsageError) as info:
        load_settings(preset="dolly-zoom")
    assert "dolly-zoom" in info.value.message
    assert "car-turn" in (info.value.hint or "")


def test_every_bad_field_is_listed_with_what_is_allowed(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.yaml", "data:\n  width: 100\n")
    with pytest.raises(SettingsError) as info:
        load_settings(
            config_file=config,
            set_options=["train.steps=-1", "lora.recipe=fancy", "sample.bogus=1"],
        )
    text = str(info.value)
    assert text.startswith("4 invalid settings")
    assert "train.steps" in text and "greater than or equal to 1" in text
    assert "lora.recipe" in text and "'paper', 'reference' or 'motiondirector'" in text
    assert "data.width" in text and "multiple of 8" in text and f"config file {config}" in text
    assert "sample.bogus" in text and "known fields here" in text
    assert info.value.exit_code == 2


def test_cross_field_check_names_both_fields() -> None:
    with pytest.raises(SettingsError, match=r"data\.fps and data\.frame_step"):
        load_settings(set_options=["data.fps=8", "data.frame_step=2"])


def test_config_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="config file not found"):
        load_settings(config_file=tmp_path / "missing.yaml")
    broken = _write(tmp_path / "b.yaml", "train: [unclosed\n")
    with pytest.raises(UsageError, match="cannot parse"):
        load_settings(config_file=broken)
    with pytest.raises(UsageError, match="unknown type"):
        load_settings(config_file=_write(tmp_path / "c.ini", "[train]\n"))


def test_set_option_needs_section_field_value() -> None:
    with pytest.raises(UsageError, match=r"section\.field=value"):
        parse_set_options(["train.steps"])
    assert parse_set_options(["a.b=x y"]) == {"a": {"b": "x y"}}


def test_resolved_settings_round_trip_as_a_config_file(tmp_path: Path) -> None:
    settings = load_settings(preset="dolly", set_options=["train.steps=3"])
    config = _write(tmp_path / "resolved.yaml", settings.to_yaml())
    assert yaml.safe_load(config.read_text())["train"]["steps"] == 3
    assert load_settings(config_file=config) == settings
