"""Evaluation metrics (DESIGN.md section 6): CLIP scores and motion fidelity.

Four numbers describe a generated video:

- **text alignment** (CLIP-T): the mean over frames of cos(CLIP image
  embedding of the frame, CLIP text embedding of the prompt), times 100.
- **temporal consistency**: the mean over consecutive frame pairs of the
  cosine between their CLIP image embeddings, times 100.
- **motion fidelity**: DMT's score (Yatim et al., 2024) over point tracks of
  the generated video E and the reference O. Tracks come from OpenCV's
  pyramidal Lucas-Kanade, weight-free (:func:`point_tracks`). For two tracks,
  each step (the displacement between consecutive frames) is unit-normalised
  and their similarity is the mean over steps of the cosine of the two steps;
  the score is the mean over tracks of E of the best similarity over tracks
  of O. It lies in [-1, 1]; see :func:`track_similarity` for stationary steps.
- **appearance leakage**: the mean over every (generated frame, reference
  frame) pair of the cosine of their CLIP image embeddings, times 100. Lower
  is better; compare it between methods at equal motion fidelity.

CLIP is loaded through transformers from a folder in the store
(``motionsep download clip``) or a path; tests build a tiny random one with
:func:`motionsep.model.components.build_tiny_clip`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from motionsep.errors import ModelFormatError, ModelNotFoundError

if TYPE_CHECKING:
    import torch

    from motionsep.store import Store

DEFAULT_TRACK_GRID = 16
DEFAULT_TRACK_SIZE = 256
DEFAULT_STATIONARY_PX = 0.1

# Lucas-Kanade settings: a 21x21 window over a 4-level pyramid follows steps
# of up to about 80 working pixels, far more than consecutive video frames move.
_LK_WINDOW = (21, 21)
_LK_LEVELS = 3
_LK_CRITERIA = (3, 30, 0.01)  # cv2.TERM_CRITERIA_EPS | COUNT, 30 iterations, 0.01 px


# ---------------------------------------------------------------------------
# point tracks and motion fidelity


@dataclass(frozen=True)
class PointTracks:
    """Point tracks of one video.

    Attributes:
        positions: ``(N, T, 2)`` float32 ``(x, y)`` of N points in each of T
            frames, in pixels of the ``size x size`` working frame.
        size: Side of the square working frame the video was resized to.
    """

    positions: np.ndarray = field(repr=False)
    size: int

    @property
    def steps(self) -> np.ndarray:
        """``(N, T - 1, 2)`` displacements between consecutive frames."""
        return np.diff(self.positions, axis=1)


def even_indices(length: int, count: int) -> np.ndarray:
    """``count`` evenly spaced indices over ``range(length)``, first and last included."""
    if count >= length:
        return np.arange(length)
    return np.rint(np.linspace(0, length - 1, count)).astype(int)


def point_tracks(
    frames: np.ndarray, grid: int = DEFAULT_TRACK_GRID, size: int = DEFAULT_TRACK_SIZE
) -> PointTracks:
    """Tracks a ``grid x grid`` lattice of points through a video with pyramidal Lucas-Kanade.

    Every frame is resized to ``size x size`` (whatever its aspect ratio), so
    displacements are measured in the same units for videos of any size. The
    points start at the centers of the lattice cells in the first frame and
    are followed frame to frame. A point that Lucas-Kanade loses, or that
    leaves the frame, is not tracked again: for the rest of the video it
    moves on with its last tracked step (constant velocity), so its positions
    may lie outside the frame. Points lost on the very first step carry no
    motion and are dropped, unless every point is (a blank or flat video):
    then all are kept, stationary.

    Args:
        frames: ``uint8`` RGB frames ``(T, H, W, 3)``.
        grid: Points per side.
        size: Side of the working frame in pixels.

    Returns:
        The tracks, at most ``grid * grid`` of them.
    """
    import cv2

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {frames.shape}")
    gray = []
    for frame in frames:
        shrink = frame.shape[0] > size or frame.shape[1] > size
        resized = cv2.resize(
            frame, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        )
        gray.append(cv2.cvtColor(resized, cv2.COLOR_RGB2GRAY))
    centers = (np.arange(grid, dtype=np.float32) + 0.5) * (size / grid)
    xs, ys = np.meshgrid(centers, centers)
    current = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)
    positions = np.empty((len(current), len(gray), 2), dtype=np.float32)
    positions[:, 0] = current
    alive = np.ones(len(current), dtype=bool)
    velocity = np.zeros_like(current)
    never_tracked = np.zeros(len(current), dtype=bool)
    for t in range(1, len(gray)):
        moved, status, _ = cv2.calcOpticalFlowPyrLK(
            gray[t - 1],
            gray[t],
            current.reshape(-1, 1, 2),
            None,
            winSize=_LK_WINDOW,
            maxLevel=_LK_LEVELS,
            criteria=_LK_CRITERIA,
        )
        moved = moved.reshape(-1, 2)
        inside = np.all((moved >= 0) & (moved <= size - 1), axis=1) & np.isfinite(moved).all(1)
        alive &= (status.ravel() == 1) & inside
        if t == 1:
            never_tracked = ~alive
        # A lost point keeps its last velocity: points leaving the frame in a
        # pan or zoom go on moving as they did, instead of freezing (a frozen
        # point would look stationary and match any static video).
        velocity = np.where(alive[:, None], moved - current, velocity).astype(np.float32)
        current = current + velocity
        positions[:, t] = current
    if never_tracked.all():
        # Nothing could be followed (a blank or flat video): every point
        # stays put, which is what such a video shows.
        return PointTracks(positions=positions, size=size)
    # A point lost on the very first step (it left the frame at once, or sits
    # in a flat region) tells nothing about the motion; as a stationary track
    # it would match every static video, so it is left out.
    return PointTracks(positions=positions[~never_tracked], size=size)


def track_similarity(
    generated: PointTracks,
    reference: PointTracks,
    stationary_px: float = DEFAULT_STATIONARY_PX,
) -> np.ndarray:
    """DMT's similarity of every generated track with every reference track.

    Each step of a track (its displacement from one frame to the next) is
    divided by its length. A step shorter than ``stationary_px`` working
    pixels is *stationary* and has no direction, so instead of 0/0 the
    cosine of two steps is defined as:

    - both moving: the cosine of their directions (the dot product of the
      unit vectors);
    - both stationary: 1 (they agree: neither moves);
    - one stationary, one moving: 0 (no agreement, no opposition).

    The similarity of two tracks is the mean of these cosines over steps, so
    it lies in [-1, 1] and is never NaN.

    Args:
        generated: Tracks of the generated video, N of them, T frames.
        reference: Tracks of the reference, M of them, T frames.
        stationary_px: Length below which a step counts as stationary.

    Returns:
        ``(N, M)`` similarities; a video with one frame (no steps) gives 1s.

    Raises:
        ValueError: if the two videos have different frame counts.
    """
    a, b = generated.steps.astype(np.float64), reference.steps.astype(np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"tracks cover {a.shape[1] + 1} and {b.shape[1] + 1} frames; "
            "resample the videos to the same frame count first"
        )
    if a.shape[1] == 0:
        return np.ones((len(a), len(b)))
    unit_a, still_a = _unit_steps(a, stationary_px)
    unit_b, still_b = _unit_steps(b, stationary_px)
    # Stationary steps have zero unit vectors, so the dot product is already
    # 0 whenever one of the two is stationary; both-stationary pairs add 1.
    cosines = np.einsum("ntk,mtk->nm", unit_a, unit_b)
    cosines += still_a.astype(np.float64) @ still_b.T.astype(np.float64)
    return np.clip(cosines / a.shape[1], -1.0, 1.0)


def _unit_steps(steps: np.ndarray, stationary_px: float) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(steps, axis=-1)
    still = norms < stationary_px
    safe = np.where(still, 1.0, norms)
    unit = np.where(still[..., None], 0.0, steps / safe[..., None])
    return unit, still


def motion_fidelity(
    generated: np.ndarray | PointTracks,
    reference: np.ndarray | PointTracks,
    *,
    grid: int = DEFAULT_TRACK_GRID,
    size: int = DEFAULT_TRACK_SIZE,
    stationary_px: float = DEFAULT_STATIONARY_PX,
) -> float:
    """DMT's motion fidelity of a generated video against a reference, in [-1, 1].

    ``mean over generated tracks of (max over reference tracks of
    track_similarity)``. Frames given with different counts are first
    brought to the shorter count by taking evenly spaced frames of the
    longer video (first and last kept); tracks must already agree.

    Args:
        generated: ``uint8`` frames ``(T, H, W, 3)`` or their tracks.
        reference: ``uint8`` frames ``(T', H', W', 3)`` or their tracks.
        grid: Points per side of the tracking lattice.
        size: Working frame side for tracking.
        stationary_px: See :func:`track_similarity`.

    Returns:
        The score; 1 for a video against itself.
    """
    if not isinstance(generated, PointTracks) or not isinstance(reference, PointTracks):
        count = min(_frame_count(generated), _frame_count(reference))
        if not isinstance(generated, PointTracks):
            generated = point_tracks(generated[even_indices(len(generated), count)], grid, size)
        if not isinstance(reference, PointTracks):
            reference = point_tracks(reference[even_indices(len(reference), count)], grid, size)
    similarity = track_similarity(generated, reference, stationary_px)
    return float(np.clip(similarity.max(axis=1).mean(), -1.0, 1.0))


def _frame_count(item: np.ndarray | PointTracks) -> int:
    return int(item.positions.shape[1] if isinstance(item, PointTracks) else len(item))


# ---------------------------------------------------------------------------
# CLIP scores


def text_alignment(image_embeds: torch.Tensor, text_embed: torch.Tensor) -> float:
    """CLIP-T: mean over frames of cos(frame embedding, text embedding), times 100.

    Args:
        image_embeds: ``(F, D)`` unit-length embeddings of the frames.
        text_embed: ``(D,)`` or ``(1, D)`` unit-length embedding of the prompt.
    """
    return float((image_embeds @ text_embed.reshape(-1)).mean()) * 100.0


def temporal_consistency(image_embeds: torch.Tensor) -> float | None:
    """Mean cosine of consecutive frames' CLIP embeddings, times 100; None for one frame.

    Args:
        image_embeds: ``(F, D)`` unit-length embeddings, frames in order.
    """
    if len(image_embeds) < 2:
        return None
    return float((image_embeds[:-1] * image_embeds[1:]).sum(-1).mean()) * 100.0


def appearance_leakage(image_embeds: torch.Tensor, reference_embeds: torch.Tensor) -> float:
    """Mean cosine over all (generated frame, reference frame) pairs, times 100.

    Args:
        image_embeds: ``(F, D)`` unit-length embeddings of the generated frames.
        reference_embeds: ``(R, D)`` unit-length embeddings of the reference frames.
    """
    return float((image_embeds @ reference_embeds.T).mean()) * 100.0


def resolve_clip_model(name_or_path: str, store: Store) -> Path:
    """The folder of a CLIP model given by store name, hub id or path.

    Raises:
        ModelNotFoundError: if it is not installed, with the command that installs it.
        ModelFormatError: if the folder holds something other than a CLIP model.
    """
    candidate = Path(name_or_path).expanduser()
    if name_or_path.startswith((".", "/", "~")) or candidate.is_dir():
        folder = candidate
        if not folder.is_dir():
            raise ModelNotFoundError(
                f"CLIP model folder not found: {folder}",
                "pass a folder saved by transformers (CLIPModel), or a store name such as clip",
            )
    else:
        record = store.model_record(name_or_path)
        if record is None:
            hint = f"run `motionsep download {name_or_path}`"
            if name_or_path == "clip":
                hint += " (openai/clip-vit-base-patch32, about 600 MB)"
            raise ModelNotFoundError(
                f"CLIP model {name_or_path!r} is not in the store ({store.models_dir})",
                hint + ", or pass --clip-model PATH to a CLIP folder",
            )
        folder = record.path
    config_file = folder / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ModelFormatError(
            f"{folder} is not a CLIP model folder: {config_file.name} is missing or unreadable",
            "run `motionsep download clip`, or pass --clip-model PATH to a CLIP folder",
        ) from exc
    if model_type != "clip":
        raise ModelFormatError(
            f"{folder} holds a {model_type!r} model, not a CLIP model",
            "run `motionsep download clip`, or pass --clip-model PATH to a CLIP folder",
        )
    return folder


class ClipScorer:
    """CLIP image and text embeddings, batched, on one device.

    Embeddings come back unit-length, float32, on the CPU.

    Args:
        folder: A CLIP folder (``config.json``, safetensors weights, tokenizer
            files, ``preprocessor_config.json``).
        device: Where to run it.
        dtype: Weights dtype; fp32 on the CPU.
        batch_size: Frames per forward pass.
    """

    def __init__(
        self,
        folder: Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        batch_size: int = 16,
    ) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        self.folder = Path(folder)
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(
            self.folder, dtype=self.dtype, use_safetensors=True
        ).to(self.device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        # The PIL backend on every machine: torchvision's resize differs
        # slightly, and scores should not depend on what else is installed.
        self.image_processor = AutoImageProcessor.from_pretrained(self.folder, backend="pil")

    def image_embeddings(self, frames: np.ndarray) -> torch.Tensor:
        """Unit-length CLIP embeddings ``(F, D)`` of ``uint8`` RGB frames ``(F, H, W, 3)``."""
        import torch

        chunks = []
        with torch.inference_mode():
            for start in range(0, len(frames), self.batch_size):
                batch = [np.asarray(f) for f in frames[start : start + self.batch_size]]
                pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
                out = self.model.get_image_features(
                    pixel_values=pixels.to(device=self.device, dtype=self.dtype)
                )
                chunks.append(_pooled(out))
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length CLIP embeddings ``(len(texts), D)`` of texts (truncated to 77 tokens)."""
        import torch

        tokens = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=min(int(self.tokenizer.model_max_length), 77),
            return_tensors="pt",
        )
        with torch.inference_mode():
            out = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
        return torch.nn.functional.normalize(_pooled(out), dim=-1)


def _pooled(out: Any) -> torch.Tensor:
    import torch

    # transformers 5 returns an output object whose pooler_output is the
    # projected embedding; older versions return the tensor itself.
    tensor = out if isinstance(out, torch.Tensor) else out.pooler_output
    return tensor.float().cpu()


def load_clip_scorer(
    name_or_path: str, store: Store, device: str = "auto", batch_size: int = 16
) -> ClipScorer:
    """Finds and loads a CLIP model: fp32 on the CPU, fp16 on CUDA and MPS.

    Args:
        name_or_path: ``eval.clip_model``: store name (``clip``), hub id or folder.
        store: The store to look in.
        device: ``model.device`` (``auto`` picks the best one).
        batch_size: ``eval.batch_size``.

    Raises:
        ModelNotFoundError: naming ``motionsep download clip``.
        ModelFormatError: for a folder that is not a CLIP model.
    """
    from motionsep.devices import resolve_device, resolve_dtype

    folder = resolve_clip_model(name_or_path, store)
    target = resolve_device(device)
    return ClipScorer(folder, target, resolve_dtype("auto", target), batch_size)
