"""Training and validation data as the paper prepares it: documents joined with EOS, cut into
non-overlapping `seq_len`-token windows, and sampled in a seeded shuffle epoch after epoch.

train, validation = prepare_data(config.data, tokenizer, config.train.seq_len)
sampler = ShuffledSampler(len(train), seed=config.train.seed)
batch = train.batch(sampler.indices(position, batch_size))   # int32 [B, T]
position += batch_size

`position` (one integer) is all the data state a run saves to resume exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lemo_jax.data.cache import cached_token_stream
from lemo_jax.data.sources import hf_dataset_split, resolve_paths
from lemo_jax.data.windows import Tokenizer
from lemo_jax.errors import UserError

if TYPE_CHECKING:  # only the type: the data package does not depend on the config tree
    from lemo_jax.configs.run import DataSection

HOLDOUT = "holdout"


class TokenWindows:
    """Non-overlapping windows of exactly `seq_len` tokens over a 1-D stream; the tail is dropped.

    Window `i` is `tokens[i * seq_len : (i + 1) * seq_len]`; `tokens` keeps the windowed part of
    the stream (a view). The stream may be a read-only memmap: only the windows a batch asks for
    are read from disk.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if tokens.ndim != 1:
            raise ValueError(f"expected a 1-D token stream, got {tokens.shape=}")
        if seq_len < 1:
            raise ValueError(f"expected a positive sequence length, got {seq_len=}")
        self.seq_len = seq_len
        self.num_windows = tokens.size // seq_len
        self.tokens = tokens[: self.num_windows * seq_len]  # [num_windows * seq_len], a view
        # [num_windows * seq_len] -> [num_windows, seq_len]: a view, nothing is read yet.
        self._windows = self.tokens.reshape(self.num_windows, seq_len)

    def __len__(self) -> int:
        return self.num_windows

    def batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Returns an int32 [len(indices), seq_len] copy of the windows at `indices`."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1:
            raise ValueError(f"expected 1-D window indices, got {indices.shape=}")
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_windows):
            raise IndexError(
                f"window indices must be in [0, {self.num_windows}), got {indices.min()} to "
                f"{indices.max()}"
            )
        return np.array(self._windows[indices], dtype=np.int32)


