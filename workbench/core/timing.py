"""The one timer: a `with` block that prints one line `label: N.N s` and can record the seconds.

Saved notebooks and logs keep the printed line, unlike a progress-bar widget, so a long cell never looks
hung after the fact; a run records its steps' seconds in its results (`into=`).

>>> steps = {}
>>> with timed("load", into=steps, log=lambda line: None):
...     pass
>>> list(steps)
['load']
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def timed(label: str, *, into: dict[str, float] | None = None,
          log: Callable[[str], None] | None = None, fmt: str = "{label}: {seconds:.1f} s") -> Iterator[None]:
    """Time the block; print (or `log`) one line when it ends; store the seconds in `into[label]` when given."""
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    if into is not None:
        into[label] = round(seconds, 3)
    line = fmt.format(label=label, seconds=seconds)
    if log is None:
        print(line, flush=True)
    else:
        log(line)
