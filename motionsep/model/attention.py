"""A recording attention processor for the temporal attentions (``inspect-attention``).

In a temporal transformer (ZeroScope's ``TransformerTemporalModel``,
AnimateDiff's motion modules, ``AnimateDiffTransformer3D``; see
:mod:`motionsep.model.family`) the attention runs over frames: the hidden
states reach ``attn1``/``attn2`` as ``(B * H * W, F, C)`` (on AnimateDiff with
the frame positions already added), so every spatial
position of every video is one "batch" row and the sequence is its ``F``
frames. The attention probabilities of one call are therefore a tensor
``(B * H * W, heads, F, F)``: for every position and head, how much each
query frame takes from each key frame.

:func:`record_temporal_attention` swaps the processors of the selected
temporal attentions (through diffusers' ``Attention.set_processor``) for a
:class:`RecordingAttnProcessor` and puts the originals back on exit, also when
the block raises. The recording processor

- hands the call to the original processor unchanged, so the layer's output
  is the stock output bit for bit (the probabilities are computed on the
  side, not substituted into the computation);
- at recorded steps only, recomputes the query/key projections through the
  module's own ``to_q``/``to_k`` (a peft LoRA wrapped around them therefore
  takes part, exactly as in the forward pass), the softmax probabilities in
  float32, and adds them to running sums per (layer, step): an ``F x F`` sum
  of probabilities, an ``F`` sum of row entropies and a count. Nothing else is
  kept, so memory does not grow with the number of layers, steps or spatial
  positions; the probabilities are computed in row chunks so that even the
  transient tensor stays bounded (``chunk_elements``).

Cost: ``to_q`` and ``to_k`` run twice in a recorded layer at a recorded step.

Example::

    with record_temporal_attention(unet, layers="up_blocks.*", steps=[0, 10]) as recorder:
        for index, t in enumerate(timesteps):
            recorder.step = index
            eps = unet(latents, t, encoder_hidden_states=text).sample
    maps = recorder.mean_maps()   # {(layer, step): (F, F) tensor}
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from motionsep.errors import UsageError
from motionsep.model import recipes

if TYPE_CHECKING:
    from torch import nn

# Elements of the float32 probability tensor computed at once (16 MiB): the
# side computation never holds more than this, whatever the resolution.
DEFAULT_CHUNK_ELEMENTS = 1 << 22

_FORWARD_ORDER = ("transformer_in.", "down_blocks.", "mid_block.", "up_blocks.")


def temporal_attention_names(unet: nn.Module) -> list[str]:
    """Full names of every temporal attention module (attn1 and attn2), in forward order.

    ``transformer_in`` comes first (ZeroScope), then the down, mid and up
    blocks' temporal transformers (the order the U-Net runs them, not the
    order it registers them: diffusers registers ``mid_block`` after
    ``up_blocks``), e.g. ``down_blocks.0.temp_attentions.1.transformer_blocks.0.attn2``
    on ZeroScope, ``down_blocks.0.motion_modules.1.transformer_blocks.0.attn2``
    on AnimateDiff.
    """
    from diffusers.models.attention_processor import Attention

    names = []
    for transformer in recipes.temporal_transformer_names(unet):
        blocks = cast("nn.ModuleList", unet.get_submodule(transformer).transformer_blocks)
        for index in range(len(blocks)):
            for attention in recipes.TEMPORAL_ATTENTIONS:
                name = f"{transformer}.transformer_blocks.{index}.{attention}"
                try:
                    module = unet.get_submodule(name)
                except AttributeError:
                    continue
                if isinstance(module, Attention):
                    names.append(name)
    return sorted(names, key=_forward_rank)  # a stable sort keeps the order within a part


def _forward_rank(name: str) -> int:
    for rank, prefix in enumerate(_FORWARD_ORDER):
        if name.startswith(prefix):
            return rank
    return len(_FORWARD_ORDER)


def match_layers(names: Sequence[str], pattern: str | Sequence[str] | None) -> list[str]:
    """The names a ``--layers`` pattern selects, in the order of ``names``.

    A name is selected when the pattern matches it as a shell glob over the
    whole name (``up_blocks.*attn1``) or, if the pattern is a valid regular
    expression, when ``re.search`` finds it in the name (``attn2$``,
    ``down_blocks\\.[01]``). A sequence selects the exact names it lists.

    Args:
        names: Candidate names (e.g. :func:`temporal_attention_names`).
        pattern: A glob/regex, an explicit list, or None for all names.

    Raises:
        UsageError: if nothing is selected (the message lists a few names).
    """
    if pattern is None:
        return list(names)
    if not isinstance(pattern, str):
        wanted = set(pattern)
        unknown = sorted(wanted - set(names))
        if unknown:
            raise UsageError(
                f"no temporal attention named {', '.join(unknown)}",
                f"temporal attentions are named like {names[0] if names else '?'}",
            )
        return [name for name in names if name in wanted]
    try:
        regex: re.Pattern[str] | None = re.compile(pattern)
    except re.error:
        regex = None  # e.g. "*attn1": a glob only
    selected = [
        name
        for name in names
        if fnmatch.fnmatchcase(name, pattern) or (regex is not None and regex.search(name))
    ]
    if not selected:
        examples = ", ".join(names[:3])
        raise UsageError(
            f"--layers {pattern!r} matches none of the {len(names)} temporal attention layers",
            f"use a glob or regex over names such as {examples} (e.g. --layers 'up_blocks.*')",
        )
    return selected


@dataclass
class AttentionStats:
    """Running sums of one temporal attention layer at one denoising step.

    Attributes:
        probability_sum: ``(F, F)`` float64: sum over heads, spatial positions
            (and calls) of the attention probabilities; row i is query frame i.
        entropy_sum: ``(F,)`` float64: sum of the entropies (nats) of the same
            probability rows.
        count: How many ``F x F`` maps were summed (heads x positions x calls).
    """

    probability_sum: torch.Tensor
    entropy_sum: torch.Tensor
    count: int = 0

    def mean_map(self) -> torch.Tensor:
        """The ``F x F`` attention map averaged over heads and positions (rows sum to 1)."""
        return self.probability_sum / max(self.count, 1)

    def mean_entropy(self) -> float:
        """Mean entropy (nats) of the individual attention distributions summed here."""
        frames = self.entropy_sum.numel()
        return float(self.entropy_sum.sum()) / max(self.count * frames, 1)


class AttentionRecorder:
    """Accumulates temporal attention maps per (layer, step) while its processors run.

    Set :attr:`step` before every U-Net call: calls at steps outside
    ``steps`` (or with ``step`` None) are passed through without recording.

    Args:
        layers: The attention module names being recorded.
        steps: Step indices to record; None records every step.
        conditional_half: The U-Net batch is classifier-free guidance's
            ``[unconditional; conditional]``: record only the conditional half.
            (The rows of a temporal attention are batch-major, ``B * H * W``,
            so the second half of the rows is the second half of the batch.)
        chunk_elements: Most probability elements computed at once; never
            more than half the elements of the call's input either.
    """

    def __init__(
        self,
        layers: Sequence[str],
        steps: Iterable[int] | None = None,
        *,
        conditional_half: bool = False,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        self.layers = tuple(layers)
        self.steps = None if steps is None else frozenset(steps)
        self.conditional_half = conditional_half
        self.chunk_elements = max(1, chunk_elements)
        self.step: int | None = None
        self.stats: dict[tuple[str, int], AttentionStats] = {}

    @property
    def recording(self) -> bool:
        """Whether a U-Net call now would be recorded."""
        return self.step is not None and (self.steps is None or self.step in self.steps)

    def mean_maps(self) -> dict[tuple[str, int], torch.Tensor]:
        """``(layer, step) -> (F, F)`` mean attention map of everything recorded."""
        return {key: stats.mean_map() for key, stats in self.stats.items()}

    def recorded_steps(self) -> list[int]:
        """Steps at which something was recorded, ascending."""
        return sorted({step for _, step in self.stats})

    def accumulate(
        self,
        layer: str,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> None:
        """Adds the probabilities of one attention call to the sums of (layer, step).

        Follows the stock processors' preprocessing (spatial norm, 4-D inputs,
        group norm, cross norm, q/k norms, mask) and ``Attention.get_attention_scores``
        (``attn.scale``, softmax), in float32.

        Raises:
            ValueError: if the batch cannot be split into guidance halves.
        """
        if self.step is None:
            return
        with torch.no_grad():
            x = hidden_states
            if attn.spatial_norm is not None:
                x = attn.spatial_norm(x, temb)
            if x.ndim == 4:
                batch, channels, height, width = x.shape
                x = x.view(batch, channels, height * width).transpose(1, 2)
            rows, query_len = x.shape[0], x.shape[1]
            key_len = query_len if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            heads = int(attn.heads)
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, key_len, rows)
                mask = mask.view(rows, heads, -1, mask.shape[-1])
            start = 0
            if self.conditional_half:
                if rows % 2:
                    raise ValueError(
                        f"{layer}: a guidance batch must have an even number of rows, got {rows}"
                    )
                start = rows // 2
            # The side computation runs before the stock processor, whose own
            # q/k/v/output tensors are several times the input: keeping our
            # transient tensors below half the input's size keeps the forward's
            # peak memory where it was.
            budget = min(self.chunk_elements, max(1, x.numel() // 2))
            chunk = max(1, budget // (heads * query_len * key_len))
            stats = self.stats.get((layer, self.step))
            if stats is None:
                stats = AttentionStats(
                    probability_sum=torch.zeros(query_len, key_len, dtype=torch.float64),
                    entropy_sum=torch.zeros(query_len, dtype=torch.float64),
                )
                self.stats[(layer, self.step)] = stats
            for first in range(start, rows, chunk):
                stop = min(rows, first + chunk)
                probs = _probabilities(
                    attn,
                    x[first:stop],
                    None if encoder_hidden_states is None else encoder_hidden_states[first:stop],
                    None if mask is None else mask[first:stop],
                )
                stats.probability_sum += probs.sum(dim=(0, 1)).to("cpu", torch.float64)
                entropy = torch.special.entr(probs).sum(dim=-1)
                stats.entropy_sum += entropy.sum(dim=(0, 1)).to("cpu", torch.float64)
                stats.count += probs.shape[0] * probs.shape[1]


def _probabilities(
    attn: Any,
    x: torch.Tensor,
    context: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Softmax attention probabilities ``(n, heads, Fq, Fk)`` of some rows, in float32."""
    if attn.group_norm is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(x)
    if context is None:
        context = x
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key = attn.to_k(context)
    heads = int(attn.heads)
    head_dim = key.shape[-1] // heads
    rows = x.shape[0]
    query = query.view(rows, -1, heads, head_dim).transpose(1, 2)
    key = key.view(rows, -1, heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * float(attn.scale)
    if mask is not None:
        scores = scores + mask.float()
    return scores.softmax(dim=-1)


class RecordingAttnProcessor:
    """An attention processor that records probabilities and then runs the original one.

    Args:
        recorder: Where the sums go (and which steps to record).
        layer: The attention module's full name (the key of its sums).
        inner: The processor it replaces; it computes the output.
    """

    def __init__(self, recorder: AttentionRecorder, layer: str, inner: Any) -> None:
        self.recorder = recorder
        self.layer = layer
        self.inner = inner

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Records (at recorded steps) and returns the original processor's output."""
        if self.recorder.recording:
            self.recorder.accumulate(
                self.layer, attn, hidden_states, encoder_hidden_states, attention_mask, temb
            )
        if temb is not None:
            kwargs["temb"] = temb
        return self.inner(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            **kwargs,
        )


@contextmanager
def record_temporal_attention(
    unet: nn.Module,
    *,
    layers: str | Sequence[str] | None = None,
    steps: Iterable[int] | None = None,
    conditional_half: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Iterator[AttentionRecorder]:
    """Records the temporal attention maps of ``unet`` inside the block.

    The selected attention modules get a :class:`RecordingAttnProcessor`
    wrapping their current processor; on exit (also on an exception) every
    module gets back the very processor object it had.

    Args:
        unet: A video U-Net of either family (a peft motion LoRA may be injected).
        layers: ``--layers`` pattern or explicit names (see :func:`match_layers`);
            None records every temporal attention.
        steps: Step indices to record; None records all.
        conditional_half: Record only the conditional half of a guidance batch.
        chunk_elements: Most probability elements computed at once.

    Yields:
        The recorder; set its ``step`` before each U-Net call.

    Raises:
        UsageError: if ``layers`` selects nothing.
    """
    selected = match_layers(temporal_attention_names(unet), layers)
    recorder = AttentionRecorder(
        selected, steps, conditional_half=conditional_half, chunk_elements=chunk_elements
    )
    originals: dict[str, Any] = {}
    try:
        for name in selected:
            module: Any = unet.get_submodule(name)  # a diffusers Attention
            originals[name] = module.processor
            module.set_processor(RecordingAttnProcessor(recorder, name, module.processor))
        yield recorder
    finally:
        for name, processor in originals.items():
            cast(Any, unet.get_submodule(name)).set_processor(processor)
