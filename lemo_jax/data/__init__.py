"""Data for training and evaluation: documents in, int32 token windows out.

documents = load_documents(spec, split)            # built-in corpus or the user's files
tokens = tokenize_documents(documents, tokenizer)  # [num_tokens], documents joined by EOS
windows = make_windows(tokens, seq_len)            # [num_windows, seq_len]
"""

from lemo_jax.data.corpus import Document, builtin_documents, corpus_fingerprint
from lemo_jax.data.sources import load_documents
from lemo_jax.data.windows import make_windows, tokenize_documents

__all__ = [
    "Document",
    "builtin_documents",
    "corpus_fingerprint",
    "load_documents",
    "make_windows",
    "tokenize_documents",
]
