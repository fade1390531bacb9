"""Float vs INT8 latency on ONNX Runtime's CPU provider, side by side in one run (on demand, not a test).

For EfficientNet-Lite0, the PP-OCR classifier, a BERT-small-sized synthetic encoder (hidden 384,
6 heads, FFN 1536, sequence 128, random inputs) and, with `--models light`, the nine architectures
the onnx package ships with placeholder weights (random N(0, 1) inputs: speed only), calibrated on the
same data:
  - the float model,
  - for reference, the float model after onnxq's prepare passes (BatchNorm, Pad and bias folding,
    hard-swish fusion): how much of a speed-up is graph clean-up rather than INT8,
  - onnxq --target ort-cpu with the rule-based plan alone (--no-latency-search, the library default)
    and with the latency search (the CLI's default for ort-cpu),
  - ONNX Runtime's own quantize_static (QDQ, u8 activations, s8 per-channel weights, MinMax),
all with graph optimisations on, timed interleaved (float, onnxq, ORT, float, ...) so machine noise
hits all three alike; median and p90 per run, and the speed-up over float. Also prints how each
INT8 model scores against float (top-1 agreement, cosine) on held-out data.

    .venv/bin/python benchmarks/latency_ort_cpu.py [--runs 50] [--batches 1,8] [--threads N]
        [--models lite0,ppocr,encoder,light]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime import quantization as ortq

import onnxq

ROOT = Path(__file__).parents[1]
DATA = ROOT / "models" / "data"
LITE0 = onnxq.ImagePreprocess(mean=(127.0,) * 3, std=(128.0,) * 3)


def _lite0_data() -> tuple[str, np.ndarray, np.ndarray]:
    specs = onnxq.input_specs(onnxq.load_model(ROOT / "models" / "efficientnet_lite0.onnx"))
    def load(folder: str) -> np.ndarray:
        source = onnxq.open_source(DATA / "photos" / folder, specs, LITE0)
        return np.concatenate([f["input"] for f in source.batches(64)])
    return "input", load("calib"), load("eval")


def _encoder() -> tuple[Path, tuple[str, np.ndarray, np.ndarray]]:
    """The synthetic encoder of models/builders_transformer.py at BERT-small size (its module constants
    set the sizes), saved to a temporary file; inputs `tokens` [N, 128, 384] and an all-ones `mask`."""
    sys.path.insert(0, str(ROOT))  # the repository's models/ package
    import models.builders_transformer as encoder

    encoder.HIDDEN, encoder.NUM_HEADS, encoder.HEAD_SIZE, encoder.FFN_HIDDEN = 384, 6, 64, 1536
    path = Path(tempfile.mkdtemp()) / "encoder.onnx"
    onnxq.save_model(encoder.build_transformer_encoder(), path)
    rng = np.random.default_rng(0)
    return path, ("tokens", rng.normal(size=(16, 128, 384)).astype(np.float32),
                  rng.normal(size=(16, 128, 384)).astype(np.float32))


def _ppocr_data() -> tuple[str, np.ndarray, np.ndarray]:
    return ("x", np.load(DATA / "textlines" / "ppocr_cls_calib.npz")["x"],
            np.load(DATA / "textlines" / "ppocr_cls_eval.npz")["x"])


def _light_models() -> list[tuple[str, Path, tuple[str, np.ndarray, np.ndarray]]]:
    """The onnx package's nine light models, each with 16 calibration and 8 held-out random inputs."""
    sys.path.insert(0, str(ROOT))  # the repository's models/ package
    import models

    found = []
    for path in models.light_model_paths():
        spec = onnxq.input_specs(onnxq.load_model(path))[0]  # their one data input, all dims fixed
        rng = np.random.default_rng(0)
        found.append((path.stem.removeprefix("light_"), path,
                      (spec.name, rng.normal(size=(16, *spec.shape[1:])).astype(np.float32),
                       rng.normal(size=(8, *spec.shape[1:])).astype(np.float32))))
    return found


def _fixed_batch(model_path: Path) -> int | None:
    """The batch size the model's first input fixes, or None."""
    return onnxq.input_specs(onnxq.load_model(model_path))[0].shape[0]


