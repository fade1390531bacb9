"""The fallback search measured ahead (`Speculator`) decides exactly what it decides one run at a time.

The search logic, not numerics: the measurements are a fake, deterministic answer per set of float layers
(monotone in the prefix length, or pseudo-random and not monotone at all). Real models measured in real
processes: tests/steps/accuracy/test_parallel.py.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import pytest

from onnxq.config import AccuracyGoal
from onnxq.metrics import OutputMetrics
from onnxq.steps.accuracy.fallback import greedy_search, search_fallback
from onnxq.steps.accuracy.sensitivity import LayerSensitivity, SensitivityResult
from onnxq.steps.accuracy.speculation import Speculator

Holds = Callable[[frozenset[str]], bool]


class _Search:
    """`greedy_search` over `layers` ranked layers through a Speculator of `width`, every batch recorded."""

    def __init__(self, layers: int, holds: Holds, width: int) -> None:
        self.order = [f"L{i:02d}" for i in range(layers)]
        self.batches: list[list[frozenset[str]]] = []

        def measure(keys: list[frozenset[str]]) -> list[bool]:
            self.batches.append(keys)
            return [holds(key) for key in keys]

        self.speculator = Speculator(measure, bool, width, {frozenset(): holds(frozenset())})
        self.chosen = self.speculator.run(lambda ask: greedy_search(self.order, ask))

    @property
    def runs(self) -> int:
        return sum(len(batch) for batch in self.batches)

    def sizes(self) -> list[list[int]]:
        """Each batch as the numbers of layers of its sets."""
        return [[len(key) for key in batch] for batch in self.batches]

    def prefix(self, size: int) -> frozenset[str]:
        return frozenset(self.order[:size])


def _at_least(size: int) -> Holds:
    return lambda key: len(key) >= size


def _scrambled(seed: int, layers: int) -> Holds:
    """Not monotone: each set holds or not by a hash of its names, more often the more layers it has."""
    def holds(key: frozenset[str]) -> bool:
        draw = zlib.crc32(f"{seed}:{','.join(sorted(key))}".encode()) / 2**32
        return draw < (len(key) / layers) ** 0.7
    return holds


def _assert_serial_decisions(serial: _Search, parallel: _Search, width: int) -> None:
    assert parallel.chosen == serial.chosen
    assert list(parallel.speculator.measured.items()) == list(serial.speculator.measured.items())  # same asks, same order
    assert all(len(batch) == 1 for batch in serial.batches) and not serial.speculator.ahead
    assert all(1 <= len(batch) <= width and len(set(batch)) == len(batch) for batch in parallel.batches)
    measured_once = [key for batch in parallel.batches for key in batch]
    assert len(set(measured_once)) == len(measured_once)  # nothing measured twice
    assert parallel.runs == serial.runs + len(parallel.speculator.ahead)  # the extra runs are the wasted ones
    assert set(parallel.speculator.ahead).isdisjoint(serial.speculator.measured)


def test_doubling_bisection_and_pruning_measured_ahead() -> None:
    serial = _Search(16, _at_least(6), width=1)
    assert serial.chosen == tuple(f"L{i:02d}" for i in range(6))
    # doubling 1, 2, 4, 8 (holds), bisection 6 (holds), 5 (fails), pruning 6 layers minus each of 5
    assert serial.sizes() == [[1], [2], [4], [8], [6], [5]] + [[5]] * 5
    three = _Search(16, _at_least(6), width=3)
    _assert_serial_decisions(serial, three, 3)
    # doubling: the next three sizes at once, as if each failed; the one after 8 (which holds) is bisection's 12
    # and then 14 on the branch where 8 fails; bisection between 4 and 8: the middle 6 and the middles on both
    # sides, 7 (if 6 fails) and 5 (if it holds); pruning: three removals at once, as if each failed
    assert three.batches[0] == [three.prefix(1), three.prefix(2), three.prefix(4)]
    assert three.batches[1] == [three.prefix(8), three.prefix(12), three.prefix(14)]
    assert three.batches[2] == [three.prefix(6), three.prefix(7), three.prefix(5)]
    assert three.sizes()[3:] == [[5, 5, 5], [5, 5]]
    assert set(three.speculator.ahead) == {three.prefix(12), three.prefix(14), three.prefix(7)}
    assert len(three.batches) == 5 < len(serial.batches) == 11


def test_a_removal_that_holds_discards_the_removals_measured_after_it() -> None:
    # L00 and L03 are all that matters: doubling stops at the prefix of 4, pruning drops L02 and L01
    holds: Holds = lambda key: {"L00", "L03"} <= key
    serial, two = _Search(8, holds, width=1), _Search(8, holds, width=2)
    assert serial.chosen == ("L00", "L03")
    _assert_serial_decisions(serial, two, 2)
    # bisection's middle 3 (fails) goes with pruning's first unknown removal, L02 from L00..L03 (removing L03
    # is the known prefix of 3); then the removals of L01 and L00 at once, both assumed to fail: L01's holds, so
    # "L00 removed from L00, L01, L03" is wasted and L00 is measured again, removed from L00, L03
    assert two.batches[-3:] == [[two.prefix(3), frozenset({"L00", "L01", "L03"})],
                                [frozenset({"L00", "L03"}), frozenset({"L01", "L03"})],
                                [frozenset({"L03"})]]
    assert set(two.speculator.ahead) == {frozenset({"L01", "L03"}), two.prefix(6)}


@pytest.mark.parametrize("width", [2, 3, 5])
def test_non_monotone_answers_get_the_serial_decisions(width: int) -> None:
    wasted = 0
    for seed in range(60):
        layers = 1 + seed % 23
        holds = _scrambled(seed, layers)
        serial, parallel = _Search(layers, holds, 1), _Search(layers, holds, width)
        _assert_serial_decisions(serial, parallel, width)
        assert len(parallel.batches) <= len(serial.batches)
        wasted += len(parallel.speculator.ahead)
    assert wasted > 0  # the answers did contradict the guesses, and the decisions still followed the real ones


class _Runner:
    """A gated runner whose measurer runs `width` at once; metrics from noise that adds up per quantized layer."""

    def __init__(self, noise: dict[str, float], width: int) -> None:
        self.noise, self.width, self.batches = noise, width, []

    def _metrics(self, gates: np.ndarray) -> tuple[OutputMetrics, ...]:
        total = sum(n for n, on in zip(self.noise.values(), gates) if on)
        return (OutputMetrics("y", 1, 1.0 - total, 0.0, 0.0, None),)

    def measure(self, gates: np.ndarray) -> tuple[OutputMetrics, ...]:
        return self.measure_many([gates])[0]

    def measure_many(self, gate_vectors: list[np.ndarray]) -> list[tuple[OutputMetrics, ...]]:
        self.batches.append(len(gate_vectors))
        return [self._metrics(gates) for gates in gate_vectors]


class _Map:
    def __init__(self, names: list[str]) -> None:
        self.names = names

    def gates(self, float_layers) -> np.ndarray:
        return np.array([name not in set(float_layers) for name in self.names])


def test_search_fallback_measures_as_many_at_once_as_the_runner_can() -> None:
    noise = {f"layer{i}": 0.001 * (i % 7) for i in range(30)} | {"big1": 0.05, "big2": 0.04, "mid": 0.01}
    total = sum(noise.values())
    entries = tuple(LayerSensitivity(name, "Conv", (), 1 - n, 0.0, 1 - (total - n), 0.0) for name, n in noise.items())
    sensitivity = SensitivityResult(entries, (OutputMetrics("y", 1, 1.0 - total, 0.0, 0.0, None),), 1, 0, 0.0)
    target = AccuracyGoal(min_cosine=1 - 0.035)
    serial_runner, parallel_runner = _Runner(noise, 1), _Runner(noise, 2)
    serial = search_fallback(serial_runner, _Map(list(noise)), sensitivity, target)
    parallel = search_fallback(parallel_runner, _Map(list(noise)), sensitivity, target)
    assert parallel.float_layers == serial.float_layers and serial.float_layers is not None
    assert list(parallel.measured.items()) == list(serial.measured.items())
    assert serial.wasted == 0 and set(serial_runner.batches) == {1}
    assert 2 in parallel_runner.batches and max(parallel_runner.batches) == 2
    assert sum(parallel_runner.batches) == sum(serial_runner.batches) + parallel.wasted
