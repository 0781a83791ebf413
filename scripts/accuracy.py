"""Does LeMo fine-tune as well as dense LoRA? Context extension, several arms, one command.

    python scripts/accuracy.py --out runs/accuracy                   # SmolLM2-135M 8K -> 32K

Every arm fine-tunes the configuration (`smollm2_accuracy`: linear position interpolation x4,
LoRA r=8 on every projection, 400 steps of 32K tokens) with the same data order, seed and steps:

    dense            LeMo off
    lemo_oracle      LeMo, paper_e2e budgets, exact (oracle) block scores
    lemo_calibrated  LeMo, budgets calibrated on the interpolated base model: the layers whose
                     elimination raises its loss by at most --max-loss-rise nats together
                     (scripts/calibrate_budgets.py; --max-loss-rise 0 for the score threshold)
    lemo_predictor   LeMo, paper_e2e budgets, trained predictors (scripts/train_predictor.py)

then each arm and the base model (with and without interpolation) is evaluated densely:
perplexity on held-out long documents and passkey retrieval at every --lengths. Stages run the
project's own commands, which are printed and saved in OUT/commands.txt; everything resumes
(re-run the same command after an interruption). OUT gets adapters/ARM (PEFT), results.json,
accuracy.md (table and settings) and perplexity.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax

from lemo_jax.configs.cli import add_run_config_arguments, run_config_from_args
from lemo_jax.data import corpus_fingerprint, load_documents
from lemo_jax.errors import UserError, run_cli
from lemo_jax.eval.accuracy import (
    EvalArm,
    EvalSettings,
    evaluate_arms,
    markdown_table,
    plot_perplexity,
)

SCRIPTS = Path(__file__).resolve().parent
ARMS = ("dense", "lemo_oracle", "lemo_calibrated", "lemo_predictor")
STAGES = ("prepare", "train", "eval", "report")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.strip().splitlines()[1:]),
    )
    add_run_config_arguments(parser, required=False)
    parser.add_argument("--out", type=Path, default=Path("runs/accuracy"))
    parser.add_argument("--arms", default=",".join(ARMS), help=f"from {', '.join(ARMS)}")
    parser.add_argument("--stages", default=",".join(STAGES), help=", ".join(STAGES))
    parser.add_argument("--lengths", default="4096,8192,16384,32768", help="evaluation lengths")
    parser.add_argument("--eval-tokens", type=int, default=262_144, help="tokens per length")
    parser.add_argument("--passkey-trials", type=int, default=50, help="trials per length")
    parser.add_argument("--batch-tokens", type=int, default=32_768, help="tokens per forward")
    parser.add_argument("--predictor-steps", type=int, default=400)
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument(
        "--max-loss-rise",
        type=float,
        default=0.05,
        help="lemo_calibrated: loss rise bound of the calibration in nats (default 0.05; 0: "
        "the score threshold instead)",
    )
    args = parser.parse_args(argv)
    args.config = args.config or "smollm2_accuracy"
    args.arms = _choices(args.arms, ARMS, "--arms")
    args.stages = _choices(args.stages, STAGES, "--stages")
    try:
        args.lengths = tuple(sorted(int(n) for n in args.lengths.split(",")))
    except ValueError:
        raise UserError(
            f"--lengths must be comma-separated integers, got {args.lengths!r}"
        ) from None
    if args.lengths[0] < 1 or any(args.lengths[-1] % n for n in args.lengths):
        raise UserError(f"--lengths must be positive and divide the longest: {args.lengths}")
    for name in ("eval_tokens", "passkey_trials", "batch_tokens", "predictor_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.max_loss_rise < 0:
        raise UserError(f"--max-loss-rise must be at least 0, got {args.max_loss_rise}")
    return args


def _choices(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        raise UserError(f"{flag}: unknown {unknown or 'empty'}; choose from {', '.join(allowed)}")
    return chosen


# Calibrated budgets prune whichever layers qualify, often one at a time: each runs alone rather
# than paired with a dense neighbour (which would run it dense), in calibration and training.
CALIBRATED_PLAN = ("lemo.merge_lone_layers=false",)


def arm_overrides(arm: str, out: Path) -> list[str]:
    lemo = {
        "dense": ["lemo.enabled=false"],
        "lemo_oracle": ["lemo.enabled=true", "lemo.schedule=paper_e2e", "lemo.scorer=oracle"],
        "lemo_calibrated": [
            "lemo.enabled=true",
            f"lemo.schedule=file:{out / 'budgets.json'}",
            *CALIBRATED_PLAN,
        ],
        "lemo_predictor": [
            "lemo.enabled=true",
            "lemo.schedule=paper_e2e",
            "lemo.scorer=predictor",
            f"lemo.predictor_path={out / 'predictors'}",
        ],
    }[arm]
    return [f"output_dir={out / 'runs' / arm}", *lemo]


class Stages:
    """Runs the project's scripts as subprocesses, logging each command and its wall time."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.timings_path = self.out / "timings.json"
        self.timings = (
            json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}
        )

    def run(self, name: str, script: str, arguments: list[str]) -> None:
        command = [sys.executable, str(SCRIPTS / script), *arguments]
        text = shlex.join(["python", f"scripts/{script}", *arguments])
        print(f"\n[{name}] {text}", file=sys.stderr, flush=True)
        with open(self.out / "commands.txt", "a") as log:
            log.write(text + "\n")
        started = time.perf_counter()
        code = subprocess.run(command).returncode
        if code != 0:
            raise UserError(f"stage {name} failed (exit {code}): {text}")
        self.timings[name] = round(self.timings.get(name, 0) + time.perf_counter() - started, 1)
        self.timings_path.write_text(json.dumps(self.timings, indent=1) + "\n")

    def config_arguments(self, *extra: str) -> list[str]:
        overrides = [*self.args.overrides, *extra]
        return ["--config", self.args.config, *(item for o in overrides for item in ("--set", o))]

    def prepare(self) -> None:
        budgets, predictors = self.out / "budgets.json", self.out / "predictors"
        if "lemo_calibrated" in self.args.arms and not budgets.exists():
            samples = ["--samples", str(self.args.calibration_samples), "--out", str(budgets)]
            if self.args.max_loss_rise:
                samples += ["--max-loss-rise", str(self.args.max_loss_rise)]
            arguments = self.config_arguments(*CALIBRATED_PLAN)
            self.run("calibrate", "calibrate_budgets.py", arguments + samples)
        if "lemo_predictor" in self.args.arms and not (predictors / "recall.json").exists():
            steps = ["--steps", str(self.args.predictor_steps), "--no-progress"]
            arguments = self.config_arguments("lemo.schedule=paper_e2e")
            self.run(
                "predictors", "train_predictor.py", [*arguments, *steps, "--out", str(predictors)]
            )

    def train(self) -> None:
        for arm in self.args.arms:
            adapter = self.out / "adapters" / arm
            if adapter.exists():
                continue
            arguments = self.config_arguments(*arm_overrides(arm, self.out))
            self.run(f"train_{arm}", "finetune.py", arguments)
            run_dir = self.out / "runs" / arm
            export = ["--checkpoint", str(run_dir), "--adapter-only", "--out", str(adapter)]
            self.run(f"export_{arm}", "export_to_pytorch.py", export)


