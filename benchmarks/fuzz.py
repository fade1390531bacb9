"""Fuzz onnxq.quantize with random valid float models (issue 12): every seed's model (tests/fuzz/generator.py)
quantized for each target and range method, each outcome classified by tests/fuzz/oracle.py as ok, a
documented refusal or a failure.

Prints: how many graphs, the ops covered (nodes per op type, graphs per opset, the variants), the outcomes
(ok; refused by error class; failures grouped by their first line, with the known bug each most likely is
and the first seeds that show it) and the seconds taken. `--json PATH` writes all of it with every failure.

    .venv/bin/python benchmarks/fuzz.py                   # seeds 0:1000, trt and ort-cpu, max and entropy
    .venv/bin/python benchmarks/fuzz.py --seeds 1000:3000 --methods max,mse --json fuzz.json
    .venv/bin/python benchmarks/fuzz.py --shrink --targets trt --methods max   # a minimal failing graph

`--shrink` lets Hypothesis search for a failure that is not a known bug and shrink it to a minimal graph,
printed as ONNX text (derandomized: the same run finds the same graph).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxruntime as ort  # noqa: E402

from tests.fuzz.generator import random_model  # noqa: E402
from tests.fuzz.known_bugs import likely_bug  # noqa: E402
from tests.fuzz.oracle import check_quantize  # noqa: E402


def _seeds(text: str) -> range:
    start, _, stop = text.partition(":")
    return range(int(start), int(stop)) if stop else range(int(start), int(start) + 1)


def _group(message: str) -> str:
    """A failure's first line with node and tensor names blanked, so one cause is one group."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message)


def run(seeds: range, targets: list[str], methods: list[str]) -> dict:
    started = time.perf_counter()
    ops, opsets, features = Counter(), Counter(), Counter()
    outcomes, refused, failures = Counter(), Counter(), defaultdict(list)
    for seed in seeds:
        model, description = random_model(seed)
        ops.update(description.ops)
        opsets[description.opset] += 1
        features.update(description.features)
        for target in targets:
            for method in methods:
                outcome = check_quantize(model, description, target, method, seed)
                outcomes[outcome.kind] += 1
                if outcome.kind == "refused":
                    refused[outcome.message.split(":")[1].strip()] += 1
                elif outcome.kind == "failure":
                    bug = likely_bug(description, outcome)
                    failures[(_group(outcome.message), bug)].append(
                        {"seed": seed, "target": target, "method": method, "message": outcome.message,
                         "model": description.summary()})
    return {
        "graphs": len(seeds), "seeds": f"{seeds.start}:{seeds.stop}", "targets": targets, "methods": methods,
        "checks": sum(outcomes.values()), "seconds": round(time.perf_counter() - started, 1),
        "ops": dict(sorted(ops.items())), "opsets": dict(sorted(opsets.items())),
        "features": dict(sorted(features.items())), "outcomes": dict(outcomes), "refused": dict(refused),
        "failures": [{"first_line": key, "likely_bug": bug, "count": len(items), "cases": items}
                     for (key, bug), items in sorted(failures.items(), key=lambda kv: -len(kv[1]))],
    }


def report(summary: dict) -> str:
    lines = [f"graphs: {summary['graphs']} (seeds {summary['seeds']}), checks: {summary['checks']} "
             f"({'/'.join(summary['targets'])} x {'/'.join(summary['methods'])}), seconds: {summary['seconds']}",
             "ops (nodes): " + ", ".join(f"{op} {n}" for op, n in summary["ops"].items()),
             "opsets (graphs): " + ", ".join(f"{v}: {n}" for v, n in summary["opsets"].items()),
             "variants (graphs): " + ", ".join(f"{f} {n}" for f, n in summary["features"].items()),
             "outcomes: " + ", ".join(f"{k} {n}" for k, n in sorted(summary["outcomes"].items()))]
    lines += [f"  refused {n}: {kind}" for kind, n in summary["refused"].items()]
    for failure in summary["failures"]:
        bug = f"likely bug {failure['likely_bug']}" if failure["likely_bug"] else "NOT A KNOWN BUG"
        seeds = sorted({case["seed"] for case in failure["cases"]})
        combos = sorted({f"{c['target']}/{c['method']}" for c in failure["cases"]})
        lines.append(f"  failure x{failure['count']} [{bug}] {failure['first_line']}")
        lines.append(f"      in {', '.join(combos)}; seeds {', '.join(map(str, seeds[:12]))}"
                     f"{' …' if len(seeds) > 12 else ''}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0:1000", help="A:B (B excluded) or one seed")
    parser.add_argument("--targets", default="trt,ort-cpu")
    parser.add_argument("--methods", default="max,entropy")
    parser.add_argument("--json", type=Path, help="also write the summary with every failure here")
    parser.add_argument("--shrink", action="store_true", help="search with Hypothesis and shrink a failure")
    parser.add_argument("--examples", type=int, default=300, help="--shrink: models to try")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(4)  # the oracle reports ORT's errors itself
    targets, methods = args.targets.split(","), args.methods.split(",")
    if args.shrink:
        from tests.fuzz.shrink import shrink_failure

        found = shrink_failure(targets, methods, args.examples)
        print(found or f"no failure but the known bugs in {args.examples} models")
        return 0
    summary = run(_seeds(args.seeds), targets, methods)
    print(report(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 1 if any(f["likely_bug"] is None for f in summary["failures"]) else 0


if __name__ == "__main__":
    sys.exit(main())
