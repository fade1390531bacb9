"""The whole accuracy step (ranking + fallback search) in 1 process vs 2 (`--jobs`), interleaved (run on demand).

For EfficientNet-Lite0 (64 calibration photos) and the PP-OCR classifier (its 64 calibration text lines,
entropy calibration), quantizes with a `--min-cosine` target that needs a fallback, on 32 held-back
samples, with `jobs=1` (one session, ONNX Runtime's default threads) and `jobs=2` (two processes, cores // 2
threads each, the search measuring ahead: `onnxq.steps.accuracy.speculation`), runs interleaved (1, 2, 1,
2, ...) so that a load from elsewhere hits both alike. Prints, median over the repeats:

- ranking: `SensitivityResult.seconds` (the gated model's build, the processes' start-up, the float
  reference run and every layer recovered on the first 8 samples);
- search: `FallbackResult.seconds` (doubling, bisection and pruning on all 32 samples, then the
  built model's check);
- step: the two together;

and the search's runs (jobs=2: those measured ahead and unused in brackets), the layers left float, and
whether the two choose the same layers with the same notes and write the same bytes.

    .venv/bin/python benchmarks/parallel_accuracy.py [--repeats 2] [--lite0-cosine 0.995] [--ppocr-cosine 0.9995]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import onnxq
from onnxq.steps.accuracy.process_pool import threads_per_job, usable_cores

ROOT = Path(__file__).parents[1]
MODELS = ROOT / "models"
PHOTOS = MODELS / "data" / "photos"
TEXTLINES = MODELS / "data" / "textlines"
HELD_BACK = 32


def _efficientnet(cosine: float, jobs: int) -> onnxq.QuantResult:
    model = onnxq.load_model(MODELS / "efficientnet_lite0.onnx")
    specs, preprocess = onnxq.input_specs(model), onnxq.ImagePreprocess(mean=(127.0,) * 3, std=(128.0,) * 3)
    return onnxq.quantize(model, onnxq.open_source(PHOTOS / "calib", specs, preprocess),
                          onnxq.QuantConfig(bias_correction=False),
                          eval_source=onnxq.open_source(PHOTOS / "eval", specs, preprocess),
                          accuracy=onnxq.AccuracyGoal(min_cosine=cosine, samples=HELD_BACK, jobs=jobs))


def _ppocr(cosine: float, jobs: int) -> onnxq.QuantResult:
    entropy = onnxq.QuantConfig(calib=onnxq.CalibConfig(method=onnxq.CalibMethod.ENTROPY))
    return onnxq.quantize(MODELS / "ppocr_mobile_v2_cls.onnx", TEXTLINES / "ppocr_cls_calib.npz", entropy,
                          eval_source=TEXTLINES / "ppocr_cls_eval.npz",
                          accuracy=onnxq.AccuracyGoal(min_cosine=cosine, samples=HELD_BACK, jobs=jobs))


def _same(serial: onnxq.QuantResult, parallel: onnxq.QuantResult) -> bool:
    assert serial.fallback is not None and parallel.fallback is not None
    return (serial.fallback.float_layers == parallel.fallback.float_layers
            and serial.fallback.note == parallel.fallback.note and serial.notes == parallel.notes
            and serial.model.SerializeToString() == parallel.model.SerializeToString())


def _seconds(result: onnxq.QuantResult) -> tuple[float, float]:
    assert result.sensitivity is not None and result.fallback is not None, "the target needed no fallback"
    return result.sensitivity.seconds, result.fallback.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lite0-cosine", type=float, default=0.995)
    parser.add_argument("--ppocr-cosine", type=float, default=0.9995)
    args = parser.parse_args()
    print(f"{usable_cores()} cores; jobs=1: one session, ORT default threads; jobs=2: 2 processes x "
          f"{threads_per_job(2)} thread(s); {HELD_BACK} held-back samples; median of {args.repeats} interleaved runs\n")
    print(f"{'model':18s} {'target':>14s} {'float':>6s} {'search runs':>12s}  {'ranking s':>11s} {'search s':>11s} "
          f"{'step s':>11s} {'speed-up':>8s}  same")
    cases: list[tuple[str, float, Callable[[float, int], onnxq.QuantResult]]] = [
        ("EfficientNet-Lite0", args.lite0_cosine, _efficientnet), ("PP-OCR cls", args.ppocr_cosine, _ppocr)]
    for name, cosine, run in cases:
        times: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
        results: dict[int, onnxq.QuantResult] = {}
        same = True
        for _ in range(args.repeats):
            for jobs in (1, 2):
                results[jobs] = run(cosine, jobs)
                times[jobs].append(_seconds(results[jobs]))
            same = same and _same(results[1], results[2])
        ranking = {jobs: statistics.median(t[0] for t in times[jobs]) for jobs in (1, 2)}
        search = {jobs: statistics.median(t[1] for t in times[jobs]) for jobs in (1, 2)}
        step = {jobs: statistics.median(t[0] + t[1] for t in times[jobs]) for jobs in (1, 2)}
        serial, parallel = results[1].fallback, results[2].fallback
        assert serial is not None and parallel is not None and results[1].sensitivity is not None
        layers = f"{len(serial.float_layers)}/{len(results[1].sensitivity.layers)}"
        runs = f"{serial.runs} / {parallel.runs} ({parallel.wasted})"
        print(f"{name:18s} {'cosine ' + str(cosine):>14s} {layers:>6s} {runs:>12s}  "
              f"{ranking[1]:5.1f}->{ranking[2]:<5.1f} {search[1]:5.1f}->{search[2]:<5.1f} {step[1]:5.1f}->{step[2]:<5.1f} "
              f"{step[1] / step[2]:7.2f}x  {'yes' if same else 'NO'}")
        for jobs in (1, 2):
            print(f"{'':18s} jobs={jobs} ranking + search, every run: "
                  + ", ".join(f"{r:.1f} + {s:.1f}" for r, s in times[jobs]))


if __name__ == "__main__":
    main()
