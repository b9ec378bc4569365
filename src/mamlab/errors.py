"""The one exception type mamlab raises for bad user input."""

from __future__ import annotations

__all__ = ["MamlabError", "StorageError", "check_positive", "check_choice"]


class MamlabError(ValueError):
    """A bad value from the user: the message is one line naming the value and what is allowed."""


class StorageError(MamlabError):
    """Writing to disk failed (full, read-only, over quota): not bad input; the CLI exits with status 3."""


def check_positive(name: str, value: float, *, integer: bool = False, allow_zero: bool = False) -> None:
    """Raise MamlabError unless ``value`` is a positive (or non-negative) finite number."""
    kind = "integer" if integer else "number"
    bound = ">= 0" if allow_zero else "> 0"
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise MamlabError(f"{name} must be an {kind} {bound}, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise MamlabError(f"{name} must be a {kind} {bound}, got {value!r}") from None
    ok = v >= 0 if allow_zero else v > 0
    if not ok or v != v or v in (float("inf"),):
        raise MamlabError(f"{name} must be a{'n' if integer else ''} {kind} {bound}, got {value!r}")


def check_choice(name: str, value: str, allowed: list[str] | tuple[str, ...]) -> None:
    """Raise MamlabError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise MamlabError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
