"""The data errors every loader raises: one line that names the field at fault (sources, WebDatasets, stores)."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset that cannot be used as configured; the message names the field at fault."""


class EmptySplitError(DataError):
    """The split exists but holds no rows."""
