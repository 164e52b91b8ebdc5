"""Multi-host runs: joining the JAX cluster, per-host data shards, and who may write files.

One Python process runs per host (TPU VM worker or GPU node). All processes run the same program;
each sees every device in ``jax.devices()`` but can only feed and read its own
``jax.local_devices()``. Three things differ between hosts and live here:

* **Joining** (:func:`initialize`): ``jax.distributed.initialize`` must run before any other JAX
  call touches devices. On a TPU pod slice JAX finds the coordinator itself (the TPU VM
  environment names every worker); on GPU clusters it needs a coordinator address, the process
  count and this process's id, from flags or the environment (``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) or, under SLURM / Open MPI, from the scheduler's own
  variables, which JAX reads.
* **Data** (:func:`data_shard`): each host loads a distinct slice of the global batch: the slice
  its devices own along the mesh's ``data`` axis. Hosts that hold the same ``data`` rows (model
  parallelism across hosts) load the same slice.
* **Writing** (:func:`is_primary`, :func:`primary_writes`): prompts and metrics are written by
  process 0 only, between two barriers so no host reads a half-written file or races ahead.
* **Failing** (:func:`exit_at_once_on_error`): an exception on one host must end the whole job,
  not leave it waiting in collectives that host will never join (see there).

Nothing here touches devices at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import traceback
from typing import Iterator, Mapping, Optional

import numpy as np

# JAX itself reads JAX_COORDINATOR_ADDRESS; the count and id variables are ours (JAX has none).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

# jax's defaults are 100 s and 300 s. Heartbeat: how long the coordination service waits before
# declaring a silent process dead and failing every other one (on GPU/TPU, survivors of a dead
# peer block in their collective until then; heartbeats come from a C++ thread, so a busy Python
# host still sends them). Shutdown: how long a process that exits waits for the others at the
# shutdown barrier; a finished run reaches it within seconds of the last collective.
HEARTBEAT_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 60
# Who this process is, for the failure message: asking jax (process_index) could first have to
# initialize the backend, which waits for every other process.
_joined_as = "this process"


@dataclasses.dataclass(frozen=True)
class ClusterPlan:
    """How this process joins (or does not join) a multi-process JAX run.

    kind: 'single' (no initialize call), 'explicit' (coordinator/count/id given), 'tpu_pod',
    'slurm' or 'ompi' (JAX auto-detects the three values from that environment).
    """
    kind: str
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    @property
    def multi_process(self) -> bool:
        return self.kind != "single"


def _int_or_none(value: Optional[str], name: str) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer.") from None


def detect_cluster(environ: Optional[Mapping[str, str]] = None, *,
                   coordinator_address: Optional[str] = None,
                   num_processes: Optional[int] = None,
                   process_id: Optional[int] = None) -> ClusterPlan:
    """Decides how to join the cluster from flags (first) and the environment; touches nothing.

    Raises ValueError when an explicit setup is incomplete or inconsistent, naming what is missing.
    """
    env = os.environ if environ is None else environ
    coordinator = coordinator_address or env.get(ENV_COORDINATOR) or None
    count = num_processes if num_processes is not None else _int_or_none(
        env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _int_or_none(
        env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)

    if coordinator is not None or count is not None or pid is not None:
        missing = [name for name, value in ((f"--coordinator_address / ${ENV_COORDINATOR}",
                                             coordinator),
                                            (f"--num_processes / ${ENV_NUM_PROCESSES}", count),
                                            (f"--process_id / ${ENV_PROCESS_ID}", pid))
                   if value is None]
        if missing:
            raise ValueError("explicit multi-process setup is incomplete: set "
                             + ", ".join(missing) + " as well (or none of them).")
        if ":" not in coordinator:
            raise ValueError(f"coordinator address {coordinator!r} needs a port: HOST:PORT, "
                             "e.g. node0:12345.")
        if count < 1 or not 0 <= pid < count:
            raise ValueError(f"process id {pid} must be in [0, {count}) for {count} processes.")
        if count == 1:
            return ClusterPlan("single")
        return ClusterPlan("explicit", coordinator, count, pid)

    # Cloud TPU VMs list the slice's workers; one worker is a single-host slice (v3-8, v4-8...).
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    slices = _int_or_none(env.get("MEGASCALE_NUM_SLICES"), "MEGASCALE_NUM_SLICES") or 1
    if len([w for w in workers.split(",") if w.strip()]) > 1 or slices > 1:
        return ClusterPlan("tpu_pod")
    if "SLURM_JOB_ID" in env:
        tasks = _int_or_none(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS"), "SLURM_NTASKS")
        if tasks is not None and tasks > 1:
            return ClusterPlan("slurm")
    ompi = _int_or_none(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE")
    if ompi is not None and ompi > 1:
        return ClusterPlan("ompi")
    return ClusterPlan("single")


def initialize(plan: Optional[ClusterPlan] = None, **flags) -> ClusterPlan:
    """Joins the cluster described by ``plan`` (default: :func:`detect_cluster` of ``flags``).

    Must run before anything else queries devices. Safe to call twice: a second call is a no-op.
    """
    import jax  # local: callers set XLA/JAX environment variables before the first import
    global _joined_as

    plan = plan or detect_cluster(**flags)
    if not plan.multi_process or jax.distributed.is_initialized():
        return plan
    # CPU processes exchange collectives through gloo: jax's default in every release setup.py
    # admits (jax>=0.10.2), so nothing to configure here.
    timeouts = dict(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
                    shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    if plan.kind == "explicit":
        jax.distributed.initialize(coordinator_address=plan.coordinator_address,
                                   num_processes=plan.num_processes,
                                   process_id=plan.process_id, **timeouts)
    else:
        # TPU pods, SLURM and Open MPI: JAX's cluster detection fills in all three values.
        jax.distributed.initialize(**timeouts)
    _joined_as = (f"process {plan.process_id} of {plan.num_processes}"
                  if plan.kind == "explicit" else f"a process of the {plan.kind} job")
    return plan


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Adds --coordinator_address/--num_processes/--process_id (all optional) to a CLI parser."""
    group = parser.add_argument_group("multi-host (GPU clusters; TPU pods need none)")
    group.add_argument("--coordinator_address", default=None,
                       help=f"HOST:PORT of process 0 (default ${ENV_COORDINATOR}).")
    group.add_argument("--num_processes", type=int, default=None,
                       help=f"number of processes (default ${ENV_NUM_PROCESSES}).")
    group.add_argument("--process_id", type=int, default=None,
                       help=f"this process's id, 0-based (default ${ENV_PROCESS_ID}).")


