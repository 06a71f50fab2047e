"""Getting base models into the store: built locally, from the hub, or from a folder.

``tiny`` is built here, offline and deterministically. Hub models (zeroscope,
modelscope, clip, or any ``OWNER/REPO``) are fetched file by file with
huggingface_hub into a staging folder ``models/.partial-NAME/`` that survives
an interrupted run, so a rerun skips every finished file. Only the files a
text-to-video pipeline (or, for CLIP, ``CLIPModel`` + ``CLIPProcessor``) needs
are fetched, safetensors preferred. The store is safetensors-only: pickled
``.bin`` weights are read with ``torch.load(weights_only=True)`` and written
back as safetensors. A model becomes visible under ``models/NAME`` only after
it was assembled, verified and recorded, by one atomic rename.

``animatediff`` joins two sources into one model folder: a Stable Diffusion
1.5 base (the hub's ``stable-diffusion-v1-5/stable-diffusion-v1-5``, another
SD 1.5 fine-tune with ``base=``, or a local folder with ``base_folder=``) and
an AnimateDiff motion adapter (``guoyww/animatediff-motion-adapter-v1-5-2``
unless ``adapter=`` names another), which lands under ``motion_adapter/``.
Their configs are fetched first and checked together, so a base or adapter
that does not fit is refused before any weights are fetched. The folder's
``model_index.json`` is rewritten for ``AnimateDiffPipeline`` and its
scheduler for DDIM on AnimateDiff's linear schedule; the record names both
sources and their commits.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from motionsep import __version__
from motionsep.errors import (
    DiskFullError,
    HubAccessError,
    HubFileMissingError,
    HubRepoNotFoundError,
    HubUnreachableError,
    ModelFormatError,
    ModelNotFoundError,
    MotionsepError,
    UsageError,
)
from motionsep.model.family import (
    ANIMATEDIFF,
    MOTION_ADAPTER_FOLDER,
    ZEROSCOPE,
    folder_family,
    read_config,
)
from motionsep.progress import Progress, or_null
from motionsep.store import (
    MODEL_RECORD,
    ModelRecord,
    Store,
    atomic_folder,
    check_model,
    model_problems,
    validate_name,
)

# Kinds of model the store holds; they decide which files are fetched and how
# the result is verified.
KIND_T2V = "text-to-video"
KIND_CLIP = "clip"
KIND_BUILTIN = "built-in"
KIND_ANIMATEDIFF = "animatediff"  # a Stable Diffusion 1.5 base + a motion adapter: two sources
KIND_MOTION_ADAPTER = "motion-adapter"  # a diffusers MotionAdapter: config.json + weights

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MOTION_ADAPTER_REPO = "guoyww/animatediff-motion-adapter-v1-5-2"
ANIMATEDIFF_NAME = "animatediff"
"""Store name of the default AnimateDiff model; other bases get ``animatediff--...`` names."""
IMAGE_UNET_CLASS = "UNet2DConditionModel"
"""The U-Net class of a Stable Diffusion folder (an image model until it gets a motion adapter)."""
MOTION_ADAPTER_CLASS = "MotionAdapter"
# What a Stable Diffusion scheduler config passes on to the AnimateDiff DDIM one:
# how the base was trained to predict noise (the schedule's shape is AnimateDiff's).
SCHEDULER_KEPT_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "prediction_type",
    "rescale_betas_zero_snr",
)

DEFAULT_ENDPOINT = "https://huggingface.co"

# Components of a diffusers text-to-video folder; the first three carry weights.
T2V_WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
T2V_CONFIG_COMPONENTS = ("tokenizer", "scheduler")
# Base names of weight files (before shard suffixes, variants and extension).
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
# What CLIPModel + CLIPProcessor read besides the weights.
CLIP_SIDE_FILES = (
    "config.json",
    "preprocessor_config.json",
    "processor_config.json",  # what transformers 5 writes instead of the one above
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


@dataclass(frozen=True)
class KnownModel:
    """A base model motionsep knows by a short name."""

    name: str
    repo_id: str | None
    description: str
    kind: str = KIND_T2V
    adapter_repo_id: str | None = None  # animatediff: the motion adapter put on ``repo_id``


KNOWN_MODELS: dict[str, KnownModel] = {
    "zeroscope": KnownModel(
        "zeroscope", "cerspense/zeroscope_v2_576w", "ZeroScope v2 576w text-to-video (default)"
    ),
    "modelscope": KnownModel(
        "modelscope", "ali-vilab/text-to-video-ms-1.7b", "ModelScope text-to-video 1.7B"
    ),
    "clip": KnownModel(
        "clip", "openai/clip-vit-base-patch32", "CLIP ViT-B/32 for evaluate", KIND_CLIP
    ),
    ANIMATEDIFF_NAME: KnownModel(
        ANIMATEDIFF_NAME,
        SD15_REPO,
        "AnimateDiff: Stable Diffusion 1.5 + motion adapter v1-5-2 (--base/--from: other SD 1.5)",
        KIND_ANIMATEDIFF,
        adapter_repo_id=MOTION_ADAPTER_REPO,
    ),
    "toy": KnownModel(
        "toy",
        None,
        "pretrained toy-world model shipped with motionsep (no download; see `motionsep toy`)",
        KIND_BUILTIN,
    ),
    "toy-animatediff": KnownModel(
        "toy-animatediff",
        None,
        "pretrained toy-world model of the AnimateDiff family, shipped with motionsep",
        KIND_BUILTIN,
    ),
    "tiny": KnownModel(
        "tiny",
        None,
        "tiny random ZeroScope-shaped model for tests (built locally)",
        KIND_BUILTIN,
    ),
    "tiny-animatediff": KnownModel(
        "tiny-animatediff",
        None,
        "tiny random AnimateDiff model (SD-style U-Net + motion adapter) for tests (built locally)",
        KIND_BUILTIN,
    ),
}

TINY_MODELS = ("tiny", "tiny-animatediff")
"""Built here from seeded random weights, one per base-model family."""


def install_tiny(
    store: Store,
    force: bool = False,
    progress: Progress | None = None,
    repair: bool = False,
    name: str = "tiny",
) -> ModelRecord:
    """Builds a tiny model and installs it in the store under its name.

    Args:
        store: Where to install it.
        force: Rebuild even if it is installed.
        progress: Receives a "build NAME" task.
        repair: Rebuild it if its files no longer match its record.
        name: ``tiny`` (ZeroScope family) or ``tiny-animatediff``.

    Returns:
        The record of the installed model.

    Raises:
        DamagedModelError: it is installed but damaged, without ``repair``.
    """
    from motionsep.model.components import TINY_SEED, build_tiny_components, save_components

    family = ANIMATEDIFF if name == "tiny-animatediff" else ZEROSCOPE
    existing = store.model_record(name)
    if existing is not None and not force and not _needs_repair(existing, repair, progress):
        return existing
    events = or_null(progress)
    task = f"build {name}"
    events.start(task, total=2, unit="step")
    with atomic_folder(store.model_path(name), overwrite=True) as tmp:
        parts = build_tiny_components(seed=TINY_SEED, family=family)
        events.advance(task)
        save_components(parts, tmp)
        store.write_model_record(tmp, name, source=f"built-in (seed {TINY_SEED})", revision=None)
        events.advance(task)
    events.finish(task)
    record = store.model_record(name)
    assert record is not None  # written just above
    return record


# -- which files a model needs ------------------------------------------------


@dataclass(frozen=True)
class WeightFile:
    """What a weight file name says about itself."""

    stem: str
    fmt: str  # "safetensors" or "bin"
    variant: str | None
    is_index: bool


def parse_weight_name(filename: str) -> WeightFile | None:
    """Parses names like ``diffusion_pytorch_model-00001-of-00002.fp16.safetensors``.

    Also understands shard indexes (``model.safetensors.index.json``,
    ``diffusion_pytorch_model.safetensors.index.fp16.json``).

    Returns:
        None for files that are not model weights (configs, flax, tf, ...).
    """
    tokens = filename.split(".")
    stem = tokens[0].split("-", 1)[0]
    if stem not in WEIGHT_STEMS:
        return None
    is_index = "index" in tokens[1:] and tokens[-1] == "json"
    if not is_index and tokens[-1] not in ("safetensors", "bin"):
        return None
    fmt = "safetensors" if "safetensors" in tokens[1:] else "bin" if "bin" in tokens[1:] else None
    if fmt is None:
        return None
    rest = [t for t in tokens[1:] if t not in ("safetensors", "bin", "index", "json")]
    return WeightFile(stem=stem, fmt=fmt, variant=".".join(rest) or None, is_index=is_index)


def store_file_name(filename: str) -> str:
    """The name a weight file gets in the store: safetensors, no variant.

    The store keeps one set of weights per model under the names diffusers
    and transformers load by default, so a ``--variant fp16`` download loads
    like any other; ``pytorch_model*.bin`` becomes ``model*.safetensors``.
    """
    parsed = parse_weight_name(filename)
    if parsed is None:
        return filename
    tokens = filename.split(".")
    head = tokens[0]
    if parsed.stem == "pytorch_model":
        head = "model" + head[len("pytorch_model") :]
    if parsed.is_index:
        return f"{head}.safetensors.index.json"
    return f"{head}.safetensors"


@dataclass(frozen=True)
class FilePlan:
    """The files of a model to fetch, and where each one goes in the store folder.

    Attributes:
        kind: ``text-to-video`` or ``clip``.
        files: Repository paths, small files first.
        targets: Repository path -> path inside the store folder.
        notes: Lines worth showing (e.g. a component without the asked variant).
    """

    kind: str
    files: tuple[str, ...]
    targets: dict[str, str]
    notes: tuple[str, ...] = field(default=())

    @property
    def converts(self) -> tuple[str, ...]:
        """Files that are pickled weights and get converted to safetensors."""
        return tuple(path for path in self.files if path.endswith(".bin"))


def _choose_weights(
    names: list[str], variant: str | None, where: str, notes: list[str]
) -> list[str]:
    """Picks one set of weights among the file names of one folder.

    Prefers the asked variant (falling back to the plain weights, as diffusers
    does), and within it safetensors over pickled ``.bin``.
    """
    parsed = {name: parse_weight_name(name) for name in names}
    weights = {name: p for name, p in parsed.items() if p is not None}
    if not weights:
        raise ModelFormatError(
            f"{where} holds no model weights (looked for *.safetensors and *.bin)",
            "is this a diffusers text-to-video repository? check the id or folder",
        )
    wanted: list[str | None] = [variant, None] if variant else [None]
    for choice in wanted:
        group = {name: p for name, p in weights.items() if p.variant == choice}
        if not group:
            continue
        if choice != variant:
            notes.append(f"{where} has no {variant!r} weights; using the default ones")
        for fmt in ("safetensors", "bin"):
            chosen = sorted(name for name, p in group.items() if p.fmt == fmt)
            if any(not weights[name].is_index for name in chosen):
                return chosen
    raise ModelFormatError(
        f"{where} holds no default weights, only variants "
        f"{sorted({str(p.variant) for p in weights.values()})}",
        "pass one of them with --variant",
    )


def plan_files(
    paths: Iterable[str], kind: str | None = None, variant: str | None = None
) -> FilePlan:
    """Selects what to fetch from a repository (or folder) listing.

    Text-to-video: ``model_index.json``; the ``*.json`` and ``*.txt`` files
    directly inside ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
    ``scheduler/`` (and ``motion_adapter/`` where an AnimateDiff folder has
    one); and one set of weights per weight component (see
    :func:`_choose_weights`). CLIP: the files of :data:`CLIP_SIDE_FILES` that
    exist and one set of top-level weights. Motion adapter: ``config.json``
    and one set of top-level weights. Everything else (README, safety
    checker, flax/tf weights, webui checkpoints, other variants) is left out.

    Args:
        paths: Every file path in the repository, ``/``-separated.
        kind: ``text-to-video``, ``clip`` or ``motion-adapter``; text-to-video
            or clip is detected from the listing if None.
        variant: Weight variant to prefer, e.g. ``fp16``.

    Raises:
        ModelFormatError: if the listing is not a model motionsep can use.
    """
    all_paths = sorted(set(paths))
    if kind is None:
        if "model_index.json" in all_paths:
            kind = KIND_T2V
        elif "config.json" in all_paths:
            kind = KIND_CLIP
        else:
            raise ModelFormatError(
                "neither a diffusers pipeline (model_index.json) nor a CLIP model (config.json)",
                "motionsep downloads text-to-video diffusers repositories and CLIP models",
            )
    by_folder: dict[str, list[str]] = {}
    for path in all_paths:
        parent = str(PurePosixPath(path).parent)
        by_folder.setdefault("" if parent == "." else parent, []).append(PurePosixPath(path).name)
    notes: list[str] = []
    small: list[str] = []
    weights: list[str] = []
    if kind == KIND_T2V:
        if "model_index.json" not in all_paths:
            raise ModelFormatError("model_index.json is missing")
        small.append("model_index.json")
        weighted: tuple[str, ...] = T2V_WEIGHT_COMPONENTS
        if f"{MOTION_ADAPTER_FOLDER}/config.json" in all_paths:
            weighted += (MOTION_ADAPTER_FOLDER,)  # an AnimateDiff folder, adapter included
        for component in weighted + T2V_CONFIG_COMPONENTS:
            names = by_folder.get(component, [])
            side = [
                n for n in names if n.endswith((".json", ".txt")) and parse_weight_name(n) is None
            ]
            if not side:
                raise ModelFormatError(f"the {component}/ folder is missing or has no config")
            small += [f"{component}/{n}" for n in side]
            if component in weighted:
                chosen = _choose_weights(names, variant, f"{component}/", notes)
                weights += [f"{component}/{n}" for n in chosen]
    elif kind == KIND_MOTION_ADAPTER:
        names = by_folder.get("", [])
        if "config.json" not in names:
            raise ModelFormatError(
                "config.json is missing at the top of the motion adapter",
                "a diffusers MotionAdapter repository such as "
                f"{MOTION_ADAPTER_REPO} has config.json and its weights at the top",
            )
        small.append("config.json")
        weights += _choose_weights(names, variant, "the motion adapter", notes)
    elif kind == KIND_CLIP:
        names = by_folder.get("", [])
        small += [n for n in CLIP_SIDE_FILES if n in names]
        if "config.json" not in small:
            raise ModelFormatError("config.json is missing")
        weights += _choose_weights(names, variant, "the repository root", notes)
    else:
        raise UsageError(f"unknown model kind {kind!r}")
    targets: dict[str, str] = {}
    for path in small + weights:
        pure = PurePosixPath(path)
        targets[path] = str(pure.parent / store_file_name(pure.name)) if path in weights else path
    return FilePlan(kind=kind, files=tuple(small + weights), targets=targets, notes=tuple(notes))


# -- verification ---------------------------------------------------------------


def verify_model_folder(folder: Path, kind: str) -> None:
    """Checks an assembled store folder before it is marked ready.

    Every JSON file must parse and every safetensors header must read. A
    text-to-video folder must pass :func:`components.check_model_folder`
    (a U-Net of a family motionsep drives); an AnimateDiff one must also pass
    :func:`check_animatediff_parts` (a Stable Diffusion 1.5-shaped U-Net and
    a motion adapter that fits it). A CLIP folder needs a CLIP config, a
    tokenizer and safetensors weights.

    Raises:
        ModelFormatError: naming the file at fault.
    """
    from safetensors import safe_open

    from motionsep.model.components import check_model_folder

    for path in sorted(folder.rglob("*.json")):
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFormatError(f"{path} is not valid JSON: {exc}") from exc
    for path in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own untyped errors
            raise ModelFormatError(f"{path} is not a readable safetensors file: {exc}") from exc
    if kind == KIND_T2V:
        if folder_family(folder) is ANIMATEDIFF:
            check_animatediff_parts(folder)
        check_model_folder(folder)
        tokenizer = folder / "tokenizer"
        if not (tokenizer / "tokenizer.json").is_file() and not (
            (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()
        ):
            raise ModelFormatError(
                f"{tokenizer} has neither tokenizer.json nor vocab.json + merges.txt"
            )
        return
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "clip":
        raise ModelFormatError(
            f"{folder}/config.json describes a {config.get('model_type')!r} model, not 'clip'",
            "the clip slot takes a CLIPModel such as openai/clip-vit-base-patch32",
        )
    if not list(folder.glob("*.safetensors")):
        raise ModelFormatError(f"{folder} holds no .safetensors weights")
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        raise ModelFormatError(f"{folder} has no tokenizer files")
    if not any(
        (folder / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")
    ):
        raise ModelFormatError(f"{folder} has no image processor config (preprocessor_config.json)")


SD15_CHANNELS = [320, 640, 1280, 1280]
SD15_TEXT_WIDTH = 768
"""The channels of a full-size Stable Diffusion 1.x / 2.x U-Net, and SD 1.x's text width."""


