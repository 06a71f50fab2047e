"""Typed settings: one nested tree, five layers of precedence.

Lowest first, each layer overrides the ones before it:

1. the defaults written in this file (the upstream training defaults);
2. a preset (``--preset NAME|PATH``), a YAML file from ``presets/``;
3. a config file (``--config FILE``, YAML or TOML);
4. environment variables ``MOTIONSEP_<SECTION>__<FIELD>`` (for instance
   ``MOTIONSEP_TRAIN__STEPS=500``);
5. command-line flags and repeatable ``--set section.field=value``.

Use :func:`load_settings` to build a :class:`Settings` from all five; an
invalid value in any layer raises :class:`~motionsep.errors.SettingsError`
listing every bad field, what is allowed and which layer set it.
"""

from __future__ import annotations

import contextvars
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from motionsep.errors import SettingsError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_PREFIX = "MOTIONSEP_"
HOME_ENV = "MOTIONSEP_HOME"


class Recipe(str, Enum):
    """Which layers get the motion LoRA and which skips the highway reroutes."""

    PAPER = "paper"
    REFERENCE = "reference"
    MOTIONDIRECTOR = "motiondirector"


class Precision(str, Enum):
    """Numeric precision of model weights and activations."""

    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class VideoFormat(str, Enum):
    """File format of generated videos."""

    MP4 = "mp4"
    GIF = "gif"
    PNG = "png"


MAX_STEPS = 10_000_000
"""Upper bound of every step count: far beyond any real run, far below what overflows."""
MAX_DENOISING_STEPS = 1000
"""DDIM cannot take more steps than the 1000 training timesteps of the schedulers used."""
MAX_SIDE = 4096
"""Largest frame width or height in pixels."""
MAX_FRAMES = 1024
MAX_SEED = 2**63 - 1
MAX_VIDEOS = 10_000
"""Most videos per prompt in one command."""


class _Section(BaseModel):
    # every float must be finite: NaN or inf in a setting is never what a user means
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_enum_values=False, allow_inf_nan=False
    )


def _check_multiple_of_8(value: int) -> int:
    if value % 8:
        raise ValueError("must be a multiple of 8")
    return value


