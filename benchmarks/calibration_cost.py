"""What calibration costs in time and memory, side by side in one run (run on demand, not a test).

For EfficientNet-Lite0 and the PP-OCR text-direction classifier, at 64 and 512 samples, prints the wall
time and peak RSS of
  - the floor: plain float inference over the same samples in ONNX Runtime with its default options
    (graph optimisations on) and onnxq's batch size; for reference, the same with optimisations off,
    onnxq's prepared graph, and that graph with the measured tensors exposed as outputs (onnxq's
    calibration session without the statistics: what reading the activations out of ORT costs);
  - `onnxq.quantize` with each calibration method (max, entropy, percentile, mse, auto), the
    data given as a memory-mapped .npy path (bias correction on, as by default);
  - ONNX Runtime `quantize_static` (QDQ, per-channel, QInt8 activations and weights,
    ActivationSymmetric) with MinMax, Entropy and Percentile calibration on the same data;
then auto against max in one line per sample count: the whole run's wall-time ratio, the
calibration pass's (histograms against running maxima; target <= 2x) and the range search's seconds
(bounded by a run count); the per-sample costs (wall at 512 - wall at 64) / 448, which cancel start-up, their ratios to the
floor, onnxq / ORT for matching methods, the growth of peak RSS from 64 to 512 samples, and the
targets with whether each is met.

Every configuration runs in its own fresh subprocess, which reports its own peak RSS: VmHWM from
/proc/self/status, because `ru_maxrss` carries the parent's peak across execve on Linux. The parent
samples each child's VmRSS every 0.2 s and kills it above --rss-cap-gib (ORT's Entropy and Percentile
calibrators keep every activation in memory) or after --timeout seconds; such a run is reported as
"killed at >12 GiB after N s" and its figures as lower bounds (">").

Timing on a shared machine: before each run the parent waits (up to --quiet-wait s) for other
processes to go idle; runs under 20 s are repeated (--repeat) and a longer run during which other
processes took CPU is run once more; after the first pass, each configuration whose fastest run was
still contended runs once more if the machine goes quiet within 3 x --quiet-wait. The fastest run is
kept; a time marked * was measured while other processes used more than 0.25 cores.

The sample sets are built once in a temporary folder: Lite0 from the 64 calibration + 192 evaluation
photos (mean 127, std 128) and their horizontal flips (512); PP-OCR from the 64 + 200 text lines and
their flips, cut to 512. Larger counts repeat the samples cyclically (`--samples 64,2048` for the PP-OCR
classifier, whose 512-sample walls are ~1 s and too noisy for a per-sample cost). Pages of the
memory-mapped .npy that a run reads count toward its RSS.

    .venv/bin/python benchmarks/calibration_cost.py
    .venv/bin/python benchmarks/calibration_cost.py --models lite0 --methods max,entropy --skip-ort
    .venv/bin/python benchmarks/calibration_cost.py --samples 64,512 --rss-cap-gib 12 --timeout 600
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from _bench_util import (CONTENDED_CORES, GIB, MIB, REPEAT_BELOW_S, Figure, RunResult, best_of, contended, divide,
                         measure, per_unit, verdict, wait_for_quiet)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "models" / "data"
METHODS = ("max", "entropy", "percentile", "mse", "auto")
ORT_METHOD = {"max": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}  # mse: no ORT counterpart
TIME_TARGET = {"max": 1.3, "entropy": 2.0, "percentile": 2.0, "mse": 2.0, "auto": 2.0}  # per-sample cost / floor's
ORT_ENTROPY_TARGET = (5.0, 10.0)  # onnxq entropy at least this many times less time, memory
RSS_ALLOWANCE = 4 * MIB  # peak RSS growth this close to the floor's counts as no more (allocator noise)


@dataclass(frozen=True)
class Model:
    """A benchmarked model: its display name and file."""

    name: str
    path: Path


MODELS = {
    "lite0": Model("EfficientNet-Lite0", ROOT / "models" / "efficientnet_lite0.onnx"),
    "ppocr": Model("PP-OCR mobile v2 text-direction classifier", ROOT / "models" / "ppocr_mobile_v2_cls.onnx"),
}


@dataclass(frozen=True)
class Config:
    """One measured configuration: `kind` floor | onnxq | ort, `variant` an opt level or a method."""

    kind: str
    variant: str

    @property
    def label(self) -> str:
        """The row label in the tables."""
        if self.kind == "floor":
            return {"on": "floor: ORT float inference (defaults)", "off": "ref.: same, optimisations off",
                    "prepared": "ref.: onnxq's prepared graph",
                    "exposed": "ref.: same, measured tensors exposed"}[self.variant]
        return f"onnxq {self.variant}" if self.kind == "onnxq" else f"ORT quantize_static {self.variant}"


# The floor is plain float inference with ORT's defaults (graph optimisations on), as a user would run the
# model; the references show the model with optimisations off, onnxq's prepared graph, and that graph with
# the tensors calibration measures exposed as outputs (handed out of ORT and dropped): the cost of any
# calibrator that reads those activations, before it computes a single statistic.
FLOOR, FLOOR_OFF = Config("floor", "on"), Config("floor", "off")
FLOOR_PREPARED, FLOOR_EXPOSED = Config("floor", "prepared"), Config("floor", "exposed")


# --------------------------------------------------------------------------------------------- the child


def _float_inference(model: str, data: np.ndarray, variant: str, batch: int) -> None:
    """Plain float inference over `data`.

    `variant`: "on" the model as given with ORT's default options (graph optimisations on): the floor;
    "off" the same with optimisations disabled; "prepared" onnxq's prepared graph (constants, BatchNorm,
    Pads, bias Adds folded, hard-swish fused) with optimisations on; "exposed" that graph with the
    tensors of onnxq's default plan as extra outputs: onnxq's calibration session, statistics left out.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_DISABLE_ALL if variant == "off" else level.ORT_ENABLE_ALL
    options.enable_mem_pattern = variant != "exposed"  # as onnxq's calibration session
    source: str | bytes = model
    if variant in ("prepared", "exposed"):
        import onnxq  # already imported by `child` before the clock started
        from onnxq.calib.expose import expose_tensors

        graph = onnxq.prepare(model)
        if variant == "exposed":
            inputs = {tensor.name for tensor in graph.inputs}
            measured = [n for n in onnxq.plan_quantization(graph).activation_names if n not in inputs]
            graph = expose_tensors(graph, measured)
        source = onnxq.from_graph(graph).SerializeToString()
    session = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for start in range(0, len(data), batch):
        session.run(None, {name: np.array(data[start:start + batch])})  # a copy, as onnxq's batching makes