def sd15_problems(folder: Path) -> list[str]:
    """Why the Stable Diffusion folder ``folder`` is not shaped like SD 1.5 (empty: it is).

    Reads configs only: ``model_index.json``, ``unet/config.json`` and
    ``text_encoder/config.json``. An SD 1.5 U-Net denoises 4 latent channels,
    is conditioned on one CLIP text encoder's hidden states alone (SDXL adds
    a second encoder and extra embeddings, 2048 wide), and takes no class
    labels. The block layout is checked against the motion adapter by
    :func:`adapter_problems`.
    """
    index = read_config(folder / "model_index.json")
    unet = read_config(folder / "unet" / "config.json")
    text = read_config(folder / "text_encoder" / "config.json")
    problems = []
    if unet.get("_class_name") != IMAGE_UNET_CLASS:
        problems.append(f"its U-Net is a {unet.get('_class_name')!r}, not a {IMAGE_UNET_CLASS}")
    if "text_encoder_2" in index or unet.get("addition_embed_type"):
        problems.append(
            "it has a second text encoder or extra embeddings "
            f"(addition_embed_type {unet.get('addition_embed_type')!r}): an SDXL-style model"
        )
    if unet.get("in_channels", 4) != 4 or unet.get("out_channels", 4) != 4:
        problems.append(
            f"its U-Net takes {unet.get('in_channels')} channels in and gives "
            f"{unet.get('out_channels')} out, not 4 (an inpainting or depth model?)"
        )
    if unet.get("class_embed_type") or unet.get("num_class_embeds"):
        problems.append("its U-Net takes class labels (an upscaler or variation model?)")
    width = unet.get("cross_attention_dim")
    if width != text.get("hidden_size"):
        problems.append(
            f"its U-Net attends to {width}-wide text but its text encoder gives "
            f"{text.get('hidden_size')} (SD 1.5: 768 and 768)"
        )
    elif list(unet.get("block_out_channels") or []) == SD15_CHANNELS and width != SD15_TEXT_WIDTH:
        # SD 2.x has SD 1.5's blocks, so the adapter joins, but its text is
        # OpenCLIP's 1024 wide and the motion modules were never trained on it.
        problems.append(
            f"its full-size U-Net attends to {width}-wide text, not CLIP ViT-L's "
            f"{SD15_TEXT_WIDTH}: a Stable Diffusion 2.x model?"
        )
    return problems


