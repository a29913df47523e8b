"""Elastic pool figures on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster), tiny model.

    .venv/bin/python bench/bench_elastic.py [--rows 360] [--every 12]

A head without capacity and one 1-CPU node; `qwen-batch submit --address <gcs> --workers 0-3` (the driver in
its own process, as a user runs it) into a local directory; a second and a third 1-CPU node join `--every`
seconds apart while the job runs. From the stored images' times and the results' worker column:

- the time from each node joining (Ray lists it alive) to its worker's first stored row;
- rows/s while 1, 2 and 3 nodes were in the cluster (from one join to the next), and rows/s from the moment
  the k-th worker stored its first row to the next join (k workers rendering).

One figure per line. Every node is a process on this machine: with 2 cores, 3 one-CPU nodes compete for them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MB = 1024 * 1024


def manifest(path: Path, rows: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "id": [f"row-{n:04d}" for n in range(rows)],
        "prompt": [f"a travel poster #{n}" for n in range(rows)],
        "width": [256] * rows, "height": [256] * rows, "steps": [6] * rows,
    }), path)
    return str(path)


def start_cluster():
    """A head without capacity (its address file restored, so `ray.init("auto")` elsewhere is unaffected)."""
    from ray.cluster_utils import Cluster

    address_file = Path("/tmp/ray/ray_current_cluster")
    before = address_file.read_text() if address_file.exists() else None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": 80 * MB})
    if before is None:
        address_file.unlink(missing_ok=True)
    else:
        address_file.write_text(before)
    return cluster


def add_node(cluster) -> tuple[object, float]:
    """A 1-CPU node; returns it and the time Ray listed it alive."""
    node = cluster.add_node(num_cpus=1, object_store_memory=80 * MB)
    return node, time.time()


def rate(times: list[float], start: float, stop: float) -> float:
    count = sum(1 for t in times if start <= t < stop)
    return count / (stop - start) if stop > start else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=360)
    parser.add_argument("--every", type=float, default=12.0, help="seconds between nodes joining")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    work = Path(tempfile.mkdtemp(prefix="qb-elastic-"))
    output = work / "out"
    cluster = start_cluster()
    try:
        joined = [add_node(cluster)]
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")  # the cluster has no token auth
        driver = subprocess.Popen(
            [sys.executable, "-m", "jobs", "submit", manifest(work / "m.parquet", args.rows), "--output", str(output),
             "--model", "tiny", "--address", cluster.address, "--no-progress", "--workers", "0-3",
             "--shard-size", "4", "--batch-size", "1"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not list(output.glob("images/*.png")):  # the first node's worker is rendering
            if driver.poll() is not None:
                sys.exit(f"the job ended early: {driver.communicate()}")
            time.sleep(0.2)
        for _ in range(2):
            time.sleep(args.every)
            if driver.poll() is None:
                joined.append(add_node(cluster))
        _out, err = driver.communicate(timeout=1800)
        ended = time.time()
        if driver.returncode != 0:
            sys.exit(f"the job failed: {err}")

        workers = {w["name"]: w.get("node_id") for w in json.loads((output / "job.json").read_text())["options"]["workers"]}
        results = pq.read_table(output / "results.parquet").to_pylist()
        stored = {r["id"]: (output / r["keys"][0]).stat().st_mtime for r in results}
        node_of_row = {r["id"]: workers.get(r["worker"]) for r in results}
        times = sorted(stored.values())
        first_row = {}
        for row_id, mtime in stored.items():
            node_id = node_of_row[row_id]
            first_row[node_id] = min(first_row.get(node_id, mtime), mtime)

        print(f"rows {len(results)}, failed {sum(r['status'] != 'done' for r in results)}, "
              f"job {ended - joined[0][1]:.1f} s from the first node joining")
        for n, (node, at) in enumerate(joined, start=1):
            first = first_row.get(node.node_id)
            shown = f"{first - at:.1f} s" if first is not None else "never (no row)"
            what = "joined (before the submit)" if n == 1 else "joined mid-job"
            print(f"node {n} {what} -> its worker's first stored row: {shown}")
        bounds = [at for _node, at in joined] + [max(times)]
        for n in range(len(joined)):
            print(f"rows/s with {n + 1} node(s) in the cluster: {rate(times, bounds[n], bounds[n + 1]):.2f} "
                  f"({bounds[n + 1] - bounds[n]:.1f} s)")
        for n, (node, _at) in enumerate(joined):
            start = first_row.get(node.node_id)
            if start is not None:
                print(f"rows/s with {n + 1} worker(s) rendering (its first row to the next join): "
                      f"{rate(times, start, bounds[n + 1]):.2f} ({bounds[n + 1] - start:.1f} s)")
        print(f"rows/s over the whole job: {len(times) / (max(times) - min(times)):.2f}")
    finally:
        cluster.shutdown()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
