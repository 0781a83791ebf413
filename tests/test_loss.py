"""Chunked cross-entropy equals the full-logits loss, in value and gradient."""

import jax
import jax.numpy as jnp
import optax
import pytest
from tolerances import TOLERANCES, relative_error

from lemo_jax.model.loss import chunked_cross_entropy, next_token_targets

B, T, D, V = 2, 100, 16, 50


def data():
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = 0.5 * jax.random.normal(keys[0], (B, T, D))
    head = 0.5 * jax.random.normal(keys[1], (D, V))
    ids = jax.random.randint(keys[2], (B, T), 0, V)
    return hidden, head, ids


def full_loss(hidden, head, ids):
    targets, weights = next_token_targets(ids)
    losses = optax.softmax_cross_entropy_with_integer_labels(hidden @ head, targets)
    return jnp.sum(losses * weights), jnp.sum(weights)


@pytest.mark.parametrize("chunk_size", [100, 32, 7, 1000])  # whole, ragged, tiny, larger than T
def test_chunked_equals_full(chunk_size):
    hidden, head, ids = data()
    targets, weights = next_token_targets(ids)

    def chunked(h, w):
        return chunked_cross_entropy(lambda x: x @ w, h, targets, weights, chunk_size=chunk_size)

    (loss, count), (expected, expected_count) = chunked(hidden, head), full_loss(hidden, head, ids)
    assert count == expected_count == B * (T - 1)
    tolerance = TOLERANCES[jnp.dtype(jnp.float32)]
    assert relative_error(loss, expected) <= tolerance.forward
    grads = jax.grad(lambda h, w: chunked(h, w)[0], argnums=(0, 1))(hidden, head)
    expected_grads = jax.grad(lambda h, w: full_loss(h, w, ids)[0], argnums=(0, 1))(hidden, head)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert relative_error(grad, expected_grad) <= tolerance.gradient


def test_next_token_targets():
    ids = jnp.array([[5, 6, 7]])
    targets, weights = next_token_targets(ids)
    assert targets.tolist() == [[6, 7, 0]]
    assert weights.tolist() == [[1.0, 1.0, 0.0]]


def test_chunked_loss_compiles_to_less_temporary_memory():
    """The point of chunking: the [T, V] logits (and their gradient) never exist at once."""
    length, dim, vocab = 4096, 64, 8192
    hidden = jax.ShapeDtypeStruct((1, length, dim), jnp.float32)
    head = jax.ShapeDtypeStruct((dim, vocab), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(chunk_size):
        def total(h, w, token_ids):
            targets, weights = next_token_targets(token_ids)
            if chunk_size is None:
                return full_loss(h, w, token_ids)[0]
            return chunked_cross_entropy(
                lambda x: x @ w, h, targets, weights, chunk_size=chunk_size
            )[0]

        return jax.jit(jax.grad(total, argnums=(0, 1)))

    def temp_bytes(chunk_size):
        compiled = loss(chunk_size).lower(hidden, head, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(None), temp_bytes(512)
    logits_bytes = length * vocab * 4  # 128 MiB
    assert full >= logits_bytes
    # A few chunk-sized [512, V] buffers (logits, their gradient) remain: 16 MiB each.
    assert chunked < logits_bytes / 3
