"""The MARLIN video masked autoencoder in Flax: encoder, decoder and patch discriminator.

Numerics follow the official PyTorch MARLIN exactly: pre-norm ViT blocks with q and v biases and no k bias,
exact (erf) GELU, LayerNorm eps 1e-5, tubelet tokens ordered (t, h, w), a fixed 1-D sin-cos table over all
tokens, the decoder appending mask tokens after the visible ones and predicting only the masked tokens.

Videos are channels-last, (B, T, H, W, 3): floats in [0, 1], or uint8 pixel values, which the encoder patchifies
as they are and scales after (the loaders' clips). Masks enter as index arrays (see
`marlin_jax.masking.mask_to_indices`): their shapes carry the static visible-token count that XLA needs.

Every parameter and the main activations carry logical axis names ("batch", "length", "embed", "mlp",
"heads", "head_dim", "patch", ...); the trainer maps them to mesh axes with rules from its config.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from marlin_jax.architectures import MarlinArchitecture

Dtype = Any
Initializer = Callable[..., jax.Array]

# torch's xavier_uniform_ on an (out, in) Linear weight, for our (in..., out...) kernels.
_xavier = nn.initializers.xavier_uniform
# torch's default Linear/Conv init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_default_kernel = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _torch_default_bias(fan_in: int) -> Initializer:
    bound = 1 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _truncated_mask_token_init(key, shape, dtype=jnp.float32):
    # The official mask token: normal(0, 0.02) truncated at +-0.02, i.e. +-1 standard deviation.
    return 0.02 * jax.random.truncated_normal(key, -1.0, 1.0, shape, dtype)


def sincos_table(num_positions: int, dim: int) -> np.ndarray:
    """The fixed 1-D sinusoid table (positions x dim): even dims sin, odd dims cos, shared frequency per pair."""
    exponent = 2 * (np.arange(dim) // 2) / dim
    angles = np.arange(num_positions)[:, None] / np.power(10000.0, exponent)[None, :]
    table = np.empty_like(angles)
    table[:, 0::2] = np.sin(angles[:, 0::2])
    table[:, 1::2] = np.cos(angles[:, 1::2])
    return table.astype(np.float32)


def patchify(video: jax.Array, tubelet_size: int, patch_size: int) -> jax.Array:
    """(B, T, H, W, C) -> (B, N, C * tubelet * patch * patch), tokens (t, h, w)-ordered, values (c, pt, ph, pw).

    This is the layout of the official Conv3d weight and of the official reconstruction target, so the patch
    embedding is one matmul and the decoder's output compares against these vectors directly.

    CPU and GPU reshape and transpose. A TPU lays out an array's two last dimensions in tiles of 8 x 128, so
    the transpose's 8-D intermediates, whose last dimensions are 16 and 3, take 8 times their size (2.5 GiB per
    v5e chip for ViT-B's float32 reconstruction target at 16 clips); there a strided convolution with a one-hot
    kernel writes each clip's (N, patch_dim) patches directly (`_patchify_by_convolution`: no temporaries where
    the transpose took 1.2 GiB for 16 bf16 clips, and two-thirds of its memory traffic, by the TPU compiler).
    """
    return jax.lax.platform_dependent(
        video, cpu=functools.partial(_patchify_by_transpose, tubelet_size=tubelet_size, patch_size=patch_size),
        tpu=functools.partial(_patchify_by_convolution, tubelet_size=tubelet_size, patch_size=patch_size),
        default=functools.partial(_patchify_by_transpose, tubelet_size=tubelet_size, patch_size=patch_size))


def _patchify_by_convolution(video: jax.Array, tubelet_size: int, patch_size: int) -> jax.Array:
    """`patchify` one clip at a time (`lax.map`; under a mesh inside `shard_map`, on each chip's own clips): with
    the batch in the convolution, the TPU compiler relays the whole input out first, which took more on-chip
    scoped memory than it has from 32 clips per chip on."""
    def each_clip(clips):
        return jax.lax.map(functools.partial(_patchify_clip_by_convolution, tubelet_size=tubelet_size,
                                             patch_size=patch_size), clips)
    return _per_chip(each_clip, (video,), (("batch", None, None, None, None),), ("batch", None, None))


def _patchify_clip_by_convolution(clip: jax.Array, tubelet_size: int, patch_size: int) -> jax.Array:
    """One clip (T, H, W, C) -> (N, patch_dim) by a strided convolution whose one-hot kernel copies input value
    (t, i, j, c) to output feature (c, t, i, j). A patch row's (pixel, channel) values are adjacent in the clip,
    so they enter as the input features (16 x 3 = 48, where 3 channels alone would pad to 128 lanes) and the
    convolution spans frames and rows only. It copies bf16 values in one pass, exactly (each output is one value
    times 1, accumulated in float32); bf16 also holds 8-bit pixel values exactly, and a float32 value is the sum
    of three bf16 parts (8 of its 24 significant bits each), copied one by one."""
    t, h, w, c = clip.shape
    row = patch_size * c
    patch_dim = tubelet_size * patch_size * row
    # one_hot[t, i, 0, j * c + ch, feature (ch, t, i, j)] = 1
    one_hot = np.eye(patch_dim, dtype=np.float32).reshape(c, tubelet_size, patch_size, patch_size, patch_dim)
    one_hot = one_hot.transpose(1, 2, 3, 0, 4).reshape(tubelet_size, patch_size, 1, row, patch_dim)
    kernel = jnp.asarray(one_hot, jnp.bfloat16)

    def copy(values: jax.Array) -> jax.Array:
        patches = jax.lax.conv_general_dilated(
            values.reshape(1, t, h, w // patch_size, row), kernel, window_strides=(tubelet_size, patch_size, 1),
            padding="VALID", dimension_numbers=("NTHWC", "THWIO", "NTHWC"), preferred_element_type=jnp.float32)
        return patches.reshape(-1, patch_dim)

    if clip.dtype in (jnp.bfloat16, jnp.uint8, jnp.int8):
        return copy(clip.astype(jnp.bfloat16)).astype(clip.dtype)
    rest, patches = clip.astype(jnp.float32), 0.0
    for _ in range(3):
        part = rest.astype(jnp.bfloat16)
        patches, rest = patches + copy(part), rest - part.astype(jnp.float32)
    return patches.astype(clip.dtype)


def _patchify_by_transpose(video: jax.Array, tubelet_size: int, patch_size: int) -> jax.Array:
    b, t, h, w, c = video.shape
    nt, nh, nw = t // tubelet_size, h // patch_size, w // patch_size
    x = video.reshape(b, nt, tubelet_size, nh, patch_size, nw, patch_size, c)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, nt * nh * nw, c * tubelet_size * patch_size * patch_size)


def unpatchify(patches: jax.Array, grid: tuple[int, int, int], tubelet_size: int, patch_size: int) -> jax.Array:
    """Inverse of `patchify`: (B, N, C * pt * ph * pw) -> (B, T, H, W, C)."""
    b = patches.shape[0]
    nt, nh, nw = grid
    x = patches.reshape(b, nt, nh, nw, -1, tubelet_size, patch_size, patch_size)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, nt * tubelet_size, nh * patch_size, nw * patch_size, -1)


def gather_tokens(tokens: jax.Array, indices: jax.Array) -> jax.Array:
    """tokens (B, N, D), indices (B, K) in [0, N) -> (B, K, D).

    The indices come from `marlin_jax.masking.mask_to_indices`, always in range, so the gather skips the
    out-of-range fill pass (a select over the whole output) that the default mode adds."""
    return jnp.take_along_axis(tokens, indices[..., None], axis=1, mode="promise_in_bounds")


# Queries per step of the CPU attention: one frame's tokens, so a step's (heads, chunk, N) weights stay in cache.
CPU_QUERY_CHUNK = 196


def _query_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """(H, N, E) -> (N / chunk, H, chunk, E)."""
    h, n, e = x.shape
    return x.reshape(h, n // chunk, chunk, e).swapaxes(0, 1)


def _merge_query_chunks(x: jax.Array) -> jax.Array:
    c, h, q, e = x.shape
    return x.swapaxes(0, 1).reshape(h, c * q, e)


def _softmax_weights(q, k):
    """Unnormalised softmax weights exp(logits - row max) of one query chunk, in float32. Written so that XLA:CPU
    fuses the max and the exp into the QK^T matmul: the (chunk, N) logits are never written out."""
    logits = jnp.einsum("hqe,hke->hqk", q, k, preferred_element_type=jnp.float32)
    return jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))


def _attend_chunk(q, k, v):
    """One query chunk: (out, softmax denominators). The output is normalised after the value matmul, which
    divides (chunk, E) values instead of the (chunk, N) weights."""
    weights = _softmax_weights(q, k)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("hqk,hke->hqe", weights.astype(v.dtype), v, preferred_element_type=jnp.float32) / total
    return out.astype(v.dtype), total


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _clip_attention(q, k, v, chunk: int):
    """One clip's (H, N, E) attention on the CPU, `chunk` queries at a time."""
    return _merge_query_chunks(jax.lax.map(lambda c: _attend_chunk(c, k, v)[0], _query_chunks(q, chunk)))


def _clip_attention_forward(q, k, v, chunk):
    out, totals = jax.lax.map(lambda c: _attend_chunk(c, k, v), _query_chunks(q, chunk))
    out = _merge_query_chunks(out)
    return out, (q, k, v, out, totals)


def _clip_attention_backward(chunk, residuals, d_out):
    """Flash attention's backward, one query chunk at a time: each chunk's probabilities are recomputed (the
    QK^T matmul again) from the saved softmax denominators, instead of (H, N, N) probabilities being stored,
    stacked and read back."""
    q, k, v, out, totals = residuals
    # sum_e dO * O per query: the softmax backward's row term, computed once for all chunks.
    row_dots = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)

    def one_chunk(carry, chunk_values):
        d_k, d_v = carry
        q_c, d_out_c, row_dot, total = chunk_values
        probs = _softmax_weights(q_c, k) / total
        d_v = d_v + jnp.einsum("hqk,hqe->hke", probs.astype(d_out_c.dtype), d_out_c,
                               preferred_element_type=jnp.float32)
        d_probs = jnp.einsum("hqe,hke->hqk", d_out_c, v, preferred_element_type=jnp.float32)
        d_logits = (probs * (d_probs - row_dot)).astype(q.dtype)
        d_q = jnp.einsum("hqk,hke->hqe", d_logits, k, preferred_element_type=jnp.float32).astype(q.dtype)
        d_k = d_k + jnp.einsum("hqk,hqe->hke", d_logits, q_c, preferred_element_type=jnp.float32)
        return (d_k, d_v), d_q

    zeros = jnp.zeros(k.shape, jnp.float32)
    chunks = (_query_chunks(q, chunk), _query_chunks(d_out, chunk), _query_chunks(row_dots, chunk), totals)
    (d_k, d_v), d_q = jax.lax.scan(one_chunk, (zeros, zeros), chunks)
    return _merge_query_chunks(d_q), d_k.astype(k.dtype), d_v.astype(v.dtype)


