"""Starting JAX's multi-host runtime: one process per host, all devices in one global mesh.

Every host runs the same command; `jax.distributed.initialize` connects the processes through
the coordinator (process 0's address), after which `jax.devices()` lists every host's devices
and the mesh (`lemo_jax.train.sharding`) spans them. Nothing here launches processes: a
cluster manager or one shell per host does.
"""

from __future__ import annotations

import os

import jax

from lemo_jax.errors import UserError

# Read here, as torchrun-style launchers name them; JAX itself reads only the address.
COORDINATOR = "JAX_COORDINATOR_ADDRESS"
PROCESS_COUNT = ("JAX_PROCESS_COUNT", "JAX_NUM_PROCESSES")
PROCESS_ID = "JAX_PROCESS_ID"


def _first(names: tuple[str, ...]) -> str | None:
    return next((os.environ[name] for name in names if os.environ.get(name)), None)


def initialize_distributed() -> bool:
    """Connects this process to the others when the environment says there are several.

    `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_PROCESS_COUNT` and `JAX_PROCESS_ID` name them
    explicitly; otherwise a SLURM job of several tasks is detected by JAX itself. Must run
    before anything touches a device. True if the process is now one of several.
    """
    address, count = os.environ.get(COORDINATOR), _first(PROCESS_COUNT)
    index = os.environ.get(PROCESS_ID)
    if address or count or index:
        if not (address and count and index):
            raise UserError(
                f"a multi-host run needs all of {COORDINATOR}, {PROCESS_COUNT[0]} and "
                f"{PROCESS_ID}; got {address=}, {count=}, {index=}"
            )
        if not (count.isdigit() and index.isdigit() and int(index) < int(count)):
            raise UserError(f"{PROCESS_COUNT[0]}={count} and {PROCESS_ID}={index} are not valid")
        if int(count) == 1:
            return False
        jax.distributed.initialize(address, num_processes=int(count), process_id=int(index))
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()  # SLURM's variables name the coordinator and the ranks
        return True
    return False