def initialize_from_args(args: argparse.Namespace) -> ClusterPlan:
    """:func:`initialize` with the values of :func:`add_flags`' flags."""
    return initialize(coordinator_address=args.coordinator_address,
                      num_processes=args.num_processes, process_id=args.process_id)


def process_index() -> int:
    import jax
    return jax.process_index()


def process_count() -> int:
    import jax
    return jax.process_count()


def is_primary() -> bool:
    """True on process 0 only: the one process that writes prompt files, metrics and logs."""
    return process_index() == 0


@dataclasses.dataclass(frozen=True)
class DataShard:
    """This host's slice of every global batch: rows [index * n, (index + 1) * n) of count."""
    index: int
    count: int

    def rows(self, global_batch_size: int) -> slice:
        if global_batch_size % self.count:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                             f"{self.count} data shards (hosts along the 'data' mesh axis).")
        per_host = global_batch_size // self.count
        return slice(self.index * per_host, (self.index + 1) * per_host)


def data_shard_from_process_grid(process_grid: np.ndarray, data_axis: int,
                                 process_id: int) -> DataShard:
    """Which data shard ``process_id`` loads, given each mesh device's owning process.

    process_grid: int array shaped like the mesh, entry = process index of that device.
    A process's shard is the set of ``data`` coordinates its devices occupy; processes with the
    same set share a shard. The training streams give each host one contiguous slice of the
    global batch and ``jax.make_array_from_process_local_data`` lays a host's rows out over its
    'data' coordinates in order, so the sets must be contiguous ranges, disjoint and equally
    large. ``jax.make_mesh`` orders devices by physical topology, which does not promise this
    on every TPU slice shape; ValueError (naming the rows) when it does not hold.
    """
    grid = np.moveaxis(np.asarray(process_grid), data_axis, 0)
    rows_of = {}
    for row in range(grid.shape[0]):
        for proc in np.unique(grid[row]):
            rows_of.setdefault(int(proc), set()).add(row)
    if process_id not in rows_of:
        raise ValueError(f"process {process_id} owns no device of the mesh.")
    scattered = {p: sorted(r) for p, r in rows_of.items() if max(r) - min(r) + 1 != len(r)}
    if scattered:
        raise ValueError("the mesh's 'data' axis interleaves hosts: each host's devices must "
                         "occupy one contiguous range of data rows, but process(es) "
                         + "; ".join(f"{p} hold rows {r}" for p, r in sorted(scattered.items()))
                         + ". Pick another mesh shape (e.g. keep 'model' within a host).")
    groups = sorted({frozenset(rows) for rows in rows_of.values()}, key=min)
    covered = [r for g in groups for r in g]
    if len(covered) != len(set(covered)) or len({len(g) for g in groups}) != 1:
        raise ValueError("the mesh's 'data' axis splits hosts unevenly: each host's devices must "
                         "cover whole, equal, disjoint data rows; got "
                         f"{[sorted(g) for g in groups]}."
                         " Build the mesh with prompt_t5x.parallel.sharding.make_mesh.")
    return DataShard(groups.index(frozenset(rows_of[process_id])), len(groups))