def _ort_quantize(model: str, data: np.ndarray, method: str, batch: int) -> None:
    """ORT quantize_static, QDQ, per-channel, symmetric INT8 activations and weights."""
    import onnx
    from onnxruntime import quantization as ortq

    class Reader(ortq.CalibrationDataReader):
        def __init__(self, name: str, batch: int) -> None:
            self.batches = ({name: np.array(data[i:i + batch])} for i in range(0, len(data), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    input_name = onnx.load(model, load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        ortq.quantize_static(model, str(Path(tmp) / "ort.onnx"), Reader(input_name, batch),
                             quant_format=ortq.QuantFormat.QDQ, per_channel=True,
                             activation_type=ortq.QuantType.QInt8, weight_type=ortq.QuantType.QInt8,
                             calibrate_method=getattr(ortq.CalibrationMethod, method),
                             extra_options={"ActivationSymmetric": True})


def _status_kib(field: str) -> int:
    """A `/proc/self/status` memory field (e.g. VmHWM, the peak RSS), in KiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def child(job: dict[str, str]) -> None:
    """Run one configuration; print its wall time and its own peak RSS (VmHWM) as JSON on the last line."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    if job["kind"] == "onnxq" or job["variant"] == "prepared":
        import onnxq  # before the clock starts, as onnxruntime is
    print(json.dumps({"started": time.time()}), flush=True)
    started = time.perf_counter()
    extra: dict[str, float] = {}
    if job["kind"] == "onnxq":
        config = onnxq.QuantConfig(calib=onnxq.CalibConfig(method=onnxq.CalibMethod(job["variant"])))
        result = onnxq.quantize(job["model"], job["data"], config)
        extra["calibration_seconds"] = result.calibration.seconds
        extra["search_seconds"] = sum(getattr(f, "seconds", 0.0) for f in result.findings
                                      if type(f).__name__ == "RangesChosen")
    else:
        data = np.load(job["data"], mmap_mode="r")
        if job["kind"] == "floor":
            _float_inference(job["model"], data, job["variant"], int(job["batch"]))
        else:
            _ort_quantize(job["model"], data, job["variant"], int(job["batch"]))
    seconds = time.perf_counter() - started
    # ru_maxrss survives execve: Linux folds the parent's peak (the mm the child was forked or vforked
    # with) into it, so it reads max(parent's peak, own peak). VmHWM is this process image's own peak.
    usage = resource.getrusage(resource.RUSAGE_SELF)  # ru_maxrss in KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_rss_kib": _status_kib("VmHWM"), "ru_maxrss_kib": usage.ru_maxrss,
                      "cpu_seconds": usage.ru_utime + usage.ru_stime, **extra}), flush=True)