class ModelSettings(_Section):
    """Which base model to use and where to run it."""

    name: str = Field(
        "zeroscope",
        description="Base model: a name in the store (zeroscope, modelscope, tiny), "
        "a hub id OWNER/REPO, or a path to a diffusers folder.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    variant: str | None = Field(None, description="Weight variant to download, e.g. fp16.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    dtype: Precision = Field(
        Precision.AUTO,
        description="Weights dtype: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16.",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        base, _, index = value.partition(":")
        if base not in {"auto", "cpu", "cuda", "mps"} or (index and not index.isdigit()):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value


class DataSettings(_Section):
    """How clips become training data (``prepare``)."""

    width: int = Field(
        384, ge=8, le=MAX_SIDE, description="Frame width in pixels, a multiple of 8."
    )
    height: int = Field(
        384, ge=8, le=MAX_SIDE, description="Frame height in pixels, a multiple of 8."
    )
    frames: int = Field(16, ge=2, le=MAX_FRAMES, description="Frames sampled from each clip.")
    frame_step: int = Field(1, ge=1, le=1000, description="Take every N-th frame of the clip.")
    fps: float | None = Field(
        None, gt=0, description="Resample clips to this frame rate instead of using frame_step."
    )
    crop: Literal["center", "bucket"] = Field(
        "center", description="center: resize and center-crop; bucket: keep aspect in buckets."
    )
    prompt: str | None = Field(
        None, description="Prompt for every clip that has no manifest entry or sidecar .txt."
    )
    inversion: bool = Field(False, description="Store a DDIM inversion of each clip (noise prior).")
    inversion_steps: int = Field(
        50, ge=1, le=MAX_DENOISING_STEPS, description="DDIM steps of that inversion."
    )
    vae_batch_size: int = Field(8, ge=1, le=4096, description="Frames encoded per VAE call.")

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        return _check_multiple_of_8(value)

    @model_validator(mode="after")
    def _fps_or_step(self) -> DataSettings:
        if self.fps is not None and self.frame_step != 1:
            raise ValueError("data.fps and data.frame_step exclude each other: set only one")
        return self


class LoraSettings(_Section):
    """The motion LoRA and the spatial LoRAs of dual-path training."""

    recipe: Recipe = Field(
        Recipe.REFERENCE,
        description="reference (the authors' released code: to_k + to_out, highway on the "
        "skips of down_blocks[2]; the default, see the README's toy tables), paper (TAP as "
        "the paper writes it: to_k only, highway on every attention skip), motiondirector "
        "(the baseline: q, k, v, out, ff).",
    )
    rank: int = Field(32, ge=1, le=1024, description="Rank of the motion LoRA.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="LoRA dropout during training.")
    spatial_rank: int = Field(32, ge=1, le=1024, description="Rank of the spatial LoRAs.")
    shared_spatial: bool = Field(
        False, description="One spatial LoRA for all clips instead of one per clip."
    )


class OptimSettings(_Section):
    """AdamW over the LoRA parameters."""

    lr: float = Field(5e-4, gt=0, le=1.0, description="Learning rate of the motion LoRA.")
    spatial_lr: float = Field(5e-4, gt=0, le=1.0, description="Learning rate of the spatial LoRAs.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant", description="Learning-rate schedule."
    )
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Warm-up steps of the schedule.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null for none.")
    fused: bool = Field(
        False,
        description="PyTorch's fused AdamW (one kernel for every tensor) instead of foreach; "
        "same results to rounding; a GPU speed lever, off until measured.",
    )

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("each beta must be in [0, 1)")
        return value


class TrainSettings(_Section):
    """The training loop (``train``)."""

    steps: int = Field(1000, ge=1, le=MAX_STEPS, description="Optimizer steps.")
    batch_size: int = Field(1, ge=1, le=1024, description="Clips per step and process.")
    checkpoint_every: int = Field(
        200, ge=1, le=MAX_STEPS, description="Write a resumable checkpoint every N steps."
    )
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed of everything random in training.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: fp16 on CUDA, none on CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    channels_last: bool = Field(
        False,
        description="Keep the U-Net's convolution weights channels-last (NHWC, NDHWC): a GPU "
        "speed lever, off until bench/train.py measures it on a GPU; same results to rounding.",
    )
    cudnn_benchmark: bool = Field(
        False,
        description="Let cuDNN time its convolution algorithms on the first steps (CUDA only; "
        "faster when it wins, but runs are then no longer bit-reproducible).",
    )
    attention: Literal["auto", "sdpa", "math"] = Field(
        "auto",
        description="Attention kernel while training: sdpa (torch's fused "
        "scaled_dot_product_attention), math (plain matmul + softmax), auto: math on the CPU "
        "(its fused kernel is slow on short sequences: bench/inner_loop.py), sdpa elsewhere. "
        "Same results to rounding; generation always uses sdpa.",
    )
    spatial_skip_prob: float = Field(
        0.2, ge=0.0, le=1.0, description="Fraction of steps that skip the spatial path."
    )
    debias_alpha: float = Field(
        math.sqrt(2.0), ge=-100, le=100, description="alpha of the appearance-debiased loss term."
    )
    debias_beta: float = Field(
        1.0, ge=-100, le=100, description="beta of the appearance-debiased loss term."
    )
    preview_every: int = Field(
        0, ge=0, le=MAX_STEPS, description="Render a preview video every N steps; 0: never."
    )
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none",
        description="Experiment tracker (through accelerate): losses per path, lr, steps/s "
        "every step, previews, the settings as hyperparameters; logs in $MOTIONSEP_HOME/logs/NAME.",
    )
    num_processes: int = Field(
        1, ge=1, le=1024, description="Data-parallel processes (accelerate)."
    )


class SampleSettings(_Section):
    """Generation (``generate``): upstream defaults are DDIM, 30 steps, guidance 12."""

    steps: int = Field(30, ge=1, le=MAX_DENOISING_STEPS, description="DDIM denoising steps.")
    guidance: float = Field(12.0, ge=0, le=100, description="Classifier-free guidance scale.")
    width: int = Field(384, ge=8, le=MAX_SIDE, description="Video width, a multiple of 8.")
    height: int = Field(384, ge=8, le=MAX_SIDE, description="Video height, a multiple of 8.")
    frames: int = Field(16, ge=1, le=MAX_FRAMES, description="Frames per video.")
    negative_prompt: str = Field("", description="Negative prompt for guidance.")
    lora_scale: float = Field(
        1.0, ge=-10, le=10, description="Scale of the motion LoRA; 0 switches it off."
    )
    highway: bool | None = Field(
        None, description="Appearance highway on/off; null: as the recipe says."
    )
    highway_beta: float | None = Field(
        None, gt=0, le=10, description="Highway scale; null: the recipe's."
    )
    pli: float | None = Field(
        None, gt=0, le=1, description="Phased LoRA integration: motion for this fraction of steps."
    )
    noise_prior: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Weight of the motion's stored inversion in the starting noise; null: the "
        "recipe's (reference: 0.2, as the authors' inference script; others 0), used only when "
        "the motion stores an inversion (train with data.inversion=true).",
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed of the first video; video k uses seed + k."
    )
    num_videos: int = Field(1, ge=1, le=MAX_VIDEOS, description="Videos per prompt.")
    batch_size: int = Field(
        4, ge=1, le=1024, description="Videos denoised together (each takes two U-Net rows)."
    )
    offload: bool = Field(
        False, description="Keep each model part on the CPU except while it is used (small GPUs)."
    )
    fps: int = Field(8, ge=1, le=120, description="Frame rate of written videos.")
    format: VideoFormat = Field(VideoFormat.MP4, description="mp4, gif or png (one PNG per frame).")
    prompts: list[str] = Field(
        default_factory=list, description="Validation prompts of the preset."
    )

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        return _check_multiple_of_8(value)


class EvalSettings(_Section):
    """Metrics (``evaluate``)."""

    clip_model: str = Field("clip", description="CLIP model in the store, hub id, or path.")
    track_grid: int = Field(
        16, ge=2, description="Point-track grid size per side (motion fidelity)."
    )
    batch_size: int = Field(16, ge=1, description="Frames per CLIP call.")
    track_size: int = Field(
        256,
        ge=32,
        description="Frames are resized to this square size before point tracking, so "
        "displacements of videos of any size are comparable.",
    )
    stationary_px: float = Field(
        0.1,
        gt=0,
        description="A track step shorter than this (pixels at track_size) counts as "
        "stationary in motion fidelity.",
    )
    ablation_pli: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="PLI fraction of the TAP + AH + PLI row of `evaluate --ablation`.",
    )


