"""Bidirectional mapping between official MARLIN PyTorch state_dicts and this project's Flax parameters.

Both directions walk one list of `TensorRule`s built from the architecture, so every tensor that can be
imported can be exported and the two are exact inverses (reshapes and transposes only: a round trip is
bitwise).

Flax trees: the generator is `MarlinMAE`'s params ({"encoder", "enc_dec_proj", "decoder"}) or, for an
encoder-only checkpoint, {"encoder"}; the discriminator is `PatchDiscriminator`'s params.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator, Mapping

import numpy as np

from marlin_jax.architectures import OFFICIAL_ARCHITECTURES, MarlinArchitecture, describe, describe_sizes, tensor_sizes

Array = np.ndarray
FlaxPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    torch_key: str
    flax_path: FlaxPath
    torch_shape: tuple[int, ...]
    to_flax: Callable[[Array], Array]
    to_torch: Callable[[Array], Array]


def _linear(torch_key: str, flax_path: FlaxPath, out_dim: int, in_dim: int, bias: bool = True) -> list[TensorRule]:
    rules = [TensorRule(f"{torch_key}.weight", (*flax_path, "kernel"), (out_dim, in_dim),
                        lambda w: w.T, lambda k: k.T)]
    if bias:
        rules.append(TensorRule(f"{torch_key}.bias", (*flax_path, "bias"), (out_dim,), _same, _same))
    return rules


def _same(x: Array) -> Array:
    return x


def _layer_norm(torch_key: str, flax_path: FlaxPath, dim: int) -> list[TensorRule]:
    return [TensorRule(f"{torch_key}.weight", (*flax_path, "scale"), (dim,), _same, _same),
            TensorRule(f"{torch_key}.bias", (*flax_path, "bias"), (dim,), _same, _same)]


def _block_rules(torch_prefix: str, flax_prefix: FlaxPath, dim: int, heads: int, mlp_dim: int,
                 qkv_bias: bool) -> list[TensorRule]:
    head_dim = dim // heads
    attn_t, attn_f = f"{torch_prefix}.attn", (*flax_prefix, "attn")
    rules = _layer_norm(f"{torch_prefix}.norm1", (*flax_prefix, "norm1"), dim)
    if qkv_bias:
        for name in ("q_bias", "v_bias"):
            rules.append(TensorRule(f"{attn_t}.{name}", (*attn_f, name), (dim,),
                                    lambda b: b.reshape(heads, head_dim), lambda b: b.reshape(dim)))
    # torch packs q, k, v as rows of one (3 * heads * head_dim, dim) weight; ours is (dim, 3, heads, head_dim).
    rules.append(TensorRule(
        f"{attn_t}.qkv.weight", (*attn_f, "qkv"), (3 * dim, dim),
        lambda w: w.reshape(3, heads, head_dim, dim).transpose(3, 0, 1, 2),
        lambda k: k.transpose(1, 2, 3, 0).reshape(3 * dim, dim)))
    rules.append(TensorRule(
        f"{attn_t}.proj.weight", (*attn_f, "proj"), (dim, dim),
        lambda w: w.T.reshape(heads, head_dim, dim), lambda k: k.reshape(dim, dim).T))
    rules.append(TensorRule(f"{attn_t}.proj.bias", (*attn_f, "proj_bias"), (dim,), _same, _same))
    rules += _layer_norm(f"{torch_prefix}.norm2", (*flax_prefix, "norm2"), dim)
    rules += _linear(f"{torch_prefix}.mlp.layers.0.linear", (*flax_prefix, "mlp", "fc1"), mlp_dim, dim)
    rules += _linear(f"{torch_prefix}.mlp.layers.1.linear", (*flax_prefix, "mlp", "fc2"), dim, mlp_dim)
    return rules


def _position_table(torch_key: str, flax_path: FlaxPath, num_tokens: int, dim: int) -> TensorRule:
    return TensorRule(torch_key, (*flax_path, "table"), (1, num_tokens, dim), lambda e: e[0], lambda t: t[None])


def encoder_rules(arch: MarlinArchitecture) -> list[TensorRule]:
    dim, pt, p = arch.encoder_embed_dim, arch.tubelet_size, arch.patch_size
    rules = [
        # Conv3d weight (D, C, pt, ph, pw) flattened in (c, pt, ph, pw) order = our patchify order.
        TensorRule("encoder.patch_embedding.projection.weight", ("encoder", "patch_embedding", "kernel"),
                   (dim, 3, pt, p, p), lambda w: w.reshape(dim, -1).T, lambda k: k.T.reshape(dim, 3, pt, p, p)),
        TensorRule("encoder.patch_embedding.projection.bias", ("encoder", "patch_embedding", "bias"), (dim,),
                   _same, _same),
        _position_table("encoder.pos_embedding.emb", ("encoder", "pos_embedding"), arch.num_tokens, dim),
    ]
    # Official key order (module registration order), so exported files list keys as the official ones do.
    rules += _layer_norm("encoder.norm", ("encoder", "norm"), dim)
    for i in range(arch.encoder_depth):
        rules += _block_rules(f"encoder.blocks.{i}", ("encoder", "blocks", f"blocks_{i}"), dim,
                              arch.encoder_num_heads, arch.mlp_dim, arch.qkv_bias)
    return rules


def decoder_rules(arch: MarlinArchitecture) -> list[TensorRule]:
    dim = arch.decoder_embed_dim
    rules = [TensorRule("decoder.mask_token", ("decoder", "mask_token"), (1, 1, dim),
                        lambda t: t.reshape(dim), lambda t: t.reshape(1, 1, dim))]
    rules += _layer_norm("decoder.norm", ("decoder", "norm"), dim)
    rules.append(_position_table("decoder.pos_embedding.emb", ("decoder", "pos_embedding"), arch.num_tokens, dim))
    for i in range(arch.decoder_depth):
        rules += _block_rules(f"decoder.blocks.{i}", ("decoder", "blocks", f"blocks_{i}"), dim,
                              arch.decoder_num_heads, arch.decoder_mlp_dim, arch.qkv_bias)
    rules += _linear("decoder.head", ("decoder", "head"), arch.patch_dim, dim)
    rules += _linear("enc_dec_proj", ("enc_dec_proj",), dim, arch.encoder_embed_dim, bias=False)
    return rules


def discriminator_rules(arch: MarlinArchitecture) -> list[TensorRule]:
    hidden = arch.discriminator_hidden_dim
    return (_linear("discriminator.layers.0.linear", ("fc1",), hidden, arch.patch_dim)
            + _linear("discriminator.layers.1.linear", ("fc2",), 1, hidden))


def _get(tree: Mapping, path: FlaxPath):
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path: FlaxPath, value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _import(state: Mapping[str, Array], rules: list[TensorRule]) -> dict:
    tree: dict = {}
    # Shapes first: for a checkpoint of another model size, the first mismatching tensor says more than the
    # list of blocks it lacks.
    for rule in rules:
        if rule.torch_key not in state:
            continue
        value = np.asarray(state[rule.torch_key])
        if tuple(value.shape) != rule.torch_shape:
            raise ValueError(f"checkpoint tensor {rule.torch_key!r} has shape {tuple(value.shape)}, but the "
                             f"model config expects {rule.torch_shape}; is this checkpoint for another model size?")
        _set(tree, rule.flax_path, rule.to_flax(value))
    missing = [r.torch_key for r in rules if r.torch_key not in state]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), first: {', '.join(missing[:5])}")
    return tree


def _has_prefix(state: Mapping[str, Array], prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(prefixes) for key in state)


def _shape(state: Mapping[str, Array], key: str, ndim: int) -> tuple[int, ...] | None:
    shape = tuple(np.shape(state[key])) if key in state else None
    return shape if shape is not None and len(shape) == ndim else None


def _block_count(state: Mapping[str, Array], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.blocks\.(\d+)\.")
    indices = {int(match.group(1)) for key in state if (match := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def sizes_in_state_dict(state: Mapping[str, Array]) -> dict[str, int]:
    """The architecture sizes (`architectures.tensor_sizes`) that an official state_dict's tensors show."""
    sizes = {}
    if patch := _shape(state, "encoder.patch_embedding.projection.weight", 5):
        sizes.update(encoder_width=patch[0], tubelet_size=patch[2], patch_size=patch[3])
    if table := _shape(state, "encoder.pos_embedding.emb", 3):
        sizes["tokens"] = table[1]
    if blocks := _block_count(state, "encoder"):
        sizes["encoder_blocks"] = blocks
    if fc1 := _shape(state, "encoder.blocks.0.mlp.layers.0.linear.weight", 2):
        sizes["mlp_width"] = fc1[0]
    if norm := _shape(state, "decoder.norm.weight", 1):
        sizes["decoder_width"] = norm[0]
    if blocks := _block_count(state, "decoder"):
        sizes["decoder_blocks"] = blocks
    return sizes


