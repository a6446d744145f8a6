"""Typed settings records that check themselves, and the config error they raise.

A registry entry (a schedule, an eval method, ...) declares a frozen dataclass of the
settings it reads: each field is named as a key of the entry's config section
(``config.model.gamma_min``, ``config.eval.num_time_samples``, ...), and :meth:`Settings.problems`
states what values are allowed. Building a record checks it: a bad value raises
:class:`ConfigError` with one line per bad field, ``config.<field>=<value> <what is wrong>
(allowed: ...)``. The runner's config checks collect those lines with their own, so a run
never starts on a value that only the entry in use could have refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar


class ConfigError(ValueError):
    """A config value that cannot run; the message names every bad field.

    Attributes:
      problems: one line per bad field (empty for an error made from a whole message).
    """

    problems: tuple[str, ...] = ()

    @classmethod
    def listing(cls, problems: Sequence[str]) -> ConfigError:
        """The error for ``problems``: ``invalid config:`` and one indented line each."""
        error = cls("invalid config:\n  " + "\n  ".join(problems))
        error.problems = tuple(problems)
        return error


def is_int(value: Any) -> bool:
    """An int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def out_of_range(field: str, value: Any, ok: bool, allowed: str) -> list[str]:
    """``[]`` if ``ok``, else the line ``config.<field>=<value> is out of range (allowed: ...)``."""
    return [] if ok else [f"config.{field}={value!r} is out of range (allowed: {allowed})"]


def unknown_name(field: str, value: Any, allowed: Iterable[str]) -> list[str]:
    """``[]`` if ``value`` is one of ``allowed``, else the line naming the field and them."""
    allowed = sorted(allowed)
    if value in allowed:
        return []
    return [f"config.{field}={value!r} is not a known name (allowed: {allowed})"]


_Record = TypeVar("_Record", bound="Settings")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of a settings record: subclasses add fields and extend :meth:`problems`."""

    def problems(self) -> list[str]:
        """One line per bad field (see :func:`out_of_range`); subclasses add to their base's."""
        return []

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError.listing(problems)

    @classmethod
    def from_section(cls: type[_Record], section: Mapping[str, Any]) -> _Record:
        """The record of a config section (a ``ConfigDict`` or any mapping holding its keys).

        Raises:
          ConfigError: naming every bad field.
        """
        return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        """The fields by name (what a run records of them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
