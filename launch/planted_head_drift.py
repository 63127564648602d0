"""Diagnostic for docs/RESULTS.md "Head-gradient rule": how far the task head moves from the teacher's, per rule.

    python launch/planted_head_drift.py

Planted benchmark settings (configs/studies/planted.py), seed 0, 600 steps; every 100 steps prints the head's relative
distance from its start ||H_t - H_0|| / ||H_0|| (H_0 is the teacher's head) and the held-out error (relative to
the backbone's) for adapad with head_gradient mean / committed and for joint.
"""

import importlib.util
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from adapad_jax.studies import planted as ps  # noqa: E402
from adapad_jax.training.sharding import make_mesh  # noqa: E402
from adapad_jax.training.trainer import Trainer  # noqa: E402

STEPS, EVERY, SEED = 600, 100, 0


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def main() -> None:
    """Print one line per task and variant."""
    spec = importlib.util.spec_from_file_location("planted_config", ROOT / "configs" / "studies" / "planted.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for name in ("branches", "residual"):
        s = cfg.task_settings[name]
        task = ps.PlantedTask(name, tuple(int(r) for r in s.planted.split(",")), s.layout, s.hidden, s.num_layers,
                              scale=s.scale, batch_size=s.batch_size, seq_len=s.seq_len, eval_rows=s.eval_rows)
        for variant in ("adapad_head_mean", "adapad_head_committed", "joint"):
            model = ps.make_toy_model(hidden=task.hidden, num_layers=task.num_layers, vocab_size=task.vocab_size,
                                      num_outputs=task.hidden, layout=task.layout, seed=SEED)
            teacher = ps.planted_teacher(model, task.planted, scale=task.scale, seed=1000 + SEED)
            config = ps.study_config(dict(cfg.adapter), dict(cfg.optim), variant, SEED, STEPS, len(model.targets))
            data = ps.TeacherBatches(model, teacher, task.batch_size, task.seq_len, seed=SEED)
            held_out = [data.batch(10**9, 256)]
            baseline = ps.backbone_error(model, held_out)
            row = []
            with tempfile.TemporaryDirectory() as out:
                trainer = Trainer(model, config, make_mesh(1, 1), out)
                trainer.restore_or_init({})
                h0 = _flat(trainer.state["trainable"]["head"])
                while trainer.step < STEPS:
                    trainer.train_step(next(data))
                    if trainer.step % EVERY == 0:
                        drift = np.linalg.norm(_flat(trainer.state["trainable"]["head"]) - h0) / np.linalg.norm(h0)
                        error = ps.held_out_error(trainer, held_out, baseline)
                        row.append(f"{trainer.step}: drift {drift:.3f} error {error:.3f}")
                trainer.close()
            print(name, variant, " | ".join(row), flush=True)


if __name__ == "__main__":
    from adapad_jax.cli.common import asked_for_help

    if asked_for_help(sys.argv):
        print(__doc__)
        sys.exit(0)
    if len(sys.argv) > 1:
        print(f"error: {Path(__file__).name} takes no arguments, got {sys.argv[1:]} (--help says what it does)",
              file=sys.stderr)
        sys.exit(2)
    main()
