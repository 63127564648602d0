"""A missing reference library skips its checks locally but fails the run under CI."""

import pytest
from reference_libs import import_reference, in_ci


def test_missing_reference_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no_such_reference_lib"):
        import_reference("no_such_reference_lib")


@pytest.mark.parametrize("value", ["true", "1", "True"])
def test_missing_reference_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match="'no_such_reference_lib' is missing under CI"):
        import_reference("no_such_reference_lib")


def test_present_reference_is_imported(monkeypatch):
    monkeypatch.setenv("CI", "false")
    assert not in_ci()
    assert import_reference("json").dumps([1]) == "[1]"
