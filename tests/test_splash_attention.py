"""The TPU attention (`marlin_jax.model.splash_attention`, the Pallas splash kernel) against the XLA attention that
TPUs ran before it, both on the CPU: Pallas interpret mode runs the kernel's own code there.

200 tokens pad to 256 (two kernel blocks), so the padding and its mask are exercised; values, dq, dk and dv are
compared. The sizes keep interpret mode at a few seconds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marlin_jax import model

BATCH, HEADS, TOKENS, HEAD_DIM = 1, 2, 200, 64
SCALE = HEAD_DIM ** -0.5
# bf16 keeps 8 significant bits: one step at a value's magnitude is 2**-7 of it.
BF16_STEP = 2.0 ** -7


def _xla_attention(q, k, v):
    return model._accelerator_attention(q, k, v, SCALE, "xla")


def _splash_attention(q, k, v):
    return model.splash_attention(q, k, v, SCALE, interpret=True)


def _forward_and_grads(attention, q, k, v, d_out):
    out, pull_back = jax.vjp(attention, q, k, v)
    return dict(zip(("out", "dq", "dk", "dv"), (out, *pull_back(d_out))))


@pytest.fixture(scope="module")
def inputs():
    keys = jax.random.split(jax.random.key(0), 4)
    return [jax.random.normal(key, (BATCH, HEADS, TOKENS, HEAD_DIM), jnp.float32) for key in keys]


def test_float32_matches_xla_attention(inputs):
    expected = _forward_and_grads(_xla_attention, *inputs)
    got = _forward_and_grads(jax.jit(_splash_attention), *inputs)
    for name in expected:
        assert got[name].shape == expected[name].shape
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-5, err_msg=name)


def test_bfloat16_within_bfloat16_tolerance(inputs):
    """bf16 splash against float32 attention of the same (bf16-rounded) inputs: within one bf16 step of the
    largest magnitude, as XLA's bf16 attention is."""
    rounded = [x.astype(jnp.bfloat16) for x in inputs]
    reference = _forward_and_grads(_xla_attention, *(x.astype(jnp.float32) for x in rounded))
    got = _forward_and_grads(jax.jit(_splash_attention), *rounded)
    for name, value in got.items():
        assert value.dtype == jnp.bfloat16, name
        error = float(jnp.abs(value.astype(jnp.float32) - reference[name]).max())
        assert error <= BF16_STEP * float(jnp.abs(reference[name]).max()), (name, error)