# ------------------------------------------------------------------------------------------- the parent


def _default_batch() -> int:
    """onnxq's default calibration batch size, which the floor and ORT runs use too."""
    import onnxq

    return onnxq.CalibConfig().batch_size


def _pool(key: str) -> np.ndarray:
    """Every sample the set for `key` can hold: the real samples followed by their horizontal flips."""
    import onnxq

    if key == "lite0":
        specs = onnxq.input_specs(onnxq.load_model(MODELS[key].path))
        preprocess = onnxq.ImagePreprocess(mean=(127.0,) * 3, std=(128.0,) * 3)
        sources = [onnxq.open_source(DATA / "photos" / part, specs, preprocess) for part in ("calib", "eval")]
        parts = [feed[specs[0].name] for source in sources for feed in source.batches(64)]
    else:
        parts = []
        for part in ("calib", "eval"):
            with np.load(DATA / "textlines" / f"ppocr_cls_{part}.npz") as archive:
                parts.append(archive["x"])
    real = np.concatenate(parts)
    return np.concatenate([real, real[..., ::-1]])


def build_sets(keys: list[str], counts: list[int], folder: Path) -> dict[tuple[str, int], Path]:
    """Write `{key}_{n}.npy` (the first n samples of the pool) for every model and sample count.

    Past the pool's size the samples repeat cyclically: fine for cost (every sample still runs through
    the model and the histograms), and it lets a thin model's walls grow long enough to time steadily.
    """
    paths = {}
    for key in keys:
        pool = _pool(key)
        if max(counts) > len(pool):
            print(f"    {MODELS[key].name}: {len(pool)} distinct samples (with flips); larger sets repeat them")
        for n in counts:
            paths[key, n] = folder / f"{key}_{n}.npy"
            rows = np.arange(n) % len(pool)
            np.save(paths[key, n], np.ascontiguousarray(pool[rows], dtype=np.float32))
    return paths


def _configs(methods: list[str], skip_ort: bool) -> list[Config]:
    configs = [FLOOR, FLOOR_OFF, FLOOR_PREPARED, FLOOR_EXPOSED] + [Config("onnxq", m) for m in methods]
    return configs + ([] if skip_ort else [Config("ort", ORT_METHOD[m]) for m in methods if m in ORT_METHOD])


def _mib(figure: Figure | None) -> str:
    return "-" if figure is None else Figure(figure.value / MIB, figure.bound).text("{:.0f}")


def _sec(figure: Figure | None, fmt: str = "{:.1f}") -> str:
    return "-" if figure is None else figure.text(fmt)


def _star(result: RunResult) -> str:
    return "*" if contended(result) else " "


def _ratio(figure: Figure | None) -> str:
    return "-" if figure is None else figure.text("{:.2f}") + "x"


Results = dict[tuple[Config, int], RunResult]


def _print_table(key: str, configs: list[Config], counts: list[int], results: Results, sets: dict) -> None:
    model = MODELS[key]
    sizes = ", ".join(f"{n} = {sets[key, n].stat().st_size / MIB:.0f} MiB" for n in counts)
    others = [r.extra["others_cores"] for r in results.values() if "others_cores" in r.extra]
    print(f"\n=== {model.name} ({model.path.relative_to(ROOT)}), batch {_default_batch()}, CPUExecutionProvider")
    print(f"    data: memory-mapped float32 .npy ({sizes}); wall s = fastest of the runs, peak = VmHWM")
    if others:
        print(f"    other processes used {min(others):.1f} to {max(others):.1f} of {os.cpu_count()} cores "
              "during the kept runs")
    print(f"{'':44}" + "".join(f"{f'{n} samples':>22}" for n in counts))
    print(f"{'configuration':44}" + f"{'wall s':>11}{'peak MiB':>11}" * len(counts))
    for config in configs:
        print(f"{config.label:44}" + "".join(f"{_sec(results[config, n].seconds) + _star(results[config, n]):>11}"
                                             f"{_mib(results[config, n].peak_rss):>11}" for n in counts))
    if any(contended(result) for result in results.values()):
        print(f"  * other processes used more than {CONTENDED_CORES:g} cores during this run: its time is inflated")
    for config in configs:
        for n in counts:
            if results[config, n].note:
                print(f"  {config.label} at {n}: {results[config, n].note}")


