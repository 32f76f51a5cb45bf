"""Named choices: one check for every value that must be one of a known set, and one registry type.

Every registry of the workbench (importance methods, normalizers, presets, allocations, baselines, per-layer
measures, plan makers, ...) is a `Registry`: a read-only mapping whose unknown keys raise a `ValueError` (also a
`KeyError`) that names the bad value, the allowed ones and the closest match. Every other "one of these"
setting is checked by `check_choice`, which writes the same message.

>>> try:
...     check_choice("mode", "sequentail", ("one_shot", "sequential"))
... except ValueError as e:
...     print(e)
mode='sequentail' is not allowed; allowed: ['one_shot', 'sequential']; did you mean 'sequential'?
>>> methods = Registry("importance method", {"taylor": 1, "wanda": 2})
>>> methods["taylor"]
1
>>> try:
...     methods["taylr"]
... except KeyError as e:
...     print(e)
importance method 'taylr' is not registered; allowed: ['taylor', 'wanda']; did you mean 'taylor'?
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

T = TypeVar("T")


class UnknownChoiceError(ValueError, KeyError):
    """A value outside its allowed set (a `ValueError` for settings, a `KeyError` for registry lookups)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def closest(value: object, allowed: Iterable[object], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The allowed names closest to `value` (difflib's ratio at least `cutoff`), best first."""
    return difflib.get_close_matches(str(value), [str(a) for a in allowed], n=n, cutoff=cutoff)


def did_you_mean(value: object, allowed: Iterable[object]) -> str:
    """'; did you mean 'x'?' for the closest allowed value, or '' when none is close."""
    close = closest(value, allowed)
    return f"; did you mean {close[0]!r}?" if close else ""


def choice_error(what: str, value: object, allowed: Iterable[object],
                 error: Callable[[str], Exception] = UnknownChoiceError, *, verb: str = "allowed",
                 setting: bool = True, also: str = "") -> Exception:
    """The one message for a value outside its set: `what=value is not allowed; allowed: [...]` (a setting) or
    `what 'value' is not registered; allowed: [...]` (a registry lookup), with the closest allowed value."""
    allowed = list(allowed)
    named = f"{what}={value!r}" if setting else f"{what} {value!r}"
    return error(f"{named} is not {verb}; allowed: {allowed}{' or ' + also if also else ''}"
                 f"{did_you_mean(value, allowed)}")


def check_choice(what: str, value: T, allowed: Iterable[object],
                 error: Callable[[str], Exception] = UnknownChoiceError) -> T:
    """`value` if it is one of `allowed`, else the error naming the value, the allowed ones and the closest."""
    allowed = list(allowed)
    if value not in allowed:
        raise choice_error(what, value, allowed, error)
    return value


class Registry(Mapping[str, T]):
    """A read-only name -> item mapping: two items cannot share a name; an unknown name says what is allowed.

    Args:
        what: the name of the setting that picks an item (the error message's `what=value`).
        items: the items, by name.
    """

    def __init__(self, what: str, items: Mapping[str, T] | Iterable[tuple[str, T]]):
        self.what = what
        self._items: dict[str, T] = {}
        for name, item in (items.items() if isinstance(items, Mapping) else items):
            self._add(name, item)

    def _add(self, name: str, item: T) -> None:
        if name in self._items:
            raise ValueError(f"two {self.what} entries are named {name!r}; names must be unique")
        self._items[name] = item

    @classmethod
    def of(cls, what: str, items: Iterable[T], name: Callable[[T], str] | None = None) -> Registry[T]:
        """A registry of items that carry their own name (`item.name` by default)."""
        return cls(what, [(name(i) if name else str(getattr(i, "name")), i) for i in items])

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise choice_error(self.what, name, self._items, verb="registered", setting=False) from None

    def check(self, name: str, also: str = "") -> str:
        """`name` if it is registered, else the error, worded for a setting (`what=name is not registered`);
        `also`: other values the setting accepts, named in the message."""
        if not isinstance(name, str) or name not in self._items:
            raise choice_error(self.what, name, self._items, verb="registered", also=also)
        return name

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {list(self._items)})"
