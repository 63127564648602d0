"""train.profile_start_step / profile_num_steps: a window of steps traced by jax.profiler into <run>/profile."""

import gzip
import json

import pytest

from adapad_jax.config.schema import ConfigError
from adapad_jax.outputs.layout import PROFILE_DIR
from adapad_jax.training import Trainer, make_mesh
from adapad_jax.testing.toy import ToyBatches, enable_compilation_cache, make_toy_model, planted_teacher, toy_config
from adapad_jax.config.validation import check_fields

enable_compilation_cache()


@pytest.fixture(scope="module")
def toy():
    model = make_toy_model(hidden=16, num_layers=2, num_outputs=4)
    return model, planted_teacher(model, [2, 1, 0, 0])


def _train(model, teacher, out, steps, **overrides):
    trainer = Trainer(model, toy_config(**{"checkpoint.every_steps": 0, **overrides}), make_mesh(1, 1), out)
    data = ToyBatches(model, teacher, 16)
    trainer.restore_or_init(data.state())
    try:
        trainer.train(data, steps, data.state, progress=False)
    finally:
        trainer.close()


def test_profile_window_writes_a_tensorboard_and_a_perfetto_trace_of_the_train_steps(toy, tmp_path):
    model, teacher = toy
    _train(model, teacher, tmp_path, 5, **{"train.profile_start_step": 2, "train.profile_num_steps": 2})
    profile = tmp_path / PROFILE_DIR
    assert len(list(profile.glob("plugins/profile/*/*.xplane.pb"))) == 1
    (perfetto,) = profile.glob("plugins/profile/*/perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(perfetto.read_bytes()))
    names = {event.get("name", "") for event in (events["traceEvents"] if isinstance(events, dict) else events)}
    # the traced window holds the compiled train step's runs (named after the jitted function)
    assert any("train_step" in name for name in names), sorted(names)[:50]


def test_no_profile_by_default_and_a_window_running_past_the_end_is_closed(toy, tmp_path):
    model, teacher = toy
    _train(model, teacher, tmp_path / "off", 2)
    assert not (tmp_path / "off" / PROFILE_DIR).exists()
    # steps 2..4 asked for, the run ends at 2: the trace is stopped (and written) when training returns
    _train(model, teacher, tmp_path / "short", 2, **{"train.profile_start_step": 2, "train.profile_num_steps": 3})
    assert list((tmp_path / "short" / PROFILE_DIR).glob("plugins/profile/*/*.xplane.pb"))
    # a later trace in the same process starts cleanly: the profiler was released
    _train(model, teacher, tmp_path / "again", 1, **{"train.profile_start_step": 1, "train.profile_num_steps": 1})
    assert list((tmp_path / "again" / PROFILE_DIR).glob("plugins/profile/*/*.xplane.pb"))
    # a window after the run's last step (known once the data sets the length) stops before any step runs
    with pytest.raises(ConfigError, match=r"train.profile_start_step=5 is after the run's last step \(2\)"):
        _train(model, teacher, tmp_path / "late", 2, **{"train.profile_start_step": 5})


@pytest.mark.parametrize("overrides, message", [
    ({"train.profile_start_step": -1}, "train.profile_start_step=-1 must be >= 0"),
    ({"train.profile_num_steps": 0}, "train.profile_num_steps=0 must be >= 1"),
    ({"train.profile_start_step": 11, "train.num_steps": 10},
     "train.profile_start_step=11 is after the run's last step (10)"),
])
def test_bad_profile_window_is_one_config_error(overrides, message):
    config = toy_config(**{"output_dir": "/tmp/out", **overrides})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_fields(config)