def evaluate(args: argparse.Namespace) -> dict:
    config = run_config_from_args(args)
    arms = [EvalArm("base", interpolate=False), EvalArm("base_interpolated")]
    for arm in args.arms:
        adapter = args.out / "adapters" / arm
        if not adapter.exists():
            raise UserError(f"{adapter} does not exist: run the train stage first")
        arms.append(EvalArm(arm, adapter=adapter))
    settings = EvalSettings(
        lengths=args.lengths,
        eval_tokens=args.eval_tokens,
        passkey_trials=args.passkey_trials,
        batch_tokens=args.batch_tokens,
        seed=config.train.seed,
    )
    validation = config.data.resolved_validation
    if validation == "holdout":
        raise UserError("the evaluation needs held-out documents: --set data.validation=FILES")
    documents = load_documents(validation, split="validation")
    started = time.perf_counter()
    results = evaluate_arms(config, arms, documents, settings, args.out / "results.json")
    print(f"evaluation: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return results


def report(args: argparse.Namespace) -> None:
    results = json.loads((args.out / "results.json").read_text())
    config = run_config_from_args(args)
    timings_path = args.out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    table = markdown_table(results, reference="dense" if "dense" in results else None)
    plot_perplexity(results, args.out / "perplexity.png", title=f"{config.name}: perplexity")
    some = next(iter(results.values()))
    windows = {k: v["num_windows"] for k, v in some["perplexity"].items()}
    train = config.train
    lines = [
        table,
        "",
        f"- device: {jax.devices()[0].device_kind}; corpus {corpus_fingerprint()}",
        f"- fine-tuning: {train.steps} steps x {train.batch_size * train.seq_len:,} tokens = "
        f"{train.steps * train.batch_size * train.seq_len:,} tokens per arm",
        f"- perplexity: {args.eval_tokens:,} tokens per length (windows {windows})",
        f"- passkey: {args.passkey_trials} trials per length",
        f"- wall time (s): {json.dumps(timings)}",
    ]
    (args.out / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    run_config_from_args(args)  # a bad --config or --set fails before any work
    stages = Stages(args)
    if "prepare" in args.stages:
        stages.prepare()
    if "train" in args.stages:
        stages.train()
    if "eval" in args.stages:
        evaluate(args)
    if "report" in args.stages:
        report(args)


if __name__ == "__main__":
    run_cli(main)
