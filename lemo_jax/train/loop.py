"""The host loop of a fine-tuning run: resume, train, evaluate, checkpoint, report, export.

Everything numerical happens in the jitted `train_step`; this loop owns the data position,
logging cadence, checkpoints and signals. Re-running the same command resumes from the newest
readable checkpoint and reproduces the losses of an uninterrupted run (same data order from the
saved position, same RNG from the step).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from lemo_jax.configs.run import RunConfig
from lemo_jax.data.pipeline import ShuffledSampler, TokenWindows, prepare_data
from lemo_jax.errors import UserError
from lemo_jax.io.checkpoint import RunCheckpoints
from lemo_jax.lemo.budgets import LayerBudgets, elimination_plan, executed_budgets
from lemo_jax.lemo.layer import EliminationPlan
from lemo_jax.model.lora import trainable_filter
from lemo_jax.train.observe import (
    MetricsLog,
    compiled_memory_gib,
    device_memory_limit_gib,
    peak_device_memory_gib,
)
from lemo_jax.train.optimizer import learning_rate_schedule, make_optimizer
from lemo_jax.train.setup import (
    attach_predictors,
    build_model,
    check_run_directory,
    write_run_config,
)
from lemo_jax.train.sharding import (
    global_array,
    replicated,
    run_mesh,
    sharded_train_state,
    step_shardings,
)
from lemo_jax.train.signals import StopRequest
from lemo_jax.train.step import (
    StepShardings,
    TrainState,
    init_state,
    make_eval_step,
    make_train_step,
)


@dataclasses.dataclass
class RunResult:
    directory: Path
    step: int
    completed: bool
    stop_signal: int | None = None
    validation_loss: float | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    exported_to: Path | None = None


def _saved_tree(state: TrainState) -> dict:
    # Frozen base weights are not checkpointed: they come from the base model on every start.
    return dict(
        step=state.step, trainable=state.trainable, opt_state=state.opt_state, rng=state.rng
    )


def evaluate(
    eval_step, state: TrainState, windows: TokenWindows, count: int, put=jnp.asarray
) -> float:
    """Mean next-token loss over the first `count` validation windows, one at a time; `put`
    moves a window's host array to the devices."""
    total, tokens = 0.0, 0.0
    for index in range(min(count, len(windows))):
        nll, predicted = eval_step(state, put(windows.batch(np.array([index]))))
        total, tokens = total + float(nll), tokens + float(predicted)
    return total / tokens


