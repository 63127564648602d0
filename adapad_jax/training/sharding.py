"""The (data, components) device mesh and the shardings used by the trainer."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adapad_jax.config.validation import check_components_divide

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
    if r_max is not None:
        check_components_divide(r_max, components)
    return Mesh(np.array(devices[: data * components]).reshape(data, components), (DATA_AXIS, COMPONENTS_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``, replicated over ``components``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def batch_slice_for_process(process_grid: np.ndarray, process_index: int) -> tuple[int, int]:
    """``(index, count)`` of one process's block of the global batch, from the mesh's [data, components] process ids.

    The batch is split over ``data``; a process feeds the rows of the data coordinates its devices hold. Those
    coordinates must form a contiguous block of the same size for every process; processes holding the same
    block (when ``components`` spans processes) feed the same rows. ``count`` is the number of distinct blocks.
    """
    process_grid = np.asarray(process_grid)
    blocks: dict[int, tuple[int, ...]] = {}
    for process in np.unique(process_grid):
        rows = tuple(int(r) for r in np.unique(np.nonzero(process_grid == process)[0]))
        if rows != tuple(range(rows[0], rows[-1] + 1)):
            raise ValueError(f"process {process} holds non-contiguous data rows {list(rows)} of the mesh")
        blocks[int(process)] = rows
    if process_index not in blocks:
        raise ValueError(f"process {process_index} has no device in the mesh; the mesh must use every process")
    distinct = sorted(set(blocks.values()))
    sizes = {len(block) for block in distinct}
    covered = sorted(r for block in distinct for r in block)
    if len(sizes) != 1 or covered != list(range(process_grid.shape[0])):
        raise ValueError(f"the processes split the mesh's data axis unevenly: {blocks}")
    return distinct.index(blocks[process_index]), len(distinct)


def process_batch_slice(mesh: Mesh) -> tuple[int, int]:
    """``(process_index, process_count)`` to hand the data pipeline: this process's block of every global batch."""
    grid = np.vectorize(lambda device: device.process_index, otypes=[int])(mesh.devices)
    return batch_slice_for_process(grid, jax.process_index())


def train_state_shardings(mesh: Mesh, state: Any) -> Any:
    """Every leaf of the train state replicated.

    The slots are small next to the backbone every device holds anyway (r_max rank-1 pairs per module), and
    with every device holding all of them a step needs no gather: each device builds its slots' deflated
    forwards from its own copy, the summed gradients arrive in the step's one all-reduce, and every device
    applies the same update. The snapshot refresh at a sync is a local copy. (Slots split over ``components``
    cost a gather of the slots in every step and a second one at each sync, for a memory saving of
    ``(1 - 1/components)`` of the slots and their Adam moments.)
    """
    rep = replicated(mesh)
    return jax.tree.map(lambda _: rep, state)
