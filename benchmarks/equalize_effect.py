"""What cross-layer equalization does to INT8 accuracy (run on demand, not a test).

For each model, target (trt; ort-cpu without the latency search) and range method, quantizes without
equalization (`--no-equalize`), with it (the default), and with the variants the default leaves out
(linear pairs; ReLU6 made per-channel), then compares each INT8 model with the float model on the held-out
data: the output's cosine, SQNR and top-1 agreement (what `onnxq quantize --eval` prints), and the logits'
SQNR change against `--no-equalize` with a 95% paired-bootstrap interval over the samples (1000
resamples): the PP-OCR classifier's output is a softmax, so its logits (the Softmax input) are read too.

    .venv/bin/python benchmarks/equalize_effect.py [--models lite0,ppocr,separable] [--methods max,mse]

Models: EfficientNet-Lite0 (64 calibration / 192 evaluation photos), the PP-OCR classifier (64 / 200 text
lines), and models/builders `separable_relu_cnn` (depthwise channels unbalanced by 100x; 32 / 32 random
samples). A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxq
from onnxq.passes.equalize import equalize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's models/ package
import models  # noqa: E402
DATA = ROOT / "models" / "data"
TARGETS = ("trt", "ort-cpu")
BOOTSTRAP = 1000


def _lite0() -> tuple[onnx.ModelProto, object, object, str | None]:
    model = onnxq.load_model(ROOT / "models" / "efficientnet_lite0.onnx")
    preprocess = onnxq.ImagePreprocess(mean=(127.0,) * 3, std=(128.0,) * 3)
    sources = (onnxq.open_source(DATA / "photos" / part, onnxq.signature_of(model), preprocess)
               for part in ("calib", "eval"))
    return model, *sources, None


def _ppocr() -> tuple[onnx.ModelProto, object, object, str | None]:
    model = onnxq.load_model(ROOT / "models" / "ppocr_mobile_v2_cls.onnx")
    sources = (onnxq.open_source(DATA / "textlines" / f"ppocr_cls_{part}.npz", onnxq.signature_of(model))
               for part in ("calib", "eval"))
    return model, *sources, "linear_1.tmp_1"  # the Softmax input


def _separable() -> tuple[onnx.ModelProto, object, object, str | None]:
    model = models.BUILDERS["separable_relu_cnn"]()
    feeds = [models.random_feeds(model, batch=8, seed=s) for s in range(8)]
    return model, onnxq.FeedsSource(feeds[:4]), onnxq.FeedsSource(feeds[4:]), None


MODELS: dict[str, Callable[[], tuple[onnx.ModelProto, object, object, str | None]]] = {
    "lite0": _lite0, "ppocr": _ppocr, "separable": _separable}


def _variants(name: str) -> dict[str, dict]:
    """Label -> quantize keyword arguments (besides the config's target and method)."""
    variants = {"--no-equalize": {"equalize": False}, "equalize (default)": {"equalize": None}}
    if name == "lite0":
        variants["+ linear pairs"] = {"equalize": False, "steps": [onnxq.Equalize(linear_pairs=True)]}
        variants["+ ReLU6 bounded"] = {"equalize": False,
                                       "user_passes": [functools.partial(equalize, bound_clips=True)]}
    return variants


def _outputs(model: onnx.ModelProto, extra: str | None, feeds: Sequence[dict]) -> np.ndarray:
    """The last graph output (or `extra`, exposed as one more output) over every feed, concatenated."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if extra is not None:
        copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(extra))
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[-1] for feed in feeds])


def _sqnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(10 * np.log10((reference ** 2).sum() / ((reference - candidate) ** 2).sum()))


def _interval(reference: np.ndarray, base: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> str:
    """SQNR(other) - SQNR(base) on the logits and its 95% paired-bootstrap interval."""
    picks = rng.integers(0, len(reference), (BOOTSTRAP, len(reference)))
    deltas = [_sqnr(reference[p], other[p]) - _sqnr(reference[p], base[p]) for p in picks]
    low, high = np.percentile(deltas, [2.5, 97.5])
    return f"{_sqnr(reference, other) - _sqnr(reference, base):+6.2f} [{low:+.2f}, {high:+.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lite0,ppocr,separable")
    parser.add_argument("--methods", default="max,mse")
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    rng = np.random.default_rng(0)
    print(f"{'model':9} {'target':7} {'method':10} {'variant':20} {'pairs eq.':>9} {'cosine':>8} {'SQNR dB':>8} "
          f"{'top-1':>7}  logit SQNR vs --no-equalize [95% CI]")
    for name in args.models.split(","):
        model, calib, held_out, logits = MODELS[name]()
        feeds = list(held_out.batches(8))
        reference = _outputs(model, logits, feeds)
        for target in TARGETS:
            for method in args.methods.split(","):
                base = None
                for label, options in _variants(name).items():
                    config = onnxq.QuantConfig(target=target, latency_search=False, equalize=options["equalize"],
                                               calib=onnxq.CalibConfig(method=onnxq.CalibMethod(method)))
                    result = onnxq.quantize(model, calib, config, steps=options.get("steps", ()),
                                            user_passes=options.get("user_passes", ()))
                    found = result.finding(onnxq.Equalized)
                    pairs = f"{len(found.equalized)}/{len(found.conv_pairs)}" if found else "-"
                    metrics = onnxq.compare_models(model, result.model, feeds)[0]
                    top1 = "-" if metrics.top1_agreement is None else f"{metrics.top1_agreement:.2%}"
                    quantized = _outputs(result.model, logits, feeds)
                    versus = "" if base is None else _interval(reference, base, quantized, rng)
                    base = quantized if base is None else base
                    print(f"{name:9} {target:7} {method:10} {label:20} {pairs:>9} {metrics.cosine:8.5f} "
                          f"{metrics.sqnr_db:8.2f} {top1:>7}  {versus}", flush=True)


if __name__ == "__main__":
    main()