def adapter_problems(unet: dict[str, Any], adapter: dict[str, Any]) -> list[str]:
    """Why a motion adapter config does not fit a Stable Diffusion U-Net config (empty: fits).

    diffusers joins them only with the same blocks, layers per block and
    channels; a channel mismatch would otherwise surface only when the
    weights load.
    """
    if adapter.get("_class_name", MOTION_ADAPTER_CLASS) != MOTION_ADAPTER_CLASS:
        return [f"it is a {adapter.get('_class_name')!r}, not a {MOTION_ADAPTER_CLASS}"]
    problems = []
    unet_channels = list(unet.get("block_out_channels") or [])
    adapter_channels = list(adapter.get("block_out_channels") or [])
    if unet_channels != adapter_channels:
        problems.append(
            f"its blocks have {adapter_channels} channels, the U-Net's have {unet_channels}"
        )
    layers = unet.get("layers_per_block")
    motion_layers = adapter.get("motion_layers_per_block", 2)
    if layers != motion_layers:
        problems.append(f"it has {motion_layers} layers per block, the U-Net has {layers}")
    return problems


def check_animatediff_parts(
    folder: Path, base_label: str | None = None, adapter_label: str | None = None
) -> None:
    """Refuses an AnimateDiff folder whose base is not SD 1.5-shaped or whose adapter misfits.

    Reads configs only, so it runs as soon as a download has fetched them.

    Args:
        folder: Holds the base's configs and ``motion_adapter/config.json``.
        base_label: How messages name the base (a repo id or a folder).
        adapter_label: How messages name the motion adapter.

    Raises:
        ModelFormatError: naming every problem found and what to use instead.
    """
    base_label = base_label or str(folder)
    adapter_label = adapter_label or str(folder / MOTION_ADAPTER_FOLDER)
    try:
        family = folder_family(folder)
    except ModelFormatError:
        family = ANIMATEDIFF  # an unknown U-Net: sd15_problems names it
    if family is not ANIMATEDIFF:
        raise ModelFormatError(
            f"{base_label} is already a video model ({family.title}): it takes no motion adapter",
            f"download it by itself: `motionsep download {base_label}`",
        )
    problems = sd15_problems(folder)
    if problems:
        raise ModelFormatError(
            f"{base_label} is not a Stable Diffusion 1.5-shaped model: {'; '.join(problems)}",
            f"AnimateDiff motion adapters go on Stable Diffusion 1.5 and its fine-tunes, "
            f"e.g. `motionsep download animatediff` ({SD15_REPO})",
        )
    unet = read_config(folder / "unet" / "config.json")
    adapter = read_config(folder / MOTION_ADAPTER_FOLDER / "config.json")
    problems = adapter_problems(unet, adapter)
    if problems:
        raise ModelFormatError(
            f"the motion adapter {adapter_label} does not fit {base_label}: {'; '.join(problems)}",
            f"use a motion adapter for Stable Diffusion 1.5 such as {MOTION_ADAPTER_REPO}",
        )
    from motionsep.model.family import unet_config

    unet_config(folder)  # joins them on the meta device: whatever else diffusers checks


def _precheck(folder: Path, kind: str, where: str, base_hint: str) -> None:
    """Refuses an unsupported model from its configs, before fetching gigabytes of weights.

    Args:
        folder: Where the model's small files are (staging, or an imported folder).
        kind: The plan's kind.
        where: How messages name the model (a repo id or a folder).
        base_hint: How ``motionsep download animatediff`` would take this model as
            its base (``--base REPO`` or ``--from PATH``).
    """
    if kind == KIND_CLIP:
        config = read_config(folder / "config.json")
        if config.get("model_type") != "clip":
            raise ModelFormatError(
                f"{where} is a {config.get('model_type')!r} model, not a CLIP model",
                "pick a CLIP repository such as openai/clip-vit-base-patch32",
            )
        return
    if kind != KIND_T2V:
        return
    unet_class = read_config(folder / "unet" / "config.json").get("_class_name")
    has_adapter = (folder / MOTION_ADAPTER_FOLDER / "config.json").is_file()
    if unet_class == IMAGE_UNET_CLASS and not has_adapter:
        raise ModelFormatError(
            f"{where} is an image model (a {IMAGE_UNET_CLASS}, Stable Diffusion?) without a "
            f"motion adapter; motionsep needs a {ZEROSCOPE.unet_class} (ZeroScope / ModelScope) "
            "or a Stable Diffusion 1.5 U-Net with an AnimateDiff motion adapter",
            "put an AnimateDiff motion adapter on it: "
            f"`motionsep download animatediff {base_hint}`",
        )
    try:
        family = folder_family(folder)
    except ModelFormatError as exc:
        raise ModelFormatError(
            f"{where} has a {unet_class!r} U-Net; motionsep needs a {ZEROSCOPE.unet_class} "
            "(ZeroScope / ModelScope) or a Stable Diffusion 1.5 U-Net with an AnimateDiff "
            "motion adapter",
            "pick a text-to-video repository such as cerspense/zeroscope_v2_576w",
        ) from exc
    if family is ANIMATEDIFF:
        check_animatediff_parts(folder, where, f"{where} ({MOTION_ADAPTER_FOLDER}/)")


