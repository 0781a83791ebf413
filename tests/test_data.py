"""Tests for lemo_jax.data: the built-in corpus, local files, tokenisation and windows."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lemo_jax.data import (
    Document,
    builtin_documents,
    corpus,
    corpus_fingerprint,
    load_documents,
    make_windows,
    tokenize_documents,
)
from lemo_jax.errors import UserError

EOS = 99


class FakeTokenizer:
    """One token per character, its code point; records the keyword arguments it was given."""

    def __init__(self, eos_token_id: int | None = EOS):
        self.eos_token_id = eos_token_id
        self.calls: list[dict] = []

    def __call__(self, text: str, **kwargs) -> dict[str, list[int]]:
        self.calls.append(kwargs)
        return {"input_ids": [ord(character) for character in text]}


# Built-in corpus.


def test_builtin_split_is_deterministic_disjoint_and_sorted():
    train = builtin_documents("train")
    validation = builtin_documents("validation")
    assert train == builtin_documents("train")
    assert validation == builtin_documents("validation")
    assert train and validation
    train_names = [document.name for document in train]
    validation_names = [document.name for document in validation]
    assert not set(train_names) & set(validation_names)
    assert train_names == sorted(train_names)
    assert validation_names == sorted(validation_names)
    assert all(document.text for document in train + validation)


def test_builtin_validation_has_long_documents_and_forced_packages():
    validation = builtin_documents("validation")
    names = {document.name for document in validation}
    assert set(corpus.FORCED_VALIDATION_NAMES) <= names
    assert max(len(document.text) for document in validation) > 100_000
    # Roughly 10% of the documents by the hash, plus the forced ones.
    num_documents = len(validation) + len(builtin_documents("train"))
    assert len(validation) < 0.25 * num_documents


def test_builtin_excludes_tests_and_tools():
    names = {document.name for document in builtin_documents("train")}
    names |= {document.name for document in builtin_documents("validation")}
    for excluded in ("test", "idlelib", "lib2to3", "site-packages", "__pycache__"):
        assert excluded not in names
    assert not any(name.startswith("_sysconfigdata_") for name in names)
    for document in builtin_documents("train") + builtin_documents("validation"):
        headers = re.findall(r"^# file: (\S+)$", document.text, flags=re.MULTILINE)
        assert not any({"test", "tests"} & set(header.split("/")) for header in headers)


def test_builtin_package_document_concatenates_files_in_order():
    json_document = next(d for d in builtin_documents("validation") if d.name == "json")
    headers = re.findall(r"^# file: (\S+)$", json_document.text, flags=re.MULTILINE)
    assert headers[0] == "json/__init__.py"
    assert headers == sorted(headers)
    assert "json/decoder.py" in headers
    assert json_document.text.startswith("# file: json/__init__.py\n")


def test_builtin_unknown_split_is_user_error():
    with pytest.raises(UserError, match="test"):
        builtin_documents("test")


def test_fingerprint_is_stable_hex():
    fingerprint = corpus_fingerprint()
    assert fingerprint == corpus_fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint)


def test_split_fallbacks_keep_both_splits_non_empty():
    documents = [Document(name=f"module_{index}.py", text="x") for index in range(3)]
    train, validation = corpus._split_documents(documents)
    assert train and validation
    assert len(train) + len(validation) == 3
    forced = [Document(name=name, text="x") for name in corpus.FORCED_VALIDATION_NAMES]
    train, validation = corpus._split_documents(forced)
    assert len(train) == 1 and len(validation) == len(forced) - 1


# Local files.


def test_load_builtin_keywords():
    validation = builtin_documents("validation")
    assert load_documents(None) == validation
    assert load_documents("BuiltIn") == validation
    assert load_documents(" default ", split="train") == builtin_documents("train")


def test_load_txt_jsonl_parquet_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("whole file\nsecond line\n", encoding="utf-8")
    lines = [json.dumps({"text": "first"}), "", json.dumps({"text": "", "id": 2})]
    lines.append(json.dumps({"text": "third\u2028still third", "id": 3}, ensure_ascii=False))
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    table = pa.table({"text": ["row zero", None, "row two"], "other": [1, 2, 3]})
    pq.write_table(table, tmp_path / "c.parquet")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    documents = load_documents(str(tmp_path / "*"), split="train")
    assert [document.text for document in documents] == [
        "first",
        "third\u2028still third",
        "whole file\nsecond line\n",
        "row zero",
        "row two",
    ]
    assert documents[0].name == f"{tmp_path / 'a.jsonl'}:1"
    assert documents[1].name == f"{tmp_path / 'a.jsonl'}:4"


def test_load_comma_separated_list_and_deduplication(tmp_path):
    for name in ("one", "two", "three"):
        (tmp_path / f"{name}.txt").write_text(name, encoding="utf-8")
    spec = f"{tmp_path / 'two.txt'}, {tmp_path / 'one.txt'},"
    assert [document.text for document in load_documents(spec)] == ["one", "two"]
    spec_list = [str(tmp_path / "t*.txt"), str(tmp_path / "two.txt")]
    assert [document.text for document in load_documents(spec_list)] == ["three", "two"]


def test_load_glob_skips_directories(tmp_path):
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "deep.txt").write_text("deep", encoding="utf-8")
    (tmp_path / "top.txt").write_text("top", encoding="utf-8")
    assert [document.text for document in load_documents(str(tmp_path / "**"))] == [
        "deep",
        "top",
    ]


def test_load_missing_path_and_empty_glob(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(UserError, match=f"data path not found: {re.escape(str(missing))}"):
        load_documents(str(missing))
    pattern = str(tmp_path / "*.jsonl")
    with pytest.raises(UserError, match=f"data path not found: {re.escape(pattern)}"):
        load_documents(pattern)
    with pytest.raises(UserError, match="directory"):
        load_documents(str(tmp_path))
    with pytest.raises(UserError, match="no data paths"):
        load_documents(" , ")


def test_load_unsupported_extension_names_supported(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(str(path))) as error:
        load_documents(str(path))
    assert ".jsonl, .parquet, .txt" in str(error.value)


@pytest.mark.parametrize(
    ("line", "expected"),
    [('{"body": "x"}', "string 'text'"), ('{"text": 3}', "string 'text'"), ("{oops", "JSON")],
)
def test_load_jsonl_bad_line_names_file_and_line(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "good"}) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"{re.escape(str(path))}:2: .*{expected}"):
        load_documents(str(path))


def test_load_parquet_without_text_column(tmp_path):
    path = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"content": ["x"]}), path)
    with pytest.raises(UserError, match=f"{re.escape(str(path))} has no 'text' column"):
        load_documents(str(path))
    path_numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path_numbers)
    with pytest.raises(UserError, match=re.escape(str(path_numbers))):
        load_documents(str(path_numbers))


def test_load_bad_utf8_and_bad_parquet(tmp_path):
    text_path = tmp_path / "latin1.txt"
    text_path.write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match=re.escape(str(text_path))):
        load_documents(str(text_path))
    parquet_path = tmp_path / "broken.parquet"
    parquet_path.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=re.escape(str(parquet_path))):
        load_documents(str(parquet_path))


def test_load_builtin_mixed_with_paths_is_user_error(tmp_path):
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    with pytest.raises(UserError, match="cannot be combined"):
        load_documents(f"builtin,{tmp_path / 'a.txt'}")


# Tokenisation and windows.


def test_tokenize_joins_with_eos_and_silences_length_warning():
    tokenizer = FakeTokenizer()
    documents = [Document("a", "ab"), Document("b", ""), Document("c", "c")]
    tokens = tokenize_documents(documents, tokenizer)
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, [97, 98, EOS, EOS, 99, EOS])
    assert tokenizer.calls == [{"add_special_tokens": False, "verbose": False}] * 3


def test_tokenize_max_tokens_truncates_and_stops_early():
    tokenizer = FakeTokenizer()
    documents = [Document("a", "abc"), Document("b", "de"), Document("c", "f")]
    tokens = tokenize_documents(documents, tokenizer, max_tokens=5)
    np.testing.assert_array_equal(tokens, [97, 98, 99, EOS, 100])
    assert len(tokenizer.calls) == 2
    exact = tokenize_documents(documents, FakeTokenizer(), max_tokens=4)
    np.testing.assert_array_equal(exact, [97, 98, 99, EOS])
    longer = tokenize_documents(documents, FakeTokenizer(), max_tokens=100, show_progress=True)
    assert longer.size == 9


def test_tokenize_errors():
    with pytest.raises(UserError, match="EOS"):
        tokenize_documents([Document("a", "a")], FakeTokenizer(eos_token_id=None))
    with pytest.raises(UserError, match="max_tokens"):
        tokenize_documents([Document("a", "a")], FakeTokenizer(), max_tokens=0)
    assert tokenize_documents([], FakeTokenizer()).shape == (0,)


def test_make_windows_shapes_and_tail():
    tokens = np.arange(11, dtype=np.int64)
    windows = make_windows(tokens, 4)
    assert windows.dtype == np.int32
    np.testing.assert_array_equal(windows, [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(make_windows(tokens, 3, max_windows=2), [[0, 1, 2], [3, 4, 5]])
    assert make_windows(tokens, 11).shape == (1, 11)
    windows[0, 0] = 42
    assert tokens[0] == 0


def test_make_windows_errors():
    with pytest.raises(UserError, match=r"only 5 tokens are available but one window needs 8"):
        make_windows(np.arange(5), 8)
    with pytest.raises(UserError, match="sequence length"):
        make_windows(np.arange(5), 0)
    with pytest.raises(UserError, match="max_windows"):
        make_windows(np.arange(5), 2, max_windows=0)
    with pytest.raises(ValueError, match="1-D"):
        make_windows(np.zeros((2, 4)), 2)
