"""Device mesh and T5X's logical-axis rules: which mesh axis each array dimension is split over.

Two steps, as in T5X. The model names every parameter and activation dimension with a *logical*
axis ('embed', 'mlp', 'heads', 'vocab', 'batch', ...: ``t5.logical_axes``). A rule table maps each
logical name to a *mesh* axis of a 2-D device mesh ``('data', 'model')`` or to None (replicated).

T5X's standard tables (``partitioning.standard_logical_axis_rules`` in t5x) have two switches:

* ``parameter_partitioning_dims=2`` additionally splits the weights' 'embed' dimension over
  'data': every weight is sharded over *all* devices (ZeRO-3 / FSDP style), so the frozen model
  costs 1/N of its size per device. XLA all-gathers each layer's weights when it runs.
* ``activation_partitioning_dims=2`` splits activations' 'embed' over 'model' as well as 'batch'
  over 'data'.

Prompt tuning adds the prompt's own axes, always replicated: the prompt is [100, 4096] at most,
and replicating it means its update needs no collective beyond the gradient all-reduce. (The
prompt-tuning paper's code names the prompt ('prompt', 'embed'), which any table that shards
'embed' would split; ours is named ('prompt', 'prompt_embed') so it stays whole.) A task bank's
leading 'tasks' axis (``methods.task_bank``) and SPT's prompt 'memory' are replicated too.

Mesh axes are created as ``AxisType.Auto``: flax's logical constraints are
``with_sharding_constraint`` calls that Explicit axes reject.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
Rules = Tuple[Tuple[str, Optional[str]], ...]
MESH_AXES = ("data", "model")

# Logical names of the trainable prompt [prompt_length, embed]; both replicated on every mesh.
PROMPT_LOGICAL_AXES = P("prompt", "prompt_embed")
PROMPT_RULES: Rules = (("prompt", None), ("prompt_embed", None), ("tasks", None),
                       ("memory", None))


def standard_logical_axis_rules(activation_partitioning_dims: int = 1,
                                parameter_partitioning_dims: int = 1,
                                additional_rules: Sequence[Tuple[str, Optional[str]]] = ()
                                ) -> Rules:
    """T5X's standard rule table, same entries in the same order (order is priority).

    A mesh axis is used at most once per array, and rules are tried in order: with both dims 2,
    'embed' of an activation [batch, length, embed] gets 'model' (batch already took 'data'),
    while 'embed' of a weight [embed, mlp] gets 'data' (mlp already took 'model').
    """
    dims = (activation_partitioning_dims, parameter_partitioning_dims)
    if dims not in ((1, 1), (1, 2), (2, 1), (2, 2)):
        raise ValueError(f"activation_partitioning_dims={dims[0]}, parameter_partitioning_dims="
                         f"{dims[1]}: each must be 1 or 2.")
    sharded = [("batch", "data"), ("vocab", "model")]
    if dims == (1, 1):
        # T5X lists 'embed' third in this table only; its place changes nothing (no other rule
        # maps to None-vs-axis for 'embed'), but keep the order identical anyway.
        sharded += [("embed", None)]
    sharded += [("mlp", "model"), ("heads", "model"), ("kv", None), ("joined_kv", "model")]
    if activation_partitioning_dims == 2:
        sharded += [("embed", "model")]
    if parameter_partitioning_dims == 2:
        sharded += [("embed", "data")]
    replicated = [(name, None) for name in ("relpos_buckets", "abspos_buckets", "length",
                                            "layers", "stack", "mlp_activations")]
    return tuple(sharded + replicated + [tuple(r) for r in additional_rules])


def rules_or_default(rules: Optional[Sequence[Tuple[str, Optional[str]]]]) -> Rules:
    """``rules`` as a tuple, or the default table (:func:`logical_axis_rules`) when None."""
    return tuple(rules) if rules is not None else logical_axis_rules()


def logical_axis_rules(activation_partitioning_dims: int = 1,
                       parameter_partitioning_dims: int = 1,
                       additional_rules: Sequence[Tuple[str, Optional[str]]] = ()) -> Rules:
    """The standard T5X table plus the (replicated) prompt axes: what prompt_t5x runs with."""
    return standard_logical_axis_rules(activation_partitioning_dims, parameter_partitioning_dims,
                                       tuple(PROMPT_RULES) + tuple(additional_rules))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """A ('data', 'model') mesh shape and T5X's two partitioning switches.

    data = -1 means "every device not used by 'model'".
    """
    data: int = -1
    model: int = 1
    activation_partitioning_dims: int = 1
    parameter_partitioning_dims: int = 1

    @classmethod
    def parse(cls, text: str, **switches) -> "MeshConfig":
        """'4x2' -> data 4, model 2; '-1x8' or 'autox8' -> data fills the rest."""
        match = re.fullmatch(r"\s*(-1|auto|\d+)\s*[x×,]\s*(\d+)\s*", text.lower())
        if not match:
            raise ValueError(f"mesh {text!r} is not DATAxMODEL (e.g. '4x2', '-1x8', 'autox1').")
        data = -1 if match.group(1) in ("-1", "auto") else int(match.group(1))
        return cls(data=data, model=int(match.group(2)), **switches)

    def shape(self, num_devices: int) -> Tuple[int, int]:
        """(data, model) sizes on ``num_devices`` devices; error if they do not multiply out."""
        if self.model < 1 or self.data == 0 or self.data < -1:
            raise ValueError(f"mesh sizes must be positive (data may be -1): {self}")
        if num_devices % self.model:
            raise ValueError(f"model={self.model} does not divide the {num_devices} devices.")
        data = num_devices // self.model if self.data == -1 else self.data
        if data * self.model != num_devices:
            raise ValueError(f"mesh {data}x{self.model} needs {data * self.model} devices, but "
                             f"{num_devices} are present; use data=-1 to fill the rest.")
        return data, self.model

    def rules(self, additional_rules: Sequence[Tuple[str, Optional[str]]] = ()) -> Rules:
        return logical_axis_rules(self.activation_partitioning_dims,
                                  self.parameter_partitioning_dims, additional_rules)


def default_mesh_config(platform: str, local_device_count: int = 1) -> MeshConfig:
    """Defaults per backend; override with ``--mesh DATAxMODEL`` for big models.

    * tpu: pure data parallel with 2-D parameter partitioning (weights' 'embed' over 'data'):
      ICI links every chip of a slice, so all-gathering each layer's frozen weights is cheap and
      every chip holds 1/N of the model. T5X's XXL configs add 'model' on top (see docs/scaling.md).
    * gpu: tensor ('model') parallel inside a node over NVLink, data parallel across nodes, whose
      network is an order of magnitude slower than NVLink; 1-D parameter partitioning.
    * cpu: pure data parallel, weights replicated (host RAM is one memory anyway; this is the
      layout of the tests' fake devices).
    """
    if platform == "tpu":
        return MeshConfig(data=-1, model=1, parameter_partitioning_dims=2)
    if platform in ("gpu", "cuda", "rocm"):
        return MeshConfig(data=-1, model=max(1, local_device_count))
    if platform == "cpu":
        return MeshConfig(data=-1, model=1)
    raise ValueError(f"no default mesh for platform {platform!r} (tpu, gpu or cpu).")


def make_mesh(config: MeshConfig, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ('data', 'model') mesh with Auto axis types over ``devices`` (default: all devices).

    ``jax.make_mesh`` orders devices by the physical topology, so 'model' groups neighbouring
    chips. It does not promise that each host's devices form one contiguous block of 'data'
    rows, which training's per-host data slices need: ``distributed.data_shard`` checks that
    (``prompt-t5x train`` calls it when it builds the mesh) and names the offending hosts.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def single_device_mesh(device=None) -> Mesh:
    """The 1x1 mesh of one device (default: the first). One device is not a special case: a run
    on it is partitioned like any other, over this mesh, so there is one execution path."""
    return make_mesh(MeshConfig(1, 1), [jax.devices()[0] if device is None else device])


def mesh_context(mesh: Mesh):
    """Context that makes ``mesh`` the one flax's logical constraints resolve against."""
    return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else jax.sharding.use_mesh(mesh)


def logical_to_mesh_spec(logical: Optional[P], rules: Rules, where: str = "") -> P:
    """PartitionSpec of logical names -> PartitionSpec of mesh axes (None = replicated dim).

    Unlike flax (which leaves unknown names unsharded), a logical name with no rule is an error:
    a misspelt axis would otherwise replicate a weight silently.
    """
    if logical is None:
        return P()
    known = {name for name, _ in rules}
    unknown = [name for name in logical if name is not None and name not in known]
    if unknown:
        raise ValueError(f"{where or 'array'}: logical axes {unknown} have no sharding rule; add "
                         f"e.g. ({unknown[0]!r}, None) to the additional rules.")
    return P(*nn.logical_to_mesh_axes(tuple(logical), rules))


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def mesh_specs(logical_tree: PyTree, rules: Rules) -> PyTree:
    """Tree of logical PartitionSpecs -> tree of mesh-axis PartitionSpecs."""
    return jax.tree_util.tree_map_with_path(
        lambda path, spec: logical_to_mesh_spec(spec, rules, _path_name(path)), logical_tree,
        is_leaf=lambda x: isinstance(x, P) or x is None)


def named_shardings(logical_tree: PyTree, mesh: Mesh, rules: Rules) -> PyTree:
    """Tree of logical PartitionSpecs -> tree of ``NamedSharding`` on ``mesh``."""
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec),
                                  mesh_specs(logical_tree, rules),
                                  is_leaf=lambda x: isinstance(x, P))


