"""lemo_jax.lemo.kept_blocks: the LeMo forward pass with each layer's kept blocks returned (the
forward itself is the model's, `Llama.hidden_states_and_kept_tokens`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lemo_jax.configs import get_model_config
from lemo_jax.lemo.calibrate import dense_layer_scan
from lemo_jax.lemo.kept_blocks import kept_blocks
from lemo_jax.lemo.layer import EliminationPlan, GroupPlan, top_blocks
from lemo_jax.model import Llama

CONFIG = dataclasses.replace(get_model_config("tiny"), num_layers=4, compute_dtype="float32")
BLOCK, NUM_BLOCKS, KEPT = 16, 8, 3
T = BLOCK * NUM_BLOCKS


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def token_ids() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (2, T), 0, CONFIG.vocab_size)


def plan_with(mlp_blocks: int | None) -> EliminationPlan:
    """Layer 0 dense, layers 1-2 keep KEPT of NUM_BLOCKS blocks, layer 3 dense."""
    groups = (GroupPlan(0, 1), GroupPlan(1, 3, KEPT, mlp_blocks), GroupPlan(3, 4))
    return EliminationPlan(BLOCK, groups)


@pytest.mark.parametrize("mlp_blocks", [None, 5], ids=["dense_mlp", "token_sparse_mlp"])
def test_masks_follow_the_plan(model, token_ids, mlp_blocks):
    kept = np.asarray(kept_blocks(model, token_ids, plan_with(mlp_blocks)).kept)
    assert kept.shape == (CONFIG.num_layers, 2, NUM_BLOCKS)
    assert kept[[0, 3]].all()  # dense layers keep every block
    assert (kept[1:3].sum(axis=-1) == KEPT).all()
    assert kept[1:3, :, 0].all()  # keep_first_blocks=1: the attention sink stays


def test_first_pruned_layer_keeps_the_oracle_top_blocks_of_the_dense_pass(model, token_ids):
    # Layer 0 is dense, so layer 1 sees the dense pass's input and ranks the same scores.
    kept = np.asarray(kept_blocks(model, token_ids, plan_with(None)).kept)
    scores = dense_layer_scan(model, token_ids, block_size=BLOCK).scores  # [L, B, M]
    expected = np.zeros((2, NUM_BLOCKS), bool)
    np.put_along_axis(expected, np.asarray(top_blocks(scores[1], KEPT, keep_first=1)), True, -1)
    np.testing.assert_array_equal(kept[1], expected)


def test_length_must_be_whole_blocks(model):
    with pytest.raises(ValueError, match="multiple of"):
        kept_blocks(model, jnp.zeros((1, T + 1), jnp.int32), plan_with(None))
