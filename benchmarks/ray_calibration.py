"""Calibration on Ray: wall time with 1 and 2 workers, Ray's start-up cost, and a simulated multi-node
cluster (run on demand, not a test; needs onnxq[ray]).

EfficientNet-Lite0 on the 64 shipped calibration photos, histograms (`onnxq calibrate`'s statistics):
  - in this process (ORT's default threads, as `onnxq calibrate` without --ray);
  - on a local Ray instance with 1 worker of 1 CPU, then 2 workers of 1 CPU (the pool started before the
    clock, the model loaded by each worker within it), and their ratio; then 2 workers again with an
    `on_progress` callback, as the CLI calls it (each worker streams its samples done after every batch);
  - Ray's start-up overhead: ray.init of a local instance + a pool's workers ready, and the shutdown;
  - a simulated cluster: a head and a second node started with `ray start --num-cpus 1 --block` (their own
    processes), joined as HOST:PORT with 2 workers, one per node.
Every Ray result is checked bit for bit against the one-process statistics. The local instances listen
on 127.0.0.1 only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which also forbids a second node: the simulated
cluster runs in a child process without it, its nodes on this machine's own address); all use token
authentication with a token made for the run (RAY_AUTH_TOKEN). The nodes this script starts are stopped
through their own process groups.

    python benchmarks/ray_calibration.py [--samples 64] [--copies 4]

`--copies K` calibrates on K copies of each photo (symbolic links in a temporary folder: K x 64 samples),
for a job long enough that Ray's per-shard overhead is small against the work.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLUSTER_PART = "--cluster-part" in sys.argv  # the simulated cluster: Ray's multi-node mode, in a child process
if not CLUSTER_PART:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))

import onnxq  # noqa: E402
from onnxq.cluster.backend import RayBackend, ShardedData  # noqa: E402
from onnxq.cluster.connect import Cluster  # noqa: E402
from onnxq.cluster.pool import WorkerPool, open_pool  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "efficientnet_lite0.onnx"
PHOTOS = REPO / "models" / "data" / "photos" / "calib"
PREPROCESS = onnxq.ImagePreprocess(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))
CONFIG = onnxq.QuantConfig(calib=onnxq.CalibConfig(method=onnxq.CalibMethod.ENTROPY))
LOCAL_INIT = {"num_cpus": 2, "object_store_memory": 128 << 20}


def _stats(data: ShardedData, backend: object = None,
           reports: list[int] | None = None) -> tuple[onnxq.StatsFile, float]:
    """The statistics and their wall time; `reports`: collect the progress reports' counts there."""
    on_progress = None if reports is None else (lambda stage, done, total: reports.append(done))
    started = time.perf_counter()
    stats, _ = onnxq.collect_stats(MODEL, data, CONFIG, backend=backend, on_progress=on_progress)
    return stats, time.perf_counter() - started


