"""Speculative evaluation of a serial search: measure ahead on idle workers, decide exactly as one at a time.

A *search* is a deterministic function of the answers it gets: it calls `ask(names, likely)` for each set
of float layers it wants judged ("does the target hold with these layers in float?") and decides from the
answers alone (`fallback.search_fallback`'s doubling, bisection and pruning are one). `likely` is the
search's own guess that the answer is yes: 0.0 for an ask it expects to fail (the next doubled prefix, the
next pruned layer), 0.5 when it has no idea (a bisection's middle). It only steers what is measured ahead.

`Speculator.run(search)` runs the search for real. When it asks for a set nobody measured, the speculator
plans a batch of `width` sets (one per worker) before measuring: it replays the search from the start
(cheap: no measurement, only the decisions) with the real answers where they are known and assumed answers
where they are not, and takes the sets the search would ask for on the most probable branches (best first:
a branch's probability is the product of the guesses along it). So with a guess of 0.0 the batch is the
next `width` asks on the path where they all fail (doubling: the next prefix sizes; pruning: the next
removals); with 0.5 it is the top of the decision tree (a bisection's middle, then the next middle on the
side where it fails, then on the side where it holds, then their middles). The batch always holds the set
asked for, and is measured at once (`measure`, results in order).

The sets measured ahead wait in `ahead` and move into `measured` only when the real search asks for them,
in the order it asks, so `measured` (and everything decided from it) is what the serial search builds; a
branch the real answers did not take leaves its sets in `ahead`: the runs speculation wasted. With
`width` 1 nothing is planned or measured ahead: the serial search, run for run.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from onnxq.metrics import OutputMetrics

__all__ = ["Ask", "Speculator", "FAILS", "EVEN"]

Metrics = tuple[OutputMetrics, ...]
Key = frozenset[str]
T = TypeVar("T")

#: The search's guess that an ask holds: the doubling and the pruning expect a no, a bisection cannot tell.
FAILS, EVEN = 0.0, 0.5
#: Replays per planned batch, at most this many times `width` (a bound; the trees here are far smaller).
_REPLAYS_PER_SET = 8


class Ask(Protocol):
    def __call__(self, names: Sequence[str], likely: float) -> bool:
        """Does the target hold with `names` in float? `likely`: the asker's guess that it does (0..1)."""
        ...


class _Unknown(Exception):
    """A replay reached an ask whose answer is neither measured nor assumed."""

    def __init__(self, key: Key, likely: float) -> None:
        super().__init__()
        self.key, self.likely = key, likely


class Speculator:
    """Runs a search, measuring up to `width` sets at once, with the serial search's decisions.

    Args:
        measure: the metrics of each set of float layers, in order (one batch, spread over the workers).
        holds: whether metrics meet the target.
        width: sets per batch (the workers); 1: no speculation.
        measured: the sets already measured (the fully quantized model, say); filled as the search asks.

    Attributes:
        measured: every set the search asked for, in the order it asked, with its metrics.
        ahead: sets measured ahead that the search has not asked for (after `run`: wasted runs).
    """

    def __init__(self, measure: Callable[[list[Key]], list[Metrics]], holds: Callable[[Metrics], bool], width: int,
                 measured: Mapping[Key, Metrics]) -> None:
        self._measure, self._holds, self.width = measure, holds, max(1, width)
        self.measured: dict[Key, Metrics] = dict(measured)
        self.ahead: dict[Key, Metrics] = {}

    def run(self, search: Callable[[Ask], T]) -> T:
        """The search's result, run with real answers."""

        def ask(names: Sequence[str], likely: float) -> bool:
            key = frozenset(names)
            if key not in self.measured:
                if key not in self.ahead:
                    batch = self._plan(search, key, likely)
                    self.ahead.update(zip(batch, self._measure(batch)))
                self.measured[key] = self.ahead.pop(key)
            return self._holds(self.measured[key])

        return search(ask)

    def _known(self, key: Key) -> Metrics | None:
        return self.measured.get(key, self.ahead.get(key))

    def _replay(self, search: Callable[[Ask], T], assumed: Mapping[Key, bool]) -> _Unknown | None:
        """The first ask the search makes that neither a measurement nor `assumed` answers; None: it ends."""

        def ask(names: Sequence[str], likely: float) -> bool:
            key = frozenset(names)
            known = self._known(key)
            if known is not None:
                return self._holds(known)
            if key in assumed:
                return assumed[key]
            raise _Unknown(key, likely)

        try:
            search(ask)
        except _Unknown as unknown:
            return unknown
        return None

    def _plan(self, search: Callable[[Ask], T], asked: Key, likely: float) -> list[Key]:
        """`asked` and the sets the search most probably asks next, `width` in all, most probable first."""
        batch = [asked]
        if self.width == 1:
            return batch
        order = itertools.count()  # ties: the earlier branch first, the "no" branch before the "yes" one
        frontier: list[tuple[float, int, dict[Key, bool]]] = []

        def branch(probability: float, assumed: dict[Key, bool], key: Key, likely: float) -> None:
            for answer, chance in ((False, 1.0 - likely), (True, likely)):
                if chance > 0.0:
                    heapq.heappush(frontier, (-probability * chance, next(order), {**assumed, key: answer}))

        branch(1.0, {}, asked, likely)
        replays = 0
        while frontier and len(batch) < self.width and replays < _REPLAYS_PER_SET * self.width:
            negative, _, assumed = heapq.heappop(frontier)
            unknown, replays = self._replay(search, assumed), replays + 1
            if unknown is None:
                continue  # the search ends on this branch
            if unknown.key not in batch:
                batch.append(unknown.key)
            branch(-negative, assumed, unknown.key, unknown.likely)
        return batch