def describe_state_dict(sizes: Mapping[str, int]) -> str:
    """A state_dict's sizes in words, with the official model they belong to when they match one."""
    with_decoder = "decoder_width" in sizes
    names = [name for name, arch in OFFICIAL_ARCHITECTURES.items()
             if all(tensor_sizes(arch, with_decoder).get(key) == value for key, value in sizes.items())]
    return f"{names[0]} ({describe_sizes(sizes)})" if len(names) == 1 else describe_sizes(sizes)


def check_architecture(state: Mapping[str, Array], arch: MarlinArchitecture) -> None:
    """Fails, naming both architectures, when the state_dict's tensors show sizes that `arch` does not have."""
    sizes = sizes_in_state_dict(state)
    expected = tensor_sizes(arch, with_decoder="decoder_width" in sizes)
    if any(expected.get(key) != value for key, value in sizes.items()):
        raise ValueError(f"the checkpoint holds weights of another architecture: {describe_state_dict(sizes)}; "
                         f"the model is {describe(arch)}")


def import_state_dict(state: Mapping[str, Array], arch: MarlinArchitecture) -> tuple[dict, dict | None]:
    """Official state_dict (numpy values) -> (generator params, discriminator params or None).

    Encoder-only checkpoints (`*.encoder.pt`) give a generator tree with "encoder" alone. Every tensor must be
    used: an unexpected key means the file is not what the architecture says, and is an error.
    """
    check_architecture(state, arch)
    rules = encoder_rules(arch)
    if _has_prefix(state, ("decoder.", "enc_dec_proj.")):
        rules += decoder_rules(arch)
    generator = _import(state, rules)
    discriminator = None
    used = {r.torch_key for r in rules}
    if _has_prefix(state, ("discriminator.",)):
        d_rules = discriminator_rules(arch)
        discriminator = _import(state, d_rules)
        used |= {r.torch_key for r in d_rules}
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} tensor(s) this MARLIN architecture does not use, "
                         f"first: {', '.join(unexpected[:5])}")
    return generator, discriminator


def _export(tree: Mapping, rules: list[TensorRule]) -> Iterator[tuple[str, Array]]:
    for rule in rules:
        try:
            value = np.asarray(_get(tree, rule.flax_path))
        except KeyError:
            raise ValueError(f"parameters have no {'/'.join(rule.flax_path)} (needed for {rule.torch_key})") from None
        value = rule.to_torch(value)
        if tuple(value.shape) != rule.torch_shape:
            raise ValueError(f"parameter {'/'.join(rule.flax_path)} gives {rule.torch_key} of shape "
                             f"{tuple(value.shape)}, expected {rule.torch_shape}")
        yield rule.torch_key, np.ascontiguousarray(value)


def export_state_dict(generator: Mapping, arch: MarlinArchitecture,
                      discriminator: Mapping | None = None) -> dict[str, Array]:
    """Flax params -> official state_dict (numpy values, official key order)."""
    rules = encoder_rules(arch)
    if "decoder" in generator:
        rules += decoder_rules(arch)
    state = dict(_export(generator, rules))
    if discriminator is not None:
        state.update(_export(discriminator, discriminator_rules(arch)))
    return state
