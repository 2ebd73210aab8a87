"""The official PyTorch MARLIN built with random weights, for parity tests (imported by test modules)."""

from __future__ import annotations

import torch

from marlin_jax.architectures import MarlinArchitecture


def build_torch_marlin(marlin_pytorch, arch: MarlinArchitecture, seed: int, full: bool = True):
    """The official model with every tensor randomised (biases and norms too, so each mapping is exercised).

    `full` False builds the encoder-only feature extractor, as `*.encoder.pt` files load.
    """
    torch.manual_seed(seed)
    model = marlin_pytorch.Marlin(
        img_size=arch.img_size, patch_size=arch.patch_size, n_frames=arch.num_frames,
        encoder_embed_dim=arch.encoder_embed_dim, encoder_depth=arch.encoder_depth,
        encoder_num_heads=arch.encoder_num_heads, decoder_embed_dim=arch.decoder_embed_dim,
        decoder_depth=arch.decoder_depth, decoder_num_heads=arch.decoder_num_heads, mlp_ratio=arch.mlp_ratio,
        qkv_bias=arch.qkv_bias, qk_scale=arch.qk_scale, drop_rate=0.0, attn_drop_rate=0.0,
        norm_layer="LayerNorm", init_values=0.0, tubelet_size=arch.tubelet_size, as_feature_extractor=not full)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "pos_embedding" not in name:
                tensor.add_(0.05 * torch.randn_like(tensor))
    return model.eval()