@dataclasses.dataclass
class _Session:
    """What one invocation of a run holds besides the training state."""

    config: RunConfig
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    train_windows: TokenWindows
    validation_windows: TokenWindows
    checkpoints: RunCheckpoints
    show_progress: bool
    plan: EliminationPlan | None
    budgets: LayerBudgets | None
    shardings: StepShardings | None = None  # None: one device, no mesh

    def __post_init__(self):
        self.eval_step = make_eval_step(self.graphdef, self.config.train)
        self.kept_fraction = 1.0 if self.budgets is None else self.budgets.kept_fraction()[1]

    def log_budgets(self, log: MetricsLog, step: int) -> None:
        """One record with the kept fraction of every layer (attention and MLP)."""
        if self.budgets is not None:
            log.write(
                dict(
                    step=step,
                    attention_kept_per_layer=self.budgets.kept_fraction()[0],
                    mlp_kept_per_layer=self.budgets.kept_fraction("mlp")[0],
                )
            )

    def validation_loss(self, state: TrainState) -> float:
        train = self.config.train
        put = jnp.asarray
        if self.shardings is not None:  # a replicated window: every process reads it whole
            put = functools.partial(global_array, sharding=replicated(self.shardings.batch.mesh))
        count = train.eval_batches * train.batch_size
        return evaluate(self.eval_step, state, self.validation_windows, count, put)

    def is_dense(self, step: int) -> bool:
        """Whether training step `step` (1-based) runs without elimination: always without
        LeMo, and in the last `lemo.dense_final_steps` steps with it."""
        if self.plan is None:
            return True
        return step > self.config.train.steps - self.config.lemo.dense_final_steps

    def too_large(self, dense: bool, needed_gib: float, limit_gib: float) -> str:
        """The one-line error for a training step whose compiled memory exceeds the device's."""
        config = self.config
        fixes = [] if config.train.remat == "full" else ["train.remat=full"]
        if dense and self.plan is not None:
            what = f"the dense tail (lemo.dense_final_steps={config.lemo.dense_final_steps})"
            fixes.insert(0, "lemo.dense_final_steps=0")
        else:
            what = "the LeMo training step" if self.plan is not None else "the training step"
            fixes.append("a shorter train.seq_len")
            if self.plan is None:
                fixes.append("LeMo (lemo.enabled=true)")
        return (
            f"{what} needs {needed_gib:.1f} GiB per device (compiled) at "
            f"train.seq_len={config.train.seq_len}, more than the {limit_gib:.1f} GiB this "
            f"process may use; try {' or '.join(fixes)}"
        )

    def compile_step(self, state: TrainState, dense: bool = False):
        train = self.config.train
        use_dropout = train.method == "lora" and self.config.lora.dropout > 0
        step = make_train_step(
            self.graphdef,
            self.optimizer,
            self.schedule,
            train,
            use_dropout=use_dropout,
            plan=None if dense else self.plan,
            shardings=self.shardings,
        )
        shape = (train.grad_accum, train.batch_size, train.seq_len)
        return step.lower(state, jax.ShapeDtypeStruct(shape, jnp.int32)).compile()

    def train(
        self, state: TrainState, record: dict, log: MetricsLog, stop: StopRequest
    ) -> tuple[TrainState, dict]:
        config, train = self.config, self.config.train
        start, position = int(state.step), int(record["data_position"])
        # One executable per kind of step, with its compiled memory estimate. Where the device
        # states its memory, every kind the run will need is compiled now and checked against
        # it, so a dense tail that cannot fit fails before the LeMo steps, not hours into them;
        # elsewhere (CPU) each kind compiles when first needed.
        compiled: dict[bool, jax.stages.Compiled] = {}
        estimate: dict[bool, float] = {}

        def compile_kind(dense: bool) -> None:
            compiled[dense] = self.compile_step(state, dense)
            estimate[dense] = compiled_memory_gib(compiled[dense])
            limit = device_memory_limit_gib()
            if limit is not None and estimate[dense] > limit:
                raise UserError(self.too_large(dense, estimate[dense], limit))

        if start < train.steps and device_memory_limit_gib() is not None:
            for dense in dict.fromkeys(self.is_dense(s) for s in (start + 1, train.steps)):
                compile_kind(dense)
        self.log_budgets(log, start)
        sampler = ShuffledSampler(len(self.train_windows), train.seed)
        per_step = train.grad_accum * train.batch_size
        progress = tqdm(
            total=train.steps,
            initial=start,
            desc=config.name,
            unit="step",
            disable=not self.show_progress,
            dynamic_ncols=True,
        )
        last_time, last_step = time.perf_counter(), start
        for step in range(start + 1, train.steps + 1):
            batch = self.train_windows.batch(sampler.indices(position, per_step))
            batch = batch.reshape(train.grad_accum, train.batch_size, -1)  # [A, B, T]
            if self.shardings is not None:  # every process reads the global batch
                batch = global_array(batch, self.shardings.batch)
            position += per_step
            dense = self.is_dense(step)
            if (
                dense
                and self.plan is not None
                and (step == start + 1 or not self.is_dense(step - 1))
            ):
                print(f"LeMo: dense from step {step} of {train.steps}", file=sys.stderr)
            if dense not in compiled:
                compile_kind(dense)
            state, metrics = compiled[dense](state, batch)
            # Read the stop flag once: a signal arriving later in this iteration is seen in the
            # next one, so a step is never left without its checkpoint.
            stopping = stop.requested is not None
            is_last = step == train.steps or stopping
            if step % train.log_every == 0 or is_last:
                metrics = {key: float(value) for key, value in jax.device_get(metrics).items()}
                now = time.perf_counter()
                metrics["tokens_per_s"] = metrics["tokens"] * (step - last_step) / (now - last_time)
                last_time, last_step = now, step
                peak = peak_device_memory_gib()  # None without device statistics (CPU)
                is_peak = peak is not None
                metrics["memory_gib"] = peak if is_peak else estimate[dense]
                metrics["kept_fraction"] = 1.0 if dense else self.kept_fraction
                log.write(dict(step=step, **metrics))
                progress.set_postfix(_postfix(metrics, is_peak), refresh=False)
            if train.eval_every and step % train.eval_every == 0 and not is_last:
                log.write(dict(step=step, validation_loss=self.validation_loss(state)))
            progress.update(1)
            if step % config.checkpoint.every == 0 or is_last:
                record = dict(record, data_position=position)
                self.checkpoints.save(step, _saved_tree(state), record)
            if stopping:
                break
        progress.close()
        return state, record