def _print_costs(configs: list[Config], low: int, high: int, results: Results) -> None:
    def cost_ms(config: Config) -> Figure | None:
        return per_unit(results[config, high].seconds, results[config, low].seconds, (high - low) / 1000)

    print(f"\n  per-sample cost = (wall at {high} - wall at {low}) / {high - low}, ms; onnxq's target vs the floor")
    for config in configs:
        cost = cost_ms(config)
        line = f"    {config.label:42}{_sec(cost, '{:.2f}'):>9}"
        if config.kind == "onnxq":
            ratio, limit = divide(cost, cost_ms(FLOOR)), TIME_TARGET[config.variant]
            line += (f"   {_ratio(ratio):>7} the floor's, target <= {limit:g}x: {verdict(ratio, at_most=limit):9}"
                     f"  ({_ratio(divide(cost, cost_ms(FLOOR_EXPOSED)))} the exposed pass's)")
        print(line)


def _print_vs_ort(configs: list[Config], counts: list[int], results: Results) -> None:
    pairs = [(Config("onnxq", m), Config("ort", o)) for m, o in ORT_METHOD.items()
             if Config("onnxq", m) in configs and Config("ort", o) in configs]
    if pairs:
        print("\n  onnxq / ORT quantize_static on the same data (time, peak RSS)")
    less_time, less_memory = ORT_ENTROPY_TARGET
    for ours, theirs in pairs:
        for n in counts:
            time_ratio = divide(results[ours, n].seconds, results[theirs, n].seconds)
            rss_ratio = divide(results[ours, n].peak_rss, results[theirs, n].peak_rss)
            line = f"    {ours.variant + ' vs ' + theirs.variant:26}{n:>4}: time {_ratio(time_ratio):>7}" \
                   f"   RSS {_ratio(rss_ratio):>7}"
            if ours.variant == "entropy":
                faster, leaner = divide(Figure(1.0), time_ratio), divide(Figure(1.0), rss_ratio)
                line += (f"   target >= {less_time:g}x less time: {_ratio(faster)} "
                         f"{verdict(faster, at_least=less_time)}; >= {less_memory:g}x less memory: "
                         f"{_ratio(leaner)} {verdict(leaner, at_least=less_memory)}")
            print(line)


def _print_growth(key: str, configs: list[Config], low: int, high: int, results: Results, sets: dict) -> None:
    def growth(config: Config) -> Figure | None:
        return per_unit(results[config, high].peak_rss, results[config, low].peak_rss, 1)

    data = sets[key, high].stat().st_size - sets[key, low].stat().st_size
    floor = growth(FLOOR)
    print(f"\n  peak RSS growth from {low} to {high} samples, MiB (the mapped .npy pages alone grow by "
          f"{data / MIB:.0f}); onnxq's target: <= the floor's + {RSS_ALLOWANCE / MIB:g} MiB allocator noise")
    for config in configs:
        line = f"    {config.label:42}{_mib(growth(config)):>9}"
        if config.kind == "onnxq":
            ours = growth(config)
            excess = None if ours is None or floor is None or floor.bound else Figure(ours.value - floor.value,
                                                                                       ours.bound)
            signed = "-" if excess is None else f"{excess.bound}{round(excess.value / MIB):+d}"
            line += f"   {signed:>6} vs the floor: {verdict(excess, at_most=RSS_ALLOWANCE)}"
        print(line)


def _print_default_vs_max(configs: list[Config], counts: list[int], results: Results) -> None:
    """auto against max: the whole quantize, the calibration pass, and the range search."""
    auto, fixed = Config("onnxq", "auto"), Config("onnxq", "max")
    if auto not in configs or fixed not in configs:
        return
    print("\n  auto against max: wall, calibration pass (target <= 2x), range search (bounded: 48 runs)")
    for n in counts:
        ours, theirs = results[auto, n], results[fixed, n]
        calib = [r.extra.get("calibration_seconds") for r in (ours, theirs)]
        pass_ratio = divide(Figure(calib[0]), Figure(calib[1])) if None not in calib else None
        print(f"    {n:>5} samples: wall {_sec(ours.seconds)} s vs {_sec(theirs.seconds)} s = "
              f"{_ratio(divide(ours.seconds, theirs.seconds))}; calibration pass "
              f"{calib[0] or 0:.1f} s vs {calib[1] or 0:.1f} s = {_ratio(pass_ratio)} "
              f"{verdict(pass_ratio, at_most=2.0) if pass_ratio else ''}; range search "
              f"{ours.extra.get('search_seconds', 0.0):.1f} s")