# -- assembling a store folder -----------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        # A hard link costs no space; the staging copy is deleted afterwards.
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def convert_bin_to_safetensors(src: Path, dst: Path) -> None:
    """Re-saves a pickled PyTorch state dict as safetensors.

    The pickle is read with ``torch.load(weights_only=True)``, which refuses
    anything but tensors and plain containers: no code from the file runs.

    Raises:
        ModelFormatError: if the file holds anything but a flat tensor dict.
    """
    import pickle

    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ModelFormatError(
            f"{src.name}: refusing to load it ({exc.__class__.__name__}: {exc})",
            "only plain tensor checkpoints are converted; use a repository with safetensors",
        ) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelFormatError(f"{src.name} is not a flat dict of tensors")
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (tied weights): copy the repeats.
        tensors[key] = tensor.clone() if pointer in storages else tensor.contiguous()
        storages.add(pointer)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata={"format": "pt"})


def _rewrite_index(src: Path, dst: Path) -> None:
    """Copies a shard index, renaming the shards the way the store names them."""
    index = json.loads(src.read_text())
    weight_map = index.get("weight_map", {})
    index["weight_map"] = {key: store_file_name(name) for key, name in weight_map.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(index, indent=2) + "\n")


def _assemble(source: Path, plan: FilePlan, dest: Path, events: Progress, task: str) -> None:
    """Places the planned files of ``source`` into ``dest``, converting pickles."""
    events.start(task, total=len(plan.files), unit="file")
    for path in plan.files:
        src = source / path
        dst = dest / plan.targets[path]
        parsed = parse_weight_name(src.name)
        if parsed is not None and parsed.is_index:
            _rewrite_index(src, dst)
        elif path.endswith(".bin"):
            events.advance(task, 0, file=f"converting {path}")
            convert_bin_to_safetensors(src, dst)
        else:
            _link_or_copy(src, dst)
        events.advance(task, 1, file=path)
    events.finish(task)


# -- errors ---------------------------------------------------------------------


