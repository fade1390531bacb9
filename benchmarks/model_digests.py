"""Record, then check, the sha256 of every model `onnxq quantize` writes for the shipped real models.

A refactor that must not change onnxq's output records the digests before it starts and checks them
after: 3 real models (EfficientNet-Lite0, the PP-OCR classifier, Silero VAD) x 2 targets (trt, and
ort-cpu with --no-latency-search, as the latency search depends on this machine's timing) x 4 methods
(max, entropy, percentile, mse) = 24 runs of the CLI, `<this python> -m onnxq_cli quantize ...`, each
writing into its own temporary folder; with `--no-bias-correction` where the CLI has it (bias correction,
on by default since, is a data-dependent step like the latency search: the digests are of the rest). A run's digest is the sha256 of the written .onnx; should a run
write any other file (e.g. a `.onnx.data` of external weights), its `name:sha256` is appended.

    python benchmarks/model_digests.py --record benchmarks/model_digests.json [--models silero_vad,...]
    python benchmarks/model_digests.py --check benchmarks/model_digests.json [--models ...]

--record writes {"commit": the git commit of the onnxq that ran, "environment": where that onnxq is,
whether its checkout had uncommitted changes, package versions, "expected_changes": EXPECTED_CHANGES
below, "digests": {"<model>/<target>/<method>": sha256}}.
--check re-runs and prints model/target/method/expected/actual/same; it exits 1 if a digest differs,
unless its key is listed in the file's "expected_changes" (then reported as "changed (expected)").
Run it with the virtual environment of the checkout under test: the onnxq that python imports is the
one measured (its path and commit are printed). Digests also depend on the onnx, onnxruntime, numpy
and protobuf versions; --check prints any that differ from the recorded ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DATA = MODELS / "data"
TARGETS = {"trt": [], "ort-cpu": ["--no-latency-search"]}
METHODS = ["max", "entropy", "percentile", "mse"]
EXPECTED_CHANGES = [f"{m}/ort-cpu/{method}" for m in ("efficientnet_lite0", "ppocr_mobile_v2_cls", "silero_vad")
                    for method in ("mse", "entropy")]
# Cross-layer equalization is on by default: it rescales the PP-OCR classifier's 14 Conv -> Relu -> Conv pairs
# (EfficientNet-Lite0 has ReLU6 or linear pairs only, Silero VAD no Conv pairs: both unchanged).
EXPECTED_CHANGES += [f"ppocr_mobile_v2_cls/{target}/{method}" for target in TARGETS for method in METHODS
                     if f"ppocr_mobile_v2_cls/{target}/{method}" not in EXPECTED_CHANGES]
PACKAGES = ["onnx", "onnxruntime", "onnxruntime-gpu", "onnx-graphsurgeon", "numpy", "protobuf", "click", "pillow"]


def silero_npz(folder: Path) -> Path:
    """The calibration set of tests/test_silero_vad.py: 12 seeded noisy tones, a zero state, sr 16000."""
    samples, rng, t = 12, np.random.default_rng(0), np.arange(512) / 16000
    audio = np.stack([0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(512)
                      for i in range(samples)]).astype(np.float32)
    path = folder / "vad.npz"
    np.savez(path, input=audio, state=np.zeros((2, samples, 128), np.float32), sr=np.array(16000, np.int64))
    return path


def calib_args(model: str, folder: Path) -> list[str]:
    """The calibration options each model is quantized with (as in tests/ and models/README.md)."""
    if model == "efficientnet_lite0":
        return ["--calib", str(DATA / "photos" / "calib"), "--mean", "127", "--std", "128"]
    if model == "ppocr_mobile_v2_cls":  # already normalised N x 3 x 48 x 192: no image options apply
        return ["--calib", str(DATA / "textlines" / "ppocr_cls_calib.npz")]
    return ["--calib", str(silero_npz(folder))]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def step_flags(tmp: Path) -> list[str]:
    """`--no-bias-correction` if the onnxq under test has it (the checkouts that recorded digests did not)."""
    shown = subprocess.run([sys.executable, "-m", "onnxq_cli", "quantize", "--help"], cwd=tmp, capture_output=True,
                           text=True)
    return ["--no-bias-correction"] if "--no-bias-correction" in shown.stdout else []


def quantize(model: str, target: str, method: str, tmp: Path, flags: list[str] = ()) -> str:
    """Run the CLI once in a fresh folder; return the digest of what it wrote."""
    out_dir = Path(tempfile.mkdtemp(prefix=f"{model}.{target}.{method}.", dir=tmp))
    out = out_dir / f"{model}.int8.onnx"
    command = [sys.executable, "-m", "onnxq_cli", "quantize", str(MODELS / f"{model}.onnx"),
               *calib_args(model, tmp), "-o", str(out), "--target", target, *TARGETS[target], "--method", method,
               *flags]
    # cwd=tmp: `python -m` puts the working directory first on sys.path, and a checkout's onnxq/ there
    # would shadow the installed one.
    done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stdout}{done.stderr}")
    others = [f"{p.name}:{sha256(p)}" for p in sorted(out_dir.iterdir()) if p != out]
    return " ".join([sha256(out), *others])


def environment() -> dict:
    """The onnxq the interpreter imports (path, git commit, C binning kernel present) and package versions."""
    probe = ("import json, onnxq, onnxq_cli, importlib.util as u; print(json.dumps([onnxq.__file__, "
             "onnxq_cli.__file__, u.find_spec('onnxq.calib._binning') is not None]))")
    onnxq_file, cli_file, binning = json.loads(subprocess.run(
        [sys.executable, "-c", probe], cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True).stdout)
    source = Path(onnxq_file).parent
    git = lambda *a: subprocess.run(["git", "-C", str(source), *a], capture_output=True, text=True).stdout.strip()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "onnxq": str(source), "onnxq_cli": str(Path(cli_file).parent), "binning_kernel": binning,
            "python": sys.version.split()[0], "versions": versions}


def run_all(models: list[str]) -> tuple[dict[str, str], float]:
    digests, runs = {}, [(m, t, k) for m in models for t in TARGETS for k in METHODS]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxq-digests.") as tmp:
        flags = step_flags(Path(tmp))
        for i, (model, target, method) in enumerate(runs, 1):
            t0 = time.perf_counter()
            key = f"{model}/{target}/{method}"
            digests[key] = quantize(model, target, method, Path(tmp), flags)
            print(f"[{i:2}/{len(runs)}] {key:40} {digests[key][:16]}  {time.perf_counter() - t0:5.1f} s", flush=True)
    return digests, time.perf_counter() - started


def check(recorded: dict, digests: dict[str, str]) -> bool:
    expected_changes = set(recorded.get("expected_changes", []))
    rows, ok = [], True
    for key, actual in digests.items():
        expected = recorded["digests"].get(key)
        if expected == actual:
            verdict = "same"
        elif expected is not None and key in expected_changes:
            verdict = "changed (expected)"
        else:
            verdict, ok = ("NOT RECORDED" if expected is None else "DIFFERENT"), False
        rows.append((*key.split("/"), (expected or "-")[:16], actual[:16], verdict))
    header = ("model", "target", "method", "expected", "actual", "same")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", metavar="FILE", type=Path, help="write the digests into FILE")
    mode.add_argument("--check", metavar="FILE", type=Path, help="compare the digests with FILE's")
    parser.add_argument("--models", default="efficientnet_lite0,ppocr_mobile_v2_cls,silero_vad",
                        help="comma-separated subset of: %(default)s")
    args = parser.parse_args()
    models = args.models.split(",")
    unknown = [m for m in models if not (MODELS / f"{m}.onnx").is_file()]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    env = environment()
    print(f"onnxq {env['onnxq']} at {env['commit'][:12]}{' (+ uncommitted changes)' if env['dirty'] else ''}, "
          f"C binning kernel {'present' if env['binning_kernel'] else 'ABSENT'}, python {sys.executable}")
    digests, seconds = run_all(models)
    print(f"{len(digests)} runs in {seconds:.0f} s")
    if args.record:
        record = {"commit": env.pop("commit"), "environment": env, "expected_changes": EXPECTED_CHANGES,
                  "digests": digests}
        args.record.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.record}")
        return
    recorded = json.loads(args.check.read_text())
    dirty = recorded.get("environment", {}).get("dirty")
    print(f"recorded at onnxq {recorded['commit'][:12]}{' (+ uncommitted changes)' if dirty else ''}")
    old, new = recorded.get("environment", {}).get("versions", {}), env["versions"]
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            print(f"note: {name} {old.get(name, 'absent')} when recorded, {new.get(name, 'absent')} now")
    sys.exit(0 if check(recorded, digests) else 1)


if __name__ == "__main__":
    main()
