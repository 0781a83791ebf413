"""The on-disk token cache: each data source is tokenised once and memory-mapped afterwards.

A cache entry is `<cache_dir>/<key>.npy`, an int32 [num_tokens] stream as `tokenize_documents`
makes it (documents joined by EOS), and `<key>.json` beside it, which says in words what the key
was made from (only for people: loading never reads it). The key is a SHA-256 of:

- the tokenizer: class name, vocabulary size, EOS id and a hash of its full serialisation
  (`backend_tokenizer.to_str()` for fast tokenizers, else the sorted vocabulary);
- the data: the built-in corpus's `corpus_fingerprint()` and split, or each file's resolved path,
  size and modification time (every file of a saved dataset directory, and the split it reads);
- `CACHE_FORMAT_VERSION`, raised whenever the stream's layout or the tokenisation changes.

Entries are written to a temporary file in the cache directory and renamed into place, so a
crash (or two processes filling the same entry) never leaves a partial file under a key's name.
Nothing is ever evicted: delete the directory to reclaim space.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lemo_jax.data.corpus import corpus_fingerprint
from lemo_jax.data.sources import hf_dataset_split, load_documents, resolve_paths
from lemo_jax.data.windows import Tokenizer, tokenize_documents
from lemo_jax.errors import UserError
from lemo_jax.files import write_atomically

CACHE_FORMAT_VERSION = 1


def cached_token_stream(
    spec: str | Sequence[str] | None,
    split: str,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike,
    *,
    show_progress: bool = False,
) -> np.ndarray:
    """Returns the int32 [num_tokens] stream of `load_documents(spec, split)`, memory-mapped.

    Tokenises only when the cache has no entry for these inputs. The result is read-only.
    """
    identity = cache_identity(spec, split, tokenizer)
    key = cache_key(identity)
    directory = Path(cache_dir).expanduser()
    path = directory / f"{key}.npy"
    cached = _load(path)
    if cached is not None:
        return cached
    documents = load_documents(spec, split)
    if not documents:
        raise UserError(f"{_describe(spec, split)} holds no text: every document in it is empty")
    tokens = tokenize_documents(documents, tokenizer, show_progress=show_progress)
    directory.mkdir(parents=True, exist_ok=True)
    # The stream first: it alone decides a cache hit, and the note must never outlive it.
    write_atomically(path, lambda handle: np.save(handle, tokens, allow_pickle=False))
    note = json.dumps(identity, indent=1, sort_keys=True).encode("utf-8")
    write_atomically(directory / f"{key}.json", lambda handle: handle.write(note))
    loaded = _load(path)
    if loaded is None:
        raise OSError(f"the token cache entry {path} could not be read back after writing it")
    return loaded


def cache_identity(
    spec: str | Sequence[str] | None, split: str, tokenizer: Tokenizer
) -> dict[str, Any]:
    """Everything the cached stream depends on, as a JSON-serialisable dict."""
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "tokenizer": tokenizer_identity(tokenizer),
        "data": data_identity(spec, split),
    }


def cache_key(identity: dict[str, Any]) -> str:
    """A 32-digit hex digest of `identity` (128 bits: collisions are not a practical concern)."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
    """Class name, vocabulary size, EOS id and a hash of the tokenizer's serialisation."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialised = backend.to_str()
    elif hasattr(tokenizer, "get_vocab"):
        serialised = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    else:
        # Without either the key could not tell two tokenizers apart, and a stale stream would
        # silently be reused: a bug in the caller, not a user mistake.
        raise TypeError(
            f"cannot identify a {type(tokenizer).__name__} for the token cache: it has neither "
            "backend_tokenizer (fast tokenizers) nor get_vocab()"
        )
    vocab_size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": int(vocab_size),
        "eos_token_id": tokenizer.eos_token_id,
        "serialisation_sha256": hashlib.sha256(serialised.encode("utf-8")).hexdigest(),
    }


def data_identity(spec: str | Sequence[str] | None, split: str) -> dict[str, Any]:
    """The built-in corpus's fingerprint and split, or each file's path, size and mtime."""
    paths = resolve_paths(spec)
    if paths is None:
        return {"builtin": corpus_fingerprint(), "split": split}
    return {"files": [_path_identity(path, split) for path in paths]}


def _path_identity(path: Path, split: str) -> dict[str, Any]:
    if not path.is_dir():
        return {"path": str(path.resolve()), **_stat_identity(path)}
    # A saved dataset directory: all its files, since `save_to_disk` may rewrite any shard.
    files = sorted(file for file in path.rglob("*") if file.is_file())
    return {
        "path": str(path.resolve()),
        "split": hf_dataset_split(path, split),
        "files": [
            {"name": file.relative_to(path).as_posix(), **_stat_identity(file)} for file in files
        ],
    }


def _stat_identity(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _describe(spec: str | Sequence[str] | None, split: str) -> str:
    if resolve_paths(spec) is None:
        return f"the built-in {split} split"
    return repr(spec if isinstance(spec, str) else ",".join(spec))


def _load(path: Path) -> np.ndarray | None:
    """The memory-mapped stream at `path`, or None when there is none (or not a valid one)."""
    if not path.is_file():
        return None
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None  # not a stream this code wrote: overwritten by the caller
    if tokens.dtype != np.int32 or tokens.ndim != 1:
        return None
    return tokens
