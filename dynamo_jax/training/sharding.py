"""The device mesh and the one rules table from logical axes to mesh axes."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dynamo_jax.errors import ConfigError
from dynamo_jax.model.partitioning import mesh_axes_size

MESH_AXES = ("data", "fsdp", "tensor")

# Every logical axis name used by a parameter or activation must appear here;
# there is deliberately no catch-all.
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "qkv": None,
    "head_dim": None,
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one axis may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ConfigError("at most one mesh axis may be -1.")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if rest < 1 or len(devices) % rest:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide "
                        f"the {len(devices)} devices.")
    sizes[sizes.index(-1)] = len(devices) // rest
  if any(s < 1 for s in sizes) or math.prod(sizes) != len(devices):
    raise ConfigError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices "
        f"but {len(devices)} are available; make data x fsdp x tensor equal "
        "the device count (or set one axis to -1).")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(logical: P, shape: tuple[int, ...], mesh: Mesh,
                    where: str) -> P:
  """Maps one logical PartitionSpec onto the mesh, checking divisibility."""
  axes = []
  for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
    if name is None:
      axes.append(None)
      continue
    if name not in RULES:
      raise ConfigError(f"{where}: logical axis {name!r} has no sharding rule; "
                        f"add it to dynamo_jax.training.sharding.RULES.")
    mesh_axes = RULES[name]
    size = mesh_axes_size(mesh, mesh_axes)
    if dim % size:
      raise ConfigError(
          f"{where}: dimension {dim} (logical {name!r}) does not divide over "
          f"mesh axes {mesh_axes} of size {size}; change the mesh.")
    axes.append(mesh_axes)
  return P(*axes)


def param_shardings(axes_tree, shapes_tree, mesh: Mesh):
  """NamedShardings for a params tree from its logical axes and shapes."""
  def one(path, spec, shape):
    where = "/".join(str(getattr(k, "key", k)) for k in path)
    return NamedSharding(mesh, logical_to_spec(spec, tuple(shape.shape), mesh,
                                               where))
  return jax.tree_util.tree_map_with_path(
      one, axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(RULES["batch"], None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
