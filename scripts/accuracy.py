"""Does LeMo fine-tune as well as dense LoRA? Context extension, several arms, one command.

    python scripts/accuracy.py --out runs/accuracy                   # SmolLM2-135M 8K -> 32K

Every arm fine-tunes the configuration (`smollm2_accuracy`: linear position interpolation x4,
LoRA r=8 on every projection, 400 steps of 32K tokens) with the same data order, seed and steps:

    dense            LeMo off
    lemo_oracle      LeMo, paper_e2e budgets, exact (oracle) block scores
    lemo_calibrated  LeMo, budgets calibrated on the interpolated base model: the layers whose
                     elimination raises its loss by at most --max-loss-rise nats together
                     (scripts/calibrate_budgets.py; --max-loss-rise 0 for the score threshold)
    lemo_predictor   LeMo, the calibrated budgets, selected by trained predictors (the
                     `heads` architecture, scripts/train_predictor.py) instead of the oracle

then each arm and the base model (with and without interpolation) is evaluated densely:
perplexity on held-out long documents and passkey retrieval at every --lengths. Stages run the
project's own commands, which are printed and saved in OUT/commands.txt; everything resumes
(re-run the same command after an interruption). With --jobs N, up to N independent stages run
at once (sharing the device; their output goes to OUT/logs/STAGE.log), so one stage's model
loading, compilation and export overlap another's device work. OUT gets adapters/ARM (PEFT),
results.json, accuracy.md (table and settings) and perplexity.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import jax

from lemo_jax.configs.cli import add_run_config_arguments, run_config_from_args
from lemo_jax.configs.overrides import apply_overrides
from lemo_jax.configs.runs import get_run_config
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
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="prepare / train stages run at once, sharing the device (default 1)",
    )
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
    for name in ("eval_tokens", "passkey_trials", "batch_tokens", "predictor_steps", "jobs"):
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
# The predictor arm's predictors: the oracle's scores over a few query heads (the architecture
# with the best measured recall, BENCHMARKS.md "Predictors"); the MLP stays dense in every arm.
PREDICTOR_PLAN = ("lemo.predictor_architecture=heads",)


def calibrated_schedule(out: Path) -> list[str]:
    return [f"lemo.schedule=file:{out / 'budgets.json'}", *CALIBRATED_PLAN]


def arm_overrides(arm: str, out: Path) -> list[str]:
    lemo = {
        "dense": ["lemo.enabled=false"],
        "lemo_oracle": ["lemo.enabled=true", "lemo.schedule=paper_e2e", "lemo.scorer=oracle"],
        "lemo_calibrated": ["lemo.enabled=true", *calibrated_schedule(out)],
        "lemo_predictor": [
            "lemo.enabled=true",
            *calibrated_schedule(out),
            *PREDICTOR_PLAN,
            "lemo.scorer=predictor",
            f"lemo.predictor_path={out / 'predictors'}",
        ],
    }[arm]
    return [f"output_dir={out / 'runs' / arm}", *lemo]


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    script: str
    arguments: list[str]
    after: tuple[str, ...] = ()  # stages that must end first (when they run at all)


class Stages:
    """Runs the project's scripts as subprocesses, logging each command and its wall time; with
    `--jobs N` up to N at once, in dependency order, each one's output in OUT/logs/."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.timings_path = self.out / "timings.json"
        self.timings = (
            json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}
        )
        self.lock = threading.Lock()

    def config_arguments(self, *extra: str) -> list[str]:
        overrides = [*self.args.overrides, *extra]
        return ["--config", self.args.config, *(item for o in overrides for item in ("--set", o))]

    def pending(self) -> list[Stage]:
        """The stages of --stages still to run, in a valid sequential order."""
        args, out = self.args, self.out
        budgets, predictors = out / "budgets.json", out / "predictors"
        needs_budgets = {"lemo_calibrated", "lemo_predictor"} & set(args.arms)
        needs_predictors = "lemo_predictor" in args.arms
        stages: list[Stage] = []
        if "prepare" in args.stages:
            if needs_budgets and not budgets.exists():
                samples = ["--samples", str(args.calibration_samples), "--out", str(budgets)]
                if args.max_loss_rise:
                    samples += ["--max-loss-rise", str(args.max_loss_rise)]
                arguments = self.config_arguments(*CALIBRATED_PLAN)
                stages.append(Stage("calibrate", "calibrate_budgets.py", arguments + samples))
            if needs_predictors and not (predictors / "recall.json").exists():
                steps = ["--steps", str(args.predictor_steps), "--no-progress"]
                arguments = self.config_arguments(*calibrated_schedule(out), *PREDICTOR_PLAN)
                arguments += [*steps, "--out", str(predictors)]
                stages.append(Stage("predictors", "train_predictor.py", arguments, ("calibrate",)))
        if "train" in args.stages:
            names = {stage.name for stage in stages}
            for arm in args.arms:
                adapter = out / "adapters" / arm
                if adapter.exists():
                    continue
                after = {"lemo_calibrated": ("calibrate",), "lemo_predictor": ("predictors",)}
                missing = [name for name in after.get(arm, ()) if name not in names]
                inputs = {"calibrate": budgets, "predictors": predictors / "recall.json"}
                for name in missing:
                    if not inputs[name].exists():
                        raise UserError(
                            f"arm {arm} needs {inputs[name]}: run the prepare stage first"
                        )
                arguments = self.config_arguments(*arm_overrides(arm, out))
                stages.append(Stage(f"train_{arm}", "finetune.py", arguments, after.get(arm, ())))
                run_dir = out / "runs" / arm
                export = ["--checkpoint", str(run_dir), "--adapter-only", "--out", str(adapter)]
                stages.append(
                    Stage(f"export_{arm}", "export_to_pytorch.py", export, (f"train_{arm}",))
                )
        return stages

    def run_all(self, stages: list[Stage]) -> None:
        """Runs `stages`, up to --jobs at a time, each once all of its `after` that are in
        `stages` have ended; on a failure no new stage starts and the first failure is raised
        once the running ones end."""
        if self.args.jobs == 1:
            for stage in stages:
                self.run(stage)
            return
        names = {stage.name for stage in stages}
        waiting, running, ended = list(stages), {}, set()
        failure: UserError | None = None
        with concurrent.futures.ThreadPoolExecutor(self.args.jobs) as pool:
            while True:
                ready = [
                    stage
                    for stage in waiting
                    if all(name in ended or name not in names for name in stage.after)
                ]
                for stage in ready[: self.args.jobs - len(running)] if failure is None else []:
                    waiting.remove(stage)
                    running[pool.submit(self.run, stage, parallel=True)] = stage
                if not running:
                    break
                done, _ = concurrent.futures.wait(
                    running, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in done:
                    stage = running.pop(future)
                    try:
                        future.result()
                        ended.add(stage.name)
                    except UserError as error:
                        failure = failure or error
        if failure is not None:
            raise failure

    def run(self, stage: Stage, parallel: bool = False) -> None:
        command = [sys.executable, str(SCRIPTS / stage.script), *stage.arguments]
        text = shlex.join(["python", f"scripts/{stage.script}", *stage.arguments])
        with self.lock:
            print(f"\n[{stage.name}] {text}", file=sys.stderr, flush=True)
            with open(self.out / "commands.txt", "a") as log:
                log.write(text + "\n")
        started = time.perf_counter()
        if parallel:  # output to a log; each process takes device memory as it needs it
            env = dict(os.environ)
            if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env:
                env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
            log_path = self.out / "logs" / f"{stage.name}.log"
            log_path.parent.mkdir(exist_ok=True)
            with open(log_path, "w") as log:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            code = code.returncode
        else:
            code = subprocess.run(command).returncode
        seconds = time.perf_counter() - started
        if code != 0:
            where = f"; its output: {log_path}" if parallel else ""
            raise UserError(f"stage {stage.name} failed (exit {code}): {text}{where}")
        with self.lock:
            print(f"[{stage.name}] done in {seconds:.0f} s", file=sys.stderr, flush=True)
            self.timings[stage.name] = round(self.timings.get(stage.name, 0) + seconds, 1)
            if parallel:
                self.timings["jobs"] = max(self.timings.get("jobs", 1), self.args.jobs)
            self.timings_path.write_text(json.dumps(self.timings, indent=1) + "\n")


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
    reference = "dense" if "dense" in results else None
    table = markdown_table(results, reference=reference)
    title = f"{config.name}: perplexity"
    plot_perplexity(results, args.out / "perplexity.png", title=title, reference=reference)
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
    for arm in args.arms:  # and so do the assignments an arm's training stage is given
        apply_overrides(
            get_run_config(args.config), [*args.overrides, *arm_overrides(arm, args.out)]
        )
    stages = Stages(args)
    stages.run_all(stages.pending())
    if "eval" in args.stages:
        evaluate(args)
    if "report" in args.stages:
        report(args)


if __name__ == "__main__":
    run_cli(main)