def default_home() -> Path:
    """The store root: ``$MOTIONSEP_HOME`` or the user's cache directory."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("motionsep"))


class StoreSettings(_Section):
    """Where models, prepared data and motions live."""

    home: Path = Field(
        default_factory=default_home,
        description="Root of the store (models/, motions/, prepared/); default $MOTIONSEP_HOME "
        "or the user's cache directory.",
    )


# The preset and config-file layers of the call being built. A context variable
# (not a global) because pydantic-settings builds its sources in a classmethod.
_FILE_LAYERS: contextvars.ContextVar[tuple[dict[str, Any], ...]] = contextvars.ContextVar(
    "motionsep_file_layers", default=()
)


TOY_TRAIL_OPACITY = 0.42
"""Opacity of the toy world's motion trail (``motionsep.toy.world.TRAIL_OPACITY``)."""


class PretrainSettings(_Section):
    """Pretraining a toy base model (``toy pretrain``): the schedule, the world's levers."""

    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of every clip, noise and init.")
    vae_steps: int = Field(800, description="VAE training steps (0 with pretrain.vae_from).")
    vae_batch: int = Field(32, description="Frames per VAE step.")
    vae_lr: float = Field(1e-3, description="VAE learning rate.")
    steps: int = Field(4000, description="U-Net and text-encoder steps.")
    batch: int = Field(16, description="Clips per U-Net step.")
    lr: float = Field(5e-4, description="U-Net and text-encoder learning rate.")
    warmup: int = Field(100, ge=0, description="Linear warm-up steps of the learning rate.")
    text_dropout: float = Field(0.1, description="Captions dropped (for guidance).")
    object_weight: float = Field(3.0, description="Extra loss weight on the object and trail.")
    min_snr_gamma: float = Field(5.0, description="Min-SNR loss weighting gamma.")
    x0_weight_floor: float = Field(0.5, description="Least loss weight at the noisiest steps.")
    noisy_share: float = Field(0.5, description="Share of timesteps drawn from noisy_from up.")
    noisy_from: int = Field(600, description="Start of the noisy timestep range.")
    train_text_encoder: bool = Field(False, description="Train the text encoder too.")
    ema_decay: float = Field(0.995, description="Decay of the exported weight average.")
    checkpoint_every: int = Field(200, description="Checkpoint every N steps.")
    probe_every: int = Field(0, ge=0, description="Held-in probe every N U-Net steps; 0: never.")
    probe_count: int = Field(56, description="Videos per probe.")
    probe_steps: int = Field(25, ge=1, description="DDIM steps of each probe video.")
    head_width: int = Field(
        4, description="Width of each attention head (diffusers' attention_head_dim; ZeroScope 64)."
    )
    speed_jitter: float = Field(0.0, description="Vary each clip's speed by up to this share.")
    attribute_dropout: float = Field(
        0.0, description="Leave object, colour and background out of captions this often (each)."
    )
    vae_from: str = Field(
        "", description="Take the VAE of this toy model folder ('toy': the built-in one)."
    )
    init_from: str = Field(
        "",
        description=(
            "Start the U-Net and text encoder from this toy model folder ('toy': the built-in "
            "one) instead of seeded random weights (fine-tuning; head_width may differ)."
        ),
    )
    trail_opacity: float = Field(
        TOY_TRAIL_OPACITY, description="Opacity of the motion trail behind the object (0: none)."
    )
    conv_skip: float = Field(
        0.0,
        description=(
            "Share of U-Net steps with every temporal convolution bypassed "
            "(1: they stay at their identity initialisation)."
        ),
    )
    motion_dropout: float = Field(
        0.0, description="Leave the motion phrase out of captions this often."
    )
    conv_keep: str = Field(
        "",
        description=(
            "Temporal convolutions under these module paths (comma-separated, e.g. "
            "'mid_block') are never bypassed by conv_skip."
        ),
    )
    family: str = Field(
        "zeroscope",
        description=(
            "Base-model family of the toy model: zeroscope (a 3D U-Net in ZeroScope's layout) "
            "or animatediff (UNetMotionModel: the same layout in Stable Diffusion's 2D blocks "
            "plus motion modules with frame positions, the only path between frames)."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> PretrainSettings:
        problems = _pretrain_problems(self)
        if problems:
            raise ValueError("bad pretraining settings: " + "; ".join(problems))
        return self

    @property
    def total_steps(self) -> int:
        return self.vae_steps + self.steps


def _pretrain_problems(cfg: PretrainSettings) -> list[str]:
    """Each rule a set of pretraining settings breaks, in words."""
    problems = []
    for name in ("vae_steps", "steps"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name} must be >= 0 (got {getattr(cfg, name)})")
    for name in ("vae_batch", "batch", "checkpoint_every", "probe_count"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1 (got {getattr(cfg, name)})")
    for name in ("vae_lr", "lr", "min_snr_gamma"):
        if not getattr(cfg, name) > 0:
            problems.append(f"{name} must be > 0 (got {getattr(cfg, name)})")
    unit = ("text_dropout", "ema_decay", "speed_jitter", "attribute_dropout", "motion_dropout")
    for name in unit:
        if not 0 <= getattr(cfg, name) < 1:
            problems.append(f"{name} must be in [0, 1) (got {getattr(cfg, name)})")
    if not 0 <= cfg.conv_skip <= 1:
        problems.append(f"conv_skip must be in [0, 1] (got {cfg.conv_skip})")
    if cfg.object_weight < 0:
        problems.append(f"object_weight must be >= 0 (got {cfg.object_weight})")
    if not 0 <= cfg.x0_weight_floor <= cfg.min_snr_gamma:
        problems.append(
            f"x0_weight_floor must be in [0, min_snr_gamma] (got {cfg.x0_weight_floor})"
        )
    if not 0 <= cfg.noisy_share <= 1:
        problems.append(f"noisy_share must be in [0, 1] (got {cfg.noisy_share})")
    if not 0 <= cfg.noisy_from < 1000:
        problems.append(f"noisy_from must be in [0, 1000) (got {cfg.noisy_from})")
    if cfg.head_width < 1 or 32 % cfg.head_width:
        problems.append(f"head_width must divide 32 (got {cfg.head_width})")
    if not 0 <= cfg.trail_opacity <= TOY_TRAIL_OPACITY:
        problems.append(
            f"trail_opacity must be in [0, {TOY_TRAIL_OPACITY}] (got {cfg.trail_opacity})"
        )
    if cfg.family not in ("zeroscope", "animatediff"):
        problems.append(f"family must be zeroscope or animatediff (got {cfg.family!r})")
    if cfg.family == "animatediff" and (cfg.conv_skip or cfg.conv_keep):
        problems.append(
            "the animatediff family has no temporal convolutions: leave conv_skip at 0 "
            "and conv_keep empty"
        )
    if cfg.vae_from and cfg.vae_steps:
        problems.append("vae_from takes a trained VAE: set vae_steps to 0")
    return problems


class Settings(BaseSettings):
    """Every setting of motionsep, one section per concern."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
        nested_model_default_partial_update=True,
    )

    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    sample: SampleSettings = Field(default_factory=SampleSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    pretrain: PretrainSettings = Field(default_factory=PretrainSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest priority first: CLI (init kwargs) > env > config file > preset.
        file_sources = [
            InitSettingsSource(settings_cls, init_kwargs=layer)
            for layer in reversed(_FILE_LAYERS.get())
        ]
        return (init_settings, env_settings, *file_sources)

    def to_dict(self) -> dict[str, Any]:
        """The resolved settings as plain JSON-compatible data."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved settings as YAML, in the shape a config file takes."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------
# presets and files


def preset_dir() -> Path:
    """The folder of the built-in presets.

    Installed, they are the package data ``motionsep.presets``; run from a
    checkout that was not installed, they are the repository's ``presets/``.
    """
    try:
        return Path(str(resources.files("motionsep.presets")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "presets"


def available_presets() -> list[str]:
    """Names of the built-in presets."""
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def resolve_preset(name_or_path: str) -> Path:
    """Finds a preset by built-in name or as a path to a YAML file."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in {".yaml", ".yml"} or os.sep in name_or_path:
        if not candidate.is_file():
            raise UsageError(
                f"preset file not found: {candidate}",
                f"built-in presets: {', '.join(available_presets())}",
            )
        return candidate
    builtin = preset_dir() / f"{name_or_path}.yaml"
    if not builtin.is_file():
        raise UsageError(
            f"unknown preset {name_or_path!r}",
            f"built-in presets: {', '.join(available_presets())}; or pass a path to a YAML file",
        )
    return builtin


MAX_SETTINGS_BYTES = 1_000_000
"""The largest settings file read (a full one, every field set, is about 5 kB)."""
MAX_SETTINGS_NODES = 10_000
"""The most YAML nodes a settings file or ``--set`` value may stand for, aliases expanded.

The whole settings tree is about 200 nodes. The budget is checked on the
composed YAML graph, before any Python object is built, so an alias bomb (a
few hundred bytes that expand into billions of nodes) is refused in
milliseconds instead of filling the memory when it is merged or printed.
"""
MAX_SHOWN_CHARS = 200
"""How much of a value an error message shows."""


def shorten(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` cut to about ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class _BoundedLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses documents standing for too many nodes.

    Composing counts every node and alias event (so a huge file stops early);
    :func:`load_yaml` then measures the composed graph with aliases expanded
    (each shared node once, by memo) before anything is constructed.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.composed = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        self.composed += 1
        if self.composed > MAX_SETTINGS_NODES:
            raise _OverBudgetError(f"it holds more than {MAX_SETTINGS_NODES} YAML nodes")
        return super().compose_node(parent, index)


class _OverBudgetError(Exception):
    """A YAML document over the node budget (turned into a UsageError by the caller)."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many nodes ``node`` stands for with every alias expanded (``sizes`` memoizes)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise _OverBudgetError("it has an alias inside its own anchor (a recursive structure)")
    open_nodes.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        children: list[yaml.Node] = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    for child in children:
        size += _expanded_size(child, sizes, open_nodes)
        if size > MAX_SETTINGS_NODES:
            raise _OverBudgetError(
                f"it stands for more than {MAX_SETTINGS_NODES} YAML nodes once its aliases are "
                "expanded (an alias bomb?)"
            )
    open_nodes.discard(key)
    sizes[key] = size
    return size


def load_yaml(text: str, what: str) -> Any:
    """Parses settings YAML safely and within :data:`MAX_SETTINGS_NODES`.

    Args:
        text: The YAML.
        what: How errors name the source (a file, a ``--set`` option).

    Raises:
        UsageError: for a document over the budget (an alias bomb, a
            recursive alias, a huge file), naming ``what``.
        yaml.YAMLError: for a syntax error.
    """
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    except _OverBudgetError as exc:
        raise UsageError(
            f"{what} cannot be read as settings: {exc}",
            "settings are a small tree of sections and fields; write the values out "
            "instead of repeating them through YAML anchors and aliases",
        ) from None
    finally:
        loader.dispose()


def read_config_file(path: Path) -> dict[str, Any]:
    """Reads a YAML or TOML settings file into a nested dict.

    Raises:
        UsageError: for a missing, unreadable, oversized or malformed file
            (see :func:`load_yaml` for the YAML budget).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"config file not found: {path}", "check the path given to --config")
    if path.stat().st_size > MAX_SETTINGS_BYTES:
        raise UsageError(
            f"config file {path} is {path.stat().st_size:,} bytes; a settings file is at most "
            f"{MAX_SETTINGS_BYTES:,}",
            "is it the right file?",
        )
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif path.suffix in {".yaml", ".yml"}:
            data = load_yaml(text, f"config file {path}")
        else:
            raise UsageError(
                f"config file {path} has an unknown type {path.suffix!r}",
                "use a .yaml, .yml or .toml file",
            )
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"cannot parse {path}: {shorten(str(exc), 4 * MAX_SHOWN_CHARS)}",
            "fix the syntax of the file",
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"{path} must hold a mapping of sections (model, data, train, ...), "
            f"found {type(data).__name__}"
        )
    return data


def parse_set_options(assignments: list[str]) -> dict[str, Any]:
    """Turns ``["train.steps=10", "optim.betas=[0.9, 0.99]"]`` into a nested dict.

    Values are read as YAML, so numbers, booleans, lists and ``null`` work;
    anything that is not valid YAML stays a string.
    """
    result: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UsageError(
                f"--set {shorten(repr(item))} is not of the form section.field=value",
                "for example: --set train.steps=500",
            )
        try:
            value = load_yaml(raw, f"--set {shorten(key)}") if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        _set_nested(result, key.split("."), value)
    return result


def _set_nested(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        nxt = target.setdefault(key, {})
        if not isinstance(nxt, dict):
            raise UsageError(f"--set gives both {key} and {key}.{keys[-1]}")
        target = nxt
    target[keys[-1]] = value


def deep_merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merges nested mappings; later layers win key by key."""
    result: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(result.get(key), dict):
                result[key] = deep_merge(result[key], value)
            elif isinstance(value, Mapping):
                result[key] = deep_merge(value)
            else:
                result[key] = value
    return result


def load_settings(
    preset: str | None = None,
    config_file: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    set_options: list[str] | None = None,
    base: tuple[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Builds the settings from defaults, preset, config file, environment and CLI.

    Args:
        base: A named layer just above the defaults, e.g. ``("motion dolly",
            settings_it_was_trained_with)`` so that ``generate`` starts from the
            settings of the preset a motion was trained with.
        preset: A built-in preset name or a path to a preset YAML.
        config_file: A YAML or TOML file with any sections.
        overrides: Values from dedicated CLI flags, nested by section.
        set_options: ``--set section.field=value`` strings (applied after ``overrides``).

    Raises:
        SettingsError: listing every invalid field with what is allowed.
        UsageError: for a missing or unreadable preset or config file.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if base is not None:
        layers.append((base[0], deep_merge(base[1])))
    if preset:
        path = resolve_preset(preset)
        layers.append((f"preset {path.stem}", read_config_file(path)))
    if config_file:
        layers.append((f"config file {config_file}", read_config_file(Path(config_file))))
    cli = deep_merge(_drop_none(overrides or {}), parse_set_options(set_options or []))

    token = _FILE_LAYERS.set(tuple(layer for _, layer in layers))
    try:
        return Settings(**cli)
    except ValidationError as exc:
        named = [*layers, ("environment", _env_layer()), ("command line", cli)]
        raise SettingsError(format_validation_error(exc, named)) from exc
    finally:
        _FILE_LAYERS.reset(token)


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    """CLI flags the user did not give arrive as None; they must not override."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            nested = _drop_none(value)
            if nested:
                out[key] = nested
        elif value is not None:
            out[key] = value
    return out


def _env_layer() -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for name, value in os.environ.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            keys = name[len(ENV_PREFIX) :].lower().split("__")
            _set_nested(layer, keys, value)
    return layer


def _lookup(layer: Mapping[str, Any], path: tuple[str | int, ...]) -> tuple[bool, Any]:
    node: Any = layer
    for key in path:
        in_mapping = isinstance(node, Mapping) and key in node
        in_sequence = isinstance(node, list | tuple) and isinstance(key, int) and key < len(node)
        if in_mapping or in_sequence:
            node = node[key]
        else:
            return False, None
    return True, node


def _field_help(path: tuple[str | int, ...]) -> str | None:
    """The description of a settings field, or the known fields of a section."""
    model: type[BaseModel] = Settings
    for key in path:
        fields = model.model_fields
        if not isinstance(key, str) or key not in fields:
            return f"known fields here: {', '.join(fields)}"
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return fields[key].description
    return None


def format_validation_error(
    exc: ValidationError, layers: list[tuple[str, dict[str, Any]]] | None = None
) -> str:
    """One message listing every invalid field, what is allowed, and who set it."""
    lines = [f"{exc.error_count()} invalid setting{'s' if exc.error_count() != 1 else ''}:"]
    for error in exc.errors():
        loc = tuple(part for part in error["loc"] if part != "__root__")
        name = ".".join(str(part) for part in loc) or "(settings)"
        origin = ""
        for label, layer in reversed(layers or []):
            found, _ = _lookup(layer, loc)
            if found:
                origin = f" (set by {label})"
                break
        value = error.get("input")
        shown = (
            "" if isinstance(value, dict) else f", got {shorten(json.dumps(value, default=str))}"
        )
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"  - {name}: {message}{shown}{origin}")
        help_text = _field_help(loc)
        if help_text:
            lines.append(f"      {help_text}")
    return "\n".join(lines)


def iter_fields(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Yields ``(dotted.name, description)`` for every leaf setting."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from iter_fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field.description or ""
