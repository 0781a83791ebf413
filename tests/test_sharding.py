"""Mesh sharding: the mesh config, the logical-axis rules, and (on 8 simulated CPU devices, in a
fresh process: this one's JAX already has its single device) models built and loaded sharded,
sharded steps that match one device, and checkpoints that restore under another mesh."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec
from tolerances import TOLERANCES

from lemo_jax.configs.overrides import apply_overrides
from lemo_jax.configs.run import MeshSection, RunConfig
from lemo_jax.configs.runs import get_run_config
from lemo_jax.errors import UserError
from lemo_jax.model.layers import param
from lemo_jax.train.loop import run_training
from lemo_jax.train.sharding import run_mesh, variable_spec

# One worker runs the whole module: its fixtures are 8-device runs of a minute or more.
pytestmark = pytest.mark.xdist_group("sharding")

CHECKS = Path(__file__).parent / "sharding_checks.py"
BUILD_CHECKS = Path(__file__).parent / "sharded_build_checks.py"
FINETUNE = Path(__file__).parents[1] / "scripts" / "finetune.py"
# The bar: fp32 loss and gradients within 1e-5 relative of one device.
TOLERANCE = TOLERANCES[jnp.dtype(jnp.float32)].forward
# The bar for a model built sharded against one built on one device (fp32): jit's fused random
# initialisation differs from eager by about one rounding (measured 4e-8 relative).
BUILD_TOLERANCE = 1e-6


def run_checks(*arguments: str, devices: int, script: Path = CHECKS) -> None:
    """`python SCRIPT ARGUMENTS` in a process whose JAX sees `devices` CPU devices."""
    environment = dict(os.environ, JAX_PLATFORMS="cpu")
    environment["XLA_FLAGS"] = (
        environment.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    )
    completed = subprocess.run(
        [sys.executable, str(script), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_mesh_shapes():
    assert MeshSection().shape(8) == (1, 8)
    assert MeshSection(data="auto", fsdp="4").shape(8) == (2, 4)
    assert MeshSection(data="8", fsdp="1").shape(8) == (8, 1)
    assert MeshSection().shape(1) == (1, 1)
    with pytest.raises(ValueError, match="needs 4 devices; 8 are present"):
        MeshSection(data="2", fsdp="2").shape(8)
    with pytest.raises(ValueError, match="needs a multiple of 4 devices; 6 are present"):
        MeshSection(data="auto", fsdp="4").shape(6)
    with pytest.raises(ValueError, match="cannot both be 'auto'"):
        MeshSection(data="auto", fsdp="auto")


def test_mesh_overrides():
    config = RunConfig(name="x", output_dir="/tmp/x")
    assert apply_overrides(config, ["mesh.data=2", "mesh.fsdp=auto"]).mesh == MeshSection("2")
    with pytest.raises(UserError, match=r"mesh\.fsdp='0' is not a positive integer"):
        apply_overrides(config, ["mesh.fsdp=0"])


def test_logical_rules():
    mesh = AbstractMesh((2, 4), ("data", "fsdp"))
    kernel = param(jnp.zeros((3, 64, 128)), ("layers", "embed", "mlp"))
    assert variable_spec(kernel, mesh) == PartitionSpec(None, "fsdp", None)
    odd = param(jnp.zeros((3, 6, 128)), ("layers", "embed", "mlp"))  # 6 does not split in 4
    assert variable_spec(odd, mesh) == PartitionSpec(None, None, None)
    adapter = param(jnp.zeros((3, 64, 8)), ("layers", "embed", "lora_rank"), kind=nnx.LoRAParam)
    assert variable_spec(adapter, mesh) == PartitionSpec()
    one = AbstractMesh((8, 1), ("data", "fsdp"))
    assert variable_spec(kernel, one) == PartitionSpec(None, None, None)
    assert jax.device_count() == 1  # the 8-device checks below need their own process


def test_pallas_attention_runs_on_each_device_own_sequences(tmp_path):
    """A Pallas kernel is opaque to XLA's partitioner: without `on_each_device` it gathers the
    whole batch onto every device and attends over all of it there."""
    out = tmp_path / "pallas_attention.json"
    run_checks("pallas_attention", str(out), devices=4)
    result = json.loads(out.read_text())
    assert result["devices"] == 4
    assert result["collectives"] == []
    assert result["output"] <= TOLERANCE and result["gradients"] <= TOLERANCE


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharding") / "equivalence.json"
    run_checks("equivalence", str(out), devices=8)
    return json.loads(out.read_text())


METHODS = ("lora", "full", "full+lemo", "full+pallas")  # +pallas: LeMo's Pallas kernels
CASES = [f"{method} {mesh}" for method in METHODS for mesh in ("2x4", "8x1")]


@pytest.mark.parametrize("case", CASES)
def test_sharded_step_matches_one_device(equivalence, case):
    result = equivalence[case]
    assert result["uses_lemo"] == ("lemo" in case or "pallas" in case)
    for name in ("loss", "gradients", "step_loss", "grad_norm", "updated_state"):
        if name in result:  # LeMo cases compare loss and gradients only
            assert result[name] <= TOLERANCE, (name, result[name])
    if case.endswith("2x4"):  # fsdp=4: a [L, D, F] weight holds a quarter of D per device
        assert result["kernel_spec"] == "P(None, 'fsdp', None)"
        layers, dim, hidden = result["kernel_shape"]
        assert result["kernel_shard"] == [layers, dim // 4, hidden]
    else:
        assert result["kernel_spec"] == "P(None, None, None)"
    if case.startswith("full"):  # Adam's moments follow their parameters
        assert result["moment_spec"] == result["kernel_spec"]
    else:  # adapters are replicated
        assert result["lora_a_spec"] == "P()"


@pytest.mark.parametrize("lemo", ["full+lemo", "full+pallas"])
@pytest.mark.parametrize("mesh", ["2x4", "8x1"])
def test_token_elimination_adds_no_communication(equivalence, lemo, mesh):
    """Elimination is per sequence: the LeMo step's collectives are the dense step's (the
    compiled programs' distinct collective kinds and shapes), with the XLA ops and with the
    Pallas kernels (which XLA cannot partition: they run under shard_map). Data parallelism
    alone (8x1) communicates only gradient all-reduces."""
    dense = {tuple(entry) for entry in equivalence[f"full {mesh}"]["collectives"]}
    with_lemo = {tuple(entry) for entry in equivalence[f"{lemo} {mesh}"]["collectives"]}
    assert with_lemo <= dense, sorted(with_lemo - dense)
    if mesh == "8x1":
        assert with_lemo == dense
        assert {kind for kind, _ in dense} == {"all-reduce"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("sharded_build")
    run_checks(str(directory / "hf"), str(directory / "built.json"), devices=8, script=BUILD_CHECKS)
    return json.loads((directory / "built.json").read_text())


MESH_NAMES = ["2x4", "1x8"]


def _assert_placed(placement: dict, count: int) -> None:
    """Every variable on the rules' sharding, and `count` of them split 1/fsdp per device."""
    assert placement["wrong_sharding"] == [], placement["wrong_sharding"]
    assert placement["uneven_shards"] == [], placement["uneven_shards"]
    assert placement["sharded"] == count


@pytest.mark.parametrize("mesh", MESH_NAMES)
def test_random_model_is_built_sharded(built, mesh):
    result, fsdp = built[mesh]["random"], built[mesh]["fsdp"]
    # The tiny model's 12 weights, embeddings and norms all have D, which fsdp divides.
    _assert_placed(result["placement"], 12)
    _assert_placed(built[mesh]["lora_placement"], 12)  # adapters are replicated
    # Every device holds exactly its 1/fsdp of the model, and so does the compiled
    # initialisation at its peak: its outputs plus temporaries (random bits) came to 2.0 times
    # the shards; one device building the whole model would need fsdp times that.
    share = result["total_bytes"] / fsdp
    assert sorted(set(result["device_bytes"].values())) == [share]
    assert len(result["device_bytes"]) == 8
    assert result["init_peak_bytes"] <= 2.5 * share


@pytest.mark.parametrize("mesh", MESH_NAMES)
def test_sharded_random_model_matches_one_device(built, mesh):
    result = built[mesh]
    assert result["random"]["mesh_difference"] == 0.0  # the same jitted init on a 1x1 mesh
    assert result["random"]["eager_difference"] <= BUILD_TOLERANCE
    assert result["random"]["loss_difference"] <= BUILD_TOLERANCE
    assert result["lora_difference"] <= BUILD_TOLERANCE


@pytest.mark.parametrize("mesh", MESH_NAMES)
def test_training_state_is_created_sharded(built, mesh):
    result, fsdp = built[mesh]["random"], built[mesh]["fsdp"]
    for moments in result["moment_placement"]:  # Adam's mu and nu follow their parameters
        _assert_placed(moments, 12)
    # Everything but the step, RNG key and Adam's count (replicated scalars) is 1/fsdp.
    share = result["state_bytes"] / fsdp
    for held in result["state_device_bytes"].values():
        assert share <= held <= share + 64


@pytest.mark.parametrize("mesh", MESH_NAMES)
def test_checkpoint_is_loaded_sharded(built, mesh):
    result, fsdp = built[mesh]["hf"], built[mesh]["fsdp"]
    _assert_placed(result["placement"], 12)
    assert result["lora_specs"] == ["P()"]
    assert result["difference"] == 0.0  # the same values as loaded on one device
    # Sampled at every tensor read and at the end: no device ever held more than its shards.
    peaks = result["load_peak_device_bytes"]
    assert len(peaks) == 8
    assert max(peaks.values()) == result["load_total_bytes"] / fsdp


def test_checkpoints_restore_across_meshes(tmp_path):
    # 8 devices: save under a 2x4 mesh; save from one device and restore on a 4-device mesh.
    run_checks("save", str(tmp_path), devices=8)
    one_to_four = json.loads((tmp_path / "one_to_four.json").read_text())
    assert one_to_four == {
        "error": 0.0,
        "kernel_spec": "P(None, 'fsdp', None)",
        "kernel_devices": 4,
    }
    # 1 device: the 2x4 checkpoint restores whole.
    run_checks("restore", str(tmp_path), str(tmp_path / "restored.json"), devices=1)
    eight_to_one = json.loads((tmp_path / "restored.json").read_text())
    assert eight_to_one["devices"] == 1 and eight_to_one["kernel_devices"] == 1
    assert eight_to_one["error"] == 0.0


def test_finetune_resumes_under_another_mesh(tmp_path):
    """scripts/finetune.py trains steps 1-2 on a 2x4 mesh of 8 devices; one device resumes to
    step 4. The losses are those of an uninterrupted one-device run."""
    text = tmp_path / "train.txt"
    text.write_text("\n".join(f"def f_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(800)))
    sets = [
        f"data.train={text}",
        "data.validation=holdout",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.seq_len=64",
        "train.batch_size=8",
        "train.eval_batches=1",
        "checkpoint.every=2",
    ]
    split = ["--set", f"output_dir={tmp_path / 'split'}", "--set", "train.steps=2"]
    for assignment in [*sets, "mesh.data=2", "mesh.fsdp=4"]:
        split += ["--set", assignment]
    run_checks("--no-progress", "--config", "tiny", *split, devices=8, script=FINETUNE)
    base = apply_overrides(get_run_config("tiny"), [*sets, "train.steps=4"])
    resumed = run_training(
        apply_overrides(base, [f"output_dir={tmp_path / 'split'}"]), show_progress=False
    )
    whole = run_training(
        apply_overrides(base, [f"output_dir={tmp_path / 'whole'}"]), show_progress=False
    )
    assert resumed.step == whole.step == 4
    split_losses, whole_losses = _losses(tmp_path / "split"), _losses(tmp_path / "whole")
    assert sorted(split_losses) == sorted(whole_losses) == [1, 2, 3, 4]
    for step, loss in whole_losses.items():
        assert abs(split_losses[step] - loss) <= TOLERANCE * abs(loss), step


def test_two_processes_train_like_one_device(tmp_path):
    """Two processes of 2 CPU devices each, started as two hosts would be (coordinator
    address, process count and index in the environment), train like one device."""
    text = tmp_path / "train.txt"
    text.write_text("\n".join(f"def f_{i}(x):\n    return x * {i}\n" for i in range(800)))
    sets = [
        f"data.train={text}",
        "data.validation=holdout",
        "train.seq_len=64",
        "train.batch_size=4",
        "train.steps=2",
        "train.eval_batches=1",
    ]
    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    processes = []
    for index in range(2):
        environment = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_PROCESS_COUNT="2",
            JAX_PROCESS_ID=str(index),
        )
        arguments = [f"output_dir={tmp_path / 'two'}", f"data.cache_dir={tmp_path / str(index)}"]
        command = [sys.executable, str(FINETUNE), "--no-progress", "--config", "tiny"]
        for assignment in [*sets, *arguments]:
            command += ["--set", assignment]
        processes.append(
            subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
        )
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    assert "4 x cpu on 2 hosts" in stderr
    config = apply_overrides(get_run_config("tiny"), [*sets, f"output_dir={tmp_path / 'one'}"])
    run_training(config, show_progress=False)
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == [1, 2]
    for step, loss in one.items():
        assert abs(two[step] - loss) <= TOLERANCE * abs(loss), step


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {record["step"]: record["loss"] for record in records if "loss" in record}


def test_batch_must_split_over_the_mesh():
    config = apply_overrides(get_run_config("tiny"), ["mesh.data=1", "mesh.fsdp=1"])
    assert run_mesh(config.mesh, 3).size == 1
    with pytest.raises(UserError, match="needs a multiple of 2 devices; 1 are present"):
        run_mesh(MeshSection(data="2", fsdp="1"), 2)
