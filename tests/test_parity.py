"""Numerical parity with the real official `marlin_pytorch` package, both directions, and weight round trips."""

from __future__ import annotations

import numpy as np
import pytest

from marlin_jax import Marlin
from marlin_jax.architectures import VIT_SMALL, VIT_TINY, MarlinArchitecture
from marlin_jax.interop import export_state_dict, import_state_dict
from marlin_jax.interop.torch_files import marlin_pytorch_yaml
from marlin_jax.model import CPU_QUERY_CHUNK, attention

try:  # only the tests that use torch need it: they ask for a torch fixture, which skips without it
    import torch
    from torch_reference import build_torch_marlin
except ImportError:
    pass

TOLERANCE = 1e-4


def random_clip_and_mask(arch: MarlinArchitecture, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    clip = rng.random((batch, 3, arch.num_frames, arch.img_size, arch.img_size), dtype=np.float32)
    num_visible = int(arch.num_tokens * 0.1)
    mask = np.zeros((batch, arch.num_tokens), bool)
    for row in mask:
        row[rng.choice(arch.num_tokens, num_visible, replace=False)] = True
    return clip, mask


def torch_outputs(model, clip: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    x = torch.from_numpy(clip)
    with torch.no_grad():
        return {
            "seq": model.extract_features(x, keep_seq=True).numpy(),
            "pooled": model.extract_features(x, keep_seq=False).numpy(),
            "reconstruction": model(x, torch.from_numpy(mask)).numpy(),
        }


def jax_outputs(model: Marlin, clip: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "seq": model.extract_features(clip, keep_seq=True),
        "pooled": model.extract_features(clip, keep_seq=False),
        "reconstruction": model.reconstruct(clip, mask),
    }


def assert_close(actual: dict, expected: dict):
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
        np.testing.assert_allclose(actual[key], expected[key], rtol=0, atol=TOLERANCE, err_msg=key)


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


# The official ViT-S at its real size with one clip (batching is checked on the tiny model).
@pytest.mark.parametrize("arch, batch", [(VIT_TINY, 2), pytest.param(VIT_SMALL, 1, marks=pytest.mark.slow)],
                         ids=["tiny", "vit_small"])
def test_imported_weights_match_pytorch(marlin_pytorch, tmp_path, arch, batch):
    torch_model = build_torch_marlin(marlin_pytorch, arch, seed=1)
    path = tmp_path / "model.full.pt"
    torch.save(torch_model.state_dict(), path)
    model = Marlin.from_file(arch, path)
    clip, mask = random_clip_and_mask(arch, batch=batch, seed=2)
    assert_close(jax_outputs(model, clip, mask), torch_outputs(torch_model, clip, mask))


@pytest.mark.parametrize("full", [True, False], ids=["full", "encoder"])
def test_exported_weights_load_strictly_in_marlin_pytorch(marlin_pytorch, tmp_path, full):
    model = Marlin.random_init(VIT_TINY, seed=3, full=full)
    rng = np.random.default_rng(4)
    model.params = _perturbed(model.params, rng)
    files = model.to_pytorch(tmp_path / "exported")
    assert all(f.is_file() for f in files.values())
    marlin_pytorch.config.register_model_from_yaml("marlin_jax_tiny_test", str(files["yaml"]))
    # from_file calls load_state_dict(strict=True): a missing or unexpected key raises.
    torch_model = marlin_pytorch.Marlin.from_file("marlin_jax_tiny_test", str(files["pt"])).eval()
    assert torch_model.as_feature_extractor is not full
    clip, mask = random_clip_and_mask(VIT_TINY, batch=2, seed=5)
    expected = {k: v for k, v in torch_outputs(torch_model, clip, mask).items()} if full else {
        "seq": torch_model.extract_features(torch.from_numpy(clip), keep_seq=True).numpy(),
        "pooled": torch_model.extract_features(torch.from_numpy(clip), keep_seq=False).numpy()}
    actual = jax_outputs(model, clip, mask) if full else {
        "seq": model.extract_features(clip, True), "pooled": model.extract_features(clip, False)}
    assert_close(actual, expected)


def test_safetensors_export_equals_pt(marlin_pytorch, tmp_path):
    from safetensors.numpy import load_file
    model = Marlin.random_init(VIT_TINY, seed=6)
    files = model.to_pytorch(tmp_path / "m")
    from_pt = torch.load(files["pt"], weights_only=True)
    from_safetensors = load_file(str(files["safetensors"]))
    assert list(from_pt) == list(model.state_dict())
    assert set(from_safetensors) == set(from_pt)
    for key, value in from_pt.items():
        np.testing.assert_array_equal(from_safetensors[key], value.numpy(), err_msg=key)


def test_yaml_registers_identically_to_official_config(marlin_pytorch, tmp_path):
    import yaml
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(marlin_pytorch_yaml(VIT_SMALL)))
    marlin_pytorch.config.register_model_from_yaml("marlin_jax_small_test", str(path))
    ours = marlin_pytorch.config.resolve_config("marlin_jax_small_test")
    official = marlin_pytorch.config.resolve_config("marlin_vit_small_ytf")
    for field in ("img_size", "patch_size", "n_frames", "encoder_embed_dim", "encoder_depth", "encoder_num_heads",
                  "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mlp_ratio", "qkv_bias", "qk_scale",
                  "norm_layer", "init_values", "tubelet_size"):
        assert getattr(ours, field) == getattr(official, field), field


def test_import_export_import_is_bitwise(marlin_pytorch):
    torch_model = build_torch_marlin(marlin_pytorch, VIT_TINY, seed=7)
    state = state_dict_numpy(torch_model)
    generator, _ = import_state_dict(state, VIT_TINY)
    exported = export_state_dict(generator, VIT_TINY)
    assert list(exported) == list(state)
    for key in state:
        assert exported[key].dtype == state[key].dtype
        np.testing.assert_array_equal(exported[key], state[key], err_msg=key)
    again, _ = import_state_dict(exported, VIT_TINY)
    _assert_trees_equal(again, generator)


def test_lightning_ckpt_with_discriminator(marlin_pytorch, tmp_path):
    from marlin_pytorch.model.modules import MLP
    torch_model = build_torch_marlin(marlin_pytorch, VIT_TINY, seed=8)
    torch.manual_seed(9)
    discriminator = MLP([VIT_TINY.patch_dim, VIT_TINY.discriminator_hidden_dim, 1],
                        build_activation=torch.nn.LeakyReLU).eval()
    state = {**torch_model.state_dict(),
             **{f"discriminator.{k}": v for k, v in discriminator.state_dict().items()}}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "hyper_parameters": {"adv_weight": 0.01}}, path)
    model = Marlin.from_file(VIT_TINY, path)
    clip, mask = random_clip_and_mask(VIT_TINY, batch=1, seed=10)
    assert_close(jax_outputs(model, clip, mask), torch_outputs(torch_model, clip, mask))

    from marlin_jax.model import PatchDiscriminator
    patches = np.random.default_rng(11).random((2, 5, VIT_TINY.patch_dim), dtype=np.float32)
    ours = PatchDiscriminator(VIT_TINY).apply({"params": model.discriminator_params}, patches)
    with torch.no_grad():
        theirs = discriminator(torch.from_numpy(patches)).numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOLERANCE)
    exported = model.state_dict(include_discriminator=True)
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


