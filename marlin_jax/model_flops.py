"""The model FLOPs of MARLIN's programs, counted from the architecture: 2 per multiply-add of every matmul,
nothing for recomputation (remat), softmax, normalisation or elementwise work. Benchmarks divide by them for MFU;
`python -m marlin_jax.aot` multiplies them by a run's steps for its hours at a given MFU.

A matmul's backward costs twice its forward (input and weight gradients), except the patch embedding, whose input
(the video) needs no gradient.
"""

from __future__ import annotations

from marlin_jax.architectures import MarlinArchitecture


def transformer_flops(depth: int, tokens: int, dim: int, mlp_dim: int) -> int:
    """Forward matmul FLOPs of `depth` ViT blocks: qkv, proj, the two MLP layers, q @ k^T and attn @ v."""
    return depth * (2 * tokens * dim * (4 * dim + 2 * mlp_dim) + 4 * tokens * tokens * dim)


def _patch_embedding_flops(arch: MarlinArchitecture, tokens: int) -> int:
    return 2 * tokens * arch.patch_dim * arch.encoder_embed_dim


def extraction_flops(arch: MarlinArchitecture) -> int:
    """Per clip: the encoder over all tokens, patch embedding and the blocks."""
    n = arch.num_tokens
    return _patch_embedding_flops(arch, n) + transformer_flops(arch.encoder_depth, n, arch.encoder_embed_dim,
                                                               arch.mlp_dim)


def finetuning_flops(arch: MarlinArchitecture, num_outputs: int) -> int:
    """Per clip: one fine-tuning step, the encoder over all tokens and the linear head, forward and backward."""
    n = arch.num_tokens
    blocks = transformer_flops(arch.encoder_depth, n, arch.encoder_embed_dim, arch.mlp_dim)
    head = 2 * arch.encoder_embed_dim * num_outputs
    return 3 * (blocks + head) + 2 * _patch_embedding_flops(arch, n)


def pretraining_flops(arch: MarlinArchitecture, num_visible: int) -> dict[str, int]:
    """Per clip: the generator forward, one marlin_jax train step, one official D-then-G iteration.

    The official iteration runs the generator forward and backward twice and embeds all tokens before dropping
    the masked ones; its D backward also reaches the prediction. The JAX step runs the generator once, embeds
    visible tokens only, and takes D's weight gradients on the detached prediction and then only input gradients
    for the generator's adversarial term.
    """
    n, nv = arch.num_tokens, num_visible
    nm, p, hidden = n - nv, arch.patch_dim, arch.discriminator_hidden_dim
    trunk = (transformer_flops(arch.encoder_depth, nv, arch.encoder_embed_dim, arch.mlp_dim)
             + 2 * nv * arch.encoder_embed_dim * arch.decoder_embed_dim
             + transformer_flops(arch.decoder_depth, n, arch.decoder_embed_dim, arch.decoder_mlp_dim)
             + 2 * nm * arch.decoder_embed_dim * p)
    embed_visible, embed_all = _patch_embedding_flops(arch, nv), _patch_embedding_flops(arch, n)
    critic = 2 * nm * (p * hidden + hidden)  # one pass of D over one clip's predicted (or real) patches
    return {"generator_forward": trunk + embed_visible,
            "jax_step": 3 * trunk + 2 * embed_visible + 6 * critic,
            "official_iteration": 6 * trunk + 2 * 2 * embed_all + 9 * critic}
