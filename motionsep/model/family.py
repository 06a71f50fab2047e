"""Base-model families: the one place that knows how each kind of video U-Net is built.

motionsep drives two families of text-to-video model:

- ``zeroscope``: ZeroScope / ModelScope, a ``UNet3DConditionModel``. Its
  temporal transformers are ``transformer_in`` and ``*.temp_attentions.M``;
  temporal convolutions also pass information between frames.
- ``animatediff``: a Stable Diffusion 1.5 ``UNet2DConditionModel`` plus an
  AnimateDiff ``MotionAdapter``, run as diffusers' ``UNetMotionModel``. Its
  temporal transformers are the motion modules ``*.motion_modules.M``, with
  sinusoidal frame positions and no temporal convolution: they are the only
  path between frames. A model folder holds the SD 1.5 components plus
  ``motion_adapter/``, the layout ``AnimateDiffPipeline.from_pretrained``
  reads; the two are joined when the U-Net is loaded.

Everything else (recipes, TAP injection, the highway, training, sampling,
inspect-attention, interop) asks the family of a U-Net or a folder through
:func:`family_of` / :func:`folder_family` and never tests for a U-Net class.

Both U-Nets take the same call here: ``unet(latents (b, c, f, h, w), t,
encoder_hidden_states=(b, seq, dim))``. ``UNetMotionModel`` wants the text
repeated per frame, ``(b * f, seq, dim)``; :meth:`Family.load_unet` gives it
a forward pre-hook that repeats a per-video text batch (one that already has
``b * f`` rows, as ``AnimateDiffPipeline`` passes, goes through unchanged).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from motionsep.errors import ModelFormatError
from motionsep.model import dtype_lookup

if TYPE_CHECKING:
    from torch import nn

MOTION_ADAPTER_FOLDER = "motion_adapter"
"""Where an AnimateDiff model folder keeps its motion module weights."""


@dataclass(frozen=True)
class Family:
    """What motionsep needs to know about one family of video U-Net.

    Attributes:
        name: ``zeroscope`` or ``animatediff``.
        title: Human-readable name for messages.
        unet_class: The diffusers class of the loaded U-Net.
        temporal_class: Class of each temporal transformer (what recipes resolve against).
        pipeline_class: The diffusers pipeline that reads this family's folders.
        width: Default video width in pixels.
        height: Default video height in pixels.
        frames: Default frames per video.
        fps: Default frame rate of written videos.
        temporal_convolutions: Whether the U-Net has temporal convolutions.
    """

    name: str
    title: str
    unet_class: str
    temporal_class: str
    pipeline_class: str
    width: int
    height: int
    frames: int
    fps: int
    temporal_convolutions: bool

    def owns(self, unet: nn.Module) -> bool:
        """Whether ``unet`` (possibly wrapped by peft layers inside) is of this family."""
        return type(unet).__name__ == self.unet_class

    def temporal_transformer_names(self, unet: nn.Module) -> list[str]:
        """Names of every temporal transformer, in module order."""
        return [n for n, m in unet.named_modules() if type(m).__name__ == self.temporal_class]

    def spatial_attention_name(self, down_block: int, layer: int) -> str:
        """The spatial transformer whose output the highway takes for one down-block layer."""
        return f"down_blocks.{down_block}.attentions.{layer}"

    def max_frames(self, unet_config: dict[str, Any]) -> int | None:
        """Most frames one forward can take (the motion modules' positions), or None."""
        if self.name == ANIMATEDIFF.name:
            return int(unet_config.get("motion_max_seq_length", 32))
        return None


ZEROSCOPE = Family(
    name="zeroscope",
    title="ZeroScope / ModelScope (UNet3DConditionModel)",
    unet_class="UNet3DConditionModel",
    temporal_class="TransformerTemporalModel",
    pipeline_class="TextToVideoSDPipeline",
    width=576,
    height=320,
    frames=24,
    fps=8,
    temporal_convolutions=True,
)

ANIMATEDIFF = Family(
    name="animatediff",
    title="AnimateDiff (Stable Diffusion 1.5 + motion adapter, UNetMotionModel)",
    unet_class="UNetMotionModel",
    temporal_class="AnimateDiffTransformer3D",
    pipeline_class="AnimateDiffPipeline",
    width=512,
    height=512,
    frames=16,
    fps=8,
    temporal_convolutions=False,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (ZEROSCOPE, ANIMATEDIFF)}


def temporal_transformer_names(unet: nn.Module) -> list[str]:
    """Names of every temporal transformer of a U-Net of any family, in module order."""
    classes = {family.temporal_class for family in FAMILIES.values()}
    return [name for name, m in unet.named_modules() if type(m).__name__ in classes]


def family_of(unet: nn.Module) -> Family:
    """The family of a loaded U-Net.

    Raises:
        ModelFormatError: for a U-Net of no supported family.
    """
    for family in FAMILIES.values():
        if family.owns(unet):
            return family
    raise ModelFormatError(
        f"a {type(unet).__name__} is not a video U-Net motionsep supports",
        "use a ZeroScope / ModelScope (UNet3DConditionModel) or an AnimateDiff "
        "(UNetMotionModel) base model",
    )


def read_config(path: Path, root: Path | None = None) -> dict[str, Any]:
    """A JSON object from a model folder's config file.

    Args:
        path: The file.
        root: The model folder, to name a missing file relative to it
            (default: the file's parent folder and name).

    Raises:
        ModelFormatError: naming the file that is missing, unreadable or not an object.
    """
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as exc:
        where = f"{root}: {path.relative_to(root)}" if root else f"{path.parent.name}/{path.name}"
        raise ModelFormatError(f"{where} is missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelFormatError(f"{path} does not hold a JSON object")
    return value


def folder_family(folder: Path) -> Family:
    """The family of a diffusers model folder, from its U-Net config (no weights read).

    Raises:
        ModelFormatError: naming what the folder lacks or holds instead.
    """
    unet_class = read_config(folder / "unet" / "config.json", folder).get("_class_name")
    if unet_class == ZEROSCOPE.unet_class:
        return ZEROSCOPE
    if unet_class == "UNet2DConditionModel":
        if (folder / MOTION_ADAPTER_FOLDER / "config.json").is_file():
            return ANIMATEDIFF
        raise ModelFormatError(
            f"{folder} is an image model (a UNet2DConditionModel, Stable Diffusion?) without "
            f"a motion adapter ({MOTION_ADAPTER_FOLDER}/ is missing); motionsep needs a "
            "UNet3DConditionModel (ZeroScope / ModelScope) or a Stable Diffusion 1.5 U-Net "
            "with an AnimateDiff motion adapter",
            "put an AnimateDiff motion adapter on it: `motionsep download animatediff "
            f"--from {folder}`",
        )
    raise ModelFormatError(
        f"{folder} has a {unet_class!r} U-Net; motionsep needs a UNet3DConditionModel "
        "(ZeroScope / ModelScope) or a Stable Diffusion 1.5 U-Net with an AnimateDiff "
        f"motion adapter ({MOTION_ADAPTER_FOLDER}/)",
    )


def weight_folders(family: Family) -> tuple[str, ...]:
    """Sub-folders of a model folder that must hold safetensors weights."""
    base = ("unet", "vae", "text_encoder")
    return (*base, MOTION_ADAPTER_FOLDER) if family is ANIMATEDIFF else base


def unet_config(folder: Path) -> dict[str, Any]:
    """The config of the U-Net the folder loads as, with every default filled in.

    For AnimateDiff this is the joined ``UNetMotionModel``'s config, built on
    the meta device (no memory, no weights), so it equals ``unet.config`` of
    the loaded model: that is what motion packages hash. Building it means
    building three models on the meta device, and one command asks for it
    several times (checking the folder, loading, checking the training base),
    so it is computed once per pair of config files in a process.
    """
    family = folder_family(folder)
    raw = read_config(folder / "unet" / "config.json", folder)
    if family is ZEROSCOPE:
        return raw
    adapter_config = read_config(folder / MOTION_ADAPTER_FOLDER / "config.json", folder)
    try:
        joined = _joined_config(
            json.dumps(raw, sort_keys=True), json.dumps(adapter_config, sort_keys=True)
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelFormatError(
            f"{folder}: the U-Net and the motion adapter do not fit together: {exc}",
            "the motion adapter must be one for Stable Diffusion 1.5 (same blocks, "
            "layers and channels as the U-Net)",
        ) from exc
    return json.loads(joined)


@functools.lru_cache(maxsize=16)
def _joined_config(unet_json: str, adapter_json: str) -> str:
    """The joined ``UNetMotionModel`` config of two config files (JSON in, JSON out:
    the cache hands out no object a caller could change)."""
    import torch
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    with _quiet_diffusers(), torch.device("meta"):
        unet2d = UNet2DConditionModel.from_config(json.loads(unet_json))
        adapter = MotionAdapter.from_config(json.loads(adapter_json))
        joined = UNetMotionModel.from_unet2d(unet2d, adapter, load_weights=False)
    return json.dumps(dict(joined.config))


class _quiet_diffusers:  # noqa: N801 - used like a function
    """Silences diffusers' logger inside the block (the library never prints)."""

    def __enter__(self) -> None:
        from diffusers.utils import logging as diffusers_logging

        self._level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity(logging.ERROR)
        diffusers_logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity(self._level)


def _text_per_frame(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Repeats a per-video text batch per frame, as ``UNetMotionModel`` expects."""
    sample = args[0] if args else kwargs["sample"]
    if "encoder_hidden_states" in kwargs:
        text = kwargs["encoder_hidden_states"]
    elif len(args) > 2:
        text = args[2]
    else:
        return None
    frames = sample.shape[2]
    if text is None or frames == 1 or text.shape[0] != sample.shape[0]:
        return None
    text = text.repeat_interleave(frames, dim=0)
    if "encoder_hidden_states" in kwargs:
        return args, {**kwargs, "encoder_hidden_states": text}
    return (*args[:2], text, *args[3:]), kwargs


def per_video_text(unet: nn.Module) -> nn.Module:
    """Lets a ``UNetMotionModel`` take one text embedding per video (see the module doc).

    Idempotent; returns ``unet``. Other U-Nets are returned unchanged.
    """
    if ANIMATEDIFF.owns(unet) and not getattr(unet, "_motionsep_text_hook", False):
        unet.register_forward_pre_hook(_text_per_frame, with_kwargs=True)
        unet._motionsep_text_hook = True  # type: ignore[assignment]
    return unet


def load_unet(folder: Path, dtype: Any = None, device: Any = "cpu") -> nn.Module:
    """Loads the U-Net of a model folder of either family, frozen, in eval mode."""
    family = folder_family(folder)
    dtype_lookup.install()
    with _quiet_diffusers():
        if family is ZEROSCOPE:
            from diffusers import UNet3DConditionModel

            unet = UNet3DConditionModel.from_pretrained(
                folder, subfolder="unet", torch_dtype=dtype, use_safetensors=True
            )
        else:
            from diffusers import MotionAdapter, UNet2DConditionModel

            unet2d = UNet2DConditionModel.from_pretrained(
                folder, subfolder="unet", torch_dtype=dtype, use_safetensors=True
            )
            adapter = MotionAdapter.from_pretrained(
                folder, subfolder=MOTION_ADAPTER_FOLDER, torch_dtype=dtype, use_safetensors=True
            )
            unet = join_motion_unet(unet2d, adapter)
    unet.to(device)
    unet.eval()
    unet.requires_grad_(False)
    return unet


def join_motion_unet(unet2d: nn.Module, adapter: nn.Module) -> nn.Module:
    """``UNetMotionModel.from_unet2d`` (quiet), with the per-video text call of this module."""
    from diffusers import UNetMotionModel

    dtype_lookup.install()
    with _quiet_diffusers():
        unet = UNetMotionModel.from_unet2d(unet2d, adapter)
        unet = unet.to(dtype=next(unet2d.parameters()).dtype)
    return per_video_text(unet)


def split_motion_unet(unet: Any) -> tuple[nn.Module, nn.Module]:
    """A ``UNetMotionModel`` as the ``UNet2DConditionModel`` and ``MotionAdapter`` it joins.

    The inverse of :func:`join_motion_unet`: every spatial tensor goes to the
    2D U-Net under the same name, every motion-module tensor to the adapter
    (strict loads: nothing is left over or missing). Saving a built or
    trained motion U-Net in the AnimateDiff folder layout goes through here.
    """
    from diffusers import MotionAdapter, UNet2DConditionModel

    config = dict(unet.config)
    config["down_block_types"] = [t.replace("Motion", "2D") for t in config["down_block_types"]]
    config["up_block_types"] = [t.replace("Motion", "2D") for t in config["up_block_types"]]
    config["mid_block_type"] = "UNetMidBlock2DCrossAttn"
    # from_unet2d moves the 2D U-Net's head count (its attention_head_dim) into
    # num_attention_heads, which the 2D U-Net refuses: move it back.
    config["attention_head_dim"] = config["num_attention_heads"]
    config["num_attention_heads"] = None
    # Only the 2D U-Net's own arguments: the motion keys would be saved into its
    # config.json and diffusers would warn about them at every load.
    accepted = inspect.signature(UNet2DConditionModel.__init__).parameters
    with _quiet_diffusers():
        unet2d = UNet2DConditionModel.from_config(
            {key: value for key, value in config.items() if key in accepted}
        )
    adapter = MotionAdapter(
        block_out_channels=list(config["block_out_channels"]),
        motion_layers_per_block=config["layers_per_block"],
        motion_transformer_layers_per_block=config["temporal_transformer_layers_per_block"],
        motion_mid_block_layers_per_block=config["temporal_transformer_layers_per_mid_block"],
        motion_num_attention_heads=config["motion_num_attention_heads"],
        motion_norm_num_groups=config["norm_num_groups"],
        motion_max_seq_length=config["motion_max_seq_length"],
        use_motion_mid_block=config["use_motion_mid_block"],
    )
    state = unet.state_dict()
    adapter.load_state_dict({k: v for k, v in state.items() if ".motion_modules." in k})
    unet2d.load_state_dict({k: v for k, v in state.items() if ".motion_modules." not in k})
    dtype = next(unet.parameters()).dtype
    with _quiet_diffusers():
        return unet2d.to(dtype=dtype).eval(), adapter.to(dtype=dtype).eval()