_clip_attention.defvjp(_clip_attention_forward, _clip_attention_backward)


def _cpu_attention(q, k, v, scale: float):
    """(B, H, N, E), one clip after another: a step's working set is then the same at any batch size."""
    tokens = q.shape[2]
    chunk = CPU_QUERY_CHUNK if tokens % CPU_QUERY_CHUNK == 0 else tokens
    q = q * jnp.asarray(scale, q.dtype)
    return jax.lax.map(lambda clip: _clip_attention(*clip, chunk), (q, k, v))


def _accelerator_attention(q, k, v, scale: float, implementation: str | None):
    # dot_product_attention takes (B, N, H, E); XLA folds these transposes into the neighbouring matmuls.
    q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    return out.swapaxes(1, 2)


# Splash attention's tile, in tokens (its default block sizes for queries and keys, forward and backward); the
# token count is padded up to a multiple of it.
SPLASH_BLOCK = 128


def _splash_per_chip(q, k, v, tokens: int, interpret: bool):
    """Splash attention over one chip's (B, H, N_padded, E) clips and heads; the first `tokens` are real."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    padded, heads = q.shape[2], q.shape[1]
    kernel = splash.make_splash_mha(masks.MultiHeadMask([masks.FullMask((padded, padded))] * heads),
                                    head_shards=1, q_seq_shards=1, interpret=interpret)
    segments = None
    if padded != tokens:
        # The padding is a segment of its own: real queries see only real keys, padded queries only padding (no
        # row is empty, so the softmax stays finite), and the padded rows are cut off afterwards.
        ids = (jnp.arange(padded) >= tokens).astype(jnp.int32)
        segments = splash.SegmentIds(q=ids, kv=ids)
    return jax.vmap(lambda q_clip, k_clip, v_clip: kernel(q_clip, k_clip, v_clip, segment_ids=segments))(q, k, v)


def splash_attention(q, k, v, scale: float, interpret: bool = False):
    """Softmax attention over (B, H, N, E) head-major arrays (q not yet scaled) by the Pallas TPU flash kernel
    that ships with JAX (`jax.experimental.pallas.ops.tpu.splash_attention`), which tiles queries and keys in
    blocks of `SPLASH_BLOCK` tokens and never writes the (N, N) logits to memory.

    The tokens are padded to a multiple of the block and the padding masked out (segment ids). XLA's
    partitioner cannot split a Pallas kernel, so under a mesh (the trainer's, the extractor's) the kernel runs
    on each chip's own clips and heads inside `shard_map`, laid out as the logical-axis rules in effect place
    "batch" and "heads". `interpret=True` runs the same kernel on the CPU (tests).
    """
    tokens = q.shape[2]
    padded = -(-tokens // SPLASH_BLOCK) * SPLASH_BLOCK
    q = q * jnp.asarray(scale, q.dtype)
    if padded != tokens:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, padded - tokens), (0, 0))) for x in (q, k, v))
    attend = functools.partial(_splash_per_chip, tokens=tokens, interpret=interpret)
    axes = ("batch", "heads", None, None)
    return _per_chip(attend, (q, k, v), (axes,) * 3, axes)[:, :, :tokens]


def _per_chip(fn, operands: tuple, operand_axes: tuple, result_axes: tuple):
    """`fn(*operands)`, and under a mesh inside `shard_map`, on each chip's own part: the operands' dimensions named
    by logical axes ("batch", "heads") split as the logical-axis rules in effect place them, except where the mesh
    axes do not divide the dimension (a batch of one clip at init, say), which stays whole. For what XLA's
    partitioner cannot split itself: a Pallas kernel, or a loop over the batch."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*operands)
    placement = {}
    for operand, names in zip(operands, operand_axes):
        for name, mesh_axes, size in zip(names, nn.logical_to_mesh_axes(names), operand.shape):
            if name is not None:
                split = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
                placement[name] = mesh_axes if size % int(np.prod([mesh.shape[a] for a in split])) == 0 else None
    spec = lambda names: jax.sharding.PartitionSpec(*(placement.get(name) for name in names))
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(names) for names in operand_axes),
                         out_specs=spec(result_axes), check_vma=False)(*operands)