def test_videomae_pth(marlin_pytorch, tmp_path):
    """A VideoMAE pretraining checkpoint: its own key names, {"model": ...}, and no sin-cos tables."""
    torch_model = build_torch_marlin(marlin_pytorch, VIT_TINY, seed=12)
    videomae = {}
    for key, value in torch_model.state_dict().items():
        if "pos_embedding" in key:
            continue
        key = (key.replace("patch_embedding.projection", "patch_embed.proj")
               .replace("mlp.layers.0.linear", "mlp.fc1").replace("mlp.layers.1.linear", "mlp.fc2")
               .replace("enc_dec_proj", "encoder_to_decoder").replace("decoder.mask_token", "mask_token"))
        videomae[key] = value
    path = tmp_path / "videomae_pretrain.pth"
    torch.save({"model": videomae, "epoch": 799}, path)
    model = Marlin.from_file(VIT_TINY, path)
    clip, mask = random_clip_and_mask(VIT_TINY, batch=1, seed=13)
    assert_close(jax_outputs(model, clip, mask), torch_outputs(torch_model, clip, mask))


def test_fresh_pos_table_matches_official_table(marlin_pytorch):
    """Our float64-computed table vs the official float32 one: equal to float32 rounding of the angles."""
    from marlin_pytorch.model.positional_embedding import SinCosPositionalEmbedding
    from marlin_jax.model import sincos_table
    official = SinCosPositionalEmbedding((VIT_SMALL.num_tokens, 384), dropout_rate=0.0).emb[0].numpy()
    np.testing.assert_allclose(sincos_table(VIT_SMALL.num_tokens, 384), official, atol=5e-4)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown MARLIN model name 'marlin_vit_huge'"):
        Marlin.from_file("marlin_vit_huge", "whatever.pt")


