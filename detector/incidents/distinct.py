"""How many different values an incident has seen, in bounded space.

A name spray tries a million user names from one address; a scraper reads ten thousand
tenants. An incident keeps its first :data:`EXACT` distinct values in the order they came, so
counts are exact up to there, and past them a HyperLogLog sketch of every value (4,096
one-byte registers, a count within about 1.6 %, one standard error) and the first
:data:`KEPT` values as the samples the incident shows. Both are
functions of the set of values alone, so an incident fed its events in any number of batches,
or restored from the store between them, counts exactly what one pass over the events counts.

>>> names = Distinct()
>>> for name in ["ann", "bob", "ann"]:
...     names.add(name)
>>> names.count, names.values
(2, ['ann', 'bob'])
>>> many = Distinct()
>>> for i in range(20_000):
...     many.add(f"user{i}")
>>> abs(many.count - 20_000) < 20_000 * 0.05, Distinct.restore(many.dump()).count == many.count
(True, True)
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Iterable
from typing import Any, Final

#: Distinct values kept as they are; past this many the sketch counts.
EXACT: Final = 1024
#: The first values still kept once the sketch counts (the samples an incident shows).
KEPT: Final = 64
_P: Final = 12  # 2**12 registers
_M: Final = 1 << _P
_REST: Final = 64 - _P
_ALPHA: Final = 0.7213 / (1.0 + 1.079 / _M)


def _hash(value: str) -> int:
    """A stable 64-bit hash (the sketch is stored, so it must not vary between processes)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big")


def _mark(registers: bytearray, value: str) -> None:
    h = _hash(value)
    rest = h & ((1 << _REST) - 1)
    rank = _REST - rest.bit_length() + 1  # position of the first 1 bit after the index bits
    index = h >> _REST
    if rank > registers[index]:
        registers[index] = rank


class Distinct:
    """The distinct values of one field of an incident (see the module docstring)."""

    __slots__ = ("_registers", "_seen", "values")

    def __init__(self, values: Iterable[str] = ()) -> None:
        #: The first distinct values, in the order they came (at most :data:`EXACT`; once the
        #: sketch counts, the first :data:`KEPT`).
        self.values: list[str] = []
        self._seen: set[str] = set()
        self._registers: bytearray | None = None
        for value in values:
            self.add(value)

    def add(self, value: str) -> None:
        if self._registers is None:
            if value in self._seen:
                return
            if len(self.values) < EXACT:
                self.values.append(value)
                self._seen.add(value)
                return
            self._registers = bytearray(_M)
            for kept in self.values:
                _mark(self._registers, kept)
            del self.values[KEPT:]
            self._seen = set()  # membership is the sketch's business from here on
        _mark(self._registers, value)

    @property
    def exact(self) -> bool:
        """Whether :attr:`count` is exact (every value is still kept)."""
        return self._registers is None

    def at_least(self, n: int) -> bool:
        """Whether there are ``n`` or more distinct values (exact for ``n`` <= :data:`EXACT`)."""
        return not self.exact or len(self.values) >= n

    @property
    def count(self) -> int:
        """The number of distinct values: exact up to :data:`EXACT`, estimated beyond."""
        if self._registers is None:
            return len(self.values)
        registers = self._registers
        estimate = _ALPHA * _M * _M / math.fsum(2.0**-r for r in registers)
        zeros = registers.count(0)
        if estimate <= 2.5 * _M and zeros:  # small range: linear counting is the better guess
            estimate = _M * math.log(_M / zeros)
        return max(EXACT + 1, round(estimate))

    def dump(self) -> dict[str, Any]:
        """A JSON-ready form that :meth:`restore` reads back."""
        sketch = base64.b64encode(bytes(self._registers)).decode() if self._registers else None
        return {"values": list(self.values), "sketch": sketch}

    @classmethod
    def restore(cls, data: Any) -> Distinct:
        out = cls()
        if not isinstance(data, dict):
            return out
        sketch = data.get("sketch")
        out.values = [str(v) for v in data.get("values") or []][: KEPT if sketch else EXACT]
        if sketch:
            raw = base64.b64decode(sketch)
            if len(raw) != _M:
                raise ValueError(f"a distinct-count sketch has {len(raw)} registers, not {_M}")
            out._registers = bytearray(raw)
        else:
            out._seen = set(out.values)
        return out
