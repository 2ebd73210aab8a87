"""`Marlin`: the inference facade, named and shaped as users of `marlin_pytorch` know it.

    from marlin_jax import Marlin
    model = Marlin.from_online("marlin_vit_base_ytf")                # downloaded once, then from the cache
    model = Marlin.from_file("marlin_vit_base_ytf", "marlin_vit_base_ytf.encoder.pt")
    features = model.extract_features(clip, keep_seq=False)   # clip (B, 3, T, H, W) in [0, 1]
    model.to_pytorch("exported/marlin_vit_base.pt")            # + .yaml + .safetensors
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from marlin_jax.architectures import OFFICIAL_ARCHITECTURES, MarlinArchitecture, official_architecture
from marlin_jax.config_files import load_config
from marlin_jax.video_features import FeatureExtractor, extract_video_features
from marlin_jax.interop import official_weights, torch_files
from marlin_jax.interop.state_dict import export_state_dict
from marlin_jax.interop.weights import load_weights, official_file
from marlin_jax.masking import mask_to_indices
from marlin_jax.model import MarlinMAE, init_params
from marlin_jax.interop import saved_models


def resolve_architecture(model: str | MarlinArchitecture) -> MarlinArchitecture:
    """An official name (`marlin_vit_base_ytf`), a pretraining config by file (`configs/pretrain/x.py[:variant]`) or
    by name (`marlin_vit_small:tiny`), or as is."""
    if isinstance(model, MarlinArchitecture):
        return model
    if model in OFFICIAL_ARCHITECTURES:
        return official_architecture(model)
    try:
        config = load_config(model, kind="pretrain")
    except ValueError:
        official_architecture(model)  # names the official models and the config forms
        raise
    return MarlinArchitecture.from_dict(config.model.to_dict())


def _as_channels_last(x) -> jax.Array:
    """(B, 3, T, H, W) as the official API takes it (numpy, torch or jax) -> (B, T, H, W, 3) float32."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"expected a clip batch shaped (B, 3, T, H, W), got {tuple(x.shape)}")
    return jnp.transpose(x, (0, 2, 3, 4, 1))


