"""Typed options: one declaration gives a configuration key, its command-line flag, and its checks.

Tasks, algorithms and runs each declare their ``Option``s; ``mamlab.config`` keeps the three sets
apart and ``mamlab.cli`` turns each into a flag. Values are checked strictly: a string where a
number or a boolean belongs is an error, never coerced.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mamlab.errors import MamlabError

__all__ = ["Option", "KINDS", "check_options"]

#: What an option's value can be.
KINDS = ("int", "float", "bool", "str", "ints", "strs", "range")
_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "ints": "a list of integers", "strs": "a list of names",
               "range": "two finite numbers LOW,HIGH with LOW <= HIGH"}


@dataclass(frozen=True)
class Option:
    """A configuration key.

    Args:
        name: the key (``inner_lr``); its flag is ``--inner-lr``.
        kind: one of ``KINDS``.
        default: the value when nothing sets it (``None`` allowed only with ``nullable``).
        help: one line for ``--help``.
        choices: the allowed values of a ``str`` option.
        positive: numbers (or every list entry) must be > 0; ``"nonnegative"`` allows 0.
        nullable: ``None`` is a valid value (e.g. "the last layer", "no data path").
    """

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    positive: bool | str = False
    nullable: bool = False

    @property
    def flag(self) -> str:
        """The command-line flag, ``--`` and the name with dashes."""
        return "--" + self.name.replace("_", "-")

    def _bad(self, value: Any, source: str) -> MamlabError:
        what = _KIND_WORDS[self.kind]
        if self.positive is True:
            what += " > 0" if self.kind in ("int", "float") else " (each > 0)"
        elif self.positive == "nonnegative":
            what += " >= 0" if self.kind in ("int", "float") else " (each >= 0)"
        prefix = f"{source}: " if source else ""
        if self.choices and isinstance(value, str):
            return MamlabError(f"{prefix}unknown {self.name} {value!r}; allowed: {', '.join(self.choices)}")
        if self.choices:
            what = "one of " + ", ".join(self.choices)
        return MamlabError(f"{prefix}{self.name} must be {what}, got {value!r}")

    def _number_ok(self, v: Any, integer: bool) -> bool:
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
            return False
        if not math.isfinite(v) or (integer and not -(2**63) <= v < 2**63):  # must fit torch's int64
            return False
        if self.positive is True:
            return v > 0
        if self.positive == "nonnegative":
            return v >= 0
        return True

    def check(self, value: Any, source: str = "") -> Any:
        """``value`` if it is valid for this option (lists normalized), else a one-line MamlabError."""
        if value is None:
            if self.nullable:
                return None
            raise self._bad(value, source)
        k = self.kind
        if k in ("int", "float"):
            if not self._number_ok(value, k == "int"):
                raise self._bad(value, source)
            return int(value) if k == "int" else float(value)
        if k == "bool":
            if not isinstance(value, bool):
                raise self._bad(value, source)
            return value
        if k == "str":
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise self._bad(value, source)
            return value
        if not isinstance(value, list | tuple):
            raise self._bad(value, source)
        if k == "ints":
            if not all(self._number_ok(v, True) for v in value):
                raise self._bad(value, source)
            return [int(v) for v in value]
        if k == "strs":
            if not value or not all(isinstance(v, str) and v for v in value):
                raise self._bad(value, source)
            return list(value)
        # range
        if len(value) != 2 or not all(self._number_ok(v, False) for v in value) or value[0] > value[1]:
            raise self._bad(value, source)
        return [float(value[0]), float(value[1])]

    def parse(self, text: str) -> Any:
        """The value of a command-line string (``"40,40"``, ``"0.1,5"``, ``"0.01"``), checked."""
        k = self.kind
        try:
            if k == "int":
                value: Any = int(text)
            elif k == "float":
                value = float(text)
            elif k == "bool":
                value = {"true": True, "false": False}[text.lower()]
            elif k == "str":
                value = text
            elif k == "ints":
                value = [int(v) for v in text.split(",") if v.strip()]
            elif k == "strs":
                value = [v.strip() for v in text.split(",") if v.strip()]
            else:
                value = [float(v) for v in text.split(",")]
        except (ValueError, KeyError):
            raise self._bad(text, "") from None
        return self.check(value)


def check_options(values: Mapping[str, Any], options: Iterable[Option], what: str,
                  source: str = "") -> dict[str, Any]:
    """Every option's checked value: from ``values`` where given, else its default.

    A key of ``values`` that is not one of ``options`` is a one-line error naming ``what`` the
    options belong to and which keys are allowed.
    """
    by_name = {o.name: o for o in options}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        prefix = f"{source}: " if source else ""
        raise MamlabError(f"{prefix}option {unknown[0]!r} does not apply to {what}; allowed: "
                          f"{', '.join(by_name) or 'none'}")
    return {name: o.check(values[name], source) if name in values else o.default
            for name, o in by_name.items()}