def print_model(key: str, configs: list[Config], counts: list[int], results: Results, sets: dict) -> None:
    """The measured table of one model, then its ratios and targets."""
    _print_table(key, configs, counts, results, sets)
    _print_default_vs_max(configs, counts, results)
    low, high = min(counts), max(counts)
    if low != high:
        _print_costs(configs, low, high, results)
    _print_vs_ort(configs, counts, results)
    if low != high:
        _print_growth(key, configs, low, high, results, sets)


def _argv(config: Config, key: str, data: Path) -> list[str]:
    job = {"kind": config.kind, "variant": config.variant, "model": str(MODELS[key].path), "data": str(data),
           "batch": str(_default_batch())}
    return [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]


def _progress(tag: str, key: str, config: Config, n: int, attempts: list[RunResult]) -> None:
    walls = ", ".join(_sec(a.seconds) for a in attempts)
    others = ", ".join(f"{a.extra['others_cores']:.1f}" for a in attempts if "others_cores" in a.extra)
    result = best_of(attempts)
    print(f"  {tag} {key} {config.label} x{n}: {walls} s, {_mib(result.peak_rss)} MiB; other processes used "
          f"{others or '?'} cores {result.note}", flush=True)


def main() -> None:
    """Parse the flags, build the sample sets, run every configuration in a child, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lite0,ppocr", help="comma-separated: lite0, ppocr")
    parser.add_argument("--samples", default="64,512", help="sample counts (per-sample cost: smallest vs largest)")
    parser.add_argument("--methods", default=",".join(METHODS), help="onnxq methods; ORT runs the matching ones")
    parser.add_argument("--skip-ort", action="store_true", help="leave out ORT quantize_static")
    parser.add_argument("--rss-cap-gib", type=float, default=12.0, help="kill a run above this VmRSS")
    parser.add_argument("--timeout", type=float, default=600.0, help="kill a run after this many seconds")
    parser.add_argument("--repeat", type=int, default=3,
                        help=f"run a configuration up to this many times while a run takes < {REPEAT_BELOW_S:g} s "
                             f"(a longer run: twice if other processes used > {CONTENDED_CORES:g} cores meanwhile)")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="before each run, wait up to this many seconds for other processes to go idle")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    keys, methods = args.models.split(","), args.methods.split(",")
    counts = sorted({int(n) for n in args.samples.split(",")})
    if set(keys) - set(MODELS) or set(methods) - set(METHODS) or min(counts) < 1:
        parser.error(f"--models from {', '.join(MODELS)}; --methods from {', '.join(METHODS)}; --samples >= 1")
    configs = _configs(methods, args.skip_ort)
    print(f"calibration cost: models {', '.join(keys)}; samples {counts}; RSS cap {args.rss_cap_gib:g} GiB; "
          f"timeout {args.timeout:g} s; each run in a fresh subprocess", flush=True)
    cap = int(args.rss_cap_gib * GIB)
    with tempfile.TemporaryDirectory(prefix="onnxq-bench-") as tmp:
        sets = build_sets(keys, counts, Path(tmp))
        runs = [(key, config, n) for key in keys for config in configs for n in counts]
        attempts: dict[tuple[str, Config, int], list[RunResult]] = {}
        for index, (key, config, n) in enumerate(runs, start=1):
            attempts[key, config, n] = measure(_argv(config, key, sets[key, n]), cap, args.timeout, args.repeat,
                                               args.quiet_wait)
            _progress(f"[{index}/{len(runs)}]", key, config, n, attempts[key, config, n])
        retry = [run for run in runs if contended(best_of(attempts[run]))]
        for index, (key, config, n) in enumerate(retry, start=1):  # once more if the machine goes quiet
            if wait_for_quiet(3 * args.quiet_wait) >= 3 * args.quiet_wait:
                continue
            attempts[key, config, n] = measure(_argv(config, key, sets[key, n]), cap, args.timeout,
                                               len(attempts[key, config, n]) + 1, 0, attempts[key, config, n])
            _progress(f"[contended, again {index}/{len(retry)}]", key, config, n, attempts[key, config, n])
        for key in keys:
            results = {(config, n): best_of(attempts[key, config, n]) for config in configs for n in counts}
            print_model(key, configs, counts, results, sets)


if __name__ == "__main__":
    main()
