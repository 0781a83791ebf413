"""Dense perplexity over non-overlapping windows.

Each window of T tokens is one sequence; the model predicts tokens 1..T-1 of it from the tokens
before them inside the window (the first token of a window has no prediction). Perplexity is
exp(total NLL / predicted tokens) over all windows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from lemo_jax.errors import UserError
from lemo_jax.model.llama import Llama
from lemo_jax.model.loss import chunked_cross_entropy, next_token_targets


def long_document_windows(
    documents: Sequence[np.ndarray], seq_len: int, num_windows: int
) -> np.ndarray:
    """int32 [W, seq_len]: non-overlapping windows that each lie inside one document, taken from
    the longest documents first, at most `num_windows` of them.

    Long-context perplexity needs text whose far context is relevant; windows of a packed stream
    would also span document boundaries, where the earlier document is no help. Cutting these
    windows into `seq_len / n` pieces gives the shorter lengths the same tokens to predict.
    """
    windows: list[np.ndarray] = []
    for tokens in sorted(documents, key=len, reverse=True):
        for start in range(0, len(tokens) - seq_len + 1, seq_len):
            if len(windows) == num_windows:
                break
            windows.append(np.asarray(tokens[start : start + seq_len], np.int32))
    if not windows:
        longest = max((len(tokens) for tokens in documents), default=0)
        raise UserError(
            f"no document has {seq_len} tokens (the longest has {longest}); "
            "give longer documents or a shorter length"
        )
    return np.stack(windows)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    predicted_tokens: int
    num_windows: int
    seq_len: int


@nnx.jit(static_argnames=("chunk_size",))
def _window_nll(model: Llama, input_ids: jax.Array, chunk_size: int):
    hidden = model.hidden_states(input_ids)
    targets, weights = next_token_targets(input_ids)
    return chunked_cross_entropy(model.logits, hidden, targets, weights, chunk_size=chunk_size)


def evaluate_perplexity(
    model: Llama,
    windows: np.ndarray,
    *,
    batch_size: int = 1,
    chunk_size: int = 2048,
    show_progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` over int32 `windows` [W, T], `batch_size` windows at a time."""
    num_windows, seq_len = windows.shape
    # Drop a partial last batch rather than compiling a second shape.
    usable = num_windows - num_windows % batch_size if num_windows >= batch_size else num_windows
    batch_size = min(batch_size, usable)
    total_nll, total_tokens = 0.0, 0.0
    batches = range(0, usable, batch_size)
    for start in tqdm(
        batches, desc=f"perplexity @ {seq_len}", unit="batch", disable=not show_progress
    ):
        batch = jnp.asarray(windows[start : start + batch_size], jnp.int32)
        nll, count = _window_nll(model, batch, chunk_size)
        total_nll += float(nll)
        total_tokens += float(count)
    mean_nll = total_nll / total_tokens
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        predicted_tokens=int(total_tokens),
        num_windows=usable,
        seq_len=seq_len,
    )