def _same(a: onnxq.StatsFile, b: onnxq.StatsFile) -> bool:
    return a.histograms.keys() == b.histograms.keys() and all(a.histograms[k] == b.histograms[k] for k in a.histograms)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _ray_node(*args: str, temp_dir: str) -> subprocess.Popen[bytes]:
    ray = Path(sys.executable).with_name("ray")
    with open(Path(temp_dir) / f"node-{len(list(Path(temp_dir).glob('node-*.log')))}.log", "wb") as log:
        head = ["--include-dashboard", "false"] if "--head" in args else []
        return subprocess.Popen([str(ray), "start", "--block", "--num-cpus", "1", *head, "--temp-dir", temp_dir,
                                 *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(node: subprocess.Popen[bytes]) -> None:
    if node.poll() is None:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=None, help="at most this many samples (default: all)")
    parser.add_argument("--copies", type=int, default=1, help="calibrate on this many copies of each photo")
    parser.add_argument("--photos", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cluster-part", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnxq-photos-") as folder:
        photos = args.photos or (PHOTOS if args.copies == 1 else _copies(PHOTOS, args.copies, Path(folder)))
        _run(args, photos)


def _copies(photos: Path, copies: int, folder: Path) -> Path:
    for path in sorted(photos.iterdir()):
        for copy in range(copies):
            (folder / f"{copy}_{path.name}").symlink_to(path)
    return folder


def _run(args: argparse.Namespace, photos: Path) -> None:
    data = ShardedData.at(photos, PREPROCESS, args.samples)
    reference, here = _stats(data)
    if args.cluster_part:
        _simulated_cluster(data, reference)
        return
    print(f"EfficientNet-Lite0, {reference.samples} photos, histograms ({os.cpu_count()} cores here)")
    print(f"  in this process                  {here:6.1f} s")

    started = time.perf_counter()
    with open_pool(RayBackend(workers=2, init=LOCAL_INIT)) as pool:
        ready = time.perf_counter() - started
        import ray

        ray.get([actor.__ray_ready__.remote() for actor in pool.actors])
        ready = time.perf_counter() - started
        pool_close = time.perf_counter()
    shut = time.perf_counter() - pool_close
    print(f"  Ray start-up: local instance + 2 workers ready {ready:.1f} s; shutdown {shut:.1f} s")

    walls = {}
    for workers in (1, 2):
        with open_pool(RayBackend(workers=workers, init=LOCAL_INIT)) as pool:
            ray.get([actor.__ray_ready__.remote() for actor in pool.actors])
            stats, walls[workers] = _stats(data, pool)
        print(f"  Ray, {workers} worker{'s' if workers > 1 else ' '} x 1 CPU             {walls[workers]:6.1f} s  "
              f"identical: {_same(stats, reference)}")
    print(f"  1 worker / 2 workers             {walls[1] / walls[2]:6.2f}x")
    reports: list[int] = []
    with open_pool(RayBackend(workers=2, init=LOCAL_INIT)) as pool:
        ray.get([actor.__ray_ready__.remote() for actor in pool.actors])
        stats, wall = _stats(data, pool, reports)
    print(f"  Ray, 2 workers, on_progress      {wall:6.1f} s  identical: {_same(stats, reference)}  "
          f"({len(reports)} progress reports)")
    env = {name: value for name, value in os.environ.items() if name != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    limit = ["--samples", str(args.samples)] if args.samples is not None else []
    subprocess.run([sys.executable, __file__, "--cluster-part", "--photos", str(photos), *limit], env=env, check=True)


def _simulated_cluster(data: ShardedData, reference: onnxq.StatsFile) -> None:
    host = socket.gethostbyname(socket.gethostname())
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="onnxq-ray-") as temp_dir:
        head = _ray_node("--head", "--port", str(port), temp_dir=temp_dir)
        nodes = [head]
        try:
            started = time.perf_counter()
            backend = RayBackend(address=f"{host}:{port}", workers=2)
            with Cluster(backend) as cluster:  # ray.init retries until the head answers
                nodes.append(_ray_node("--address", f"{host}:{port}", temp_dir=temp_dir))
                deadline = time.monotonic() + 120
                while cluster.ray.cluster_resources().get("CPU", 0) < 2:  # until the second node has joined
                    assert time.monotonic() < deadline and nodes[-1].poll() is None, \
                        (Path(temp_dir) / "node-1.log").read_text()[-2000:]
                    time.sleep(0.5)
                joined = time.perf_counter() - started
                with WorkerPool(cluster) as pool:
                    stats, wall = _stats(data, pool)
                    nodes_alive = sum(1 for node in cluster.ray.nodes() if node.get("Alive"))
            print(f"  simulated cluster, 2 nodes x 1 CPU (ray start), 2 workers  {wall:6.1f} s  "
                  f"identical: {_same(stats, reference)}  ({nodes_alive} nodes; second node joined after {joined:.1f} s)")
        finally:
            for node in reversed(nodes):
                _stop(node)


if __name__ == "__main__":
    main()