def run_training(config: RunConfig, *, show_progress: bool = True) -> RunResult:
    train = config.train
    directory = check_run_directory(config)
    mesh = run_mesh(config.mesh, train.batch_size)
    show_progress = show_progress and jax.process_index() == 0
    lora = config.lora if train.method == "lora" else None
    is_sharded = mesh.size > 1  # one device keeps the unsharded path
    model, tokenizer = build_model(
        config.model,
        lora,
        seq_len=train.seq_len,
        seed=train.seed,
        mesh=mesh if is_sharded else None,  # created on its shardings: never whole on a device
    )
    attach_predictors(model, config.lemo)
    train_windows, validation_windows = prepare_data(
        config.data, tokenizer, train.seq_len, show_progress=show_progress
    )
    if jax.process_index() == 0:  # one writer; the others read the same directory
        write_run_config(directory, config)
    optimizer, num_layers = make_optimizer(train), model.config.num_layers
    shardings = None
    if is_sharded:  # checkpoints then restore onto this mesh
        graphdef, state = sharded_train_state(
            model, trainable_filter(lora), optimizer, train.seed, mesh
        )
        shardings = step_shardings(state, mesh)
    else:
        graphdef, state = init_state(model, trainable_filter(lora), optimizer, train.seed)
    del model  # the state holds the arrays
    checkpoints = RunCheckpoints(directory / "checkpoints", keep=config.checkpoint.keep)
    plan, budgets = _elimination(config, num_layers, train.seq_len)
    session = _Session(
        config,
        graphdef,
        optimizer,
        learning_rate_schedule(train),
        train_windows,
        validation_windows,
        checkpoints,
        show_progress,
        plan,
        budgets,
        shardings,
    )
    record = {"data_position": 0}
    restored = checkpoints.restore_latest(_saved_tree(state))
    if restored is not None:
        _, tree, record = restored
        state = state.replace(**tree)
    start = int(state.step)
    result = RunResult(directory=directory, step=start, completed=start >= train.steps)
    if config.perplexity_before_after:
        if "perplexity_before" not in record:
            record["perplexity_before"] = math.exp(session.validation_loss(state))
        result.perplexity_before = record["perplexity_before"]

    log = MetricsLog(directory, resume_step=start, is_writer=jax.process_index() == 0)
    with StopRequest() as stop:
        state, record = session.train(state, record, log, stop)
    checkpoints.close()
    result.step = int(state.step)
    result.completed = result.step >= train.steps
    result.stop_signal = stop.requested
    if result.completed:
        result.validation_loss = session.validation_loss(state)
        if start < train.steps:  # a finished run that is re-run only reports
            log.write(dict(step=result.step, validation_loss=result.validation_loss))
        if config.perplexity_before_after:
            result.perplexity_after = math.exp(result.validation_loss)
        if config.export_after:
            result.exported_to = _export(graphdef, state, directory, tokenizer)
    log.close()
    return result


def _elimination(config: RunConfig, num_layers: int, seq_len: int):
    """The static LeMo plan and the per-layer budgets (None, None without LeMo)."""
    if not config.lemo.enabled:
        return None, None
    budgets = executed_budgets(config.lemo, num_layers, seq_len)
    print(f"LeMo: {budgets.summary()}", file=sys.stderr)
    return elimination_plan(config.lemo, num_layers, seq_len), budgets


def _postfix(metrics: dict, is_device_peak: bool) -> dict:
    memory = f"{metrics['memory_gib']:.1f}G" + ("" if is_device_peak else " (est.)")
    if jax.device_count() > 1:  # the largest device's, not the sum
        memory += " per device"
    return {
        "kept": f"{metrics['kept_fraction']:.2f}",
        "loss": f"{metrics['loss']:.4f}",
        "tok/s": f"{metrics['tokens_per_s']:,.0f}",
        "lr": f"{metrics['learning_rate']:.2e}",
        "mem": memory,
    }


def _export(graphdef, state: TrainState, directory: Path, tokenizer) -> Path | None:
    from lemo_jax.io.export import export_hf

    target = directory / "hf"
    if target.exists():
        print(f"{target} exists; not exporting again", file=sys.stderr)
        return target
    model = nnx.merge(graphdef, state.trainable, state.frozen)
    return export_hf(model, target, dtype="bfloat16", tokenizer=tokenizer)
