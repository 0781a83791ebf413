"""Tokenisation of documents into one token stream, and its cut into fixed-length windows.

Documents are joined with the EOS token (also after the last one), so a window may span a
document boundary, as in ordinary packed pre-training data; EOS marks where one document ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from lemo_jax.data.corpus import Document
from lemo_jax.errors import UserError


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer used here."""

    eos_token_id: int | None

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


def tokenize_documents(
    documents: Iterable[Document],
    tokenizer: Tokenizer,
    *,
    max_tokens: int | None = None,
    show_progress: bool = False,
) -> np.ndarray:
    """Returns an int32 [num_tokens] stream: each document's tokens followed by EOS.

    Stops reading documents once `max_tokens` tokens are collected and truncates to exactly
    `max_tokens`. The tokenizer is called as `tokenizer(text, add_special_tokens=False,
    verbose=False)`: `verbose=False` silences Hugging Face's warning that a text is longer than
    the model's maximum length, which is expected here because the stream is windowed later.
    Passing the flag (rather than splitting texts into chunks) keeps the tokenisation exact: code
    tokenizers merge a newline with the indentation after it, which a chunk cut would break.
    """
    eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        raise UserError(
            "the tokenizer has no EOS token (eos_token_id is None); it is needed to separate "
            "documents in the token stream"
        )
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
    pieces: list[np.ndarray] = []
    num_tokens = 0
    with tqdm(documents, desc="tokenizing", unit="doc", disable=not show_progress) as progress:
        for document in progress:
            token_ids = tokenizer(document.text, add_special_tokens=False, verbose=False)
            piece = np.asarray(token_ids["input_ids"], dtype=np.int32)
            pieces.extend([piece, np.array([eos_token_id], dtype=np.int32)])
            num_tokens += piece.size + 1
            if max_tokens is not None and num_tokens >= max_tokens:
                break
    if not pieces:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate(pieces)[:max_tokens]


def make_windows(tokens: np.ndarray, seq_len: int, *, max_windows: int | None = None) -> np.ndarray:
    """Cuts a [num_tokens] stream into int32 [num_windows, seq_len] non-overlapping windows.

    The tail shorter than `seq_len` is dropped; at most `max_windows` windows are returned.
    """
    if seq_len < 1:
        raise UserError(f"the sequence length must be positive, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"max_windows must be positive, got {max_windows}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"expected a 1-D token stream, got {tokens.shape=}")
    num_windows = tokens.size // seq_len
    if num_windows == 0:
        raise UserError(
            f"only {tokens.size} tokens are available but one window needs {seq_len}; "
            "give more or longer documents or a shorter sequence length"
        )
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    # [num_windows * seq_len] -> [num_windows, seq_len]; a copy, so windows never alias `tokens`.
    windows = np.array(tokens[: num_windows * seq_len], dtype=np.int32)
    return windows.reshape(num_windows, seq_len)