def data_shard(mesh) -> DataShard:
    """This process's :class:`DataShard` for a ``jax.sharding.Mesh`` with a 'data' axis."""
    grid = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
    return data_shard_from_process_grid(grid, mesh.axis_names.index("data"), process_index())


def barrier(name: str) -> None:
    """Blocks until every process reaches the barrier called ``name``; free on one process."""
    if process_count() == 1:
        return
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def primary_writes(name: str) -> Iterator[bool]:
    """``with primary_writes('save_prompt_100') as write: if write: ...``.

    Yields True on process 0 only. The barrier before makes every host finish the step whose
    result is saved; the barrier after keeps other hosts from reading the file (or exiting, which
    tears down the cluster) before process 0 has finished writing it.
    """
    barrier(f"{name}:before")
    try:
        yield is_primary()
    finally:
        barrier(f"{name}:after")


def broadcast_from_primary(value: int) -> int:
    """Process 0's ``value`` on every process (a collective: all must call it); one process
    gets its own back. For decisions every host must take the same way."""
    if process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def _exit_code(error: BaseException) -> int:
    from prompt_t5x.base.errors import EXIT_STOPPED, StoppedCleanly, UsageError
    if isinstance(error, UsageError):
        return 2
    if isinstance(error, StoppedCleanly):
        return EXIT_STOPPED
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) and error.code else 1
    return 130 if isinstance(error, KeyboardInterrupt) else 1


@contextlib.contextmanager
def exit_at_once_on_error(prog: str) -> Iterator[None]:
    """In a joined multi-process run, any exception ends this process at once (``os._exit``).

    Raising normally would run jax's exit handler, which waits at the coordination service's
    shutdown barrier for processes that are themselves waiting for this one in their next
    collective: the whole job hangs for minutes. Exiting at once closes this process's
    connections, so the others fail in that collective (or when the coordinator misses this
    process's heartbeats) and exit through here too. The traceback (and a usage error's one-line
    message) is printed and flushed first. Outside a joined cluster it re-raises unchanged.
    """
    try:
        yield
    except BaseException as error:
        import jax
        if not jax.distributed.is_initialized():
            raise
        from prompt_t5x.base.errors import UsageError
        traceback.print_exception(error)
        if isinstance(error, UsageError):
            print(f"{prog}: error: {error}", file=sys.stderr)
        print(f"{prog}: {_joined_as} failed; exiting now so the other processes stop too.",
              file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_code(error))
