"""The real SmolLM2-135M (packaged GGUF) matches transformers' dequantised model."""

import inspect
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tolerances import GGUF_LOSS_PARITY, GGUF_PARITY, relative_error
from transformers import AutoModelForCausalLM

from lemo_jax import load_pretrained, load_tokenizer
from lemo_jax.io import resolve_source


@pytest.fixture(scope="module")
def token_ids() -> np.ndarray:
    tokenizer = load_tokenizer("smollm2-135m")
    text = inspect.getsource(json.decoder)  # real text that is on every machine
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:256]
    assert len(ids) == 256
    return np.asarray([ids])


def test_gguf_logits_and_loss_match_transformers(token_ids):
    model = load_pretrained("smollm2-135m", compute_dtype="float32")
    assert (model.config.num_layers, model.config.num_kv_heads) == (30, 3)
    assert model.config.tie_embeddings

    source = resolve_source("smollm2-135m")
    reference = AutoModelForCausalLM.from_pretrained(
        source.directory, gguf_file=source.gguf_file, dtype=torch.float32
    ).eval()
    ids = torch.as_tensor(token_ids)
    with torch.no_grad():
        expected = reference(ids, labels=ids)

    logits = np.asarray(model(jnp.asarray(token_ids, jnp.int32)))
    assert relative_error(logits, expected.logits.numpy()) <= GGUF_PARITY
    log_probs = logits[0, :-1] - np.log(np.exp(logits[0, :-1].astype(np.float64)).sum(-1))[:, None]
    loss = -np.mean(np.take_along_axis(log_probs, token_ids[0, 1:, None], axis=-1))
    assert abs(loss - float(expected.loss)) <= GGUF_LOSS_PARITY
    # A real model on real code: far better than uniform over 49,152 tokens (ln V = 10.8).
    assert loss < 4.0