@functools.cache
def _cudnn_attention_available() -> bool:
    """Whether this process can build cuDNN's fused attention (JAX raises on a machine without cuDNN)."""
    probe = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
    try:
        jax.eval_shape(functools.partial(jax.nn.dot_product_attention, implementation="cudnn"), probe, probe, probe)
    except (RuntimeError, NotImplementedError, ValueError):
        return False
    return True


def gpu_attention_implementation(dtype, head_dim: int) -> str:
    """What `attention` runs on NVIDIA GPUs: cuDNN's fused flash attention where it applies (16-bit floats,
    head_dim a multiple of 8 up to 128, cuDNN present), XLA's softmax(QK^T)V otherwise (e.g. float32)."""
    supported = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if supported and _cudnn_attention_available() else "xla"


def attention(q, k, v, scale: float):
    """Softmax attention over (B, H, N, E) head-major arrays; q is not yet scaled.

    CPU: clip by clip, the queries run in chunks of one frame (`CPU_QUERY_CHUNK`) through plain einsums, the
    softmax normalised after the value matmul, and a custom backward that recomputes each chunk's
    probabilities from the saved denominators. XLA:CPU then fuses each chunk's QK^T matmul with its max and
    exp, and never materialises the (B, H, N, N) logits (59 MB per ViT-S clip) that
    `jax.nn.dot_product_attention` writes and re-reads.
    NVIDIA GPUs: `jax.nn.dot_product_attention` with `gpu_attention_implementation`. TPUs: `splash_attention`.
    Others: `jax.nn.dot_product_attention`'s XLA implementation.
    """
    # platform_dependent traces every branch, so the cuDNN choice must also hold where cuDNN is absent.
    gpu_implementation = gpu_attention_implementation(q.dtype, q.shape[-1])
    return jax.lax.platform_dependent(
        q, k, v,
        cpu=functools.partial(_cpu_attention, scale=scale),
        cuda=functools.partial(_accelerator_attention, scale=scale, implementation=gpu_implementation),
        tpu=functools.partial(splash_attention, scale=scale),
        default=functools.partial(_accelerator_attention, scale=scale, implementation="xla"))