def _size(num_bytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"


def _check_free_space(folder: Path, needed: int) -> None:
    """Refuses to start when the store's file system cannot take ``needed`` bytes."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DiskFullError(
            f"not enough disk space in {folder}: {_size(needed)} needed, {_size(free)} free",
            "free some space, or point MOTIONSEP_HOME at a larger disk",
        )


@dataclass
class _Context:
    """What an error message needs to say what to do next."""

    name: str
    repo_id: str
    revision: str | None
    endpoint: str
    token: str | None
    staging: Path
    needed: int = 0
    current_file: str | None = None
    # How to do without this repository (changes with the repository being fetched).
    local_copy: str = ""

    def __post_init__(self) -> None:
        self.local_copy = (
            self.local_copy
            or f"import a local copy with `motionsep download {self.name} --from PATH`"
        )


def _unreachable_hint(ctx: _Context) -> str:
    return (
        "check the network (and HF_ENDPOINT) and rerun: finished files are kept; "
        f"or {ctx.local_copy}; "
        "set HF_HUB_OFFLINE=1 to work offline with installed models"
    )


def _translate(exc: BaseException, ctx: _Context) -> MotionsepError | None:
    """Maps huggingface_hub / httpx / OS errors to motionsep errors (None: not ours)."""
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    model_page = f"{ctx.endpoint}/{ctx.repo_id}"
    if isinstance(exc, GatedRepoError) or (
        isinstance(exc, HfHubHTTPError)
        and not isinstance(exc, RepositoryNotFoundError)
        and exc.response is not None
        and exc.response.status_code in (401, 403)
    ):
        token_state = "the token in HF_TOKEN was refused" if ctx.token else "no token was sent"
        return HubAccessError(
            f"{ctx.repo_id} is gated or private and {token_state}",
            f"accept the license at {model_page} with your account, "
            "then set HF_TOKEN to an access token of that account (https://huggingface.co/settings/tokens)",
        )
    if isinstance(exc, RepositoryNotFoundError):
        private = "" if ctx.token else " (or it is private and HF_TOKEN is not set)"
        known = ", ".join(n for n, k in KNOWN_MODELS.items() if k.repo_id)
        return HubRepoNotFoundError(
            f"repository {ctx.repo_id!r} was not found on {ctx.endpoint}{private}",
            f"check the id (OWNER/REPO, as in the model page's URL); known names: {known}",
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubRepoNotFoundError(
            f"revision {ctx.revision!r} does not exist in {ctx.repo_id}",
            f"pass a branch, tag or commit listed at {model_page}/commits/main, or omit --revision",
        )
    if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        return HubFileMissingError(
            f"{ctx.repo_id} lists {ctx.current_file} but the hub does not serve it",
            "the repository may be changing right now: rerun later, or pin --revision to a commit",
        )
    if isinstance(exc, OfflineModeIsEnabled):
        return HubUnreachableError(
            "offline mode is on (HF_HUB_OFFLINE=1): nothing can be downloaded",
            f"unset HF_HUB_OFFLINE, or {ctx.local_copy}",
        )
    network = (httpx2.TransportError, LocalEntryNotFoundError, ConnectionError, TimeoutError)
    server_down = (
        isinstance(exc, HfHubHTTPError)
        and exc.response is not None
        and exc.response.status_code >= 500
    )
    if isinstance(exc, network) or server_down:
        where = f" while fetching {ctx.current_file}" if ctx.current_file else ""
        return HubUnreachableError(
            f"the hub at {ctx.endpoint} is unreachable{where} "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})",
            _unreachable_hint(ctx),
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DiskFullError(
            f"the disk under {ctx.staging.parent} is full"
            + (f" ({_size(ctx.needed)} needed for this model)" if ctx.needed else ""),
            "free some space and rerun (finished files are kept), "
            "or point MOTIONSEP_HOME at a larger disk",
        )
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return HubUnreachableError(
            f"the download of {ctx.current_file} was cut off", _unreachable_hint(ctx)
        )
    return None


# -- downloading ------------------------------------------------------------------


def _byte_reporter(sink: Callable[[int], None]) -> type:
    """A tqdm stand-in for huggingface_hub that forwards byte counts to ``sink``.

    huggingface_hub instantiates it once per file (with tqdm's keyword
    arguments) and calls ``update(n)`` per chunk; ``update_transfer`` marks it
    as an aggregating bar, so Xet downloads do not report every byte twice.
    """

    class _Reporter:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.total = kwargs.get("total")
            self.n = 0

        def __enter__(self) -> _Reporter:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def update(self, n: float | None = 1) -> None:
            self.n += int(n or 0)
            sink(int(n or 0))

        def update_transfer(self, n: float | None = 1) -> None:
            return None

        def __getattr__(self, name: str) -> Callable[..., None]:
            # set_description, set_postfix_str, refresh, close, ...: nothing to show.
            return lambda *args, **kwargs: None

    return _Reporter


@contextlib.contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """huggingface_hub logs retries itself; the library never prints, so mute it."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _hub_id(value: str, what: str) -> str:
    """``value`` if it reads as a hub id ``OWNER/REPO``."""
    parts = value.split("/")
    if len(parts) != 2 or not all(parts):
        raise UsageError(
            f"{what} {value!r} is not a hub id",
            "write it as OWNER/REPO, as in the model page's URL",
        )
    return value


def _resolve_repo(name: str) -> tuple[str, str | None]:
    """The hub repository of ``name`` and the kind it is known as (None: detect)."""
    known = KNOWN_MODELS.get(name)
    if known is not None and known.repo_id is not None:
        return known.repo_id, known.kind
    parts = name.split("/")
    if len(parts) != 2 or not all(parts):
        names = ", ".join(KNOWN_MODELS)
        raise UsageError(
            f"unknown model {name!r}",
            f"use one of {names}, a hub id OWNER/REPO, or import a folder with "
            f"`motionsep download NAME --from PATH`",
        )
    return name, None


def download(
    store: Store,
    name: str,
    revision: str | None = None,
    variant: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    repair: bool = False,
) -> ModelRecord:
    """Puts the model ``name`` into the store and returns its record.

    Hub files go to ``models/.partial-NAME/`` first; an interrupted run leaves
    them there and the next run skips every finished file. The model appears
    under ``models/NAME`` only once it is complete, converted to safetensors,
    verified and recorded with the resolved commit sha.

    Args:
        store: The store to install into.
        name: ``tiny``, ``tiny-animatediff``, ``zeroscope``, ``modelscope``,
            ``animatediff`` (see :func:`install_animatediff`), ``clip``, a hub
            id ``OWNER/REPO`` (stored as ``OWNER--REPO``), or the store name
            of an installed AnimateDiff model (installed again from its
            recorded sources, e.g. with ``repair``).
        revision: Branch, tag or commit; the default branch if None.
        variant: Weight variant to prefer, e.g. ``fp16`` (the default weights
            are used for components that lack it).
        force: Replace an installed model of that name.
        progress: Receives "download NAME" (bytes) and "assemble NAME" (files).
        token: Hub access token; ``HF_TOKEN`` if None.
        endpoint: Hub URL; ``HF_ENDPOINT`` (read now, not at import) if None.
        repair: If the model is installed, hash every file against its record
            and install it again only if one is missing or changed. Without
            it (and without ``force``) a damaged installed model is an error.

    Returns:
        The record of the installed model.

    Raises:
        UsageError: for an unknown name.
        HubRepoNotFoundError: the repository or revision does not exist.
        HubAccessError: a gated or private repository without a valid token.
        HubFileMissingError: the hub lists a file it does not serve.
        HubUnreachableError: no network, hub down, offline mode, or a cut download.
        DiskFullError: not enough space in the store.
        ModelFormatError: the repository is not a model motionsep can use.
        StoreLockedError: another download of this model is running.
        DamagedModelError: the installed model is damaged and neither
            ``repair`` nor ``force`` was given.
    """
    if name in BUILTIN_TOYS:
        return _builtin_toy(store, progress, name)
    if name in TINY_MODELS:
        if revision or variant:
            raise UsageError(f"the built-in {name} model has no revisions or variants")
        return install_tiny(store, force=force, progress=progress, repair=repair, name=name)
    if name == ANIMATEDIFF_NAME or _is_joined_model(store, name):
        options = {} if name == ANIMATEDIFF_NAME else _reinstall_options(store, name)
        return install_animatediff(
            store,
            **options,
            revision=revision,
            variant=variant,
            force=force,
            progress=progress,
            token=token,
            endpoint=endpoint,
            repair=repair,
        )
    repo_id, kind = _resolve_repo(name)
    existing = store.model_record(name)
    events = or_null(progress)
    if existing is not None and not force:
        if _keep_installed(existing, revision, repair, events):
            return existing
        revision = revision or existing.revision
        force = True
    ctx = _context(store, name, repo_id, revision, token, endpoint)
    with store.model_lock(name, f"download of {name!r}"), _quiet_hub_logs():
        return _guarded(ctx, lambda: _download_locked(store, ctx, kind, variant, force, events))


def install_animatediff(
    store: Store,
    *,
    base: str | None = None,
    base_folder: Path | None = None,
    adapter: str | None = None,
    name: str | None = None,
    revision: str | None = None,
    adapter_revision: str | None = None,
    variant: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    repair: bool = False,
) -> ModelRecord:
    """Installs a Stable Diffusion 1.5 base with an AnimateDiff motion adapter as one model.

    The base's ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and
    ``scheduler`` (not its safety checker) and the adapter's ``config.json``
    and weights are staged in ``models/.partial-NAME/`` (resumable, as in
    :func:`download`). Once the configs of both are in, the base must be SD
    1.5-shaped and the adapter must fit it (:func:`check_animatediff_parts`),
    or nothing more is fetched. The folder gets an ``AnimateDiffPipeline``
    ``model_index.json`` and a DDIM scheduler on AnimateDiff's linear schedule
    (keeping the base's :data:`SCHEDULER_KEPT_KEYS`); its record names both
    sources with their commits (``sources``; ``revision`` is the base's).

    Args:
        store: The store to install into.
        base: Hub id of an SD 1.5 model; :data:`SD15_REPO` if neither this nor
            ``base_folder`` is given.
        base_folder: A local diffusers SD 1.5 folder to use as the base instead.
        adapter: Hub id or local folder of a diffusers ``MotionAdapter``;
            :data:`MOTION_ADAPTER_REPO` if None.
        name: Store name; by default ``animatediff`` for SD 1.5 itself,
            ``animatediff--OWNER--REPO`` for ``base``, ``animatediff--FOLDER``
            for ``base_folder`` (see :func:`animatediff_store_name`).
        revision: Branch, tag or commit of the base repository.
        adapter_revision: Branch, tag or commit of the adapter repository.
        variant: Weight variant to prefer in both, e.g. ``fp16``.
        force, progress, token, endpoint, repair: As for :func:`download`.

    Returns:
        The record of the installed model.

    Raises:
        UsageError: conflicting options, or ``name`` is installed from other sources.
        ModelFormatError: the base is not SD 1.5-shaped, or the adapter does
            not fit it (both before any weights are fetched).
        HubRepoNotFoundError, HubAccessError, HubFileMissingError,
        HubUnreachableError, DiskFullError, StoreLockedError, DamagedModelError:
            as for :func:`download`, naming the repository at fault.
    """
    sources = _animatediff_sources(base, base_folder, adapter, revision, adapter_revision)
    name = name or animatediff_store_name(base, base_folder)
    events = or_null(progress)
    existing = store.model_record(name)
    if existing is not None and not force:
        _check_same_sources(existing, sources)
        if _keep_installed(existing, revision, repair, events):
            return existing
        recorded = _recorded_sources(existing)
        for source in sources:
            source.revision = source.revision or recorded.get(source.role, {}).get("revision")
        force = True
    base_source = sources[0]
    ctx = _context(store, name, base_source.label, base_source.revision, token, endpoint)
    with store.model_lock(name, f"download of {name!r}"), _quiet_hub_logs():
        return _guarded(
            ctx, lambda: _install_animatediff_locked(store, ctx, sources, variant, force, events)
        )


def animatediff_store_name(base: str | None = None, base_folder: Path | None = None) -> str:
    """The default store name of an AnimateDiff model, from its base.

    ``animatediff`` for :data:`SD15_REPO`, ``animatediff--OWNER--REPO`` for
    another hub base, ``animatediff--FOLDER`` for a local one.

    Raises:
        UsageError: the folder's name cannot be a store name (pass ``name``).
    """
    if base_folder is not None:
        name = f"{ANIMATEDIFF_NAME}--{Path(base_folder).expanduser().resolve().name}"
    elif base is not None and base != SD15_REPO:
        name = f"{ANIMATEDIFF_NAME}--{base.replace('/', '--')}"
    else:
        name = ANIMATEDIFF_NAME
    try:
        return validate_name(name, "model name")
    except UsageError as exc:
        raise UsageError(exc.message, "choose the store name with --name") from exc


def _context(
    store: Store,
    name: str,
    repo_id: str,
    revision: str | None,
    token: str | None,
    endpoint: str | None,
) -> _Context:
    return _Context(
        name,
        repo_id,
        revision,
        (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
        token or os.environ.get("HF_TOKEN") or None,
        store.partial_model_dir(name),
    )


def _keep_installed(
    existing: ModelRecord, revision: str | None, repair: bool, events: Progress
) -> bool:
    """Whether an installed model stays as it is (False: install it again, for ``repair``).

    Raises:
        UsageError: it is installed at another revision than ``revision``.
        DamagedModelError: it is damaged, without ``repair``.
    """
    if revision is not None and not (existing.revision or "").startswith(revision):
        raise UsageError(
            f"{existing.name} is installed at revision {existing.revision}, not {revision}",
            "pass --force to replace it",
        )
    if _needs_repair(existing, repair, events):
        return False
    events.log(f"{existing.name} is already installed at {existing.path}")
    return True


def _guarded(ctx: _Context, work: Callable[[], ModelRecord]) -> ModelRecord:
    """Runs an install, mapping hub and OS errors to motionsep errors.

    Staged files are kept for failures a rerun can get past (network, disk
    space, an interruption) and deleted for the others.
    """
    try:
        return work()
    except MotionsepError as exc:
        if not isinstance(exc, (HubUnreachableError, DiskFullError)):
            # Permanent failures: a rerun would fail the same way, keep nothing.
            shutil.rmtree(ctx.staging, ignore_errors=True)
        raise
    except (Exception, KeyboardInterrupt) as exc:
        translated = _translate(exc, ctx)
        if translated is None:
            raise
        if not isinstance(translated, (HubUnreachableError, DiskFullError)):
            shutil.rmtree(ctx.staging, ignore_errors=True)
        raise translated from exc


def _needs_repair(record: ModelRecord, repair: bool, progress: Progress | None) -> bool:
    """Checks every file of an installed model against its record (hashing them all).

    Returns whether it must be installed again: only when it is damaged and
    ``repair`` asks for that.

    Raises:
        DamagedModelError: damaged, without ``repair``.
    """
    if not repair:
        check_model(record.path, record.name, full=True)
        return False
    problems = model_problems(record.path, full=True)
    events = or_null(progress)
    if problems:
        events.log(f"{record.name} is damaged ({'; '.join(problems[:3])}); installing it again")
    else:
        events.log(f"{record.name} is intact: every file matches its record")
    return bool(problems)


BUILTIN_TOYS = ("toy", "toy-animatediff")
"""The pretrained toy models that ship inside the package (``download NAME`` fetches nothing)."""


def _builtin_toy(store: Store, progress: Progress | None, name: str = "toy") -> ModelRecord:
    """``download toy``: nothing to fetch; the record of the shipped (or store) toy model."""
    from motionsep.store import builtin_model_path, folder_size

    existing = store.model_record(name)
    if existing is not None:
        return existing
    path = builtin_model_path(name)
    if path is None:
        family = " --family animatediff" if name == "toy-animatediff" else ""
        raise ModelNotFoundError(
            f"this install of motionsep does not ship the {name} model",
            f"pretrain it with `motionsep toy pretrain --name {name}{family}`",
        )
    or_null(progress).log(f"{name} ships with motionsep ({path}); nothing to download")
    return ModelRecord(
        name=name,
        path=path,
        source="built-in",
        revision=None,
        size_bytes=folder_size(path),
        created="",
    )


# -- sources: where a model's files come from --------------------------------------


@dataclass
class _Source:
    """One place files of a model come from: a hub repository or a local folder.

    Attributes:
        role: Its key in the record's ``sources``: ``base`` or ``motion_adapter``
            (``model`` for a model from one repository).
        kind: What :func:`plan_files` plans it as (None: detect).
        repo_id: Hub id, or None for a local folder.
        folder: Local folder, or None for a hub repository.
        revision: Asked branch, tag or commit (hub only).
        prefix: Sub-folder of the model folder its files go to (``""`` or ``motion_adapter/``).
        local_copy: How to do without the hub, for messages.
        sha: The commit ``revision`` resolved to.
        sizes: Every file it has, with its size.
        plan: What is taken from it.
    """

    role: str
    kind: str | None
    repo_id: str | None = None
    folder: Path | None = None
    revision: str | None = None
    prefix: str = ""
    local_copy: str = ""
    sha: str | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    plan: FilePlan = field(default_factory=lambda: FilePlan(KIND_T2V, (), {}))

    @property
    def label(self) -> str:
        """How messages and the record name it."""
        return self.repo_id or str(self.folder)

    def record(self) -> dict[str, str | None]:
        """Its entry in the model record's ``sources``."""
        where = {"repo": self.repo_id} if self.repo_id else {"folder": str(self.folder)}
        return {"role": self.role, **where, "revision": self.sha}


def _local_folder(value: str | Path, what: str) -> Path:
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise UsageError(f"{what} {folder} is not a folder", "pass the folder of a diffusers model")
    return folder.resolve()


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or Path(value).expanduser().is_dir()


def _animatediff_sources(
    base: str | None,
    base_folder: Path | None,
    adapter: str | None,
    revision: str | None,
    adapter_revision: str | None,
) -> list[_Source]:
    """The base and motion-adapter sources of an AnimateDiff install, checked."""
    if base is not None and base_folder is not None:
        raise UsageError(
            "--base and --from both name the base model", "pass one of them: a hub id or a folder"
        )
    if base_folder is not None and revision is not None:
        raise UsageError("--revision applies to a base on the hub, not to --from")
    base_source = _Source(
        "base",
        KIND_T2V,
        revision=revision,
        local_copy="put the motion adapter on a local copy with "
        "`motionsep download animatediff --from PATH`",
    )
    if base_folder is not None:
        base_source.folder = _local_folder(base_folder, "the base model")
    else:
        base_source.repo_id = _hub_id(base or SD15_REPO, "the base model")
    adapter_source = _Source(
        MOTION_ADAPTER_FOLDER,
        KIND_MOTION_ADAPTER,
        revision=adapter_revision,
        prefix=f"{MOTION_ADAPTER_FOLDER}/",
        local_copy="use a local copy of the motion adapter with --adapter PATH",
    )
    adapter = adapter or MOTION_ADAPTER_REPO
    if _looks_like_path(adapter):
        if adapter_revision is not None:
            raise UsageError("an adapter revision applies to the hub, not to a local adapter")
        adapter_source.folder = _local_folder(adapter, "the motion adapter")
    else:
        adapter_source.repo_id = _hub_id(adapter, "the motion adapter")
    return [base_source, adapter_source]


def _recorded_sources(record: ModelRecord) -> dict[str, dict[str, Any]]:
    """The ``sources`` an AnimateDiff install wrote into its record, by role ({} if none)."""
    try:
        data = json.loads((record.path / MODEL_RECORD).read_text())
        return {s["role"]: s for s in data.get("sources") or []}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _is_joined_model(store: Store, name: str) -> bool:
    """Whether ``name`` is the store name of an installed base + motion adapter."""
    if name in KNOWN_MODELS or "/" in name:
        return False
    try:
        record = store.model_record(name)
    except UsageError:
        return False  # not a store name: _resolve_repo says what is wrong with it
    return record is not None and "base" in _recorded_sources(record)


def _reinstall_options(store: Store, name: str) -> dict[str, Any]:
    """``install_animatediff`` options that install a joined model from its recorded sources."""
    record = store.model_record(name)
    assert record is not None  # see _is_joined_model
    recorded = _recorded_sources(record)
    base, adapter = recorded.get("base", {}), recorded.get(MOTION_ADAPTER_FOLDER, {})
    # Revisions: --repair takes the recorded ones, --force the newest (as for one repository).
    options: dict[str, Any] = {
        "name": name,
        "adapter": adapter.get("repo") or adapter.get("folder"),
    }
    if base.get("folder"):
        return options | {"base_folder": Path(base["folder"])}
    return options | {"base": base.get("repo")}


def _check_same_sources(existing: ModelRecord, sources: list[_Source]) -> None:
    recorded = _recorded_sources(existing)
    if not recorded:
        return  # installed before records named their sources
    wanted = {s.role: s.label for s in sources}
    had = {role: s.get("repo") or s.get("folder") for role, s in recorded.items()}
    if had != wanted:
        raise UsageError(
            f"{existing.name} is installed from {existing.source}, "
            f"not {' + '.join(wanted.values())}",
            "choose another store name with --name, or pass --force to replace it",
        )


def _write_record_sources(folder: Path, sources: list[_Source]) -> None:
    """Adds ``sources`` (repository or folder, and commit, per role) to a written record."""
    path = folder / MODEL_RECORD
    data = json.loads(path.read_text())
    data["sources"] = [source.record() for source in sources]
    path.write_text(json.dumps(data, indent=2) + "\n")


# -- fetching into the staging folder ----------------------------------------------


def _hub_api(ctx: _Context) -> Any:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    if constants.is_offline_mode():
        raise OfflineModeIsEnabled("HF_HUB_OFFLINE is set")
    return HfApi(
        endpoint=ctx.endpoint,
        token=ctx.token,
        library_name="motionsep",
        library_version=__version__,
    )


def _talk_to(ctx: _Context, source: _Source) -> None:
    """Points error messages at ``source``."""
    ctx.repo_id, ctx.revision, ctx.current_file = source.label, source.revision, None
    if source.local_copy:
        ctx.local_copy = source.local_copy


def _list_source(
    api: Any,
    ctx: _Context,
    source: _Source,
    variant: str | None,
    events: Progress,
    ignore_folder: str | None = None,
) -> None:
    """Fills in the commit, file sizes and plan of a source (configs only, no weights read)."""
    from huggingface_hub import constants
    from huggingface_hub.hf_api import RepoFile

    if source.folder is not None:
        files = [p for p in source.folder.rglob("*") if p.is_file()]
        rels = {p.relative_to(source.folder).as_posix(): p for p in files}
        source.sizes = {
            rel: path.stat().st_size for rel, path in rels.items() if ".cache" not in rel.split("/")
        }
        where = source.label
    else:
        _talk_to(ctx, source)
        info = api.model_info(
            source.repo_id, revision=source.revision or constants.DEFAULT_REVISION
        )
        if not info.sha:
            raise HubUnreachableError(
                f"{ctx.endpoint} did not say which commit {source.revision or 'main'} is",
                _unreachable_hint(ctx),
            )
        source.sha = info.sha
        events.log(
            f"{source.repo_id}: revision {source.revision or 'main'} is commit {info.sha[:12]}"
        )
        source.sizes = {
            entry.path: int(entry.size)
            for entry in api.list_repo_tree(source.repo_id, revision=info.sha, recursive=True)
            if isinstance(entry, RepoFile)
        }
        where = f"{source.repo_id} at {info.sha[:12]}"
    if ignore_folder is not None:
        ignored = {p for p in source.sizes if p.startswith(f"{ignore_folder}/")}
        if ignored:
            events.log(f"{where}: leaving out its own {ignore_folder}/")
        source.sizes = {p: n for p, n in source.sizes.items() if p not in ignored}
    try:
        source.plan = plan_files(source.sizes, kind=source.kind, variant=variant)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{where}: {exc.message}", exc.hint) from exc
    for note in source.plan.notes:
        events.log(f"{where}: {note}")


def _is_staged(staging: Path, source: _Source, path: str) -> bool:
    staged = staging / source.prefix / path
    if not staged.is_file():
        return False
    if source.folder is not None:
        original, copy = (source.folder / path).stat(), staged.stat()
        return (original.st_size, original.st_mtime_ns) == (copy.st_size, copy.st_mtime_ns)
    return staged.stat().st_size == source.sizes[path]


def _reserve_space(ctx: _Context, sources: list[_Source], events: Progress) -> int:
    """Refuses to start without room for what is left; returns the bytes of every planned file."""
    planned = [(s, p) for s in sources for p in s.plan.files]
    done = [(s, p) for s, p in planned if _is_staged(ctx.staging, s, p)]
    total = sum(s.sizes[p] for s, p in planned)
    remaining = total - sum(s.sizes[p] for s, p in done)
    converted = sum(s.sizes[p] for s in sources for p in s.plan.converts)
    # Room for what is left to fetch, the safetensors copies of pickles, and some slack.
    ctx.needed = remaining + converted + 64 * 1024 * 1024
    _check_free_space(ctx.staging, ctx.needed)
    if done:
        events.log(f"resuming: {len(done)} of {len(planned)} files are already here")
    return total


def _configs_and_weights(source: _Source) -> tuple[list[str], list[str]]:
    """The planned files of a source: configs, then weights from small to large.

    Configs come first so that a wrong model is refused before any weights
    are fetched; small weights before large ones, so an interruption loses
    the least.
    """
    ordered = sorted(
        source.plan.files,
        key=lambda p: (p.endswith((".safetensors", ".bin")), source.sizes[p]),
    )
    weights = [p for p in ordered if p.endswith((".safetensors", ".bin"))]
    return [p for p in ordered if p not in weights], weights


def _fetch(ctx: _Context, source: _Source, paths: list[str], events: Progress, task: str) -> None:
    """Puts files of a source into the staging folder (skipping those already there)."""
    from huggingface_hub import hf_hub_download

    _talk_to(ctx, source)
    local_dir = ctx.staging / source.prefix
    for path in paths:
        ctx.current_file = path
        counted = 0
        if source.repo_id is None:
            assert source.folder is not None  # a source is a repository or a folder
            if not _is_staged(ctx.staging, source, path):
                (local_dir / path).unlink(missing_ok=True)
                _link_or_copy(source.folder / path, local_dir / path)
        else:

            def sink(n: int, path: str = path) -> None:
                nonlocal counted
                counted += n
                events.advance(task, n, file=path)

            hf_hub_download(
                source.repo_id,
                path,
                revision=source.sha,
                local_dir=local_dir,
                endpoint=ctx.endpoint,
                token=ctx.token,
                library_name="motionsep",
                library_version=__version__,
                tqdm_class=_byte_reporter(sink),
            )
        if counted != source.sizes[path]:
            # Copied, skipped (already staged) or taken from the HF cache: count it whole.
            events.advance(task, source.sizes[path] - counted, file=path)
    ctx.current_file = None


def _download_locked(
    store: Store,
    ctx: _Context,
    kind: str | None,
    variant: str | None,
    force: bool,
    events: Progress,
) -> ModelRecord:
    api = _hub_api(ctx)
    source = _Source("model", kind, repo_id=ctx.repo_id, revision=ctx.revision)
    _list_source(api, ctx, source, variant, events)
    task = f"download {ctx.name}"
    events.start(task, total=_reserve_space(ctx, [source], events), unit="B")
    ctx.staging.mkdir(parents=True, exist_ok=True)
    configs, weights = _configs_and_weights(source)
    _fetch(ctx, source, configs, events, task)
    _precheck(ctx.staging, source.plan.kind, source.label, f"--base {source.label}")
    _fetch(ctx, source, weights, events, task)
    events.finish(task)

    final = store.model_path(ctx.name)
    with atomic_folder(final, overwrite=force) as tmp:
        _assemble(ctx.staging, source.plan, tmp, events, f"assemble {ctx.name}")
        verify_model_folder(tmp, source.plan.kind)
        store.write_model_record(tmp, ctx.name, source=source.label, revision=source.sha)
    shutil.rmtree(ctx.staging, ignore_errors=True)
    record = store.model_record(ctx.name)
    assert record is not None  # written just above
    return record


def _install_animatediff_locked(
    store: Store,
    ctx: _Context,
    sources: list[_Source],
    variant: str | None,
    force: bool,
    events: Progress,
) -> ModelRecord:
    base, adapter = sources
    api = _hub_api(ctx) if any(s.repo_id for s in sources) else None
    _list_source(api, ctx, base, variant, events, ignore_folder=MOTION_ADAPTER_FOLDER)
    _list_source(api, ctx, adapter, variant, events)
    task = f"download {ctx.name}"
    events.start(task, total=_reserve_space(ctx, sources, events), unit="B")
    ctx.staging.mkdir(parents=True, exist_ok=True)
    weights: list[tuple[_Source, str]] = []
    for source in sources:
        configs, source_weights = _configs_and_weights(source)
        _fetch(ctx, source, configs, events, task)
        weights += [(source, path) for path in source_weights]
    check_animatediff_parts(ctx.staging, base.label, adapter.label)
    for source, path in sorted(weights, key=lambda item: item[0].sizes[item[1]]):
        _fetch(ctx, source, [path], events, task)
    events.finish(task)

    joined = FilePlan(
        KIND_T2V,
        files=tuple(s.prefix + p for s in sources for p in s.plan.files),
        targets={s.prefix + p: s.prefix + t for s in sources for p, t in s.plan.targets.items()},
    )
    final = store.model_path(ctx.name)
    with atomic_folder(final, overwrite=force) as tmp:
        _assemble(ctx.staging, joined, tmp, events, f"assemble {ctx.name}")
        _write_animatediff_configs(tmp)
        verify_model_folder(tmp, KIND_T2V)
        label = " + ".join(s.label for s in sources)
        store.write_model_record(tmp, ctx.name, source=label, revision=base.sha)
        _write_record_sources(tmp, sources)
    shutil.rmtree(ctx.staging, ignore_errors=True)
    record = store.model_record(ctx.name)
    assert record is not None  # written just above
    return record


def animatediff_model_index(base_index: dict[str, Any]) -> dict[str, Any]:
    """An ``AnimateDiffPipeline`` model index for a Stable Diffusion one.

    Keeps the classes of the base's VAE, text encoder and tokenizer; drops
    its safety checker and feature extractor (motionsep fetches neither).
    """
    from importlib.metadata import version

    index: dict[str, Any] = {
        "_class_name": ANIMATEDIFF.pipeline_class,
        "_diffusers_version": version("diffusers"),
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        MOTION_ADAPTER_FOLDER: ["diffusers", MOTION_ADAPTER_CLASS],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": base_index.get("text_encoder", ["transformers", "CLIPTextModel"]),
        "tokenizer": base_index.get("tokenizer", ["transformers", "CLIPTokenizer"]),
        "unet": ["diffusers", IMAGE_UNET_CLASS],
        "vae": base_index.get("vae", ["diffusers", "AutoencoderKL"]),
    }
    return index


def animatediff_scheduler_config(base: dict[str, Any]) -> dict[str, Any]:
    """DDIM on AnimateDiff's linear schedule, keeping :data:`SCHEDULER_KEPT_KEYS` of ``base``.

    The schedule's shape, spacing and offsets are AnimateDiff's (what its
    motion modules were trained with); what the base was trained to predict
    (``prediction_type``, the beta range, zero terminal SNR) stays the base's.
    """
    from importlib.metadata import version

    from motionsep.model.components import ANIMATEDIFF_SCHEDULER_CONFIG

    kept = {key: base[key] for key in SCHEDULER_KEPT_KEYS if key in base}
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": version("diffusers"),
        **ANIMATEDIFF_SCHEDULER_CONFIG,
        **kept,
    }


def _write_animatediff_configs(folder: Path) -> None:
    """Rewrites a joined folder's model index and scheduler config for AnimateDiff.

    The assembled files may be hard links to staged or user files: each is
    replaced by a new file, never written through.
    """
    for path, rewrite in (
        (folder / "model_index.json", animatediff_model_index),
        (folder / "scheduler" / "scheduler_config.json", animatediff_scheduler_config),
    ):
        value = rewrite(read_config(path))
        path.unlink()
        path.write_text(json.dumps(value, indent=2) + "\n")


def import_folder(
    store: Store,
    path: Path,
    name: str,
    force: bool = False,
    variant: str | None = None,
    progress: Progress | None = None,
) -> ModelRecord:
    """Imports a local diffusers text-to-video folder (or CLIP folder) as ``name``.

    The same files are taken as from the hub, pickled weights are converted to
    safetensors, and the copy is verified before it appears in the store.
    The source folder is never modified.

    Args:
        store: The store to install into.
        path: A folder saved by diffusers (``model_index.json`` at its top)
            or by transformers for CLIP.
        name: Store name of the model.
        force: Replace an installed model of that name.
        variant: Weight variant to prefer, as for :func:`download`.
        progress: Receives an "import NAME" task (files).

    Returns:
        The record of the installed model.

    Raises:
        UsageError: ``path`` is not a folder, or ``name`` is taken without ``force``.
        ModelFormatError: the folder is not a model motionsep can use.
    """
    source = Path(path).expanduser()
    if not source.is_dir():
        raise UsageError(f"{source} is not a folder", "pass the folder of a diffusers model")
    known = KNOWN_MODELS.get(name)
    kind = known.kind if known is not None and known.kind in (KIND_T2V, KIND_CLIP) else None
    final = store.model_path(name)
    if store.model_record(name) is not None and not force:
        raise UsageError(
            f"a model named {name!r} is already installed", "pass --force to replace it"
        )
    listing = [
        p.relative_to(source).as_posix()
        for p in source.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(source).parts
    ]
    try:
        plan = plan_files(listing, kind=kind, variant=variant)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{source}: {exc.message}", exc.hint) from exc
    events = or_null(progress)
    for note in plan.notes:
        events.log(note)
    _precheck(source, plan.kind, str(source), f"--from {source}")
    with store.model_lock(name, f"import of {name!r}"):
        needed = sum((source / p).stat().st_size for p in plan.files)
        _check_free_space(final.parent, needed)
        try:
            with atomic_folder(final, overwrite=force) as tmp:
                _assemble(source, plan, tmp, events, f"import {name}")
                verify_model_folder(tmp, plan.kind)
                store.write_model_record(tmp, name, source=str(source.resolve()), revision=None)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"the disk under {final.parent} is full ({_size(needed)} needed)",
                    "free some space, or point MOTIONSEP_HOME at a larger disk",
                ) from exc
            raise
    record = store.model_record(name)
    assert record is not None  # written just above
    return record


