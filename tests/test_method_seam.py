"""The method seam (methods/base.py, registry.py) and the adapter.<method>.* config blocks."""

from __future__ import annotations

import pytest

from adapad_jax.cli.common import overridden_fields
from adapad_jax.config import validation
from adapad_jax.config.schema import METHOD_BLOCKS, METHODS, ConfigError, base_config
from adapad_jax.methods.registry import METHOD_CLASSES


def test_registry_has_every_method_of_the_schema_in_order():
    assert tuple(METHOD_CLASSES) == METHODS
    assert all(cls.name == name for name, cls in METHOD_CLASSES.items())
    assert set(METHOD_BLOCKS) <= set(METHODS)


def test_every_method_block_field_has_a_rule_and_the_defaults_pass():
    config = base_config()
    fields = {f"{m}.{k}" for m in METHOD_BLOCKS for k in config.adapter[m].keys()}
    assert fields == set(validation.METHOD_FIELD_RULES)
    validation.check_method_blocks(config)


@pytest.mark.parametrize("field, value, message", [
    ("adalora.deltaT", 0, "adapter.adalora.deltaT=0 must be >= 1"),
    ("increlora.beta1", 1.0, "adapter.increlora.beta1=1.0 must be < 1.0"),
    ("sora.lambda_schedule", "cubic", "adapter.sora.lambda_schedule='cubic' is not one of: , linear, log_linear, exp_linear"),
    ("ardlora.tau", -1.0, "adapter.ardlora.tau=-1.0 must be >= 0.0"),
])
def test_a_bad_method_field_is_one_line_naming_it(field, value, message):
    config = base_config()
    method, leaf = field.split(".")
    config.adapter[method][leaf] = value
    with pytest.raises(ConfigError) as err:
        validation.check_method_blocks(config)
    assert str(err.value) == message


def test_a_field_of_another_method_set_on_the_command_line_is_refused():
    argv = ["--config", "configs/glue_cola.py", "--config.adapter.adalora.tinit=5", "--config.train.num_steps", "3"]
    assert overridden_fields(argv) == ["adapter.adalora.tinit", "train.num_steps"]
    validation.check_method_overrides("adalora", overridden_fields(argv))
    with pytest.raises(ConfigError) as err:
        validation.check_method_overrides("sora", overridden_fields(argv))
    assert str(err.value) == ("adapter.adalora.tinit is read only by adapter.method=adalora, and this run's method "
                              "is sora; drop it or set --config.adapter.method=adalora")
