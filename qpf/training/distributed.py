"""Devices, meshes and multi-host start-up for data-parallel training.

Data parallelism is GSPMD over a one-axis ``('data',)`` mesh: params are replicated, each
batch is sharded along its rows, and XLA inserts the gradient all-reduce. Each process feeds
only its own rows (``make_array_from_process_local_data``), so the same code runs on one
CPU, on all local GPUs, and across machines after ``jax.distributed.initialize``. Steps are
traced under the mesh (``under_mesh``) so that ops with no partitioning rule (the Pallas scan)
can run in ``shard_map`` over the data axis instead of being gathered.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qpf.config import ConfigError
from qpf.ops.sharding import DATA_AXIS

F = TypeVar("F", bound=Callable[..., Any])


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Join JAX's distributed runtime when several processes are requested.

    Explicit arguments win; otherwise the standard environment (``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, or a cluster JAX auto-detects such as SLURM)
    decides. A single process with no coordinator does nothing.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if num_processes is not None and (isinstance(num_processes, bool) or num_processes < 1):
        raise ConfigError(f"--num-processes = {num_processes} is invalid: allowed an int >= 1")
    if process_id is not None and not 0 <= process_id < (num_processes or 1):
        raise ConfigError(
            f"--process-id = {process_id} is invalid: allowed 0 <= id < --num-processes "
            f"({num_processes})"
        )
    if coordinator_address is None and (num_processes is None or num_processes == 1):
        return
    if coordinator_address is None or num_processes is None or process_id is None:
        raise ValueError(
            "multi-process training needs --coordinator-address HOST:PORT, --num-processes N "
            "and --process-id I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def make_mesh(data_parallel: bool) -> Mesh:
    """A ``('data',)`` mesh over all devices (data_parallel) or over the first device."""
    devices = jax.devices() if data_parallel else jax.local_devices()[:1]
    if not data_parallel and jax.process_count() > 1:
        raise ValueError("several processes need data_parallel=True (--data-parallel)")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def under_mesh(fn: F, mesh: Mesh) -> F:
    """``fn`` traced with ``mesh`` as the context mesh (wrap it before ``jax.jit``).

    GSPMD needs no context mesh, but ops without a partitioning rule do: the Pallas scan
    (``kernels.oscillatory_scan``) reads the context mesh to run itself in ``shard_map`` over
    the data axis, each device on its own rows. The mesh is set only while ``fn`` traces.
    """

    @functools.wraps(fn)
    def traced_under_mesh(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced_under_mesh  # type: ignore[return-value]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays sharded over the mesh's data axis."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def check_batch_divisible(batch_size: int, mesh: Mesh, grad_accum: int) -> None:
    """The global batch must split evenly into micro-batches, each over all devices.

    Micro-batch i is rows i::grad_accum (``step.split_micro_batches``), so each device's
    contiguous block of batch_size / n rows holds batch_size / (n * grad_accum) rows of every
    micro-batch: no row moves between devices.
    """
    n = mesh.devices.size
    if batch_size % (n * grad_accum):
        raise ValueError(
            f"batch size {batch_size} must be divisible by the number of devices ({n}) times "
            f"optim.grad_accum ({grad_accum}), so every micro-batch splits over the devices; "
            "change --batch-size or --grad-accum"
        )


def to_host(tree: Any) -> Any:
    """Fetch (replicated) arrays to host numpy."""
    return jax.device_get(tree)
