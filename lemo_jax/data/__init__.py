"""Data for training and evaluation: documents in, int32 token windows out.

For training, one call does it all (tokenising once per data source and tokenizer, through an
on-disk cache), and a seeded sampler picks the windows of each batch:

train, validation = prepare_data(config.data, tokenizer, seq_len)
batch = train.batch(ShuffledSampler(len(train), seed).indices(position, batch_size))  # [B, T]

The steps, for evaluation scripts and tests:

documents = load_documents(spec, split)            # built-in corpus or the user's files
tokens = tokenize_documents(documents, tokenizer)  # [num_tokens], documents joined by EOS
windows = make_windows(tokens, seq_len)            # [num_windows, seq_len]
"""

from lemo_jax.data.cache import cached_token_stream
from lemo_jax.data.corpus import Document, builtin_documents, corpus_fingerprint
from lemo_jax.data.pipeline import ShuffledSampler, TokenWindows, prepare_data
from lemo_jax.data.sources import load_documents, resolve_paths
from lemo_jax.data.windows import make_windows, tokenize_documents

__all__ = [
    "Document",
    "ShuffledSampler",
    "TokenWindows",
    "builtin_documents",
    "cached_token_stream",
    "corpus_fingerprint",
    "load_documents",
    "make_windows",
    "prepare_data",
    "resolve_paths",
    "tokenize_documents",
]
