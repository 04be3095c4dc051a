"""Assertion helpers shared by several test modules."""

from __future__ import annotations

import pytest

from medmerge_core.errors import InputError


def one_line_error(call, *args, **kwargs) -> str:
    """The InputError message of call(*args, **kwargs), asserted to be a single line."""
    with pytest.raises(InputError) as err:
        call(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message