def test_checkpoint_for_another_size_names_both_sizes(marlin_pytorch, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(build_torch_marlin(marlin_pytorch, VIT_TINY, seed=14).state_dict(), path)
    with pytest.raises(ValueError, match=r"tiny.pt: .*another architecture: encoder 64 wide x 2 blocks, decoder 32 "
                                         r"wide x 1 blocks.*the model is marlin_vit_small_ytf \(encoder 384 wide"):
        Marlin.from_file("marlin_vit_small_ytf", path)


def test_not_a_checkpoint(torch, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        Marlin.from_file("marlin_vit_small_ytf", text)
    other = tmp_path / "weights.npz"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported checkpoint type"):
        Marlin.from_file("marlin_vit_small_ytf", other)
    with pytest.raises(ValueError, match="weights not found: .*missing.pt"):
        Marlin.from_file("marlin_vit_small_ytf", tmp_path / "missing.pt")


@pytest.mark.parametrize("tokens", [156, 2 * CPU_QUERY_CHUNK], ids=["one_query_chunk", "two_query_chunks"])
def test_attention_and_its_gradient_match_torch(torch, tokens):
    """The CPU attention (query chunks, custom backward) against the official Attention's formula under torch
    autograd. The models above have a single chunk (tiny) or are compared forward only."""
    import jax
    q, k, v, d_out = np.random.default_rng(16).standard_normal((4, 2, 3, tokens, 16), dtype=np.float32)
    scale = 16 ** -0.5
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    expected = torch.softmax((tq * scale) @ tk.transpose(-2, -1), dim=-1) @ tv
    expected.backward(torch.from_numpy(d_out))
    out, pull_back = jax.vjp(lambda q, k, v: attention(q, k, v, scale), q, k, v)
    np.testing.assert_allclose(np.asarray(out), expected.detach().numpy(), rtol=0, atol=TOLERANCE)
    for name, ours, theirs in zip("qkv", pull_back(d_out), (tq, tk, tv)):
        np.testing.assert_allclose(np.asarray(ours), theirs.grad.numpy(), rtol=0, atol=TOLERANCE, err_msg=name)


def test_unexpected_tensor_is_an_error(marlin_pytorch, tmp_path):
    state = build_torch_marlin(marlin_pytorch, VIT_TINY, seed=15).state_dict()
    state["encoder.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="encoder.extra_head.weight"):
        Marlin.from_file(VIT_TINY, path)


def _perturbed(tree, rng):
    import jax
    return jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32), tree)


def _assert_trees_equal(a, b):
    import jax
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
