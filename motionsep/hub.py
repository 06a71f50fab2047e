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
from motionsep.progress import Progress, or_null
from motionsep.store import (
    ModelRecord,
    Store,
    atomic_folder,
    check_model,
    model_problems,
)

# Kinds of model the store holds; they decide which files are fetched and how
# the result is verified.
KIND_T2V = "text-to-video"
KIND_CLIP = "clip"
KIND_BUILTIN = "built-in"

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
    "toy": KnownModel(
        "toy",
        None,
        "pretrained toy-world model shipped with motionsep (no download; see `motionsep toy`)",
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
    from motionsep.model.family import ANIMATEDIFF, ZEROSCOPE

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
    ``scheduler/``; and one set of weights per weight component (see
    :func:`_choose_weights`). CLIP: the files of :data:`CLIP_SIDE_FILES` that
    exist and one set of top-level weights. Everything else (README, flax/tf
    weights, webui checkpoints, other variants) is left out.

    Args:
        paths: Every file path in the repository, ``/``-separated.
        kind: ``text-to-video`` or ``clip``; detected from the listing if None.
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
        for component in T2V_WEIGHT_COMPONENTS + T2V_CONFIG_COMPONENTS:
            names = by_folder.get(component, [])
            side = [
                n for n in names if n.endswith((".json", ".txt")) and parse_weight_name(n) is None
            ]
            if not side:
                raise ModelFormatError(f"the {component}/ folder is missing or has no config")
            small += [f"{component}/{n}" for n in side]
            if component in T2V_WEIGHT_COMPONENTS:
                chosen = _choose_weights(names, variant, f"{component}/", notes)
                weights += [f"{component}/{n}" for n in chosen]
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
    text-to-video folder must pass :func:`components.check_model_folder` (its
    U-Net is a ``UNet3DConditionModel``); a CLIP folder needs a CLIP config, a
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


def _unreachable_hint(ctx: _Context) -> str:
    return (
        "check the network (and HF_ENDPOINT) and rerun: finished files are kept; "
        f"or import a local copy with `motionsep download {ctx.name} --from PATH`; "
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
            f"unset HF_HUB_OFFLINE, or import a local copy with "
            f"`motionsep download {ctx.name} --from PATH`",
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
        name: ``tiny``, ``zeroscope``, ``modelscope``, ``clip`` or a hub id
            ``OWNER/REPO`` (stored as ``OWNER--REPO``).
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
    if name == "toy":
        return _builtin_toy(store, progress)
    if name in TINY_MODELS:
        if revision or variant:
            raise UsageError(f"the built-in {name} model has no revisions or variants")
        return install_tiny(store, force=force, progress=progress, repair=repair, name=name)
    repo_id, kind = _resolve_repo(name)
    store_name = name
    existing = store.model_record(store_name)
    events = or_null(progress)
    if existing is not None and not force:
        if revision is not None and not (existing.revision or "").startswith(revision):
            raise UsageError(
                f"{store_name} is installed at revision {existing.revision}, not {revision}",
                "pass --force to replace it",
            )
        if not _needs_repair(existing, repair, events):
            events.log(f"{store_name} is already installed at {existing.path}")
            return existing
        revision = revision or existing.revision
        force = True
    token = token or os.environ.get("HF_TOKEN") or None
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    staging = store.partial_model_dir(store_name)
    ctx = _Context(store_name, repo_id, revision, endpoint, token, staging)
    with store.model_lock(store_name, f"download of {store_name!r}"), _quiet_hub_logs():
        try:
            return _download_locked(store, ctx, kind, variant, force, events)
        except MotionsepError as exc:
            if not isinstance(exc, (HubUnreachableError, DiskFullError)):
                # Permanent failures: a rerun would fail the same way, keep nothing.
                shutil.rmtree(staging, ignore_errors=True)
            raise
        except (Exception, KeyboardInterrupt) as exc:
            translated = _translate(exc, ctx)
            if translated is None:
                raise
            if not isinstance(translated, (HubUnreachableError, DiskFullError)):
                shutil.rmtree(staging, ignore_errors=True)
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


def _builtin_toy(store: Store, progress: Progress | None) -> ModelRecord:
    """``download toy``: nothing to fetch; the record of the shipped (or store) toy model."""
    from motionsep.store import builtin_model_path, folder_size

    existing = store.model_record("toy")
    if existing is not None:
        return existing
    path = builtin_model_path("toy")
    if path is None:
        raise ModelNotFoundError(
            "this install of motionsep does not ship the toy model",
            "pretrain it with `motionsep toy pretrain` (it installs as `toy` in the store)",
        )
    or_null(progress).log(f"toy ships with motionsep ({path}); nothing to download")
    return ModelRecord(
        name="toy",
        path=path,
        source="built-in",
        revision=None,
        size_bytes=folder_size(path),
        created="",
    )


def _download_locked(
    store: Store,
    ctx: _Context,
    kind: str | None,
    variant: str | None,
    force: bool,
    events: Progress,
) -> ModelRecord:
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.hf_api import RepoFile

    if constants.is_offline_mode():
        raise OfflineModeIsEnabled("HF_HUB_OFFLINE is set")
    api = HfApi(
        endpoint=ctx.endpoint,
        token=ctx.token,
        library_name="motionsep",
        library_version=__version__,
    )
    info = api.model_info(ctx.repo_id, revision=ctx.revision or constants.DEFAULT_REVISION)
    sha = info.sha
    if not sha:
        raise HubUnreachableError(
            f"{ctx.endpoint} did not say which commit {ctx.revision or 'main'} is",
            _unreachable_hint(ctx),
        )
    events.log(f"{ctx.repo_id}: revision {ctx.revision or 'main'} is commit {sha[:12]}")
    sizes = {
        entry.path: int(entry.size)
        for entry in api.list_repo_tree(ctx.repo_id, revision=sha, recursive=True)
        if isinstance(entry, RepoFile)
    }
    try:
        plan = plan_files(sizes, kind=kind, variant=variant)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{ctx.repo_id} at {sha[:12]}: {exc.message}", exc.hint) from exc
    for note in plan.notes:
        events.log(note)

    staging = ctx.staging
    done = {
        p
        for p in plan.files
        if (staging / p).is_file() and (staging / p).stat().st_size == sizes[p]
    }
    total = sum(sizes[p] for p in plan.files)
    remaining = total - sum(sizes[p] for p in done)
    converted = sum(sizes[p] for p in plan.converts)
    # Room for what is left to fetch, the safetensors copies of pickles, and some slack.
    ctx.needed = remaining + converted + 64 * 1024 * 1024
    _check_free_space(staging, ctx.needed)
    if done:
        events.log(f"resuming: {len(done)} of {len(plan.files)} files are already here")

    task = f"download {ctx.name}"
    events.start(task, total=total, unit="B")
    staging.mkdir(parents=True, exist_ok=True)
    # Configs first (a wrong model is refused before any weights are fetched),
    # then weights from small to large, so an interruption loses the least.
    order = sorted(plan.files, key=lambda p: (p.endswith((".safetensors", ".bin")), sizes[p]))
    for path in order:
        ctx.current_file = path
        counted = 0

        def sink(n: int, path: str = path) -> None:
            nonlocal counted
            counted += n
            events.advance(task, n, file=path)

        hf_hub_download(
            ctx.repo_id,
            path,
            revision=sha,
            local_dir=staging,
            endpoint=ctx.endpoint,
            token=ctx.token,
            library_name="motionsep",
            library_version=__version__,
            tqdm_class=_byte_reporter(sink),
        )
        if counted != sizes[path]:
            # Skipped (already staged) or copied from the HF cache: count it whole.
            events.advance(task, sizes[path] - counted, file=path)
        if path == "model_index.json" or path.endswith("config.json"):
            _precheck(staging, path, plan.kind, ctx)
    ctx.current_file = None
    events.finish(task)

    final = store.model_path(ctx.name)
    with atomic_folder(final, overwrite=force) as tmp:
        _assemble(staging, plan, tmp, events, f"assemble {ctx.name}")
        verify_model_folder(tmp, plan.kind)
        store.write_model_record(tmp, ctx.name, source=ctx.repo_id, revision=sha)
    shutil.rmtree(staging, ignore_errors=True)
    record = store.model_record(ctx.name)
    assert record is not None  # written just above
    return record


def _precheck(staging: Path, path: str, kind: str, ctx: _Context) -> None:
    """Refuses an unsupported model from its configs, before fetching gigabytes of weights."""
    if kind == KIND_T2V and path == "unet/config.json":
        config = json.loads((staging / path).read_text())
        if config.get("_class_name") != "UNet3DConditionModel":
            raise ModelFormatError(
                f"{ctx.repo_id} has a {config.get('_class_name')!r} U-Net; motionsep needs a "
                "UNet3DConditionModel (ZeroScope / ModelScope text-to-video)",
                "pick a text-to-video repository such as cerspense/zeroscope_v2_576w",
            )
    if kind == KIND_CLIP and path == "config.json":
        config = json.loads((staging / path).read_text())
        if config.get("model_type") != "clip":
            raise ModelFormatError(
                f"{ctx.repo_id} is a {config.get('model_type')!r} model, not a CLIP model",
                "pick a CLIP repository such as openai/clip-vit-base-patch32",
            )


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
    kind = known.kind if known is not None and known.kind != KIND_BUILTIN else None
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
        rows.append(
            {
                "name": record.name,
                "repo_id": record.source,
                "description": "",
                "installed": True,
                "size_bytes": record.size_bytes,
                "revision": record.revision,
                "path": str(Path(record.path)),
            }
        )
    return rows
