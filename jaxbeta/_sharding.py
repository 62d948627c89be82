"""Spreading a batch of independent fits over every visible device.

The batch axis (one entry per trace, or per setting of a sweep) is split
over a one-axis :class:`jax.sharding.Mesh` named ``"batch"`` that holds all
of ``jax.devices()``: one GPU, several GPUs, or the devices of every host in
a ``jax.distributed`` job. Each device runs the vmapped fit on its own slice
through :func:`jax.shard_map`, so the slices never talk to each other and
each device's MM loop stops as soon as its own slowest trace is done.

Nothing here is specific to jaxbeta's estimators: the helpers take and
return pytrees whose every leaf has the batch as its leading axis.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "BATCH_AXIS",
    "batch_mesh",
    "gather_batch",
    "padded_batch_size",
    "shard_batch",
    "shard_over_batch",
]

BATCH_AXIS = "batch"
"""Name of the mesh axis that the batch of fits is split over."""


def batch_mesh() -> Mesh:
    """A one-axis mesh (``"batch"``) over all devices visible to JAX.

    Under ``jax.distributed`` this is the global device list, so every host
    takes its share of the batch with no change to the calling code.
    """
    return _mesh_for(tuple(jax.devices()))


@functools.cache
def _mesh_for(devices: tuple) -> Mesh:
    return Mesh(np.asarray(devices, dtype=object), (BATCH_AXIS,))


def padded_batch_size(count: int, n_devices: int, minimum: int = 1) -> int:
    """Batch length for ``count`` fits: a power of two, then a device multiple.

    Rounding up to a power of two (at least ``minimum``) makes batches of 5
    and 7 traces share one compiled program; rounding up to a multiple of
    ``n_devices`` gives every device an equal slice.

    Args:
      count: number of real entries (>= 1).
      n_devices: devices the batch is split over (>= 1).
      minimum: smallest batch length.

    Returns:
      The padded length (>= ``count``).
    """
    if count < 1 or n_devices < 1:
        raise ValueError(
            f"need count >= 1 and n_devices >= 1, got {count}, {n_devices}"
        )
    size = 1
    while size < max(count, minimum):
        size *= 2
    return -(-size // n_devices) * n_devices


def shard_over_batch(fn: Callable, mesh: Mesh) -> Callable:
    """Wraps ``fn`` (batch-leading pytrees in and out) to run per device slice.

    ``fn`` sees its device's slice of every input and must return pytrees
    whose leaves keep the batch as their leading axis.
    """
    spec = PartitionSpec(BATCH_AXIS)
    return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Places a host pytree on ``mesh``, split along the leading (batch) axis.

    Every process of a multi-host job must pass the same full host arrays;
    each one then uploads only the slices its own devices hold.

    Args:
      tree: pytree of NumPy arrays, each of shape ``[B, ...]`` with ``B`` a
        multiple of ``mesh.size``.
      mesh: from :func:`batch_mesh`.

    Returns:
      The same pytree of global ``jax.Array`` s.
    """
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def place(host: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(
            host.shape, sharding, lambda index: host[index]
        )

    return jax.tree.map(place, tree)


def gather_batch(tree: Any) -> Any:
    """Brings a batch-sharded pytree back to the host as NumPy arrays.

    With several processes, every process receives the whole batch.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
