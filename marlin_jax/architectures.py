"""MARLIN architecture hyper-parameters, and the official model names that users already know.

One frozen dataclass describes a model's shape. The pretraining configs (`configs/pretrain/*.py`) build their
`config.model` from it, and `Marlin.from_file("marlin_vit_base_ytf", ...)` resolves official names here, so
both paths agree on every number.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class MarlinArchitecture:
    """Shape of a MARLIN model (encoder, decoder and discriminator)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    img_size: int = 224
    patch_size: int = 16
    num_frames: int = 16
    tubelet_size: int = 2
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    # None means head_dim ** -0.5, as in the official attention.
    qk_scale: float | None = None
    # torch.nn.LayerNorm's default; flax's default (1e-6) would break parity.
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("encoder", "decoder"):
            dim = getattr(self, f"{name}_embed_dim")
            heads = getattr(self, f"{name}_num_heads")
            if dim % heads:
                raise ValueError(f"{name}_embed_dim={dim} is not divisible by {name}_num_heads={heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.num_frames % self.tubelet_size:
            raise ValueError(f"num_frames={self.num_frames} is not a multiple of tubelet_size={self.tubelet_size}")

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (t, h, w); tokens are ordered t-major, as the official Conv3d + flatten orders them."""
        side = self.img_size // self.patch_size
        return self.num_frames // self.tubelet_size, side, side

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def patch_dim(self) -> int:
        """Values in one tubelet patch: channels x tubelet x patch x patch."""
        return 3 * self.tubelet_size * self.patch_size * self.patch_size

    @property
    def mlp_dim(self) -> int:
        return int(self.encoder_embed_dim * self.mlp_ratio)

    @property
    def decoder_mlp_dim(self) -> int:
        return int(self.decoder_embed_dim * self.mlp_ratio)

    @property
    def discriminator_hidden_dim(self) -> int:
        # The official discriminator is MLP([patch_dim, decoder_embed_dim * mlp_ratio, 1]).
        return int(self.decoder_embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MarlinArchitecture":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MARLIN architecture field(s): {', '.join(unknown)}")
        return cls(**dict(values))


VIT_SMALL = MarlinArchitecture(
    encoder_embed_dim=384, encoder_depth=12, encoder_num_heads=6,
    decoder_embed_dim=192, decoder_depth=4, decoder_num_heads=3)
VIT_BASE = MarlinArchitecture(
    encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
    decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=6)
VIT_LARGE = MarlinArchitecture(
    encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
    decoder_embed_dim=512, decoder_depth=12, decoder_num_heads=8)
# Small enough for CPU tests in seconds. It keeps 16 frames because marlin_pytorch's full model always builds
# its decoder for 16 frames, and parity tests build this size in PyTorch too.
VIT_TINY = MarlinArchitecture(
    encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2,
    decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, img_size=64)

OFFICIAL_ARCHITECTURES: dict[str, MarlinArchitecture] = {
    "marlin_vit_small_ytf": VIT_SMALL,
    "marlin_vit_base_ytf": VIT_BASE,
    "marlin_vit_large_ytf": VIT_LARGE,
}


def official_name(arch: MarlinArchitecture) -> str | None:
    return next((name for name, official in OFFICIAL_ARCHITECTURES.items() if official == arch), None)


def tensor_sizes(arch: MarlinArchitecture, with_decoder: bool = True) -> dict[str, int]:
    """The sizes that an official state_dict's tensor shapes reveal (attention heads do not show in them)."""
    sizes = {"encoder_width": arch.encoder_embed_dim, "encoder_blocks": arch.encoder_depth,
             "mlp_width": arch.mlp_dim, "patch_size": arch.patch_size, "tubelet_size": arch.tubelet_size,
             "tokens": arch.num_tokens}
    if with_decoder:
        sizes.update(decoder_width=arch.decoder_embed_dim, decoder_blocks=arch.decoder_depth)
    return sizes


def describe_sizes(sizes: Mapping[str, int]) -> str:
    """`tensor_sizes` (or the part of them a file shows) in words."""
    def pair(part: str) -> str:
        width, blocks = sizes.get(f"{part}_width", "?"), sizes.get(f"{part}_blocks", "?")
        return f"{part} {width} wide x {blocks} blocks"

    parts = [pair("encoder"), pair("decoder") if "decoder_width" in sizes else "no decoder"]
    if "patch_size" in sizes:
        parts.append(f"{sizes['patch_size']} px patches")
    if "tokens" in sizes:
        parts.append(f"{sizes['tokens']} tokens")
    return ", ".join(parts)


def describe(arch: MarlinArchitecture) -> str:
    """The official name and sizes, or the sizes alone: enough to tell two architectures apart in a message."""
    name = official_name(arch)
    sizes = describe_sizes(tensor_sizes(arch))
    return f"{name} ({sizes})" if name else sizes


def official_architecture(name: str) -> MarlinArchitecture:
    try:
        return OFFICIAL_ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown MARLIN model name {name!r}; official names are {', '.join(OFFICIAL_ARCHITECTURES)}, "
            "or a pretraining config such as marlin_vit_base[:variant] or configs/pretrain/marlin_vit_base.py"
        ) from None
