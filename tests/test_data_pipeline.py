"""Tests for the training data pipeline: saved datasets, the token cache, windows and sampling."""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from lemo_jax.configs.run import DataSection
from lemo_jax.data import (
    Document,
    ShuffledSampler,
    TokenWindows,
    cached_token_stream,
    corpus,
    load_documents,
    prepare_data,
)
from lemo_jax.data import cache as token_cache
from lemo_jax.data.sources import hf_dataset_split
from lemo_jax.errors import UserError

EOS = 0


class CountingTokenizer:
    """One token per character (its code point); counts the texts it tokenises."""

    def __init__(self, eos_token_id: int | None = EOS, extra_vocab: str = ""):
        self.eos_token_id = eos_token_id
        self.extra_vocab = extra_vocab  # changes the vocabulary, hence the cache key
        self.num_calls = 0

    def __call__(self, text: str, **kwargs) -> dict[str, list[int]]:
        self.num_calls += 1
        return {"input_ids": [ord(character) for character in text]}

    def get_vocab(self) -> dict[str, int]:
        return {"<eos>": EOS, "a": 97, **({self.extra_vocab: 1000} if self.extra_vocab else {})}

    def __len__(self) -> int:
        return len(self.get_vocab())


def write_text(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def codes(text: str) -> list[int]:
    return [ord(character) for character in text]


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(path.name for path in cache_dir.iterdir()) if cache_dir.exists() else []


@pytest.fixture
def small_builtin(monkeypatch):
    """Replaces the ~11 M-character built-in corpus by two tiny splits."""
    small = corpus._Corpus(
        train=(Document("alpha", "abcdefg"), Document("beta", "hij")),
        validation=(Document("gamma", "klmnopq"),),
        fingerprint="0123456789abcdef",
    )
    monkeypatch.setattr(corpus, "_scan_stdlib", lambda: small)
    return small


# Token cache.


def test_cache_miss_then_hit_returns_the_same_memmap(tmp_path):
    spec = write_text(tmp_path / "a.txt", "abc")
    cache_dir = tmp_path / "cache"
    tokenizer = CountingTokenizer()
    tokens = cached_token_stream(spec, "train", tokenizer, cache_dir)
    np.testing.assert_array_equal(tokens, [*codes("abc"), EOS])
    assert tokens.dtype == np.int32
    assert isinstance(tokens, np.memmap) and not tokens.flags.writeable
    assert tokenizer.num_calls == 1
    again = cached_token_stream(spec, "train", tokenizer, cache_dir)
    np.testing.assert_array_equal(again, tokens)
    assert tokenizer.num_calls == 1
    [note, entry] = cache_files(cache_dir)  # no temporary files left behind
    assert entry.endswith(".npy") and note == entry.replace(".npy", ".json")
    identity = json.loads((cache_dir / note).read_text())
    assert identity["data"]["files"][0]["path"] == str((tmp_path / "a.txt").resolve())
    assert identity["tokenizer"]["class"] == "CountingTokenizer"
    assert identity["format_version"] == token_cache.CACHE_FORMAT_VERSION


def test_cache_key_changes_with_content_mtime_tokenizer_and_file_set(tmp_path):
    path = tmp_path / "a.txt"
    spec = write_text(path, "abc")
    cache_dir = tmp_path / "cache"
    tokenizer = CountingTokenizer()
    cached_token_stream(spec, "train", tokenizer, cache_dir)
    write_text(path, "abcd")
    np.testing.assert_array_equal(
        cached_token_stream(spec, "train", tokenizer, cache_dir), [*codes("abcd"), EOS]
    )
    assert tokenizer.num_calls == 2
    # Same size, new content: the modification time tells them apart.
    write_text(path, "wxyz")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    np.testing.assert_array_equal(
        cached_token_stream(spec, "train", tokenizer, cache_dir), [*codes("wxyz"), EOS]
    )
    other_tokenizer = CountingTokenizer(extra_vocab="xyz")
    cached_token_stream(spec, "train", other_tokenizer, cache_dir)
    assert other_tokenizer.num_calls == 1
    both = f"{spec},{write_text(tmp_path / 'b.txt', 'b')}"
    np.testing.assert_array_equal(
        cached_token_stream(both, "train", tokenizer, cache_dir), [*codes("wxyz"), EOS, 98, EOS]
    )
    assert tokenizer.num_calls == 5  # two documents
    assert len([name for name in cache_files(cache_dir) if name.endswith(".npy")]) == 5


def test_cache_failed_write_leaves_no_file(tmp_path, monkeypatch):
    spec = write_text(tmp_path / "a.txt", "abc")
    cache_dir = tmp_path / "cache"

    def failing_save(handle, array, **kwargs):
        handle.write(b"\x93NUMPY half of a header")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        cached_token_stream(spec, "train", CountingTokenizer(), cache_dir)
    assert cache_files(cache_dir) == []
    monkeypatch.undo()
    tokenizer = CountingTokenizer()
    np.testing.assert_array_equal(
        cached_token_stream(spec, "train", tokenizer, cache_dir), [*codes("abc"), EOS]
    )
    assert tokenizer.num_calls == 1


def test_cache_rebuilds_an_unreadable_entry(tmp_path):
    spec = write_text(tmp_path / "a.txt", "abc")
    cache_dir = tmp_path / "cache"
    tokenizer = CountingTokenizer()
    identity = token_cache.cache_identity(spec, "train", tokenizer)
    cache_dir.mkdir()
    (cache_dir / f"{token_cache.cache_key(identity)}.npy").write_bytes(b"garbage")
    np.testing.assert_array_equal(
        cached_token_stream(spec, "train", tokenizer, cache_dir), [*codes("abc"), EOS]
    )
    assert tokenizer.num_calls == 1


def test_cache_dir_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    spec = write_text(tmp_path / "a.txt", "abc")
    cached_token_stream(spec, "train", CountingTokenizer(), "~/tokens")
    assert len(cache_files(tmp_path / "home" / "tokens")) == 2


def test_builtin_cache_keys_on_fingerprint_and_split(small_builtin, tmp_path, monkeypatch):
    tokenizer = CountingTokenizer()
    train = cached_token_stream("builtin", "train", tokenizer, tmp_path)
    np.testing.assert_array_equal(train, [*codes("abcdefg"), EOS, *codes("hij"), EOS])
    validation = cached_token_stream("builtin", "validation", tokenizer, tmp_path)
    np.testing.assert_array_equal(validation, [*codes("klmnopq"), EOS])
    cached_token_stream("builtin", "train", tokenizer, tmp_path)
    assert tokenizer.num_calls == 3
    changed = corpus._Corpus(small_builtin.train, small_builtin.validation, "fedcba9876543210")
    monkeypatch.setattr(corpus, "_scan_stdlib", lambda: changed)
    cached_token_stream("builtin", "train", tokenizer, tmp_path)
    assert tokenizer.num_calls == 5


def test_tokenizer_identity_of_fast_tokenizers():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def train_tokenizer(text: str) -> PreTrainedTokenizerFast:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=270, special_tokens=["</s>"])
        tokenizer.train_from_iterator([text] * 20, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>")

    tokenizer = train_tokenizer("the cat sat on the mat")
    first = token_cache.tokenizer_identity(tokenizer)
    assert first == token_cache.tokenizer_identity(train_tokenizer("the cat sat on the mat"))
    second = token_cache.tokenizer_identity(train_tokenizer("import numpy as np"))
    assert first["class"] == type(tokenizer).__name__ and first["eos_token_id"] == 0
    assert first["vocab_size"] == len(tokenizer)
    assert first["serialisation_sha256"] != second["serialisation_sha256"]


def test_tokenizer_identity_needs_a_serialisation():
    class Opaque:
        eos_token_id = 0

        def __call__(self, text, **kwargs):
            return {"input_ids": []}

    with pytest.raises(TypeError, match="Opaque"):
        token_cache.tokenizer_identity(Opaque())


# Windows and sampling.


def test_token_windows_drop_the_tail_and_copy():
    tokens = np.arange(11, dtype=np.int32)
    windows = TokenWindows(tokens, 4)
    assert len(windows) == 2
    batch = windows.batch([1, 0, 1])
    assert batch.dtype == np.int32
    np.testing.assert_array_equal(batch, [[4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7]])
    batch[0, 0] = 42
    assert tokens[4] == 4
    assert windows.batch(np.zeros(0, dtype=np.int64)).shape == (0, 4)
    with pytest.raises(IndexError, match=r"\[0, 2\)"):
        windows.batch([2])
    with pytest.raises(IndexError):
        windows.batch([-1])


def test_token_windows_batch_from_memmap_is_plain_array(tmp_path):
    np.save(tmp_path / "tokens.npy", np.arange(12, dtype=np.int32))
    windows = TokenWindows(np.load(tmp_path / "tokens.npy", mmap_mode="r"), 3)
    batch = windows.batch([3])
    assert type(batch) is np.ndarray and batch.flags.writeable
    np.testing.assert_array_equal(batch, [[9, 10, 11]])


@pytest.mark.parametrize("num_windows", [7, 10])
def test_sampler_positions_concatenate_across_epochs(num_windows):
    sampler = ShuffledSampler(num_windows, seed=3)
    whole = sampler.indices(0, 20)
    np.testing.assert_array_equal(np.concatenate([sampler.indices(0, 10), whole[10:]]), whole)
    np.testing.assert_array_equal(sampler.indices(10, 10), whole[10:])
    # A fresh sampler (a resumed run) at an epoch-crossing position gives the same windows.
    np.testing.assert_array_equal(ShuffledSampler(num_windows, seed=3).indices(5, 9), whole[5:14])
    for epoch in range(2):
        expected = np.random.default_rng([3, epoch]).permutation(num_windows)
        epoch_slice = whole[epoch * num_windows : (epoch + 1) * num_windows]
        np.testing.assert_array_equal(epoch_slice, expected[: epoch_slice.size])
    np.testing.assert_array_equal(np.sort(whole[:num_windows]), np.arange(num_windows))
    assert sampler.epoch(num_windows - 1) == 0 and sampler.epoch(num_windows) == 1


def test_sampler_seeds_and_epochs_differ_and_errors():
    sampler = ShuffledSampler(50, seed=0)
    assert not np.array_equal(sampler.indices(0, 50), ShuffledSampler(50, seed=1).indices(0, 50))
    assert not np.array_equal(sampler.indices(0, 50), sampler.indices(50, 50))
    assert sampler.indices(17, 0).shape == (0,)
    np.testing.assert_array_equal(ShuffledSampler(1, seed=0).indices(3, 3), [0, 0, 0])
    with pytest.raises(ValueError, match="position"):
        sampler.indices(-1, 2)
    with pytest.raises(ValueError, match="num_windows"):
        ShuffledSampler(0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        ShuffledSampler(5, seed=-1)


# prepare_data.


def test_prepare_builtin(small_builtin, tmp_path):
    section = DataSection(cache_dir=str(tmp_path))
    train, validation = prepare_data(section, CountingTokenizer(), 3)
    # train stream: a b c d e f g EOS h i j EOS (12 tokens); validation: k .. q EOS (8 tokens)
    np.testing.assert_array_equal(
        train.batch(range(len(train))),
        np.array([*codes("abcdefg"), EOS, *codes("hij"), EOS]).reshape(4, 3),
    )
    assert len(validation) == 2
    np.testing.assert_array_equal(validation.batch([0, 1]), [codes("klm"), codes("nop")])


def test_prepare_holdout_takes_a_contiguous_tail(tmp_path):
    spec = write_text(tmp_path / "train.txt", "abcdefghijklmnopqrs")  # + EOS: 20 tokens
    section = DataSection(
        train=spec, validation="holdout", holdout_fraction=0.2, cache_dir=str(tmp_path)
    )
    train, validation = prepare_data(section, CountingTokenizer(), 2)
    assert (len(train), len(validation)) == (8, 2)
    np.testing.assert_array_equal(train.batch([7]), [codes("op")])
    np.testing.assert_array_equal(validation.batch([0, 1]), [codes("qr"), [ord("s"), EOS]])
    tiny = DataSection(
        train=spec, validation="Holdout", holdout_fraction=0.01, cache_dir=str(tmp_path)
    )
    train, validation = prepare_data(tiny, CountingTokenizer(), 2)
    assert (len(train), len(validation)) == (9, 1)
    # At most all windows but one: training keeps one.
    large = DataSection(
        train=spec, validation="holdout", holdout_fraction=0.9, cache_dir=str(tmp_path)
    )
    train, validation = prepare_data(large, CountingTokenizer(), 10)
    assert (len(train), len(validation)) == (1, 1)
    with pytest.raises(UserError, match=r"holdout needs two"):
        prepare_data(large, CountingTokenizer(), 11)


def test_prepare_validation_files_and_shared_file_warning(tmp_path):
    train_spec = write_text(tmp_path / "train.txt", "abcde")
    validation_spec = write_text(tmp_path / "validation.txt", "xyz")
    section = DataSection(train=train_spec, validation=validation_spec, cache_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, validation = prepare_data(section, CountingTokenizer(), 2)
    assert (len(train), len(validation)) == (3, 2)
    np.testing.assert_array_equal(validation.batch([1]), [[ord("z"), EOS]])
    shared = DataSection(
        train=train_spec,
        validation=f"{validation_spec},{tmp_path}/tr*.txt",
        cache_dir=str(tmp_path),
    )
    with pytest.warns(UserWarning, match=re.escape(str(tmp_path / "train.txt")) + ".*holdout"):
        prepare_data(shared, CountingTokenizer(), 2)


def test_prepare_errors(tmp_path):
    short = write_text(tmp_path / "short.txt", "abc")  # 4 tokens with EOS
    long = write_text(tmp_path / "long.txt", "abcdefgh")
    empty = write_text(tmp_path / "empty.txt", "")
    missing = str(tmp_path / "nope.txt")
    cases = [
        ((missing, "builtin"), r"^data\.train: data path not found: "),
        ((long, str(tmp_path / "no*.txt")), r"^data\.validation: data path not found"),
        ((empty, "builtin"), r"^data\.train: .*empty\.txt' holds no text"),
        (
            (short, "builtin"),
            r"^data\.train has 4 tokens; one sequence of train\.seq_len=8 needs 8",
        ),
        ((long, short), r"^data\.validation has 4 tokens; .*train\.seq_len=8 needs 8"),
    ]
    for (train, validation), message in cases:
        section = DataSection(train=train, validation=validation, cache_dir=str(tmp_path / "c"))
        with pytest.raises(UserError, match=message) as error:
            prepare_data(section, CountingTokenizer(), 8)
        assert "\n" not in str(error.value)


# Saved Hugging Face datasets.


def make_saved_dataset_dir(path: Path, splits: list[str] | None = None) -> Path:
    """The marker files `save_to_disk` writes (no arrow data: enough to be detected)."""
    path.mkdir()
    if splits is None:
        (path / "state.json").write_text("{}", encoding="utf-8")
        (path / "dataset_info.json").write_text("{}", encoding="utf-8")
    else:
        (path / "dataset_dict.json").write_text(json.dumps({"splits": splits}), encoding="utf-8")
    return path


def test_saved_dataset_without_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    path = make_saved_dataset_dir(tmp_path / "saved")
    message = f"{re.escape(str(path))} is a saved Hugging Face dataset; pip install datasets"
    with pytest.raises(UserError, match=message):
        load_documents(str(path), split="train")
    section = DataSection(train=str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="^data.train: " + message):
        prepare_data(section, CountingTokenizer(), 4)


def test_saved_dataset_dict_split_choice(tmp_path):
    both = make_saved_dataset_dir(tmp_path / "both", ["train", "validation"])
    assert hf_dataset_split(both, "train") == "train"
    assert hf_dataset_split(both, "validation") == "validation"
    only = make_saved_dataset_dir(tmp_path / "only", ["train"])
    assert hf_dataset_split(only, "validation") == "train"
    several = make_saved_dataset_dir(tmp_path / "several", ["train", "test"])
    with pytest.raises(UserError, match="splits train, test but none named 'validation'"):
        hf_dataset_split(several, "validation")
    assert hf_dataset_split(make_saved_dataset_dir(tmp_path / "one"), "train") is None


def test_saved_dataset_identity_covers_its_files_and_split(tmp_path):
    path = make_saved_dataset_dir(tmp_path / "saved", ["train", "validation"])
    (path / "train").mkdir()
    shard = path / "train" / "data-00000-of-00001.arrow"
    shard.write_bytes(b"1234")
    train_identity = token_cache.data_identity(str(path), "train")
    assert train_identity != token_cache.data_identity(str(path), "validation")
    assert [file["name"] for file in train_identity["files"][0]["files"]] == [
        "dataset_dict.json",
        "train/data-00000-of-00001.arrow",
    ]
    shard.write_bytes(b"12345")
    assert token_cache.data_identity(str(path), "train") != train_identity


def test_plain_directory_is_still_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    with pytest.raises(UserError, match=r"directory.*save_to_disk"):
        load_documents(str(tmp_path))


def test_saved_dataset_with_datasets_package(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = datasets.Dataset.from_dict({"text": ["abc", "", None, "de"], "id": [1, 2, 3, 4]})
    single.save_to_disk(str(tmp_path / "single"))
    documents = load_documents(str(tmp_path / "single"), split="train")
    assert [(document.name, document.text) for document in documents] == [
        (f"{tmp_path / 'single'}[0]", "abc"),
        (f"{tmp_path / 'single'}[3]", "de"),
    ]
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["abcdefg"]}),
            "validation": datasets.Dataset.from_dict({"text": ["xyz"]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    section = DataSection(
        train=str(tmp_path / "dict"),
        validation=str(tmp_path / "dict"),
        cache_dir=str(tmp_path / "c"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # different splits of one directory share no text
        train, validation = prepare_data(section, CountingTokenizer(), 4)
    np.testing.assert_array_equal(train.batch([0, 1]), [codes("abcd"), [*codes("efg"), EOS]])
    np.testing.assert_array_equal(validation.batch([0]), [[*codes("xyz"), EOS]])
    no_text = datasets.Dataset.from_dict({"body": ["x"]})
    no_text.save_to_disk(str(tmp_path / "no_text"))
    with pytest.raises(UserError, match="has no 'text' column"):
        load_documents(str(tmp_path / "no_text"))
