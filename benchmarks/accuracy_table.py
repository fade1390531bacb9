"""INT8 against float, every onnxq range method beside ONNX Runtime and NNCF, on the shipped models.

For every model and target (trt, ort-cpu) the table shows how close each INT8 model stays to the float
model on held-out data: onnxq with each range method (max, entropy, percentile, mse) and with no method
set ("default": whatever `onnxq.QuantConfig()` gives, so the column follows the library's default), ONNX
Runtime's `quantize_static` (QDQ; MinMax, Entropy and Percentile calibrators, the best shown, all three
listed under the table) and NNCF's ONNX post-training quantization with its defaults. Every quantizer
gets the same calibration samples; every INT8 model is measured on the same evaluation samples.

    .venv/bin/python benchmarks/accuracy_table.py [--models lite0,ppocr,silero,encoder]
        [--targets trt,ort-cpu] [--json OUT.json]

Models and data (calibration / evaluation samples):
  lite0    models/efficientnet_lite0.onnx, photos/calib (64) / photos/eval (192), onnxq's image loading
  ppocr    models/ppocr_mobile_v2_cls.onnx, textlines/ppocr_cls_{calib,eval}.npz (64 / 200)
  silero   models/silero_vad.onnx, seeded synthetic 512-sample chunks at 16 kHz (64 / 128): harmonic
           tones with noise, and noise alone; zero recurrent state (each chunk on its own)
  encoder  models.BUILDERS["outlier_encoder"] (pre-LN encoder, LayerNorm outputs with outlier channels),
           seeded token sequences from a 512-word embedding table, 32 tokens, padded to 12-32 (64 / 128)

Each cell is "metric (cosine)":
  cosine     cosine similarity of the whole flattened output of INT8 and float over the evaluation
             samples (the encoder: over the unpadded tokens only); 1 = identical
  lite0, ppocr: top-1 agreement, the share of samples whose argmax is the float model's. ppocr also
             has labels (0 upright, 1 rotated 180 degrees): accuracy against them is listed under the table
  silero     the largest difference of the speech probability between INT8 and float over the chunks
             (lower is better; the JSON also has the share of chunks on which both agree whether the
             probability is above 0.5, and the float model's share above 0.5: the tones are not speech)
  encoder    nearest-neighbour agreement: the masked-mean-pooled embedding of each evaluation sample,
             its nearest other sample by cosine, the share for which INT8 finds the same one as float
"ORT best" is the calibrator with the best metric, then the highest cosine. NNCF has no TensorRT or ORT target:
one NNCF model per model appears in both tables. Sessions: the float model with ONNX Runtime's default
optimisations; INT8 models for trt with graph optimisations off (exact Q/DQ arithmetic, as TensorRT
computes it), for ort-cpu with all on (ORT's fused integer kernels, as deployed). Progress goes to
stderr; the JSON holds every number and what each model quantized (Q/DQ counts, quantized outputs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxq

sys.path.insert(0, str(Path(__file__).parent))
from _peers import ORT_CALIBRATORS, first_line, nncf_quantize, nncf_version, ort_quantize, qdq_summary  # noqa: E402

ROOT = Path(__file__).parents[1]
DATA = ROOT / "models" / "data"
METHODS = ("max", "entropy", "percentile", "mse", "auto")
TARGETS = {"trt": onnxq.TRT, "ort-cpu": onnxq.ORT_CPU}
BATCH = 8
STARTED = time.perf_counter()


def progress(text: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {text}", file=sys.stderr, flush=True)


@dataclass
class Case:
    """One model with its data, and how its outputs are scored."""

    name: str
    model: onnx.ModelProto
    calib: dict[str, np.ndarray]        # every calibration sample in one feed
    eval: dict[str, np.ndarray]
    metric: str                          # what the first number of a cell is
    score: Callable[[list[np.ndarray], list[np.ndarray], Case], dict]  # (float, int8, case) -> numbers
    transformer: bool = False
    lower_is_better: bool = False        # the metric is an error, not an agreement
    labels: np.ndarray | None = None     # class labels of the evaluation samples, if known

    @cached_property
    def signature(self) -> onnxq.ModelSignature:
        return onnxq.signature_of(self.model)

    def fresh_model(self) -> onnx.ModelProto:
        """A copy of the float model for one quantizer, so that none can change what the next one gets."""
        copy = onnx.ModelProto()
        copy.CopyFrom(self.model)
        return copy

    def batches(self, feed: dict, size: int) -> list[dict]:
        count = self.signature.samples_in(feed)
        return [self.signature.cut(feed, i, min(i + size, count)) for i in range(0, count, size)]


# ------------------------------------------------------------------ metrics

def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def classifier_score(ref: list[np.ndarray], cand: list[np.ndarray], case: Case) -> dict:
    numbers = {"top1_agreement": float(np.mean(ref[0].argmax(-1) == cand[0].argmax(-1))),
               "cosine": cosine(ref[0], cand[0])}
    if case.labels is not None:
        numbers["label_accuracy"] = float(np.mean(cand[0].argmax(-1) == case.labels))
    return numbers


def vad_score(ref: list[np.ndarray], cand: list[np.ndarray], _: Case) -> dict:
    p, q = ref[0].ravel(), cand[0].ravel()
    return {"max_abs_prob_diff": float(np.abs(p - q).max()), "cosine": cosine(p, q),
            "decision_agreement": float(np.mean((p > 0.5) == (q > 0.5))), "float_speech_share": float(np.mean(p > 0.5))}


def encoder_score(ref: list[np.ndarray], cand: list[np.ndarray], case: Case) -> dict:
    mask = case.eval["mask"].astype(bool)

    def neighbours(hidden: np.ndarray) -> np.ndarray:
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        similarity = pooled @ pooled.T
        np.fill_diagonal(similarity, -np.inf)
        return similarity.argmax(1)

    return {"nn_agreement": float(np.mean(neighbours(ref[0]) == neighbours(cand[0]))),
            "cosine": cosine(ref[0][mask], cand[0][mask])}


# ------------------------------------------------------------------ models and data

def lite0() -> Case:
    model = onnxq.load_model(ROOT / "models" / "efficientnet_lite0.onnx")
    preprocess = onnxq.ImagePreprocess(mean=(127.0,) * 3, std=(128.0,) * 3)

    def load(folder: str) -> dict:
        source = onnxq.open_source(DATA / "photos" / folder, onnxq.input_specs(model), preprocess)
        return {"input": np.concatenate([feed["input"] for feed in source.batches(64)])}

    return Case("lite0", model, load("calib"), load("eval"), "top1_agreement", classifier_score)


def ppocr() -> Case:
    model = onnxq.load_model(ROOT / "models" / "ppocr_mobile_v2_cls.onnx")
    text = DATA / "textlines"
    labels = np.asarray(json.loads((text / "ppocr_cls_eval_labels.json").read_text())["label"])
    return Case("ppocr", model, {"x": np.load(text / "ppocr_cls_calib.npz")["x"]},
                {"x": np.load(text / "ppocr_cls_eval.npz")["x"]}, "top1_agreement", classifier_score, labels=labels)


def _audio(rng: np.random.Generator, count: int) -> dict:
    """`count` chunks of 512 samples at 16 kHz: 3 in 4 a harmonic tone (f0 90-300 Hz, up to 4
    harmonics, amplitude 0.02-0.5, a slow envelope) plus noise, the rest noise alone."""
    t = np.arange(512) / 16000
    chunks = []
    for _ in range(count):
        noise = rng.uniform(0.001, 0.05) * rng.standard_normal(512)
        if rng.random() < 0.25:
            chunks.append(noise)
            continue
        f0, amplitude = rng.uniform(90, 300), rng.uniform(0.02, 0.5)
        tone = sum(rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
                   for k in range(1, int(rng.integers(1, 5)) + 1))
        envelope = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(2, 8) * t + rng.uniform(0, 2 * np.pi))
        chunks.append(amplitude * envelope * tone / np.abs(tone).max() + noise)
    audio = np.stack(chunks).astype(np.float32)
    return {"input": audio, "state": np.zeros((2, count, 128), np.float32), "sr": np.array(16000, np.int64)}


def silero() -> Case:
    rng = np.random.default_rng(0)
    return Case("silero", onnxq.load_model(ROOT / "models" / "silero_vad.onnx"), _audio(rng, 64), _audio(rng, 128),
                "max_abs_prob_diff", vad_score, lower_is_better=True)


def encoder() -> Case:
    sys.path.insert(0, str(ROOT))  # the repository's models/ package
    import models

    model = models.BUILDERS["outlier_encoder"]()
    hidden = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    rng = np.random.default_rng(0)
    table = rng.standard_normal((512, hidden)).astype(np.float32)
    frequency = 1.0 / np.arange(1, 513)  # Zipf-like: sentences share their common words

    def sentences(count: int) -> dict:
        ids = rng.choice(512, size=(count, 32), p=frequency / frequency.sum())
        lengths = rng.integers(12, 33, count)
        return {"tokens": table[ids], "mask": (np.arange(32)[None] < lengths[:, None]).astype(np.float32)}

    return Case("encoder", model, sentences(64), sentences(128), "nn_agreement", encoder_score, transformer=True)


CASES = {"lite0": lite0, "ppocr": ppocr, "silero": silero, "encoder": encoder}


# ------------------------------------------------------------------ running

def run_outputs(model: onnx.ModelProto, case: Case, optimize: bool) -> list[np.ndarray]:
    """Every output of `model` on the evaluation samples, batch by batch, concatenated on axis 0."""
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()[:1]]  # the first output: logits, probability, hidden states
    runs = [session.run(names, batch) for batch in case.batches(case.eval, BATCH)]
    return [np.concatenate([run[i] for run in runs]) for i in range(len(names))]


def measure(label: str, build: Callable[[], onnx.ModelProto], case: Case, reference: list[np.ndarray],
            optimize: bool) -> dict:
    """Quantize with `build`, score against `reference`; a failure becomes {"refused": first line}."""
    progress(f"{case.name}: {label}")
    try:
        model = build()
        numbers = case.score(reference, run_outputs(model, case, optimize), case)
    except Exception as error:  # noqa: BLE001 - a peer's refusal or crash is a table cell, not the end
        progress(f"{case.name}: {label} refused: {first_line(error)}")
        return {"refused": first_line(error)}
    return {**numbers, "qdq": qdq_summary(model)}


def onnxq_model(case: Case, target: str, method: str | None) -> onnx.ModelProto:
    config = (onnxq.QuantConfig(target=TARGETS[target]) if method is None else
              onnxq.QuantConfig(target=TARGETS[target], calib=onnxq.CalibConfig(method=onnxq.CalibMethod(method))))
    source = onnxq.FeedsSource([case.calib], signature=case.signature)
    return onnxq.quantize(case.fresh_model(), source, config).model


def run_case(case: Case, targets: Sequence[str]) -> dict:
    reference = run_outputs(case.model, case, optimize=True)
    samples = [case.signature.cut(case.calib, i, i + 1) for i in range(case.signature.samples_in(case.calib))]
    nncf_cache: dict = {}

    def nncf_model() -> onnx.ModelProto:  # one NNCF run per model, scored under each target's session
        if "model" not in nncf_cache:
            try:
                nncf_cache["model"] = nncf_quantize(case.fresh_model(), samples, case.transformer)
            except Exception as error:  # noqa: BLE001
                nncf_cache["model"] = error
        if isinstance(nncf_cache["model"], Exception):
            raise nncf_cache["model"]
        return nncf_cache["model"]

    results: dict = {"metric": case.metric, "lower_is_better": case.lower_is_better, "calib_samples": len(samples),
                     "eval_samples": case.signature.samples_in(case.eval), "targets": {}}
    if case.labels is not None:
        results["float_label_accuracy"] = float(np.mean(reference[0].argmax(-1) == case.labels))
    calib_batches = case.batches(case.calib, BATCH)
    for target in targets:
        optimize = target == "ort-cpu"
        cells: dict = {}
        for method in (*METHODS, None):
            cells[method or "default"] = measure(f"{target} onnxq {method or 'default'}",
                                                 lambda m=method: onnxq_model(case, target, m),
                                                 case, reference, optimize)
        cells["ort"] = {name: measure(f"{target} ORT {name}",
                                      lambda n=name: ort_quantize(case.fresh_model(), calib_batches, target, n),
                                      case, reference, optimize) for name in ORT_CALIBRATORS}
        cells["ort_best"] = best_ort(cells["ort"], case.metric, case.lower_is_better)
        cells["nncf"] = measure(f"{target} NNCF", nncf_model, case, reference, optimize)
        results["targets"][target] = cells
    return results


# ------------------------------------------------------------------ output

def best_ort(cells: dict, metric: str, lower_is_better: bool) -> str | None:
    """The ORT calibrator with the best metric, then the highest cosine; None if all refused."""
    scored = [name for name, cell in cells.items() if "refused" not in cell]
    sign = -1.0 if lower_is_better else 1.0
    return max(scored, key=lambda n: (sign * cells[n][metric], cells[n]["cosine"]), default=None)


def cell_text(cell: dict, result: dict) -> str:
    """"metric (cosine)", or "refused: <the error's first line>"."""
    if "refused" in cell:
        return "refused: " + cell["refused"]
    digits = 4 if result["lower_is_better"] else 3
    return f"{cell[result['metric']]:.{digits}f} ({cell['cosine']:.5f})"


def quantize_count(qdq: dict) -> str:
    """E.g. "51", or "0 (+12 in subgraphs)"."""
    inside = f" (+{qdq['quantize_subgraphs']} in subgraphs)" if qdq["quantize_subgraphs"] else ""
    return f"{qdq['quantize_main']}{inside}"


def print_table(target: str, results: dict) -> None:
    header = ["model (metric)", *METHODS, "default", "ORT best (which)", "NNCF"]
    rows = []
    for name, result in results.items():
        cells, best = result["targets"][target], result["targets"][target]["ort_best"]
        ort_cell = f"{cell_text(cells['ort'][best], result)} {best}" if best else "all refused (below)"
        rows.append([f"{name} ({result['metric']})", *(cell_text(cells[m], result) for m in (*METHODS, "default")),
                     ort_cell, cell_text(cells["nncf"], result)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(f"\ntarget {target}: metric (cosine) of INT8 against float on the evaluation samples")
    for row in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(text.ljust(w) for text, w in zip(row, widths)).rstrip())
    print("  ORT quantize_static, each calibrator:")
    for name, result in results.items():
        ort_cells = result["targets"][target]["ort"]
        print(f"    {name:8s} " + "   ".join(f"{n} {cell_text(c, result)}" for n, c in ort_cells.items()))
    print("  QuantizeLinear nodes, and graph outputs that a DequantizeLinear writes:")
    for name, result in results.items():
        cells = result["targets"][target]
        tools = {"onnxq": {m: cells[m] for m in (*METHODS, "default")}, "ORT": cells["ort"],
                 "NNCF": {"": cells["nncf"]}}
        parts, outputs = [], []
        for tool, runs in tools.items():
            counts = {k: quantize_count(c["qdq"]) for k, c in runs.items() if "qdq" in c}
            if len(set(counts.values())) == 1:
                parts.append(f"{tool} {next(iter(counts.values()))}")
            else:
                parts += [f"{tool} {k} {v}" for k, v in counts.items()]
            outputs += [f"{tool} {k} ({', '.join(c['qdq']['dequantized_outputs'])})".replace("  ", " ")
                        for k, c in runs.items() if c.get("qdq", {}).get("dequantized_outputs")]
        print(f"    {name:8s} {', '.join(parts)}; quantized outputs: {', '.join(outputs) or 'none'}")
    for name, result in results.items():
        if "float_label_accuracy" not in result:
            continue
        cells = result["targets"][target]
        named = [*((m, cells[m]) for m in (*METHODS, "default")), *((f"ORT {n}", c) for n, c in cells["ort"].items()),
                 ("NNCF", cells["nncf"])]
        print(f"  {name} accuracy against its labels: float {result['float_label_accuracy']:.3f}, "
              + ", ".join(f"{k} {c['label_accuracy']:.3f}" for k, c in named if "label_accuracy" in c))


def versions() -> dict:
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    return {"onnxq": f"{onnxq.__version__} ({commit or 'no git'})", "onnxruntime": ort.__version__,
            "nncf": nncf_version(), "onnx": onnx.__version__, "numpy": np.__version__,
            "onnxq_default_method": onnxq.QuantConfig().calib.method.value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--targets", default="trt,ort-cpu", help="comma-separated, of trt, ort-cpu")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    args = parser.parse_args()
    models, targets = args.models.split(","), args.targets.split(",")
    unknown = [m for m in models if m not in CASES] + [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown model or target: {', '.join(unknown)}")
    ort.set_default_logger_severity(3)
    info = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    results = {}
    for name in models:
        progress(f"{name}: loading the model and data")
        results[name] = run_case(CASES[name](), targets)
    for target in targets:
        print_table(target, results)
    wall = time.perf_counter() - STARTED
    print(f"\ntotal wall time {wall:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"versions": info, "wall_time_s": round(wall, 1), "models": results}, indent=1))


if __name__ == "__main__":
    main()
