"""Base-model components: load them from a diffusers folder, or build them.

A base model is an ordinary diffusers text-to-video folder (``model_index.json``
plus ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``).
ZeroScope and ModelScope come from the hub; the ``tiny`` model is built here,
offline and deterministically, with the same architecture family and much
smaller channels, so every code path runs on a CPU in tests.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from motionsep.errors import ModelFormatError
from motionsep.model import dtype_lookup
from motionsep.model.family import (
    ANIMATEDIFF,
    MOTION_ADAPTER_FOLDER,
    Family,
    family_of,
    folder_family,
    join_motion_unet,
    split_motion_unet,
    weight_folders,
)
from motionsep.model.family import load_unet as load_family_unet
from motionsep.model.family import unet_config as family_unet_config

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

COMPONENT_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# The 3D U-Net of ZeroScope v2 / ModelScope T2V. Note that diffusers'
# `attention_head_dim` here is really the number of heads per attention.
ZEROSCOPE_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 64,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024,
    "down_block_types": [
        "CrossAttnDownBlock3D",
        "CrossAttnDownBlock3D",
        "CrossAttnDownBlock3D",
        "DownBlock3D",
    ],
    "downsample_padding": 1,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 32,
    "up_block_types": [
        "UpBlock3D",
        "CrossAttnUpBlock3D",
        "CrossAttnUpBlock3D",
        "CrossAttnUpBlock3D",
    ],
}

# Same block layout as ZeroScope (three attention down blocks, two layers each,
# a plain bottom block, mirrored up path), with tiny channels: about 5 M
# parameters. Every module name of ZeroScope's U-Net exists here too.
TINY_UNET_CONFIG: dict[str, Any] = {
    **ZEROSCOPE_UNET_CONFIG,
    "attention_head_dim": 4,
    "block_out_channels": [32, 64, 64, 64],
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "sample_size": 16,
}

TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    # The VAE downsamples only by 2, so mid-block attention would be over
    # (H/2 * W/2)^2 pairs: quadratic blow-up at real clip sizes.
    "mid_block_add_attention": False,
}

TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 32,
}

# ZeroScope's scheduler (DDIM over the Stable Diffusion noise schedule).
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

# AnimateDiff's DDIM schedule: the motion modules were trained on the linear
# beta schedule (the AnimateDiff configs and diffusers' AnimateDiff examples),
# not on Stable Diffusion's scaled_linear one.
ANIMATEDIFF_SCHEDULER_CONFIG: dict[str, Any] = {
    **SCHEDULER_CONFIG,
    "beta_schedule": "linear",
    "timestep_spacing": "linspace",
}

# The 2D U-Net of the tiny AnimateDiff model: the tiny ZeroScope U-Net's layout
# in Stable Diffusion's 2D blocks (three attention down blocks, a plain bottom
# block, two layers each), joined to a motion adapter of the same channels.
TINY_UNET2D_CONFIG: dict[str, Any] = {
    "attention_head_dim": 4,
    "block_out_channels": [32, 64, 64, 64],
    "cross_attention_dim": 32,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "sample_size": 16,
}

# The motion adapter of the tiny AnimateDiff model: 4 heads per motion module
# and AnimateDiff v1-5-2's 32 frame positions and mid-block motion module.
TINY_MOTION_ADAPTER_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64, 64, 64],
    "motion_layers_per_block": 2,
    "motion_num_attention_heads": 4,
    "motion_norm_num_groups": 8,
    "motion_max_seq_length": 32,
    "use_motion_mid_block": True,
}

TINY_SEED = 0


@dataclass
class Components:
    """The parts of a text-to-video model that motionsep drives."""

    unet: Any  # UNet3DConditionModel or UNetMotionModel: see motionsep.model.family
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    path: Path

    @property
    def family(self) -> Family:
        """The base-model family of the U-Net."""
        return family_of(self.unet)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))


def unet_config_hash(config: dict[str, Any]) -> str:
    """A stable hash of the U-Net architecture (ignores bookkeeping keys).

    Motion packages record it, so that a motion is only used with the base
    model architecture it was trained on.
    """
    relevant = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    relevant.pop("sample_size", None)
    blob = json.dumps(relevant, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()


def tiny_vocab() -> tuple[dict[str, int], list[str]]:
    """A character-level CLIP vocabulary, written in code (no download).

    Every printable ASCII character appears twice: inside a word and at the
    end of a word (``</w>``), as CLIP's byte-pair tokenizer expects. With no
    merges, words are spelled out letter by letter, which is enough for a
    model that only needs prompts to map to distinct embeddings.
    """
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(chars) + [f"{c}</w>" for c in chars]
    return {token: index for index, token in enumerate(tokens)}, []


def build_tiny_components(
    seed: int = TINY_SEED,
    *,
    family: Family | None = None,
    unet_config: dict[str, Any] | None = None,
    vae_config: dict[str, Any] | None = None,
    text_config: dict[str, Any] | None = None,
    tokenizer: CLIPTokenizer | None = None,
) -> dict[str, Any]:
    """Builds a small model of a family with seeded random weights.

    Building twice with the same seed gives bit-identical weights. The
    defaults give the ``tiny`` model (ZeroScope-shaped); ``family=ANIMATEDIFF``
    gives ``tiny-animatediff``: a 2D U-Net (``unet_config`` overrides
    :data:`TINY_UNET2D_CONFIG`) joined to a motion adapter of the same
    channels. The toy model passes its own sizes and word-level tokenizer.

    Returns:
        ``unet`` (ready to run: a ``UNet3DConditionModel`` or a
        ``UNetMotionModel``), ``vae``, ``text_encoder``, ``tokenizer`` and
        ``scheduler``.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    dtype_lookup.install()
    if tokenizer is None:
        vocab, merges = tiny_vocab()
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    vocab = tokenizer.get_vocab()

    torch.manual_seed(seed)
    if family is ANIMATEDIFF:
        from diffusers import MotionAdapter, UNet2DConditionModel

        unet2d = UNet2DConditionModel(**(unet_config or TINY_UNET2D_CONFIG))
        adapter_config = {
            **TINY_MOTION_ADAPTER_CONFIG,
            "block_out_channels": list(unet2d.config.block_out_channels),
            "motion_layers_per_block": unet2d.config.layers_per_block,
            "motion_norm_num_groups": unet2d.config.norm_num_groups,
        }
        unet = join_motion_unet(unet2d, MotionAdapter(**adapter_config))
        scheduler_config = ANIMATEDIFF_SCHEDULER_CONFIG
    else:
        unet = UNet3DConditionModel(**(unet_config or TINY_UNET_CONFIG))
        scheduler_config = SCHEDULER_CONFIG
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**(vae_config or TINY_VAE_CONFIG))
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            **(text_config or TINY_TEXT_CONFIG),
        )
    )
    scheduler = DDIMScheduler(**scheduler_config)
    for module in (unet, vae, text_encoder):
        module.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def save_components(parts: dict[str, Any], folder: Path) -> None:
    """Saves components as a diffusers folder of their family (safetensors only).

    A ZeroScope-family model is written as a ``TextToVideoSDPipeline`` folder;
    an AnimateDiff one as an ``AnimateDiffPipeline`` folder: the joined U-Net
    is split back into the Stable Diffusion ``unet/`` and ``motion_adapter/``.
    """
    import diffusers
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # The library never prints: no tqdm bars from the savers either.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    folder.mkdir(parents=True, exist_ok=True)
    family = family_of(parts["unet"])
    parts = dict(parts)
    index: dict[str, Any] = {
        "_class_name": family.pipeline_class,
        "_diffusers_version": diffusers.__version__,
    }
    names = list(COMPONENT_FOLDERS)
    if family is ANIMATEDIFF:
        parts["unet"], parts[MOTION_ADAPTER_FOLDER] = split_motion_unet(parts["unet"])
        names.append(MOTION_ADAPTER_FOLDER)
        # optional parts of AnimateDiffPipeline that motionsep does not use
        index |= {"feature_extractor": [None, None], "image_encoder": [None, None]}
    for name in names:
        part = parts[name]
        if name == "tokenizer" or name == "scheduler":
            part.save_pretrained(folder / name)
        else:
            part.save_pretrained(folder / name, safe_serialization=True)
        library = "transformers" if name in {"tokenizer", "text_encoder"} else "diffusers"
        index[name] = [library, type(part).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_zeroscope_unet(device: str | torch.device = "cpu", dtype: Any = None) -> Any:
    """The full ZeroScope v2 U-Net architecture with random weights (no download).

    Meant for speed and memory benchmarks and for counting parameters; with
    ``device="meta"`` no memory is allocated.
    """
    import torch
    from diffusers import UNet3DConditionModel

    dtype_lookup.install()
    with torch.device(device):
        unet = UNet3DConditionModel(**ZEROSCOPE_UNET_CONFIG)
    if dtype is not None:
        unet = unet.to(dtype=dtype)
    return unet


# The Stable Diffusion 1.5 U-Net that AnimateDiff animates (runwayml/stable-diffusion-v1-5's
# unet/config.json); `attention_head_dim` here too is really the number of heads.
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

# The AnimateDiff v1-5-2 motion adapter (guoyww/animatediff-motion-adapter-v1-5-2):
# two motion modules per block layer, 8 heads, 32 frame positions, a mid-block
# motion module.
ANIMATEDIFF_V152_ADAPTER_CONFIG: dict[str, Any] = {
    "block_out_channels": [320, 640, 1280, 1280],
    "motion_layers_per_block": 2,
    "motion_mid_block_layers_per_block": 1,
    "motion_num_attention_heads": 8,
    "motion_norm_num_groups": 32,
    "motion_max_seq_length": 32,
    "use_motion_mid_block": True,
}


def build_animatediff_unet(device: str | torch.device = "cpu", dtype: Any = None) -> Any:
    """The full AnimateDiff U-Net (SD 1.5 + the v1-5-2 motion adapter) with random weights.

    The two parts are built from :data:`SD15_UNET_CONFIG` and
    :data:`ANIMATEDIFF_V152_ADAPTER_CONFIG` and joined as the loaded model is
    (:func:`motionsep.model.family.join_motion_unet`). Meant for speed and
    memory benchmarks and for counting parameters; with ``device="meta"`` no
    memory is allocated.
    """
    import torch
    from diffusers import MotionAdapter, UNet2DConditionModel

    with torch.device(device):
        unet2d = UNet2DConditionModel(**SD15_UNET_CONFIG)
        adapter = MotionAdapter(**ANIMATEDIFF_V152_ADAPTER_CONFIG)
        unet = join_motion_unet(unet2d, adapter)
    if dtype is not None:
        unet = unet.to(dtype=dtype)
    return unet


def check_model_folder(folder: Path) -> dict[str, Any]:
    """Checks that a folder is a text-to-video model motionsep supports.

    Returns the config of the U-Net it loads as (for AnimateDiff: the joined
    ``UNetMotionModel``; see :func:`motionsep.model.family.unet_config`).

    Raises:
        ModelFormatError: naming the missing file or the unsupported part.
    """
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelFormatError(
            f"{folder} is not a diffusers model folder: model_index.json is missing",
            "point at a folder saved by diffusers, or use `motionsep download`",
        )
    for name in ("unet", "vae", "text_encoder", "scheduler"):
        config = folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if not config.is_file():
            raise ModelFormatError(f"{folder}: {config.relative_to(folder)} is missing")
    if not (folder / "tokenizer").is_dir():
        raise ModelFormatError(f"{folder}: the tokenizer folder is missing")
    family = folder_family(folder)
    for name in weight_folders(family):
        if not list((folder / name).glob("*.safetensors")):
            raise ModelFormatError(
                f"{folder}/{name} holds no .safetensors weights",
                "motionsep loads only safetensors; re-import the model with `motionsep download`",
            )
    return family_unet_config(folder)


def load_unet(folder: Path, dtype: Any = None, device: Any = "cpu") -> Any:
    """Loads only the U-Net of a model folder of either family (safetensors only)."""
    return load_family_unet(folder, dtype=dtype, device=device)


def load_components(folder: Path, dtype: Any = None, device: Any = "cpu") -> Components:
    """Loads every component of a model folder, frozen, in eval mode.

    Args:
        folder: A diffusers text-to-video folder (see :func:`check_model_folder`).
        dtype: torch dtype of the U-Net, VAE and text encoder; None keeps fp32.
        device: Where to put them.
    """
    from diffusers import AutoencoderKL, DDIMScheduler
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    check_model_folder(folder)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    unet = load_unet(folder, dtype=dtype, device=device)
    vae = AutoencoderKL.from_pretrained(
        folder, subfolder="vae", torch_dtype=dtype, use_safetensors=True
    )
    text_encoder = CLIPTextModel.from_pretrained(
        folder, subfolder="text_encoder", dtype=dtype, use_safetensors=True
    )
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    for module in (vae, text_encoder):
        module.to(device)
        module.eval()
        module.requires_grad_(False)
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        path=folder,
    )


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """Token ids (len(prompts), model_max_length), padded and truncated as CLIP expects."""
    ids: torch.Tensor = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids


def encode_prompts(components: Components, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings (last hidden state) of ``prompts``, padded to the max length.

    Returns:
        A tensor (len(prompts), max_length, hidden) on the text encoder's device.
    """
    import torch

    ids = tokenize(components.tokenizer, prompts)
    encoder = components.text_encoder
    with torch.no_grad():
        return encoder(ids.to(encoder.device))[0]


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those that require grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


TINY_CLIP_IMAGE_SIZE = 32

# A CLIP with the architecture of openai/clip-vit-base-patch32 in miniature:
# the same text and vision towers and projections, tiny widths, 32x32 images
# in 8x8 patches.
TINY_CLIP_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": TINY_CLIP_IMAGE_SIZE,
    "patch_size": 8,
}


def build_tiny_clip(folder: Path, seed: int = TINY_SEED) -> Path:
    """Builds a tiny random CLIP (model, tokenizer, image processor) and saves it to ``folder``.

    The folder has the layout of a CLIP downloaded with ``motionsep download
    clip`` (``config.json``, ``model.safetensors``, tokenizer files and
    ``preprocessor_config.json``), so evaluation loads it through the same
    code path as the real model. Building twice with the same seed gives
    bit-identical weights.

    Args:
        folder: Where to write it (created if missing).
        seed: Seed of the random weights.

    Returns:
        ``folder``.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    vocab, merges = tiny_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    text_config = {
        **TINY_TEXT_CONFIG,
        "vocab_size": len(vocab),
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    config = CLIPConfig(
        text_config=text_config,
        vision_config=TINY_CLIP_VISION_CONFIG,
        projection_dim=TINY_TEXT_CONFIG["projection_dim"],
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
        crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder
