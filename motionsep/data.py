"""``prepare``: clips -> cached latents, prompt embeddings and (optionally) inversions.

Every clip becomes one cache *entry* keyed by the clip's sha256, its prompt,
the data settings that shape its frames, and a fingerprint of the VAE and
text encoder. Entries live under ``prepared/entries/KEY/`` (or ``OUT/entries``)
and are shared by every dataset that uses the same clip with the same
settings, so changing one clip or one setting re-encodes exactly what changed.
A dataset is a ``manifest.json`` that lists its entries.

All inputs are checked before any work starts; every problem found is
reported in one error, and nothing partial is left in the cache.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from motionsep import __version__
from motionsep.config import DataSettings, Settings
from motionsep.errors import DamagedCacheError, MotionsepError, UsageError
from motionsep.progress import Progress, or_null
from motionsep.store import Store, atomic_folder, atomic_write_bytes, file_sha256

if TYPE_CHECKING:
    import torch

    from motionsep.model.components import Components

MANIFEST_FORMAT = 1
MANIFEST_SUFFIXES = {".csv", ".jsonl"}
LATENTS_FILE = "latents.safetensors"
ENTRY_FILE = "entry.json"
# The settings that change which pixels a clip contributes.
FRAME_SETTINGS = ("width", "height", "frames", "frame_step", "fps", "crop")


class ClipInputError(UsageError):
    """One or more clips cannot be used; the message lists every problem."""


@dataclass
class ClipSpec:
    """A clip to prepare and where its prompt came from."""

    path: Path
    name: str
    prompt: str | None
    prompt_source: str


@dataclass
class PreparedClip:
    """One prepared clip of a dataset."""

    name: str
    source: Path
    sha256: str
    prompt: str
    prompt_source: str
    entry: Path
    cached: bool
    indices: list[int] = field(default_factory=list)

    @property
    def latents_path(self) -> Path:
        """The safetensors file with ``latents`` (C, F, h, w) and ``prompt_embeds`` (L, D)."""
        return self.entry / LATENTS_FILE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as the manifest stores it."""
        return {
            "name": self.name,
            "source": str(self.source),
            "sha256": self.sha256,
            "prompt": self.prompt,
            "prompt_source": self.prompt_source,
            "entry": str(self.entry),
            "indices": self.indices,
        }


@dataclass
class PreparedDataset:
    """The result of ``prepare``: a manifest and its clips."""

    manifest: Path
    clips: list[PreparedClip]
    settings: dict[str, Any]
    model: dict[str, Any]

    @property
    def cache_hits(self) -> int:
        """How many clips were already in the cache."""
        return sum(clip.cached for clip in self.clips)

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """The cached tensors of clip ``index`` (latents, prompt_embeds), checked first.

        Raises:
            DamagedCacheError: if the entry no longer matches its recorded sha256.
        """
        from safetensors.torch import load_file

        verify_entry(self.clips[index].entry)
        return load_file(self.clips[index].latents_path)

    def inversion_path(self, index: int, steps: int) -> Path | None:
        """The stored DDIM inversion of clip ``index``, if prepare made one."""
        path = self.clips[index].entry / _inversion_name(self.model["unet_fingerprint"], steps)
        return path if path.is_file() else None


# ---------------------------------------------------------------------------
# inputs


def _read_manifest(path: Path) -> tuple[list[ClipSpec], list[str]]:
    specs: list[ClipSpec] = []
    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    try:
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        else:
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        problems.append(f"{path}:{number}: not valid JSON ({exc.msg})")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [], [f"{path}: cannot read the manifest ({exc})"]
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("path"):
            problems.append(f"{path}: entry {number} has no 'path'")
            continue
        clip = Path(str(row["path"])).expanduser()
        if not clip.is_absolute():
            clip = path.parent / clip
        prompt = str(row["prompt"]).strip() if row.get("prompt") else None
        specs.append(ClipSpec(clip, clip.stem, prompt, f"manifest {path.name}"))
    return specs, problems


def collect_clips(inputs: Iterable[Path], default_prompt: str | None = None) -> list[ClipSpec]:
    """Expands files, folders and manifests into clips, each with its prompt.

    A clip's prompt comes from its manifest row, else a sidecar ``NAME.txt``
    beside it, else ``default_prompt``.

    Raises:
        ClipInputError: listing every missing path, clip without prompt, bad
            manifest row and duplicate clip name.
    """
    from motionsep.video import find_videos

    specs: list[ClipSpec] = []
    problems: list[str] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            problems.append(f"{path}: no such file or folder")
        elif path.is_dir():
            try:
                found = find_videos([path])
            except MotionsepError as exc:  # a folder without videos
                problems.append(exc.message)
                continue
            specs.extend(ClipSpec(p, p.stem, None, "") for p in found)
        elif path.suffix.lower() in MANIFEST_SUFFIXES:
            found_specs, manifest_problems = _read_manifest(path)
            specs.extend(found_specs)
            problems.extend(manifest_problems)
        else:
            specs.append(ClipSpec(path, path.stem, None, ""))

    seen: dict[str, Path] = {}
    for spec in specs:
        if spec.name in seen and seen[spec.name] != spec.path:
            problems.append(
                f"{spec.path}: another clip has the same name {spec.name!r} ({seen[spec.name]}); "
                "rename one of them"
            )
        seen.setdefault(spec.name, spec.path)
        if not spec.path.is_file():
            if spec.prompt_source:  # folder entries exist by construction
                problems.append(f"{spec.path}: no such file (listed in {spec.prompt_source})")
            continue
        if spec.prompt is None:
            sidecar = spec.path.with_suffix(".txt")
            if sidecar.is_file():
                try:
                    spec.prompt = sidecar.read_text(encoding="utf-8").strip() or None
                except UnicodeDecodeError:
                    problems.append(f"{sidecar}: the prompt is not UTF-8 text (save it as UTF-8)")
                    continue
                spec.prompt_source = f"sidecar {sidecar.name}"
        if spec.prompt is None and default_prompt:
            spec.prompt, spec.prompt_source = default_prompt, "--prompt"
        if spec.prompt is None:
            problems.append(
                f"{spec.path}: no prompt (give it a sidecar {spec.path.stem}.txt, "
                "a manifest row, or --prompt)"
            )
    if problems:
        raise _problems(problems)
    # the same file given twice is one clip
    unique: dict[Path, ClipSpec] = {}
    for spec in specs:
        unique.setdefault(spec.path.resolve(), spec)
    return list(unique.values())


def _problems(problems: list[str]) -> ClipInputError:
    count = len(problems)
    lines = "\n".join(f"  - {p}" for p in problems)
    return ClipInputError(
        f"{count} problem{'s' if count != 1 else ''} with the clips; nothing was prepared:"
        f"\n{lines}",
        "fix or remove the clips listed above and run the command again",
    )


def verify_entry(entry: Path) -> None:
    """Checks a prepared entry against the sha256 its ``entry.json`` recorded.

    Entries written before motionsep recorded checksums have none and pass.
    Cheap: the latents of one clip are a few MB at most.

    Raises:
        DamagedCacheError: naming the entry, what is wrong, and the fix.
    """
    try:
        record = json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))
        recorded = dict(record.get("files", {}))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
        problem = f"its {ENTRY_FILE} is unreadable ({exc})"
    else:
        problem = ""
        for name, digest in recorded.items():
            path = entry / name
            if not path.is_file():
                problem = f"{name} is missing"
            elif file_sha256(path) != digest:
                problem = f"{name} does not match the sha256 recorded when it was written"
            if problem:
                break
    if problem:
        raise DamagedCacheError(
            f"the prepared clip in {entry} is damaged: {problem}",
            "rebuild it from its clip: motionsep prepare CLIPS --rebuild (with the same clips "
            "and settings), then run the command again",
        )


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def component_fingerprint(model_dir: Path, parts: Iterable[str]) -> str:
    """A cheap fingerprint of model components: configs' content and weights' size and mtime."""
    items: list[Any] = []
    for part in parts:
        for file in sorted((model_dir / part).glob("*")):
            if file.suffix == ".json":
                items.append([part, file.name, file.read_text()])
            elif file.is_file():
                stat = file.stat()
                items.append([part, file.name, stat.st_size, stat.st_mtime_ns])
    return _digest(items)


def _inversion_name(unet_fingerprint: str, steps: int) -> str:
    return f"inversion-{unet_fingerprint[:16]}-{steps}.safetensors"


# ---------------------------------------------------------------------------
# prepare


def prepare(
    inputs: Iterable[Path],
    settings: Settings,
    store: Store,
    out: Path | None = None,
    progress: Progress | None = None,
    components: Components | None = None,
    rebuild: bool = False,
) -> PreparedDataset:
    """Prepares clips for training and returns the dataset.

    Args:
        inputs: Video files, folders of videos, or manifests (CSV / JSONL with
            ``path`` and ``prompt``).
        settings: Uses ``data`` (frame sampling, size, inversion) and ``model``.
        store: The store; the cache lives in ``store.prepared_dir`` unless ``out``.
        out: A folder for the entries and ``manifest.json`` instead of the store.
        progress: Receives a "prepare" task over the clips to encode.
        components: Already loaded model components (``train`` passes its own);
            loaded on demand otherwise, and only if some clip is not cached.
        rebuild: Encode every clip again, replacing its cache entry (the fix
            for a damaged one).

    Raises:
        ClipInputError: listing every unusable clip, before any work starts.
        DamagedCacheError: a cached entry does not match its recorded sha256
            (``rebuild`` replaces it).
    """
    data = settings.data
    events = or_null(progress)
    specs = collect_clips(inputs, data.prompt)
    model_dir = (
        components.path if components is not None else store.resolve_model(settings.model.name)
    )
    model_info = {
        "name": settings.model.name,
        "path": str(model_dir),
        "encoder_fingerprint": component_fingerprint(
            model_dir, ("vae", "text_encoder", "tokenizer")
        ),
        "unet_fingerprint": component_fingerprint(model_dir, ("unet", "scheduler")),
    }
    frame_settings = {name: getattr(data, name) for name in FRAME_SETTINGS}
    root = Path(out).expanduser() if out is not None else store.prepared_dir
    entries_dir = root / "entries"

    planned: list[tuple[ClipSpec, str, Path]] = []
    for spec in specs:
        sha = file_sha256(spec.path)
        key = _digest([sha, spec.prompt, frame_settings, model_info["encoder_fingerprint"]])[:24]
        planned.append((spec, sha, entries_dir / key))
    if rebuild:
        misses = list(planned)
    else:
        misses = [item for item in planned if not (item[2] / ENTRY_FILE).is_file()]
        for _, _, entry in planned:
            if (entry / ENTRY_FILE).is_file():
                verify_entry(entry)  # a damaged hit is reported, never used

    indices = _check_clips([spec for spec, _, _ in misses], data)

    if components is None and (misses or data.inversion):
        components = _load_for_prepare(model_dir, settings)
    if misses and components is not None:
        events.start("prepare", total=len(misses), unit="clip")
        for spec, sha, entry in misses:
            _encode_entry(
                spec, sha, entry, indices[spec.path], frame_settings, model_info, data, components
            )
            events.advance("prepare", clip=spec.name)
        events.finish("prepare")

    clips = []
    for spec, sha, entry in planned:
        record = json.loads((entry / ENTRY_FILE).read_text())
        clips.append(
            PreparedClip(
                name=spec.name,
                source=spec.path,
                sha256=sha,
                prompt=str(spec.prompt),
                prompt_source=spec.prompt_source,
                entry=entry,
                cached=(spec, sha, entry) not in misses,
                indices=list(record["indices"]),
            )
        )
    dataset = PreparedDataset(
        manifest=Path(), clips=clips, settings=frame_settings, model=model_info
    )
    if data.inversion and components is not None:
        _ensure_inversions(dataset, components, data.inversion_steps, events)
    dataset.manifest = _write_manifest(dataset, root if out is not None else None, store)
    return dataset


def _check_clips(specs: list[ClipSpec], data: DataSettings) -> dict[Path, list[int]]:
    """Probes every clip and plans its frames; raises once with every problem."""
    from motionsep import video

    problems: list[str] = []
    plan: dict[Path, list[int]] = {}
    for spec in specs:
        try:
            info = video.probe(spec.path)
            plan[spec.path] = video.sample_indices(
                info, data.frames, frame_step=data.frame_step, fps=data.fps
            )
        except MotionsepError as exc:
            problems.append(
                exc.message if str(spec.path) in exc.message else f"{spec.path}: {exc.message}"
            )
    if problems:
        raise _problems(problems)
    return plan


def _load_for_prepare(model_dir: Path, settings: Settings) -> Components:
    from motionsep.devices import resolve_device, resolve_dtype
    from motionsep.model.components import load_components

    device = resolve_device(settings.model.device)
    return load_components(
        model_dir, dtype=resolve_dtype(settings.model.dtype, device), device=device
    )


def _encode_entry(
    spec: ClipSpec,
    sha: str,
    entry: Path,
    indices: list[int],
    frame_settings: dict[str, Any],
    model_info: dict[str, Any],
    data: DataSettings,
    components: Components,
) -> None:
    import torch
    from safetensors.torch import save_file

    from motionsep import video
    from motionsep.model.components import encode_prompts

    frames = video.load_clip(
        spec.path,
        data.frames,
        frame_step=data.frame_step,
        fps=data.fps,
        width=data.width,
        height=data.height,
        crop=data.crop,
    )
    latents = encode_frames(components, frames, data.vae_batch_size)
    prompt_embeds = encode_prompts(components, [str(spec.prompt)])[0]
    with atomic_folder(entry, overwrite=True) as tmp:
        save_file(
            {
                "latents": latents.to("cpu", torch.float32).contiguous(),
                "prompt_embeds": prompt_embeds.to("cpu", torch.float32).contiguous(),
            },
            str(tmp / LATENTS_FILE),
        )
        record = {
            "format": MANIFEST_FORMAT,
            "clip": spec.name,
            "source": str(spec.path),
            "sha256": sha,
            "prompt": spec.prompt,
            "settings": frame_settings,
            "indices": indices,
            "latent_shape": list(latents.shape),
            "encoder_fingerprint": model_info["encoder_fingerprint"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        record["files"] = {LATENTS_FILE: file_sha256(tmp / LATENTS_FILE)}
        (tmp / ENTRY_FILE).write_text(json.dumps(record, indent=2) + "\n")


def encode_frames(components: Components, frames: torch.Tensor, batch_size: int) -> torch.Tensor:
    """VAE-encodes frames (F, 3, H, W) in [-1, 1] to scaled latents (C, F, h, w).

    Uses the posterior mean, so the cache is deterministic.
    """
    import torch

    vae = components.vae
    parts = []
    with torch.no_grad():
        for start in range(0, frames.shape[0], batch_size):
            batch = frames[start : start + batch_size].to(vae.device, vae.dtype)
            parts.append(vae.encode(batch).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(parts).permute(1, 0, 2, 3).contiguous()


def ddim_invert(
    components: Components,
    latents: torch.Tensor,
    steps: int,
    prompt_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion of video latents (B, C, F, h, w) to noise.

    Runs the DDIM update backwards from the clean latents to the last
    timestep of a ``steps``-step schedule, conditioning on the empty prompt
    unless ``prompt_embeds`` is given.
    """
    import torch

    from motionsep.model.components import encode_prompts

    unet = components.unet
    scheduler = components.scheduler
    if prompt_embeds is None:
        prompt_embeds = encode_prompts(components, [""] * latents.shape[0])
    prompt_embeds = prompt_embeds.to(unet.device, unet.dtype)
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    stride = scheduler.config.num_train_timesteps // steps
    sample = latents.to(unet.device, unet.dtype)
    with torch.no_grad():
        for t in reversed(scheduler.timesteps):
            current = int(t) - stride
            alpha_now = alphas[current] if current >= 0 else scheduler.final_alpha_cumprod
            alpha_next = alphas[int(t)]
            eps = unet(sample, t, encoder_hidden_states=prompt_embeds).sample.to(torch.float64)
            x = sample.to(torch.float64)
            x0 = (x - (1 - alpha_now).sqrt() * eps) / alpha_now.sqrt()
            sample = (alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * eps).to(unet.dtype)
    return sample


def _ensure_inversions(
    dataset: PreparedDataset, components: Components, steps: int, events: Progress
) -> None:
    from safetensors.torch import save

    todo = [i for i in range(len(dataset.clips)) if dataset.inversion_path(i, steps) is None]
    if not todo:
        return
    events.start("invert", total=len(todo), unit="clip")
    for index in todo:
        latents = dataset.load(index)["latents"].unsqueeze(0)
        noise = ddim_invert(components, latents, steps)[0].to("cpu").float().contiguous()
        target = dataset.clips[index].entry / _inversion_name(
            dataset.model["unet_fingerprint"], steps
        )
        atomic_write_bytes(target, save({"inversion": noise}))
        events.advance("invert", clip=dataset.clips[index].name)
    events.finish("invert")


def _write_manifest(dataset: PreparedDataset, out: Path | None, store: Store) -> Path:
    clips = [clip.to_dict() for clip in dataset.clips]
    set_key = _digest([c["entry"] for c in clips])[:16]
    target = (out or store.prepared_dir / "sets" / set_key) / "manifest.json"
    manifest = {
        "format": MANIFEST_FORMAT,
        "motionsep_version": __version__,
        "settings": dataset.settings,
        "model": dataset.model,
        "clips": clips,
    }
    atomic_write_bytes(target, (json.dumps(manifest, indent=2) + "\n").encode())
    return target


def load_prepared(path: Path) -> PreparedDataset:
    """Opens a prepared dataset from its ``manifest.json`` or the folder holding it.

    Raises:
        UsageError: if the manifest is missing, of another format, or lists
            entries that are gone.
    """
    manifest = path / "manifest.json" if path.is_dir() else path
    if not manifest.is_file():
        raise UsageError(
            f"{path} holds no prepared dataset (manifest.json)", "run `motionsep prepare`"
        )
    data = json.loads(manifest.read_text())
    if data.get("format") != MANIFEST_FORMAT:
        raise UsageError(
            f"{manifest} has format {data.get('format')!r}, this motionsep reads {MANIFEST_FORMAT}",
            "run `motionsep prepare` again on the clips",
        )
    clips = []
    missing = []
    for item in data["clips"]:
        entry = Path(item["entry"])
        if not (entry / LATENTS_FILE).is_file():
            missing.append(str(entry))
        clips.append(
            PreparedClip(
                name=item["name"],
                source=Path(item["source"]),
                sha256=item["sha256"],
                prompt=item["prompt"],
                prompt_source=item["prompt_source"],
                entry=entry,
                cached=True,
                indices=list(item["indices"]),
            )
        )
    if missing:
        raise UsageError(
            f"{manifest} lists cache entries that are gone: {', '.join(missing)}",
            "run `motionsep prepare` again on the clips",
        )
    return PreparedDataset(
        manifest=manifest, clips=clips, settings=data["settings"], model=data["model"]
    )
