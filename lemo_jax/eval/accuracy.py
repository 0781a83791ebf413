"""Long-context quality of fine-tuned arms: dense perplexity and passkey retrieval per length.

Every arm is evaluated densely (token elimination is a training-time saving), on the same
tokens: windows of the longest length taken inside the longest held-out documents
(`long_document_windows`), cut into pieces for the shorter lengths, so each length predicts the
same tokens with a different amount of context.

An arm is the base model with a PEFT adapter (or none, for the base rows) and with or without
the run's position interpolation. Arms sharing a RoPE setting share one model whose adapter
weights are swapped, so each shape compiles once for all of them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lemo_jax.configs.run import RunConfig
from lemo_jax.data import Document
from lemo_jax.eval.passkey import passkey_accuracy
from lemo_jax.eval.perplexity import evaluate_perplexity, long_document_windows
from lemo_jax.io.peft_adapter import apply_peft_adapter, peft_lora_config
from lemo_jax.train.setup import build_model


@dataclasses.dataclass(frozen=True)
class EvalArm:
    """What to evaluate: `adapter` None is the base model; `interpolate` False drops the run's
    RoPE scaling (the checkpoint's own positions)."""

    name: str
    adapter: Path | None = None
    interpolate: bool = True


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    lengths: tuple[int, ...]  # ascending; each divides the last
    eval_tokens: int  # tokens per length: eval_tokens / max(lengths) windows of the longest
    passkey_trials: int
    batch_tokens: int  # tokens per forward pass (batch = batch_tokens // length, at least 1)
    seed: int = 0


def evaluation_windows(
    documents: Sequence[Document], tokenizer, settings: EvalSettings
) -> dict[int, np.ndarray]:
    """{length: int32 [W, length]} over the same tokens for every length."""
    longest = settings.lengths[-1]
    if any(longest % length for length in settings.lengths):
        raise ValueError(f"every length must divide the longest: {settings.lengths}")
    streams = [
        np.asarray(tokenizer(d.text, add_special_tokens=False, verbose=False)["input_ids"])
        for d in documents
    ]
    windows = long_document_windows(streams, longest, max(1, settings.eval_tokens // longest))
    return {length: windows.reshape(-1, length) for length in settings.lengths}


def evaluate_model(model, tokenizer, windows: dict[int, np.ndarray], settings: EvalSettings):
    """{"perplexity": {length: {...}}, "passkey": {length: {...}}} for one model."""
    result: dict = {"perplexity": {}, "passkey": {}}
    for length in settings.lengths:
        batch = max(1, settings.batch_tokens // length)
        ppl = evaluate_perplexity(
            model, windows[length], batch_size=min(batch, len(windows[length]))
        )
        result["perplexity"][str(length)] = dataclasses.asdict(ppl)
        result["passkey"][str(length)] = passkey_accuracy(
            model, tokenizer, length, settings.passkey_trials, batch_size=batch, seed=settings.seed
        )
    return result


def evaluate_arms(
    config: RunConfig,
    arms: Sequence[EvalArm],
    documents: Sequence[Document],
    settings: EvalSettings,
    results_path: Path,
    *,
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr),
) -> dict:
    """Evaluates each arm not yet in `results_path` (JSON, rewritten after every arm, so an
    interrupted evaluation resumes) and returns all results by arm name."""
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    todo = [arm for arm in arms if arm.name not in results]
    windows = None
    for interpolate in (False, True):
        group = [arm for arm in todo if arm.interpolate == interpolate]
        if not group:
            continue
        section = config.model
        if not interpolate:
            section = dataclasses.replace(section, rope_scaling=None)
        adapters = [arm.adapter for arm in group if arm.adapter is not None]
        lora = peft_lora_config(adapters[0]) if adapters else None
        model, tokenizer = build_model(
            section, lora, seq_len=settings.lengths[-1], seed=config.train.seed
        )
        if windows is None:
            windows = evaluation_windows(documents, tokenizer, settings)
        # Base rows first, while the fresh adapters (B = 0) leave the model unchanged.
        for arm in sorted(group, key=lambda arm: arm.adapter is not None):
            started = time.perf_counter()
            if arm.adapter is not None:
                apply_peft_adapter(model, arm.adapter)
            result = evaluate_model(model, tokenizer, windows, settings)
            result.update(
                adapter=str(arm.adapter) if arm.adapter else None,
                interpolate=interpolate,
                seconds=round(time.perf_counter() - started, 1),
            )
            results[arm.name] = result
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            log(f"{arm.name}: {summary_line(result)}")
    return results


def summary_line(result: dict) -> str:
    ppl = " ".join(f"{k}:{v['perplexity']:.3f}" for k, v in result["perplexity"].items())
    passkey = " ".join(f"{k}:{v['accuracy']:.2f}" for k, v in result["passkey"].items())
    return f"perplexity {ppl} | passkey {passkey}"


def markdown_table(results: dict, *, reference: str | None = "dense") -> str:
    """Perplexity and passkey accuracy per arm and length, with each arm's perplexity over
    `reference`'s (the worst length) where that arm was evaluated."""
    lengths = sorted({int(k) for r in results.values() for k in r["perplexity"]})
    heads = [f"ppl {_k(n)}" for n in lengths] + [f"passkey {_k(n)}" for n in lengths]
    base = results.get(reference) if reference else None
    head = "| arm | " + " | ".join(heads) + (f" | max ppl / {reference} |" if base else " |")
    lines = [head, "|" + "---|" * (len(heads) + 1 + bool(base))]
    for name, result in results.items():
        ppl = [result["perplexity"][str(n)]["perplexity"] for n in lengths]
        cells = [f"{value:.3f}" for value in ppl]
        cells += [f"{result['passkey'][str(n)]['accuracy']:.0%}" for n in lengths]
        if base:
            reference_ppl = [base["perplexity"][str(n)]["perplexity"] for n in lengths]
            ratios = [p / r for p, r in zip(ppl, reference_ppl, strict=True)]
            cells.append(f"{max(ratios):.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_perplexity(
    results: dict, path: Path, *, title: str, reference: str | None = None, bound: float = 1.02
) -> None:
    """Perplexity against context length, one line per arm (log-scaled axes); with `reference`
    (an arm in `results`), a second panel with every fine-tuned arm's perplexity over the
    reference's and a dashed line at `bound`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    compare = reference is not None and reference in results
    size = (12, 4.5) if compare else (7, 4.5)
    figure, axes = plt.subplots(1, 2 if compare else 1, figsize=size, squeeze=False)
    axes = axes[0]
    axis = axes[0]
    lengths = sorted(int(k) for k in results[next(iter(results))]["perplexity"])

    def perplexity(name: str) -> list[float]:
        return [results[name]["perplexity"][str(n)]["perplexity"] for n in lengths]

    for name in results:
        axis.plot(lengths, perplexity(name), marker="o", label=name)
    axis.set_yscale("log")
    axis.set_ylabel("perplexity (held-out documents)")
    axis.set_title(title)
    if compare:
        ratio_axis, base = axes[1], perplexity(reference)
        for index, name in enumerate(results):
            if results[name].get("adapter") is None or name == reference:
                continue  # base rows: off this scale
            ratio = [value / ref for value, ref in zip(perplexity(name), base, strict=True)]
            ratio_axis.plot(lengths, ratio, marker="o", label=name, color=f"C{index}")
        color = f"C{list(results).index(reference)}"  # the reference's colour on the left
        ratio_axis.axhline(1.0, color=color, linewidth=1, label=reference)
        ratio_axis.axhline(bound, color="gray", linestyle="--", linewidth=1, label=f"{bound}")
        ratio_axis.set_ylabel(f"perplexity / {reference}'s")
        ratio_axis.set_title(f"fine-tuned arms against {reference}")
    for each in axes:
        each.set_xscale("log", base=2)
        each.set_xticks(lengths, [_k(n) for n in lengths])
        each.set_xlabel("context length (tokens)")
        each.grid(True, which="both", alpha=0.3)
        each.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _k(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)
