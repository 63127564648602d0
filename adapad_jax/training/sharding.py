"""The (data, components) device mesh and the shardings used by the trainer."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
COMPONENTS_AXIS = "components"


def make_mesh(data: int, components: int, r_max: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, components)`` mesh over the first ``data * components`` devices (classic Auto axes)."""
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or components < 1:
        raise ValueError(f"mesh.data and mesh.components must be >= 1, got data={data}, components={components}")
    if data * components > len(devices):
        raise ValueError(
            f"mesh.data={data} x mesh.components={components} = {data * components} devices, but only "
            f"{len(devices)} are available ({devices[0].platform}); lower mesh.data or mesh.components so their "
            f"product is at most {len(devices)}"
        )
    if r_max is not None and r_max % components != 0:
        raise ValueError(
            f"adapter.r_max={r_max} is not divisible by mesh.components={components}; choose mesh.components "
            f"among the divisors of r_max {[c for c in range(1, r_max + 1) if r_max % c == 0]}"
        )
    return Mesh(np.array(devices[: data * components]).reshape(data, components), (DATA_AXIS, COMPONENTS_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``, replicated over ``components``."""
    return NamedSharding(mesh, P(DATA_AXIS))
