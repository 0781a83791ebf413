"""Where documents come from: the built-in corpus or the user's own files.

The user's files are .txt, .jsonl or .parquet files, or directories written by Hugging Face
`datasets`' `save_to_disk` (read with the optional `datasets` package). `load_documents` is the
one entry point; `resolve_paths` gives the paths a spec names without reading them (the token
cache keys on them). Every mistake in a data spec (a missing path, a glob that matches nothing, a
bad line) is a `UserError` whose one-line message names the file.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from pathlib import Path

from lemo_jax.data.corpus import Document, builtin_documents
from lemo_jax.errors import UserError

BUILTIN_SPECS = frozenset({"default", "builtin"})
SUPPORTED_SUFFIXES = (".jsonl", ".parquet", ".txt")
GLOB_CHARACTERS = frozenset("*?[")

# Files that `save_to_disk` writes: a `DatasetDict` lists its splits in `dataset_dict.json`; a
# `Dataset` directory has `state.json` (its arrow files) and `dataset_info.json` (its features).
HF_DATASET_DICT_MARKER = "dataset_dict.json"
HF_DATASET_MARKERS = ("state.json", "dataset_info.json")


def load_documents(spec: str | Sequence[str] | None, split: str = "validation") -> list[Document]:
    """Loads documents named by `spec`; empty documents are dropped.

    `None`, "default" or "builtin" (any case) mean the built-in corpus's `split`. Anything else
    is paths or glob patterns (a list, or one string separated by commas); `split` then matters
    only for a saved Hugging Face `DatasetDict` (see `hf_dataset_split`), because the user chose
    the files. Files are read in sorted path order, each in file order.
    """
    paths = resolve_paths(spec)
    if paths is None:
        return builtin_documents(split)
    documents = []
    for path in paths:
        documents.extend(document for document in _read_file(path, split) if document.text)
    return documents


def resolve_paths(spec: str | Sequence[str] | None) -> list[Path] | None:
    """Returns the sorted files and saved-dataset directories `spec` names, None for built-in.

    Expands `~` and globs and checks that every path exists and has a supported type; reads no
    data. A glob matches files only: a saved dataset directory must be named on its own.
    """
    entries = _spec_entries(spec)
    if entries is None:
        return None
    return _expand_paths(entries)


def is_hf_dataset_dir(path: Path) -> bool:
    """Whether `path` is a directory written by `datasets`' `save_to_disk`."""
    markers = (HF_DATASET_DICT_MARKER, *HF_DATASET_MARKERS)
    return path.is_dir() and any((path / marker).is_file() for marker in markers)


def hf_dataset_split(path: Path, split: str) -> str | None:
    """The split of a saved `DatasetDict` that `split` reads; None for a single `Dataset`.

    The split named `split` when the dict has it, else its only split; with several splits and
    none named `split` the choice is the user's, so it is an error that lists them.
    """
    dict_path = path / HF_DATASET_DICT_MARKER
    if not dict_path.is_file():
        return None
    try:
        splits = json.loads(dict_path.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{dict_path} could not be read ({error!r})") from None
    if split in splits:
        return split
    if len(splits) == 1:
        return splits[0]
    raise UserError(
        f"{path} has splits {', '.join(map(str, splits))} but none named {split!r}; "
        "save the split you want on its own or rename it"
    )


def _spec_entries(spec: str | Sequence[str] | None) -> list[str] | None:
    """Returns the path entries of `spec`, or None when it names the built-in corpus."""
    if spec is None:
        return None
    raw_entries = [spec] if isinstance(spec, str) else list(spec)
    entries = [part.strip() for entry in raw_entries for part in entry.split(",") if part.strip()]
    if not entries:
        raise UserError(f"no data paths given in {spec!r}")
    builtin_entries = [entry for entry in entries if entry.lower() in BUILTIN_SPECS]
    if builtin_entries and len(entries) == 1:
        return None
    if builtin_entries:
        raise UserError(f"data {builtin_entries[0]!r} cannot be combined with file paths: {spec!r}")
    return entries


def _expand_paths(entries: list[str]) -> list[Path]:
    """Expands `~` and globs; checks every path and suffix before any file is read."""
    paths: set[Path] = set()
    for entry in entries:
        pattern = os.path.expanduser(entry)
        if GLOB_CHARACTERS & set(pattern):
            # Directories a pattern such as `data/*` happens to match are skipped, not errors.
            matches = [Path(match) for match in glob.glob(pattern, recursive=True)]
            files = [match for match in matches if match.is_file()]
            if not files:
                raise UserError(f"data path not found: {entry} (the pattern matches no files)")
            paths.update(files)
            continue
        path = Path(pattern)
        if not path.exists():
            raise UserError(f"data path not found: {entry}")
        if path.is_dir() and not is_hf_dataset_dir(path):
            raise UserError(
                f"data path is a directory: {entry} (give files, a glob like dir/*.txt, "
                "or a directory written by datasets' save_to_disk)"
            )
        paths.add(path)
    for path in paths:
        if path.is_file() and path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise UserError(
                f"unsupported data file type: {path} (supported: {', '.join(SUPPORTED_SUFFIXES)})"
            )
    return sorted(paths)


def _read_file(path: Path, split: str) -> list[Document]:
    if path.is_dir():
        return _read_hf_dataset(path, split)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [Document(name=str(path), text=_read_text(path))]
    if suffix == ".jsonl":
        return _read_jsonl(path)
    return _read_parquet(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not valid UTF-8 text (byte {error.start})") from None


def _read_jsonl(path: Path) -> list[Document]:
    """One document per line from its "text" field; blank lines are skipped."""
    documents = []
    # Split on "\n" only: `splitlines` would also split at U+2028 and similar characters, which
    # JSON allows unescaped inside strings.
    for line_number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{line_number}: invalid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{line_number}: expected a JSON object with a string 'text'")
        documents.append(Document(name=f"{path}:{line_number}", text=record["text"]))
    return documents


def _read_parquet(path: Path) -> list[Document]:
    """One document per row of the "text" column; null rows count as empty and are dropped."""
    import pyarrow as pa  # here: only parquet files need it, and it takes a while to import
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if "text" not in schema.names:
            raise UserError(f"{path} has no 'text' column (columns: {', '.join(schema.names)})")
        column_type = schema.field("text").type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise UserError(f"{path}: the 'text' column holds {column_type}, not strings")
        texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path} could not be read as parquet ({error})") from None
    return [Document(name=f"{path}[{row}]", text=text or "") for row, text in enumerate(texts)]


def _read_hf_dataset(path: Path, split: str) -> list[Document]:
    """One document per row of the "text" column of a saved `Dataset` or `DatasetDict` split."""
    split_name = hf_dataset_split(path, split)
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"{path} is a saved Hugging Face dataset; pip install datasets to read it"
        ) from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as error:
        raise UserError(f"{path} could not be read as a saved dataset ({error})") from None
    if split_name is not None:
        dataset = dataset[split_name]
    label = str(path) if split_name is None else f"{path}[{split_name}]"
    if "text" not in dataset.column_names:
        raise UserError(
            f"{label} has no 'text' column (columns: {', '.join(dataset.column_names)})"
        )
    feature = dataset.features["text"]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserError(f"{label}: the 'text' column holds {feature}, not strings")
    return [
        Document(name=f"{label}[{row}]", text=text or "")
        for row, text in enumerate(dataset["text"])
    ]
