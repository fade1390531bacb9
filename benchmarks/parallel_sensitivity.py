"""Per-layer sensitivity in 1 process vs 2 (`--jobs`), side by side in one run (run on demand, not a test).

For EfficientNet-Lite0 (64 calibration photos) and the PP-OCR classifier (64 text lines), measures every
layer alone and recovered (1 + 2 x layers runs, `AccuracyGoal()` without a threshold) on 32 held-back
samples, with `jobs=1` (one session, ONNX Runtime's default threads) and `jobs=2` (two processes, cores // 2
threads each), runs interleaved (1, 2, 1, 2, ...) so that a load from elsewhere hits both alike. Prints the
wall time of the sensitivity (`SensitivityResult.seconds`: from the gated model's build, the processes'
start-up and the float reference run to the last layer), the median over the repeats, the speed-up, and
whether the per-layer figures of the two are equal.

    .venv/bin/python benchmarks/parallel_sensitivity.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import onnxq
from onnxq.steps.accuracy.process_pool import threads_per_job, usable_cores

ROOT = Path(__file__).parents[1]
MODELS = ROOT / "models"
PHOTOS = MODELS / "data" / "photos"
TEXTLINES = MODELS / "data" / "textlines"
HELD_BACK = 32


def _efficientnet(jobs: int) -> onnxq.QuantResult:
    model = onnxq.load_model(MODELS / "efficientnet_lite0.onnx")
    specs, preprocess = onnxq.input_specs(model), onnxq.ImagePreprocess(mean=(127.0,) * 3, std=(128.0,) * 3)
    return onnxq.quantize(model, onnxq.open_source(PHOTOS / "calib", specs, preprocess),
                          onnxq.QuantConfig(bias_correction=False),
                          eval_source=onnxq.open_source(PHOTOS / "eval", specs, preprocess),
                          accuracy=onnxq.AccuracyGoal(samples=HELD_BACK, jobs=jobs))


def _ppocr(jobs: int) -> onnxq.QuantResult:
    return onnxq.quantize(MODELS / "ppocr_mobile_v2_cls.onnx", TEXTLINES / "ppocr_cls_calib.npz",
                          onnxq.QuantConfig(bias_correction=False), eval_source=TEXTLINES / "ppocr_cls_eval.npz",
                          accuracy=onnxq.AccuracyGoal(samples=HELD_BACK, jobs=jobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    repeats = parser.parse_args().repeats
    cores = usable_cores()
    print(f"{cores} cores; jobs=1: one session, ORT default threads; jobs=2: 2 processes x {threads_per_job(2)} "
          f"thread(s); {HELD_BACK} held-back samples; median of {repeats} interleaved runs\n")
    print(f"{'model':18s} {'layers':>6s} {'runs':>5s} {'jobs=1 s':>9s} {'jobs=2 s':>9s} {'speed-up':>9s}  equal")
    for name, run in (("EfficientNet-Lite0", _efficientnet), ("PP-OCR cls", _ppocr)):
        seconds: dict[int, list[float]] = {1: [], 2: []}
        layers = {}
        for _ in range(repeats):
            for jobs in (1, 2):
                sensitivity = run(jobs).sensitivity
                assert sensitivity is not None
                seconds[jobs].append(sensitivity.seconds)
                layers[jobs] = sensitivity
        one, two = statistics.median(seconds[1]), statistics.median(seconds[2])
        equal = layers[1].layers == layers[2].layers and layers[1].float_vs_int8 == layers[2].float_vs_int8
        print(f"{name:18s} {len(layers[1].layers):6d} {layers[1].runs:5d} {one:9.1f} {two:9.1f} {one / two:8.2f}x  "
              f"{'yes' if equal else 'NO'}")
        print(f"{'':18s} all runs: jobs=1 {', '.join(f'{s:.1f}' for s in seconds[1])}; "
              f"jobs=2 {', '.join(f'{s:.1f}' for s in seconds[2])}")


if __name__ == "__main__":
    main()