def _param(module: nn.Module, name: str, init: Initializer, shape: tuple[int, ...], axes: tuple):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def layer_norm(eps: float, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm with torch's eps and logically named scale/bias (flax keeps its statistics in float32)."""
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class Attention(nn.Module):
    """Multi-head self-attention with the official qkv bias: (q_bias, 0, v_bias)."""

    num_heads: int
    qkv_bias: bool = True
    qk_scale: float | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        head_dim = dim // self.num_heads
        qkv_kernel = _param(self, "qkv", _xavier(in_axis=0, out_axis=(1, 2, 3)),
                            (dim, 3, self.num_heads, head_dim), ("embed", None, "heads", "head_dim"))
        # Head-major (B, H, N, E): every attention matmul then has its batch dimensions first and needs no
        # transposed copy on the CPU.
        qkv = jnp.einsum("bnd,dkhe->kbhne", x, qkv_kernel.astype(self.dtype))
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.qkv_bias:
            bias_axes = ("heads", "head_dim")
            q_bias = _param(self, "q_bias", nn.initializers.zeros, (self.num_heads, head_dim), bias_axes)
            v_bias = _param(self, "v_bias", nn.initializers.zeros, (self.num_heads, head_dim), bias_axes)
            q = q + q_bias.astype(self.dtype)[:, None]
            v = v + v_bias.astype(self.dtype)[:, None]
        q, k, v = (nn.with_logical_constraint(a, ("batch", "heads", "length", "head_dim")) for a in (q, k, v))
        scale = self.qk_scale if self.qk_scale is not None else head_dim ** -0.5
        out = attention(q, k, v, scale)
        out_kernel = _param(self, "proj", _xavier(in_axis=(0, 1), out_axis=2),
                            (self.num_heads, head_dim, dim), ("heads", "head_dim", "embed"))
        out_bias = _param(self, "proj_bias", nn.initializers.zeros, (dim,), ("embed",))
        out = jnp.einsum("bhne,hed->bnd", out, out_kernel.astype(self.dtype)) + out_bias.astype(self.dtype)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class Dense(nn.Module):
    """A Linear layer whose kernel and bias carry logical axis names."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    kernel_init: Initializer = _xavier()
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = _param(self, "kernel", self.kernel_init, (x.shape[-1], self.features), self.axes)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            y = y + _param(self, "bias", self.bias_init, (self.features,), (self.axes[1],)).astype(self.dtype)
        return y


@jax.custom_vjp
def exact_gelu(x: jax.Array) -> jax.Array:
    """torch's nn.GELU, x * (1 + erf(x / sqrt(2))) / 2. `nn.gelu(approximate=False)` goes through erfc, whose
    piecewise approximation XLA:CPU runs about twice as slowly as erf's single rational one; the custom
    gradient keeps only x for the backward, one fused pass, where autodiff also stores and re-reads erf."""
    return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(2 ** -0.5, x.dtype)))


def _exact_gelu_forward(x):
    return exact_gelu(x), x


def _exact_gelu_backward(x, grad):
    cdf = 0.5 * (1 + jax.lax.erf(x * np.asarray(2 ** -0.5, x.dtype)))
    pdf = jnp.exp(-0.5 * x * x) * np.asarray((2 * np.pi) ** -0.5, x.dtype)
    return (grad * (cdf + x * pdf),)


exact_gelu.defvjp(_exact_gelu_forward, _exact_gelu_backward)


class MlpBlock(nn.Module):
    hidden_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = Dense(self.hidden_dim, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = exact_gelu(h)
        return Dense(dim, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class TransformerBlock(nn.Module):
    """Pre-norm ViT block (the official config has init_values 0, i.e. no layer scale)."""

    num_heads: int
    mlp_dim: int
    qkv_bias: bool
    qk_scale: float | None
    norm_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.num_heads, self.qkv_bias, self.qk_scale, self.dtype, name="attn")(
            layer_norm(self.norm_eps, self.dtype, name="norm1")(x))
        x = x + MlpBlock(self.mlp_dim, self.dtype, name="mlp")(layer_norm(self.norm_eps, self.dtype, name="norm2")(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class TransformerStack(nn.Module):
    depth: int
    num_heads: int
    mlp_dim: int
    qkv_bias: bool
    qk_scale: float | None
    norm_eps: float
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        block_cls = nn.remat(TransformerBlock) if self.remat else TransformerBlock
        for i in range(self.depth):
            x = block_cls(self.num_heads, self.mlp_dim, self.qkv_bias, self.qk_scale, self.norm_eps, self.dtype,
                          name=f"blocks_{i}")(x)
        return x


class PositionTable(nn.Module):
    """The fixed sin-cos table, kept as a parameter like the official `pos_embedding.emb` so that imported
    tables are used verbatim (torch computes it in float32, which differs from the exact table by ~1e-4 at far
    positions). Gradients are stopped; the trainer also excludes it from the optimiser."""

    num_positions: int
    dim: int

    @nn.compact
    def __call__(self):
        table = self.param("table", nn.with_logical_partitioning(
            lambda *_: jnp.asarray(sincos_table(self.num_positions, self.dim)), (None, "embed")))
        return jax.lax.stop_gradient(table)


class MarlinEncoder(nn.Module):
    arch: MarlinArchitecture
    remat: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        a = self.arch
        self.patch_embedding = Dense(
            a.encoder_embed_dim, ("patch", "embed"), kernel_init=_torch_default_kernel,
            bias_init=_torch_default_bias(a.patch_dim), dtype=self.dtype)
        self.pos_embedding = PositionTable(a.num_tokens, a.encoder_embed_dim)
        self.blocks = TransformerStack(
            a.encoder_depth, a.encoder_num_heads, a.mlp_dim, a.qkv_bias, a.qk_scale, a.norm_eps, self.remat,
            self.dtype)
        self.norm = layer_norm(a.norm_eps, self.dtype)

    def embed(self, video, token_idx=None):
        """Patch + position embedding of all tokens, or only of `token_idx` (B, K): embedding is per token, so
        gathering the pixels first skips the 90% of the patch-embedding matmul that masking would discard.
        uint8 video is patchified as bytes (a quarter of float32's to move) and scaled to [0, 1] after the
        gather, to the same values as float video."""
        pixel_values = jnp.issubdtype(video.dtype, jnp.integer)
        patches = patchify(video if pixel_values else video.astype(self.dtype), self.arch.tubelet_size,
                           self.arch.patch_size)
        table = self.pos_embedding().astype(self.dtype)[None]
        if token_idx is not None:
            patches = gather_tokens(patches, token_idx)
            table = gather_tokens(jnp.broadcast_to(table, (patches.shape[0], *table.shape[1:])), token_idx)
        if pixel_values:
            patches = (patches.astype(jnp.float32) / 255).astype(self.dtype)
        tokens = self.patch_embedding(patches) + table
        return nn.with_logical_constraint(tokens, ("batch", "length", "embed"))

    def __call__(self, video, visible_idx):
        """Encodes the visible tokens only: (B, T, H, W, 3), (B, Nv) -> (B, Nv, D)."""
        return self.norm(self.blocks(self.embed(video, visible_idx)))

    def extract_features(self, video, keep_seq: bool = True):
        """All tokens; (B, N, D) or, with keep_seq False, (B, D) mean-pooled BEFORE the final norm (official)."""
        tokens = self.blocks(self.embed(video))
        if not keep_seq:
            tokens = tokens.mean(axis=1)
        return self.norm(tokens)


class MarlinDecoder(nn.Module):
    arch: MarlinArchitecture
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, visible_tokens, visible_idx, masked_idx):
        """(B, Nv, Dd) visible tokens -> (B, Nm, patch_dim) predicted pixels of the masked tokens."""
        a = self.arch
        batch = visible_tokens.shape[0]
        table = PositionTable(a.num_tokens, a.decoder_embed_dim, name="pos_embedding")().astype(self.dtype)
        table = jnp.broadcast_to(table, (batch, *table.shape))
        mask_token = _param(self, "mask_token", _truncated_mask_token_init, (a.decoder_embed_dim,), ("embed",))
        x = jnp.concatenate([
            visible_tokens.astype(self.dtype) + gather_tokens(table, visible_idx),
            mask_token.astype(self.dtype) + gather_tokens(table, masked_idx),
        ], axis=1)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = TransformerStack(a.decoder_depth, a.decoder_num_heads, a.decoder_mlp_dim, a.qkv_bias, a.qk_scale,
                             a.norm_eps, self.remat, self.dtype, name="blocks")(x)
        x = x[:, -masked_idx.shape[1]:]
        x = layer_norm(a.norm_eps, self.dtype, name="norm")(x)
        return Dense(a.patch_dim, ("embed", "patch"), dtype=self.dtype, name="head")(x)


class MarlinMAE(nn.Module):
    """Encoder -> bias-free projection -> decoder; the generator of MARLIN's adversarial training."""

    arch: MarlinArchitecture
    remat: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        self.encoder = MarlinEncoder(self.arch, self.remat, self.dtype)
        self.enc_dec_proj = Dense(self.arch.decoder_embed_dim, ("embed", "decoder_embed"), use_bias=False,
                                  dtype=self.dtype)
        self.decoder = MarlinDecoder(self.arch, self.remat, self.dtype)

    def __call__(self, video, visible_idx, masked_idx):
        """Predicted pixels (B, Nm, patch_dim) for the masked tokens, in ascending token order."""
        encoded = self.encoder(video, visible_idx)
        return self.decoder(self.enc_dec_proj(encoded), visible_idx, masked_idx)

    def extract_features(self, video, keep_seq: bool = True):
        return self.encoder.extract_features(video, keep_seq)


class PatchDiscriminator(nn.Module):
    """The official MLP([patch_dim, decoder_embed_dim * mlp_ratio, 1]) with LeakyReLU(0.01), per patch."""

    arch: MarlinArchitecture
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, patches):
        a = self.arch
        dense = functools.partial(Dense, kernel_init=_torch_default_kernel, dtype=self.dtype)
        h = dense(a.discriminator_hidden_dim, ("patch", "mlp"), bias_init=_torch_default_bias(a.patch_dim),
                  name="fc1")(patches.astype(self.dtype))
        h = nn.leaky_relu(h, negative_slope=0.01)
        return dense(1, ("mlp", None), bias_init=_torch_default_bias(a.discriminator_hidden_dim), name="fc2")(h)


def init_params(key: jax.Array, arch: MarlinArchitecture) -> tuple[Any, Any]:
    """(generator, discriminator) parameters with the official init scheme, still in their logical-axis boxes
    (`nn.meta.unbox` them; the trainer first reads their shardings)."""
    g_key, d_key = jax.random.split(key)
    clip = jnp.zeros((1, arch.num_frames, arch.img_size, arch.img_size, 3), jnp.float32)
    generator = MarlinMAE(arch).init(g_key, clip, jnp.arange(1)[None], jnp.arange(1, arch.num_tokens)[None])
    discriminator = PatchDiscriminator(arch).init(d_key, jnp.zeros((1, 1, arch.patch_dim), jnp.float32))
    return generator["params"], discriminator["params"]


@functools.partial(jax.jit, static_argnames=("arch", "keep_seq"))
def encode_clips(encoder_params, clips: jax.Array, arch: MarlinArchitecture, keep_seq: bool) -> jax.Array:
    """Encoder features of clips (B, T, H, W, 3): floats in [0, 1], or uint8 (scaled by the encoder, so a
    host-to-accelerator copy moves a quarter of the bytes). -> (B, D), or (B, N, D) with keep_seq."""
    return MarlinEncoder(arch).apply({"params": encoder_params}, clips, keep_seq,
                                     method=MarlinEncoder.extract_features)

