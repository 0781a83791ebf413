"""RoPE frequencies equal transformers' for every scaling type, at real model settings."""

import numpy as np
import pytest
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from lemo_jax.configs import RopeConfig
from lemo_jax.io.hf_config import _rope_from_hf
from lemo_jax.model.rope import inverse_frequencies

CASES = {
    "llama2-default": {"rope_type": "default", "rope_theta": 10_000.0},
    "llama2-linear16": {"rope_type": "linear", "factor": 16.0, "rope_theta": 10_000.0},
    "llama3.1": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500_000.0,
    },
    "yarn4": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 4096,
        "rope_theta": 10_000.0,
    },
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 16.0,
        "original_max_position_embeddings": 4096,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "beta_fast": 16.0,
        "rope_theta": 50_000.0,
    },
}


def transformers_frequencies(parameters: dict) -> tuple[np.ndarray, float, LlamaConfig]:
    config = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131_072,
        rope_parameters=dict(parameters),
    )
    if parameters["rope_type"] == "default":
        compute = LlamaRotaryEmbedding.compute_default_rope_parameters
    else:
        compute = ROPE_INIT_FUNCTIONS[parameters["rope_type"]]
    inv_freq, scaling = compute(config)
    return inv_freq.numpy(), float(scaling), config


@pytest.mark.parametrize("case", list(CASES))
def test_frequencies_match_transformers(case):
    expected, expected_scaling, hf_config = transformers_frequencies(CASES[case])
    rope = _rope_from_hf(hf_config)
    assert rope.scaling == CASES[case]["rope_type"]
    inv_freq, scaling = inverse_frequencies(rope, head_dim=128)
    assert inv_freq.dtype == np.float32
    # Angles at 128K positions: a 1-ulp frequency error would already be ~1e-2 rad there.
    np.testing.assert_allclose(inv_freq, expected, rtol=2e-7, atol=0)
    assert scaling == pytest.approx(expected_scaling, rel=1e-12)


def test_llama3_keeps_high_and_scales_low_frequencies():
    rope = RopeConfig(
        theta=500_000.0, scaling="llama3", factor=8.0, original_max_position_embeddings=8192
    )
    scaled, _ = inverse_frequencies(rope, 128)
    plain, _ = inverse_frequencies(RopeConfig(theta=500_000.0), 128)
    assert scaled[0] == plain[0]  # shortest wavelength untouched
    assert scaled[-1] == pytest.approx(plain[-1] / 8.0, rel=1e-6)  # longest divided by factor
