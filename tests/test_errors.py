"""Errors: one root, leaves that are also the stdlib error a caller catches, each documented."""

import inspect
from pathlib import Path

import pytest

from dispatcher import errors
from dispatcher.curve import keygen

CLASSES = [
    c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__
]


@pytest.mark.parametrize("error", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_every_error_is_a_dispatcher_error_saying_when_it_is_raised(error: type) -> None:
    assert issubclass(error, errors.DispatcherError)
    assert (error.__doc__ or "").startswith("Raised ")


@pytest.mark.parametrize(
    "error", [errors.SettingsError, errors.InvalidRequest, errors.UsageError, errors.NotFound]
)
def test_input_errors_are_value_errors(error: type) -> None:
    assert issubclass(error, ValueError)


def test_keygen_refuses_to_overwrite_a_key_as_a_usage_error(tmp_path: Path) -> None:
    keygen("app", tmp_path)
    with pytest.raises(errors.UsageError, match="refusing to overwrite"):
        keygen("app", tmp_path)
