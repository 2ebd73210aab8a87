"""PyTorch references built from the official MARLIN for parity tests (the `torch_reference` fixture).

`build_torch_marlin` is marlin_pytorch's inference model with random weights. `OfficialPretraining` and
`official_iteration` are one pretraining iteration as the official Lightning module (ControlNet/MARLIN
model/marlin.py) runs it, written here from that code's semantics with marlin_pytorch's encoder and decoder,
torch autograd and `torch.optim.AdamW`; nothing of this project's losses, batch preparation or model is used.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
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


@dataclasses.dataclass(frozen=True)
class AdversarialSettings:
    adv_weight: float
    gp_weight: float = 0.0
    d_steps: int = 1
    g_steps: int = 1


class OfficialPretraining(torch.nn.Module):
    """The modules of the official pretraining model under its state_dict keys: marlin_pytorch's encoder and
    decoder, a bias-free encoder->decoder projection and the per-patch MLP discriminator with LeakyReLU."""

    def __init__(self, marlin_pytorch, arch: MarlinArchitecture):
        super().__init__()
        from marlin_pytorch.model.decoder import MarlinDecoder
        from marlin_pytorch.model.encoder import MarlinEncoder
        from marlin_pytorch.model.modules import MLP
        common = dict(img_size=arch.img_size, patch_size=arch.patch_size, mlp_ratio=arch.mlp_ratio,
                      qkv_bias=arch.qkv_bias, qk_scale=arch.qk_scale, drop_rate=0.0, attn_drop_rate=0.0,
                      norm_layer="LayerNorm", init_values=0.0, tubelet_size=arch.tubelet_size)
        self.arch = arch
        self.encoder = MarlinEncoder(n_frames=arch.num_frames, embed_dim=arch.encoder_embed_dim,
                                     depth=arch.encoder_depth, num_heads=arch.encoder_num_heads, **common)
        self.decoder = MarlinDecoder(n_frames=arch.num_frames, embed_dim=arch.decoder_embed_dim,
                                     depth=arch.decoder_depth, num_heads=arch.decoder_num_heads, **common)
        self.enc_dec_proj = torch.nn.Linear(arch.encoder_embed_dim, arch.decoder_embed_dim, bias=False)
        self.discriminator = MLP([arch.patch_dim, int(arch.decoder_embed_dim * arch.mlp_ratio), 1],
                                 build_activation=torch.nn.LeakyReLU)

    def generator_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in (self.encoder, self.decoder, self.enc_dec_proj) for p in m.parameters()]

    def forward(self, clips: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) clips and a (B, N) visible mask -> predicted patches of the masked tokens."""
        return self.decoder(self.enc_dec_proj(self.encoder(clips, visible)), visible)

    def patches(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, N, C * pt * ph * pw): tokens (t, h, w)-ordered, values (c, pt, ph, pw)."""
        a = self.arch
        b, c, t, h, w = clips.shape
        nt, nh, nw = t // a.tubelet_size, h // a.patch_size, w // a.patch_size
        blocks = clips.reshape(b, c, nt, a.tubelet_size, nh, a.patch_size, nw, a.patch_size)
        return blocks.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, nt * nh * nw, -1)

    def reconstruct_chosen(self, clips: torch.Tensor, visible: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """VideoMAE V2 decoder masking with the official modules: the decoder gets the visible tokens and mask
        tokens at the `chosen` (B, K) positions only, and predicts those K patches."""
        encoded = self.enc_dec_proj(self.encoder(clips, visible))
        table = self.decoder.pos_embedding.emb[0]
        visible_positions = torch.stack([row.nonzero()[:, 0] for row in visible])  # ascending, as encoded
        tokens = torch.cat([encoded + table[visible_positions], self.decoder.mask_token + table[chosen]], dim=1)
        return self.decoder.forward_features(tokens, return_token_num=chosen.shape[1])

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor, alpha: float) -> torch.Tensor:
        """WGAN-GP at one interpolation weight for the whole batch; per-patch gradient norms."""
        mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        scores = self.discriminator(mixed)
        (grads,) = torch.autograd.grad(scores, mixed, torch.ones_like(scores), create_graph=True)
        return ((grads.reshape(-1, grads.shape[-1]).norm(2, dim=1) - 1) ** 2).mean()


def make_official_optimizers(model: OfficialPretraining, betas: tuple[float, float], eps: float,
                             weight_decay: float) -> tuple[torch.optim.AdamW, torch.optim.AdamW]:
    """(generator, discriminator) AdamW, as configure_optimizers builds them (the fixed position tables do not
    require grad, so AdamW never moves them)."""
    def adamw(params):
        return torch.optim.AdamW(params, lr=0.0, betas=betas, eps=eps, weight_decay=weight_decay)
    return adamw(model.generator_parameters()), adamw(model.discriminator.parameters())


def official_iteration(model: OfficialPretraining, g_optimizer, d_optimizer, clips: torch.Tensor,
                       visible: torch.Tensor, settings: AdversarialSettings, lr: float,
                       alphas: Sequence[float] = ()) -> dict[str, float]:
    """One official training_step: d_steps discriminator updates, each on a fresh generator forward, then
    g_steps generator updates. Returns the losses the official step logs (those of its LAST D and G steps).

    `alphas` gives the gradient-penalty interpolation weight of each D step (officially torch.rand(1)).
    """
    for group in (*g_optimizer.param_groups, *d_optimizer.param_groups):
        group["lr"] = lr
    batch = clips.shape[0]
    target = model.patches(clips)[~visible].reshape(batch, -1, model.arch.patch_dim)
    logged = {}
    for d_step in range(settings.d_steps):
        d_optimizer.zero_grad()
        predicted = model(clips, visible)
        # Fake patches score low, real ones high: mean D(fake) - mean D(real).
        d_loss = model.discriminator(predicted).mean() - model.discriminator(target).mean()
        if settings.gp_weight > 0:
            d_loss = d_loss + settings.gp_weight * model.gradient_penalty(target, predicted.detach(), alphas[d_step])
        d_loss.backward()
        d_optimizer.step()
        logged["d_loss"] = d_loss.item()
    for _ in range(settings.g_steps):
        g_optimizer.zero_grad()  # drops what the D loss back-propagated into the generator
        predicted = model(clips, visible)
        rec_loss = torch.nn.functional.mse_loss(predicted, target)
        adv_loss = settings.adv_weight * -model.discriminator(predicted).mean()
        (rec_loss + adv_loss).backward()
        g_optimizer.step()
        logged.update(rec_loss=rec_loss.item(), adv_loss=adv_loss.item())
    return logged


def load_numpy_state(model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Every tensor of `model` from `state` (strict: a missing or unexpected key raises)."""
    model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}, strict=True)