class ShuffledSampler:
    """Window indices for an infinite stream of epochs, each a seeded permutation of all windows.

    Position `p` of the stream is window `permutation(epoch)[p % num_windows]` with
    `epoch = p // num_windows` and the permutation drawn from `np.random.default_rng([seed,
    epoch])`, so any position's indices follow from `(seed, p)` alone: resuming needs only `p`.
    """

    def __init__(self, num_windows: int, seed: int):
        if num_windows < 1:
            raise ValueError(f"a sampler needs at least one window, got {num_windows=}")
        if seed < 0:
            raise ValueError(f"the seed must be non-negative (numpy SeedSequence), got {seed=}")
        self.num_windows = num_windows
        self.seed = seed
        self._epoch: int | None = None
        self._permutation = np.zeros(0, dtype=np.int64)

    def epoch(self, position: int) -> int:
        """The epoch (0-based) that stream position `position` falls in."""
        return position // self.num_windows

    def permutation(self, epoch: int) -> np.ndarray:
        """The int64 [num_windows] order of the windows in `epoch`; the latest one is kept."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._permutation = rng.permutation(self.num_windows)
            self._epoch = epoch
        return self._permutation

    def indices(self, position: int, count: int) -> np.ndarray:
        """The int64 [count] window indices at stream positions `position .. position+count-1`."""
        if position < 0 or count < 0:
            raise ValueError(f"expected position >= 0 and count >= 0, got {position=}, {count=}")
        pieces = []
        end = position + count
        while position < end:
            epoch, offset = divmod(position, self.num_windows)
            take = min(end - position, self.num_windows - offset)
            pieces.append(self.permutation(epoch)[offset : offset + take])
            position += take
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def prepare_data(
    section: DataSection,
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    show_progress: bool = False,
) -> tuple[TokenWindows, TokenWindows]:
    """Returns (train, validation) windows of `seq_len` tokens, tokenised through the cache.

    `section.train` is "builtin" (the built-in corpus's train split) or files; a saved
    `DatasetDict` gives its "train" split. `section.validation` is "builtin" (the built-in
    validation split), files (a `DatasetDict` gives its "validation" split), "holdout": the
    last `holdout_fraction` of the training windows (at least one), removed from training as one
    contiguous tail so no window shares a token with the other split, or "auto" (builtin with
    the built-in corpus, holdout otherwise). Validation files that are
    also training files are allowed (e.g. to check that a run can overfit) but warned about.
    """
    with _labelled("data.train"):
        train_tokens = cached_token_stream(
            section.train, "train", tokenizer, section.cache_dir, show_progress=show_progress
        )
    train = _windows_or_error(train_tokens, seq_len, "data.train")
    validation_spec = section.resolved_validation
    if validation_spec.strip().lower() == HOLDOUT:
        return _split_holdout(train, section.holdout_fraction)
    _warn_on_shared_files(section.train, validation_spec)
    with _labelled("data.validation"):
        validation_tokens = cached_token_stream(
            validation_spec,
            "validation",
            tokenizer,
            section.cache_dir,
            show_progress=show_progress,
        )
    return train, _windows_or_error(validation_tokens, seq_len, "data.validation")


@contextlib.contextmanager
def _labelled(field: str) -> Iterator[None]:
    """Prefixes a `UserError` with the config field whose data caused it."""
    try:
        yield
    except UserError as error:
        raise UserError(f"{field}: {error}") from None


def _windows_or_error(tokens: np.ndarray, seq_len: int, field: str) -> TokenWindows:
    if tokens.size < seq_len:
        raise UserError(
            f"{field} has {tokens.size} tokens; one sequence of train.seq_len={seq_len} needs "
            f"{seq_len}: give more or longer documents or a shorter train.seq_len"
        )
    return TokenWindows(tokens, seq_len)


def _split_holdout(train: TokenWindows, fraction: float) -> tuple[TokenWindows, TokenWindows]:
    """Moves the last `round(fraction * len(train))` windows (at least one) to validation."""
    if len(train) < 2:
        raise UserError(
            f"data.train has {train.tokens.size} tokens in windows, only {len(train)} sequence of "
            f"train.seq_len={train.seq_len}; data.validation=holdout needs two (one to train, one "
            "to validate): give more data or name validation data"
        )
    # round, not floor: 0.29 * 100 is 28.999... in floating point.
    num_holdout = min(len(train) - 1, max(1, round(fraction * len(train))))
    num_train = len(train) - num_holdout
    boundary = num_train * train.seq_len
    return (
        TokenWindows(train.tokens[:boundary], train.seq_len),
        TokenWindows(train.tokens[boundary:], train.seq_len),
    )


def _warn_on_shared_files(train_spec: str, validation_spec: str) -> None:
    """Warns when a validation file is also read for training (the same split, for datasets)."""
    with contextlib.suppress(UserError):  # bad specs are reported when they are loaded
        shared = _read_sources(train_spec, "train") & _read_sources(validation_spec, "validation")
        if shared:
            names = ", ".join(sorted(path for path, _ in shared))
            warnings.warn(
                f"data.validation reads data that data.train also trains on ({names}), so "
                "validation loss will be optimistic; use data.validation=holdout for a disjoint "
                "split",
                UserWarning,
                stacklevel=3,
            )


def _read_sources(spec: str, split: str) -> set[tuple[str, str | None]]:
    """The (resolved path, dataset split) pairs that `spec` reads; empty for built-in data."""
    paths = resolve_paths(spec) or []
    return {
        (str(Path(path).resolve()), hf_dataset_split(path, split) if path.is_dir() else None)
        for path in paths
    }