def list_models(store: Store) -> list[dict[str, object]]:
    """Known and installed models, for ``download --list``."""
    installed = {record.name: record for record in store.installed_models()}
    rows: list[dict[str, object]] = []
    from motionsep.store import builtin_model_path, folder_size

    for known in KNOWN_MODELS.values():
        record = installed.pop(known.name, None)
        builtin = builtin_model_path(known.name) if record is None else None
        path = record.path if record else builtin
        rows.append(
            {
                "name": known.name,
                "repo_id": known.repo_id,
                "adapter_repo_id": known.adapter_repo_id,
                "description": known.description,
                "installed": path is not None,
                "size_bytes": record.size_bytes
                if record
                else (folder_size(builtin) if builtin else None),
                "revision": record.revision if record else None,
                "path": str(path) if path else None,
            }
        )
    for record in installed.values():
        recorded = _recorded_sources(record)
        base, adapter = recorded.get("base", {}), recorded.get(MOTION_ADAPTER_FOLDER, {})
        rows.append(
            {
                "name": record.name,
                "repo_id": base.get("repo") or base.get("folder") or record.source,
                "adapter_repo_id": adapter.get("repo") or adapter.get("folder"),
                "description": "AnimateDiff (SD 1.5 base + motion adapter)" if adapter else "",
                "installed": True,
                "size_bytes": record.size_bytes,
                "revision": record.revision,
                "path": str(Path(record.path)),
            }
        )
    return rows
