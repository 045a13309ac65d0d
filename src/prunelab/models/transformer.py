"""Small transformers: a character-level GPT (nanoGPT-style) and a ViT for CIFAR-sized images.

Every projection is an ``nn.Linear`` (separate query, key, value and output projections, the
MLP's two layers, the language model's head), so the prunable registry, every unstructured
method and FLOP counting see each of them as an ordinary layer. Attention derives its number of
heads from the width of its query projection (``query.out_features // head_dim``): removing
whole heads (``head_dim`` consecutive outputs of query, key and value, and the matching inputs
of the output projection) leaves a smaller, plain module that still runs, with the same
``head_dim`` and fewer heads. ``prunelab.structured`` removes heads that way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.models import check_image_shape, register_model

#: ``model.task`` of a language model: outputs are next-token logits per position.
LANGUAGE_MODEL = "language-model"


class SelfAttention(nn.Module):
    """Multi-head self-attention from four Linear layers; heads = query width / ``head_dim``."""

    def __init__(self, width: int, heads: int, causal: bool, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise InvalidValueError(f"width {width} is not divisible by heads {heads}")
        self.head_dim, self.causal, self.dropout = width // heads, causal, dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    @property
    def heads(self) -> int:
        """The current number of heads (fewer after head pruning)."""
        return self.query.out_features // self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, T, H*D) -> (B, H, T, D)
            return t.view(batch, length, -1, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, length, -1))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, causal: bool, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


def _init(model: nn.Module, layers: int) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases, residual outputs scaled by
    1/√(2·layers) so the residual stream's variance does not grow with depth."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn.out", "fc2")) else 0.02
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class CharGPT(nn.Module):
    """Decoder-only transformer over token ids ``(batch, length)`` -> logits ``(batch, length,
    vocab)``; each position only attends to itself and earlier positions."""

    task = LANGUAGE_MODEL
    input_dtype = torch.long

    def __init__(self, vocab: int, context: int, layers: int, width: int, heads: int,
                 mlp_ratio: int, dropout: float, tie_weights: bool):
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio, True, dropout)
                                      for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        _init(self, layers)
        if tie_weights:
            self.head.weight = self.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[-1]
        if length > self.context:
            raise InvalidValueError(
                f"sequence of length {length} is longer than the model's context {self.context}")
        where = torch.arange(length, device=ids.device)
        x = self.drop(self.tokens(ids) + self.positions(where))
        return self.head(self.norm(self.blocks(x)))


def _positive(option: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValueError(f"{option} must be a positive integer, got {value!r}")
    return value


def _dropout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise InvalidValueError(f"dropout must be in [0, 1), got {value!r}")
    return float(value)


@register_model("gpt-char")
def gpt_char(num_classes: int, input_shape: tuple[int, ...] = (64,), layers: int = 4,
             width: int = 128, heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.0,
             tie_weights: bool = False) -> nn.Module:
    """Character-level GPT (nanoGPT-style): 4 layers, 128 wide, 4 heads; input (context,) ids.

    ``num_classes`` is the vocabulary (65 characters for Tiny Shakespeare) and ``input_shape``
    ``(context,)``. ``tie_weights`` shares the token embedding with the output layer (nanoGPT
    does); it is off by default so that every criterion, including ``activation``, can score
    every tensor (a tied tensor multiplies two different inputs).
    """
    if len(input_shape) != 1:
        raise InvalidValueError(
            f"gpt-char takes token sequences: input_shape must be (context,), got "
            f"{tuple(input_shape)} (an image shape? use a text dataset such as tinyshakespeare)")
    for option, value in (("layers", layers), ("width", width), ("heads", heads),
                          ("mlp_ratio", mlp_ratio)):
        _positive(option, value)
    return CharGPT(num_classes, input_shape[0], layers, width, heads, mlp_ratio,
                   _dropout(dropout), bool(tie_weights))


class ViT(nn.Module):
    """Vision transformer: non-overlapping patches -> encoder blocks -> mean token -> classes."""

    def __init__(self, num_classes: int, channels: int, grid: tuple[int, int], patch: int,
                 layers: int, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.patches = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)
        self.positions = nn.Parameter(torch.zeros(1, grid[0] * grid[1], width))
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio, False, dropout)
                                      for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        _init(self, layers)
        nn.init.normal_(self.positions, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patches(images).flatten(2).transpose(1, 2) + self.positions
        return self.head(self.norm(self.blocks(x)).mean(1))


@register_model("vit-cifar")
def vit_cifar(num_classes: int, input_shape: tuple[int, ...] = (3, 32, 32), patch: int = 4,
              layers: int = 6, width: int = 192, heads: int = 3, mlp_ratio: int = 2,
              dropout: float = 0.0) -> nn.Module:
    """Small ViT for CIFAR: 4x4 patches, 6 layers, 192 wide, 3 heads, mean-pooled tokens.

    Images must be a whole number of patches on each side.
    """
    channels, height, width_px = check_image_shape(input_shape, "vit-cifar", 1)
    for option, value in (("patch", patch), ("layers", layers), ("width", width),
                          ("heads", heads), ("mlp_ratio", mlp_ratio)):
        _positive(option, value)
    if height % patch or width_px % patch:
        raise InvalidValueError(
            f"vit-cifar: image size {height}x{width_px} is not a multiple of patch {patch}")
    return ViT(num_classes, channels, (height // patch, width_px // patch), patch, layers,
               width, heads, mlp_ratio, _dropout(dropout))