class Marlin:
    """Holds an architecture and its (host) parameters; runs jitted feature extraction and reconstruction."""

    def __init__(self, architecture: MarlinArchitecture, generator_params: dict[str, Any],
                 discriminator_params: dict[str, Any] | None = None, name: str | None = None):
        if "encoder" not in generator_params:
            raise ValueError("parameters have no 'encoder' tree")
        self.architecture = architecture
        self.params = generator_params
        self.discriminator_params = discriminator_params
        self.name = name
        self.step: int | None = None  # the training step, for a model read from a workdir

    @property
    def params(self) -> dict[str, Any]:
        """Generator parameters (host arrays): {"encoder"} or {"encoder", "enc_dec_proj", "decoder"}."""
        return self._params

    @params.setter
    def params(self, value: dict[str, Any]) -> None:
        self._params = value
        self.__dict__.pop("device_params", None)
        self.__dict__.pop("feature_extractor", None)

    @functools.cached_property
    def device_params(self) -> dict[str, Any]:
        """`params` on the default device, copied once (not on every call: ViT-B's weights are 344 MB)."""
        return jax.device_put(self._params)

    @functools.cached_property
    def feature_extractor(self) -> FeatureExtractor:
        """The encoder on every local device, placed once."""
        return FeatureExtractor(self.architecture, self._params["encoder"])

    @property
    def has_decoder(self) -> bool:
        return "decoder" in self.params

    @classmethod
    def random_init(cls, model: str | MarlinArchitecture, seed: int = 0, full: bool = True) -> "Marlin":
        """Freshly initialised weights (the official init scheme); `full` adds the decoder and discriminator."""
        arch = resolve_architecture(model)
        # jit: an eager init would run the whole forward op by op (seconds for ViT-S).
        generator, discriminator = nn.meta.unbox(
            jax.jit(init_params, static_argnums=1)(jax.random.key(seed), arch))
        if not full:
            generator, discriminator = {"encoder": generator["encoder"]}, None
        return cls(arch, jax.device_get(generator), jax.device_get(discriminator),
                   name=model if isinstance(model, str) else None)

    @classmethod
    def from_file(cls, model_name: str | MarlinArchitecture, path, *, step: int | None = None,
                  trust_pickled_checkpoint: bool = False) -> "Marlin":
        """Loads an official weights name (`marlin_vit_base_ytf`, downloaded once), an official `.pt` / Lightning
        `.ckpt`, a `.safetensors` export, a VideoMAE `.pth`, or a workdir of this project (its latest checkpoint,
        or `step`; `<workdir>/best` for the best one). See `interop.weights.load_weights`."""
        arch = resolve_architecture(model_name)
        weights = load_weights(arch, path, step=step, trust_pickled_checkpoint=trust_pickled_checkpoint)
        return cls(arch, weights.generator, weights.discriminator, model_name if isinstance(model_name, str) else None)

    @classmethod
    def from_online(cls, model_name: str, full_model: bool = False) -> "Marlin":
        """The official release weights of `model_name` (marlin_vit_small_ytf, marlin_vit_base_ytf,
        marlin_vit_large_ytf): the encoder, or with `full_model` the encoder and decoder. Downloaded once into
        `~/.cache/marlin_jax` (or `$MARLIN_JAX_CACHE_DIR`), from `$MARLIN_JAX_WEIGHTS_URL` when set; see
        `interop.official_weights`."""
        if model_name not in OFFICIAL_ARCHITECTURES:
            raise ValueError(f"no official weights are named {model_name!r}; the official models are "
                             f"{', '.join(OFFICIAL_ARCHITECTURES)}")
        weights = model_name + official_weights.FULL_SUFFIX if full_model else model_name
        return cls.from_file(model_name, official_file(weights, official_architecture(model_name)))

    @staticmethod
    def clean_cache() -> None:
        """Deletes the downloaded official weights (the whole cache folder)."""
        official_weights.clean_cache()

    @classmethod
    def from_checkpoint(cls, workdir, step: int | None = None) -> "Marlin":
        """The model of a training workdir's (latest, or `step`) checkpoint, with the architecture it was saved
        with; `<workdir>/best` holds the best one."""
        saved = saved_models.read_saved_model(workdir, step)
        model = cls(saved.architecture, saved.generator, saved.discriminator, saved.model_name)
        model.step = saved.step
        return model

    def state_dict(self, include_discriminator: bool = False) -> dict[str, np.ndarray]:
        """The official PyTorch state_dict (numpy values)."""
        discriminator = self.discriminator_params if include_discriminator else None
        return export_state_dict(jax.device_get(self.params), self.architecture, discriminator)

    def to_pytorch(self, path) -> dict[str, epath.Path]:
        """Writes `<path>.pt` (loads strictly in `marlin_pytorch.Marlin.from_file`), `<path>.yaml`
        (for `marlin_pytorch.config.register_model_from_yaml`) and `<path>.safetensors`."""
        stem = epath.Path(path)
        stem = stem.with_suffix("") if stem.suffix in (".pt", ".yaml", ".safetensors") else stem
        stem.parent.mkdir(parents=True, exist_ok=True)
        files = {kind: stem.with_suffix(f".{kind}") for kind in ("pt", "yaml", "safetensors")}
        state = self.state_dict()
        torch_files.write_torch_state_dict(state, files["pt"])
        torch_files.write_marlin_pytorch_yaml(self.architecture, files["yaml"])
        torch_files.write_safetensors(state, files["safetensors"])
        return files

    @functools.cached_property
    def _reconstruct_fn(self):
        return jax.jit(lambda params, clip, visible_idx, masked_idx: MarlinMAE(self.architecture).apply(
            {"params": params}, clip, visible_idx, masked_idx))

    def extract_features(self, x, keep_seq: bool = True) -> np.ndarray:
        """x (B, 3, T, H, W) in [0, 1] -> (B, N, D) features, or (B, D) with keep_seq False."""
        return self.feature_extractor.features(np.asarray(_as_channels_last(x)), bool(keep_seq))

    def extract_video(self, video_path, crop_face: bool = False, sample_rate: int = 2, stride: int = 16,
                      reduction: str = "none", keep_seq: bool = False) -> np.ndarray:
        """marlin_pytorch's extract_video: (clips, D) features of a video file; see marlin_jax.video_features."""
        return extract_video_features(self, video_path, crop_face=crop_face, keep_seq=keep_seq,
                                      sample_rate=sample_rate, stride=stride, reduction=reduction)

    def reconstruct(self, x, mask) -> np.ndarray:
        """x (B, 3, T, H, W), mask (B, N) bool, True = visible, the same count per row -> predicted patches of
        the masked tokens (B, N_masked, 3 * tubelet * patch * patch), in ascending token order."""
        if not self.has_decoder:
            raise ValueError("this model has no decoder (loaded from an encoder-only checkpoint)")
        mask = np.asarray(mask, bool)
        if mask.ndim != 2 or mask.shape[1] != self.architecture.num_tokens:
            raise ValueError(f"mask must be (B, {self.architecture.num_tokens}) bool, got {mask.shape}")
        counts = mask.sum(axis=1)
        if (counts != counts[0]).any():
            raise ValueError(f"every mask row needs the same number of visible tokens, got {sorted(set(counts))}")
        visible_idx, masked_idx = mask_to_indices(jnp.asarray(mask), int(counts[0]))
        return np.asarray(self._reconstruct_fn(self.device_params, _as_channels_last(x), visible_idx, masked_idx))
