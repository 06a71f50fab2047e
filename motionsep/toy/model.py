"""The toy base model: a text-to-video model of the toy world, in ZeroScope's format.

It is an ordinary diffusers folder (3D U-Net with ZeroScope's block layout,
VAE, CLIP text encoder, tokenizer, DDIM scheduler), so every motionsep command
drives it through the same code as ZeroScope. Only the sizes differ: 32x32
pixels, 8 frames, latents of 8x8 (the VAE downsamples by 4), a 5 M-parameter
U-Net, and a word-level tokenizer over the toy vocabulary.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from motionsep.model.components import TINY_TEXT_CONFIG, TINY_UNET2D_CONFIG, TINY_UNET_CONFIG
from motionsep.toy import world

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BUILTIN_NAME = "toy"

TOY_UNET_CONFIG: dict[str, Any] = {
    **TINY_UNET_CONFIG,
    "sample_size": world.SIZE // 4,
}

TOY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": world.SIZE,
    # set from the trained encoder's latent spread (see pretrain)
    "scaling_factor": 1.0,
    "mid_block_add_attention": False,
}

MAX_TOKENS = 16
TOY_TEXT_CONFIG: dict[str, Any] = {**TINY_TEXT_CONFIG, "max_position_embeddings": MAX_TOKENS}

TOY_SAMPLE_SETTINGS: dict[str, Any] = {
    "width": world.SIZE,
    "height": world.SIZE,
    "frames": world.FRAMES,
    "fps": world.FPS,
}


def builtin_path() -> Path:
    """Where the shipped toy model lives inside the installed package."""
    return Path(__file__).resolve().parent / "weights"


def builtin_animatediff_path() -> Path:
    """Where the shipped toy model of the AnimateDiff family lives inside the package."""
    return Path(__file__).resolve().parent / "weights-animatediff"


def _bpe_merges(words: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Learns byte-pair merges until every word is one token.

    Applying the merges in order to any of ``words`` then yields the whole
    word as a single ``word</w>`` token, which is what a word-level CLIP
    tokenizer needs. Ties break alphabetically, so the result is fixed.
    """
    pieces = {word: [*word[:-1], word[-1] + "</w>"] for word in words}
    merges: list[tuple[str, str]] = []
    tokens: list[str] = []
    while any(len(p) > 1 for p in pieces.values()):
        counts: dict[tuple[str, str], int] = {}
        for parts in pieces.values():
            for pair in itertools.pairwise(parts):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        tokens.append(best[0] + best[1])
        for word, parts in pieces.items():
            merged: list[str] = []
            index = 0
            while index < len(parts):
                if index + 1 < len(parts) and (parts[index], parts[index + 1]) == best:
                    merged.append(best[0] + best[1])
                    index += 2
                else:
                    merged.append(parts[index])
                    index += 1
            pieces[word] = merged
    return tokens, merges


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer that gives each toy word its own token.

    Characters stay in the vocabulary, so any other text still tokenizes
    (letter by letter).
    """
    import string

    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(chars) + [f"{c}</w>" for c in chars]
    merged, merges = _bpe_merges(world.vocabulary())
    for token in merged:
        if token not in tokens:
            tokens.append(token)
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def unet_config(head_width: int = 4) -> dict[str, Any]:
    """The toy U-Net's config; ``head_width`` is diffusers' ``attention_head_dim``.

    In diffusers' 3D U-Net ``attention_head_dim`` is the width of each
    attention head (the block's channels divided by it give the head count),
    not the number of heads: ZeroScope's is 64.
    """
    return {**TOY_UNET_CONFIG, "attention_head_dim": head_width}


def unet2d_config(head_width: int = 4) -> dict[str, Any]:
    """The toy layout in Stable Diffusion's 2D blocks (the ``animatediff`` family).

    Its spatial layers are the 3D toy U-Net's under the same names and with
    the same heads: the 2D U-Net's ``attention_head_dim`` is the head count,
    so each block gets its channels divided by ``head_width``; its spatial
    projections are Linear as in the 3D U-Net.
    """
    channels = TOY_UNET_CONFIG["block_out_channels"]
    return {
        **TINY_UNET2D_CONFIG,
        "sample_size": world.SIZE // 4,
        "attention_head_dim": [c // head_width for c in channels],
        "use_linear_projection": True,
    }


def build_components(seed: int, head_width: int = 4, family: str = "zeroscope") -> dict[str, Any]:
    """The toy model's components with seeded random weights (before pretraining).

    ``family="animatediff"`` gives a ``UNetMotionModel`` (:func:`unet2d_config`
    plus motion modules with 4 heads and 32 frame positions) instead of the
    3D U-Net; VAE, text encoder and tokenizer are the same.
    """
    import torch

    from motionsep.model.components import build_tiny_components
    from motionsep.model.family import FAMILIES

    motion = family == "animatediff"
    parts = build_tiny_components(
        seed,
        family=FAMILIES[family],
        unet_config=unet2d_config(head_width) if motion else unet_config(head_width),
        vae_config=TOY_VAE_CONFIG,
        text_config=TOY_TEXT_CONFIG,
        tokenizer=build_tokenizer(),
    )
    # Word vectors of unit scale instead of CLIP's 0.02: then every toy word,
    # "left" as much as "red", moves the encoder's output from the start.
    # Pretraining keeps this encoder frozen (see PretrainConfig).
    embedding = parts["text_encoder"].get_input_embeddings()
    generator = torch.Generator().manual_seed(seed + 17)
    with torch.no_grad():
        embedding.weight.copy_(torch.randn(embedding.weight.shape, generator=generator))
    return parts