class _Reader(ortq.CalibrationDataReader):
    def __init__(self, name: str, x: np.ndarray, extra: dict, batch: int) -> None:
        self.batches = iter([{name: x[i:i + batch], **{k: v[i:i + batch] for k, v in extra.items()}}
                             for i in range(0, len(x), batch)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # The sessions take turns: idle threads of one must not spin on the cores the next one needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _interleaved(sessions: list[ort.InferenceSession], feed: dict, runs: int) -> list[np.ndarray]:
    for session in sessions:
        for _ in range(5):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for session, spent in zip(sessions, times):
            start = time.perf_counter_ns()
            session.run(None, feed)
            spent.append((time.perf_counter_ns() - start) / 1e6)
    return [np.asarray(t) for t in times]


def _accuracy(reference: np.ndarray, candidate: np.ndarray) -> str:
    if reference.ndim != 2:
        cosine = float((reference * candidate).sum() / np.linalg.norm(reference) / np.linalg.norm(candidate))
        return f"cosine {cosine:.4f}"
    cosine = float((reference * candidate).sum() / np.linalg.norm(reference) / np.linalg.norm(candidate))
    return f"top-1 agreement {np.mean(reference.argmax(1) == candidate.argmax(1)):.3f}, cosine {cosine:.4f}"


def bench(label: str, model_path: Path, data: tuple[str, np.ndarray, np.ndarray], args: argparse.Namespace,
          folder: Path) -> None:
    name, calib, held_out = data
    extra = {"mask": np.ones(calib.shape[:2], np.float32)} if name == "tokens" else {}
    ours, theirs = folder / f"{label}.onnxq.onnx", folder / f"{label}.ort.onnx"
    prepared, searched = folder / f"{label}.prepared.onnx", folder / f"{label}.searched.onnx"
    fixed = _fixed_batch(model_path)
    step = fixed or 8
    config = onnxq.QuantConfig(target=onnxq.Target.ORT_CPU, calib=onnxq.CalibConfig(batch_size=step))
    calib_source = onnxq.FeedsSource([{name: calib[i:i + step], **{k: v[i:i + step] for k, v in extra.items()}}
                                      for i in range(0, len(calib), step)])
    onnxq.save_model(onnxq.quantize(model_path, calib_source, config).model, ours)
    float_model = onnxq.load_model(model_path)
    onnxq.save_model(onnxq.from_graph(onnxq.prepare(float_model), template=float_model), prepared)
    search = onnxq.quantize(model_path, calib_source, config, latency=onnxq.LatencySearchConfig())
    onnxq.save_model(search.model, searched)
    print(f"\n{label}: latency search on one batch of {step}: float {search.latency.float_model_ms:.2f} ms, "
          f"full plan {search.latency.start_ms:.2f} ms, chosen {search.latency.final_ms:.2f} ms")
    for trial in search.latency.trials:
        print(f"  {'int8 ' if trial.kept_int8 else 'float'} {trial.layer_class} ({len(trial.nodes)}): {trial.reason}")
    ortq.quantize_static(str(model_path), str(theirs), _Reader(name, calib, extra, step), quant_format=ortq.QuantFormat.QDQ,
                         per_channel=True, activation_type=ortq.QuantType.QUInt8, weight_type=ortq.QuantType.QInt8,
                         calibrate_method=ortq.CalibrationMethod.MinMax)
    sessions = [_session(p, args.threads) for p in (model_path, prepared, ours, searched, theirs)]
    held_extra = {k: np.ones(held_out.shape[:2], np.float32) for k in extra}
    outputs = [np.concatenate([s.run(None, {name: held_out[i:i + step], **{k: v[i:i + step] for k, v in held_extra.items()}})[0]
                               for i in range(0, len(held_out), step)]) for s in sessions]
    print(f"\n{label}: accuracy vs float on {len(held_out)} held-out samples")
    print(f"  onnxq, rule-based plan   {_accuracy(outputs[0], outputs[2])}")
    print(f"  onnxq, latency search    {_accuracy(outputs[0], outputs[3])}")
    print(f"  ORT quantize_static u8s8 {_accuracy(outputs[0], outputs[4])}")
    for batch in [fixed] if fixed else args.batches:
        times = _interleaved(sessions, {name: held_out[:batch], **{k: v[:batch] for k, v in held_extra.items()}},
                             args.runs)
        base = np.median(times[0])
        print(f"{label} batch {batch}: median / p90 ms over {args.runs} interleaved runs")
        tags = ("float", "float, onnxq-prepared (ref.)", "onnxq, rule-based plan", "onnxq, latency search (CLI)",
                "ORT quantize_static u8s8")
        for tag, spent in zip(tags, times):
            median, p90 = np.median(spent), np.percentile(spent, 90)
            print(f"  {tag:32s} {median:8.2f} / {p90:8.2f}   speed-up over float {base / median:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--batches", default="1,8", type=lambda t: [int(v) for v in t.split(",")])
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT's default)")
    parser.add_argument("--models", default="lite0,ppocr,encoder", type=lambda t: t.split(","),
                        help="comma-separated: lite0, ppocr, encoder, light (the onnx package's nine)")
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, threads {args.threads or 'default'}")
    with tempfile.TemporaryDirectory() as tmp:
        if "lite0" in args.models:
            bench("EfficientNet-Lite0", ROOT / "models" / "efficientnet_lite0.onnx", _lite0_data(), args, Path(tmp))
        if "ppocr" in args.models:
            bench("PP-OCR classifier", ROOT / "models" / "ppocr_mobile_v2_cls.onnx", _ppocr_data(), args, Path(tmp))
        if "encoder" in args.models:
            encoder_path, encoder_data = _encoder()
            bench("BERT-small-sized encoder", encoder_path, encoder_data, args, Path(tmp))
        if "light" in args.models:
            for label, path, data in _light_models():
                bench(label, path, data, args, Path(tmp))


if __name__ == "__main__":
    main()
