"""The built-in corpus: long documents made from the Python standard library's own sources.

Every machine that runs lemo-jax has these files, so evaluation and smoke-test training need no
download. A document is one top-level package (all its `.py` files concatenated, each preceded
by a `# file: <relative path>` header) or one top-level module file, which gives coherent
documents of tens to hundreds of thousands of characters (`asyncio`, `email`, `http`, ...).

The standard library differs between Python versions, so `corpus_fingerprint()` names the exact
set of files used; results should record it next to their numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sysconfig
from pathlib import Path

from lemo_jax.errors import UserError

SPLITS = ("train", "validation")

# Directories that are not ordinary library code: third-party packages, the test suites (large,
# repetitive and partly in non-UTF-8 encodings), the IDLE editor and the deprecated lib2to3.
EXCLUDED_NAMES = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})

# `_sysconfigdata_*.py` is a dict of build flags and paths generated when Python was compiled; it
# is not code anyone wrote and would make the fingerprint differ between builds of one version.
EXCLUDED_MODULE_PREFIX = "_sysconfigdata_"

VALIDATION_FRACTION = 0.1

# The hash alone picks ~10% of the ~200 documents but may pick only short modules, while
# long-context evaluation needs long documents. These packages exist in every Python 3 release
# and are each 50k-500k characters, so they always go to validation (not only when the hash
# leaves validation short): a fixed rule keeps the split simple and comparable across versions.
FORCED_VALIDATION_NAMES = ("asyncio", "email", "http", "json")


@dataclasses.dataclass(frozen=True)
class Document:
    """One text document; `name` says where it came from (a package, module, file or line)."""

    name: str
    text: str


@dataclasses.dataclass(frozen=True)
class _Corpus:
    train: tuple[Document, ...]
    validation: tuple[Document, ...]
    fingerprint: str


def builtin_documents(split: str) -> list[Document]:
    """Returns the built-in documents of `split` ("train" or "validation"), sorted by name."""
    corpus = _scan_stdlib()
    if split == "train":
        return list(corpus.train)
    if split == "validation":
        return list(corpus.validation)
    raise UserError(f"unknown data split {split!r}; expected one of {', '.join(SPLITS)}")


def corpus_fingerprint() -> str:
    """Returns a 16-digit hex digest of the names and byte sizes of the files in the corpus."""
    return _scan_stdlib().fingerprint


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_excluded(relative_path: Path) -> bool:
    return any(part in EXCLUDED_NAMES for part in relative_path.parts)


def _read_utf8(path: Path) -> bytes | None:
    """Returns the file's bytes, or None when they are not valid UTF-8 (such files are skipped)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def _package_document(root: Path, package_dir: Path, file_sizes: dict[str, int]) -> Document | None:
    """Concatenates a package's files in sorted relative-path order, each under a header line."""
    relative_paths = sorted(
        path.relative_to(root).as_posix()
        for path in package_dir.rglob("*.py")
        if path.is_file() and not _is_excluded(path.relative_to(root))
    )
    parts = []
    for relative_path in relative_paths:
        data = _read_utf8(root / relative_path)
        if data is None:
            continue
        text = data.decode("utf-8")
        if text and not text.endswith("\n"):
            text += "\n"
        parts.append(f"# file: {relative_path}\n{text}")
        file_sizes[relative_path] = len(data)
    if not parts:
        return None
    return Document(name=package_dir.name, text="".join(parts))


def _module_document(root: Path, module_path: Path, file_sizes: dict[str, int]) -> Document | None:
    data = _read_utf8(module_path)
    if not data:
        return None
    relative_path = module_path.relative_to(root).as_posix()
    file_sizes[relative_path] = len(data)
    return Document(name=relative_path, text=data.decode("utf-8"))


def _collect_documents(root: Path, file_sizes: dict[str, int]) -> list[Document]:
    """Reads every top-level package (a directory with `__init__.py`) and module of `root`."""
    documents = []
    for entry in sorted(root.iterdir()):
        if entry.name in EXCLUDED_NAMES:
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file():
            document = _package_document(root, entry, file_sizes)
        elif entry.is_file() and entry.suffix == ".py":
            if entry.name.startswith(EXCLUDED_MODULE_PREFIX):
                continue
            document = _module_document(root, entry, file_sizes)
        else:
            continue
        if document is not None:
            documents.append(document)
    return sorted(documents, key=lambda document: document.name)


def _hash_position(name: str) -> float:
    """Maps a name to [0, 1) stably across processes and machines (unlike the salted `hash`)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split_documents(
    documents: list[Document],
) -> tuple[tuple[Document, ...], tuple[Document, ...]]:
    """Splits by name hash plus the forced list; keeps both splits non-empty and disjoint."""
    if len(documents) < 2:
        raise RuntimeError(f"the standard library at {_stdlib_root()} gave too few documents")
    is_validation = {
        document.name: document.name in FORCED_VALIDATION_NAMES
        or _hash_position(document.name) < VALIDATION_FRACTION
        for document in documents
    }
    # Fallbacks for an unusual standard library (none of the forced packages, or every document
    # picked): move the document whose hash is lowest to validation, or highest to train.
    by_position = sorted(documents, key=lambda document: _hash_position(document.name))
    if not any(is_validation.values()):
        is_validation[by_position[0].name] = True
    if all(is_validation.values()):
        is_validation[by_position[-1].name] = False
    train = tuple(document for document in documents if not is_validation[document.name])
    validation = tuple(document for document in documents if is_validation[document.name])
    return train, validation


@functools.cache
def _scan_stdlib() -> _Corpus:
    """Reads about a thousand files once per process."""
    file_sizes: dict[str, int] = {}
    documents = _collect_documents(_stdlib_root(), file_sizes)
    train, validation = _split_documents(documents)
    listing = "".join(f"{name}\t{size}\n" for name, size in sorted(file_sizes.items()))
    fingerprint = hashlib.sha256(listing.encode("utf-8")).hexdigest()[:16]
    return _Corpus(train=train, validation=validation, fingerprint=fingerprint)
