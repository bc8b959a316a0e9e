"""Activation sharding constraints, active only while a train step traces.

Parameters carry logical axes (`nn.with_logical_partitioning`) and get
their shardings from the training code's rules table. Activations need the
same treatment: without a constraint, XLA's SPMD partitioner propagates a
parameter's sharding into the activations it touches. A LayerNorm scale
sharded over "fsdp" then asks the [B, T, D] stream for D over "fsdp" while
the batch is already split over ("data", "fsdp"); the partitioner cannot
reshard that in place and replicates the tensor ("involuntary full
rematerialization") in every layer's backward pass.

`constrain(x, logical_axes)` pins an activation to its logical layout. It is
a no-op unless `activation_sharding(mesh, rules)` is active, so inference,
the KV-cache decode steps and single-device code trace exactly as before.
The context is plain Python state read at trace time, so it can be entered
inside a jitted function (unlike `jax.set_mesh`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar(
    "dynamo_jax_activation_sharding", default=None)


def mesh_axes_size(mesh: Mesh, axes) -> int:
  """Devices along `axes` (a mesh axis name, a tuple of them, or None)."""
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in names)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh,
                        rules: Mapping[str, Any]) -> Iterator[None]:
  """Makes `constrain` pin activations on `mesh` with `rules` (logical axis
  name -> mesh axis, tuple of mesh axes, or None) while the block runs."""
  token = _ACTIVE.set((mesh, dict(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  """x with a sharding constraint from its logical axes (one per dimension),
  or x itself outside `activation_sharding`.

  A dimension that does not divide over its mesh axes (a small microbatch,
  say) is left unconstrained rather than raising: this is a layout hint, the
  inputs' shardings are checked where they are made.
  """
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  if len(logical_axes) != x.ndim:
    raise ValueError(f"constrain: {len(logical_axes)} logical axes for an "
                     f"array of rank {x.ndim}.")
  spec = []
  for dim, name in zip(x.shape, logical_axes):
    axes = None if name is None else rules[name]
    spec.append(axes if axes and dim % mesh_axes_size(mesh, axes) == 0
                else None)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))
