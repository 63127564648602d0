"""docs/DESIGN.md's figures (Conventions) for advance learning's reserve: on the toy task (lr 1e-2, 20 steps) a
``joint`` reserve (in the forward at E = 1e-5, so its gradient is E-scaled and Adam's eps damps its update) moves a
small fraction as far as a committed slot, an ``adapad`` reserve (its own full-scale deflated forward) about as far."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from adapad_jax.training import Trainer, make_mesh
from adapad_jax.testing.toy import ToyBatches, enable_compilation_cache, make_toy_model, planted_teacher, toy_config

enable_compilation_cache()

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "DESIGN.md"
STEPS = 20


def design_figures() -> dict[str, float]:
    """{"joint": x, "adapad": y} from DESIGN.md: '... a `joint` reserve moved Xx ... an `adapad` reserve Yx'."""
    text = " ".join(DESIGN.read_text().split())
    match = re.search(r"a `joint` reserve moved ([0-9.]+)x as far as a committed slot, an `adapad` reserve ([0-9.]+)x",
                      text)
    assert match, "docs/DESIGN.md's reserve-damping sentence changed; update this test with it"
    return {"joint": float(match.group(1)), "adapad": float(match.group(2))}


def reserve_to_committed_movement(method: str, tmp_path: Path) -> float:
    """Mean |change| of the reserve slot's entries over that of the committed slot's, all modules, a and b."""
    model = make_toy_model()
    teacher = planted_teacher(model, [2, 1, 0, 0])
    # No growth within the run: slot 0 stays the committed slot and slot 1 the reserve in every module.
    cfg = toy_config(**{"adapter.method": method, "adapter.growth_interval": 100, "train.num_steps": STEPS,
                        "checkpoint.every_steps": 0})
    assert cfg.optim.learning_rate == 1e-2
    trainer = Trainer(model, cfg, make_mesh(1, 1), tmp_path / method)
    data = ToyBatches(model, teacher, 16)
    trainer.restore_or_init(data.state())
    alloc = jax.device_get(trainer.state["alloc"])
    assert alloc["committed"][:, 0].all() and alloc["reserve"][:, 1].all() and alloc["rank"].tolist() == [1] * 4
    before = jax.device_get(trainer.state["trainable"]["slots"])
    trainer.train(data, STEPS, data.state, progress=False)
    after = jax.device_get(trainer.state["trainable"]["slots"])
    trainer.close()
    moved = {row: sum(np.abs(np.asarray(after[p][m][row]) - np.asarray(before[p][m][row])).sum()
                      for p in ("a", "b") for m in range(len(model.targets))) for row in (0, 1)}
    assert moved[0] > 0
    return float(moved[1] / moved[0])


@pytest.mark.parametrize("method", ["joint", "adapad"])
def test_reserve_moves_as_far_as_the_design_doc_says(method, tmp_path):
    stated = design_figures()[method]
    measured = reserve_to_committed_movement(method, tmp_path)
    assert measured == pytest.approx(stated, rel=0.2), (method, measured, stated)
    if method == "joint":
        assert measured < 0.05, "the E-scaled reserve should be strongly damped"
    else:
        assert 0.5 < measured < 2.0, "adapad's reserve trains at full scale"