def frozen_shardings(config, mesh: Mesh, rules: Rules) -> PyTree:
    """``NamedSharding`` per frozen T5 parameter, from ``t5.logical_axes(config)``."""
    from prompt_t5x.model import t5
    return named_shardings(t5.logical_axes(config), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicated_like(tree: PyTree, mesh: Mesh) -> PyTree:
    """One replicated ``NamedSharding`` per leaf of ``tree`` (the trainable state's layout)."""
    return jax.tree_util.tree_map(lambda _: replicated(mesh), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples (leading dim) split over 'data'; every other dim whole."""
    return NamedSharding(mesh, P("data"))


def check_divisible(shapes: PyTree, shardings: PyTree) -> None:
    """Raises one ValueError naming every array whose dims the mesh cannot split evenly."""
    problems = []

    def check(path, shape, sharding):
        mesh_shape = dict(sharding.mesh.shape)
        for dim, (size, axes) in enumerate(zip(shape.shape, sharding.spec)):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            parts = int(np.prod([mesh_shape[a] for a in axes])) if axes else 1
            if size % parts:
                problems.append(f"{_path_name(path)} dim {dim} (size {size}) over {axes} "
                                f"({parts} devices)")

    jax.tree_util.tree_map_with_path(check, shapes, shardings)
    if problems:
        raise ValueError("cannot shard evenly: " + "; ".join(problems)
                         + ". Pick a mesh whose axes divide these sizes.")


@functools.lru_cache(maxsize=8)
def _local_data_rows(mesh: Mesh) -> int:
    """How many 'data' coordinates this process's devices occupy (its rows split over that
    many). Cached: it is a fact of the mesh, and shard_batch runs at every training step."""
    data_axis = mesh.axis_names.index("data")
    mine = np.vectorize(lambda d: d.process_index == jax.process_index(), otypes=[bool])(
        mesh.devices)
    return int(np.moveaxis(mine, data_axis, 0).reshape(mine.shape[data_axis], -1)
               .any(axis=1).sum())


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict:
    """This host's rows of a batch -> global ``jax.Array`` s split over 'data'.

    On one host ``batch`` is the whole global batch. On N hosts each passes its own rows (see
    ``distributed.data_shard``) and the result is the global batch that no host holds in full.
    """
    sharding = batch_sharding(mesh)
    local_rows = _local_data_rows(mesh)
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % local_rows:
            raise ValueError(f"batch[{name!r}] has shape {value.shape}: its leading (example) "
                             f"dim must be divisible by the {local_rows} 'data' shards on this "
                             "host; change the batch size or the mesh.")
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


def shard_global_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict:
    """A batch that *every* host holds in full (e.g. validation) -> global arrays over 'data'.

    Each device's shard is cut from the full value at the index the sharding gives it, so the
    result is right for any device order of the mesh (a TPU slice's topology order may place
    one host's devices at non-adjacent 'data' coordinates, which contiguous per-host slices
    would permute).
    """
    sharding = batch_sharding(mesh)
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"batch[{name!r}] is a scalar; every feature needs an example dim.")
        data_size = mesh.shape["data"]
        if value.shape[0] % data_size:
            raise ValueError(f"batch[{name!r}] has shape {value.shape}: its leading (example) "
                             f"dim must be divisible by the mesh's 'data' size {data_size}.")
        out[name] = jax.make_array_from_callback(value.shape, sharding,
                                                 lambda index, v=value: v[index])
    return out


def to_host(tree: PyTree) -> PyTree:
    """Every leaf's *global* value as numpy, on every host.

    Replicated arrays (and arrays whose shards all live on this host) are read locally; arrays
    split across processes are all-gathered, a collective that every process must call.
    """
    from jax.experimental import multihost_utils

    def fetch(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(fetch, tree)
