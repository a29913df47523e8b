"""Fault figures on a real 3-node Ray cluster on this machine (`ray start` processes), tiny model.

    .venv/bin/python bench/bench_cluster_faults.py

(a) a node lost mid-job (SIGKILL of its raylet): rows failed / stored / duplicate objects, and the
    time from the node loss to the first of its rows stored by another node;
(b) a node without S3 credentials among two healthy ones: rows failed / stored / duplicates, and
    how long the job took against the same job on the two healthy nodes alone.
(a) writes to a local directory (every node is on this machine), (b) to a real S3 server
(SeaweedFS) that the node without credentials cannot use. One figure per line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from ray_cluster import RayCluster, without_credentials  # noqa: E402


def manifest(path: Path, rows: int, size: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "id": [f"row-{n:04d}" for n in range(rows)],
        "prompt": [f"a poster #{n}" for n in range(rows)],
        "width": [size] * rows, "height": [size] * rows, "steps": [2] * rows,
    }), path)
    return str(path)


def submit(cluster, env, manifest_path, output, *args):
    command = [sys.executable, "-m", "jobs", "submit", manifest_path, "--output", output, "--model", "tiny",
               "--address", cluster.gcs_address, "--no-progress", *args]
    return subprocess.Popen(command, env={**env, "RAY_AUTH_TOKEN": cluster.token}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def ledger(output: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for path in sorted((output / "_ledger").glob("*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def counts(output: Path, rows: int) -> str:
    records = {r["row_index"]: r for r in ledger(output)}
    failed = sum(1 for r in records.values() if r["status"] != "done")
    images = [p.name for p in (output / "images").iterdir()]
    return f"rows failed {failed}, rows stored {len(images)}/{rows}, duplicate objects {len(images) - len(set(images))}"


def s3_counts(server, uri: str, rows: int) -> str:
    import io

    import pyarrow.parquet as pq

    bucket, prefix = uri[5:].split("/", 1)
    client = server.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/images/")
            for o in page.get("Contents", [])]
    results = pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=f"{prefix}/results.parquet")["Body"].read()))
    failed = sum(1 for status in results.column("status").to_pylist() if status != "done")
    return f"rows failed {failed}, rows stored {len(keys)}/{rows}, duplicate objects {len(keys) - len(set(keys))}"


def main() -> None:
    from s3_server import start_s3_server

    work = Path(tempfile.mkdtemp(prefix="qb-bench-faults-"))
    server = start_s3_server(work / "s3")
    server.client().create_bucket(Bucket="bench-faults")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key, AWS_REGION="us-east-1",
               AWS_ENDPOINT_URL=server.endpoint, AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    cluster = RayCluster(env=env).start()
    try:
        cluster.add_node("good-1")
        cluster.add_node("good-2")
        # (a) node loss
        rows = 80
        path = manifest(work / "a.parquet", rows, 128)
        output = work / "a-out"
        process = submit(cluster, env, path, str(output), "--workers", "2", "--shard-size", "4", "--batch-size", "1")
        while not (output / "images").exists() or len(list((output / "images").iterdir())) < 12:
            time.sleep(0.05)
        killed_at = time.time()
        cluster.kill_node("good-2")
        process.communicate(timeout=600)
        rerun = [r for r in ledger(output) if r["attempts"] >= 2]
        # of those, the ones rendered again (not found stored by the lost node before it went)
        rendered = [(output / r["keys"][0]).stat().st_mtime for r in rerun if r["rendered"]]
        first = min(rendered) if rendered else float("nan")
        print(f"(a) node lost mid-job: exit {process.returncode}; {counts(output, rows)}")
        print(f"(a) rows of the lost node run again elsewhere: {len(rerun)} ({len(rendered)} rendered again, the rest "
              f"found stored); first rendered one stored {first - killed_at:.1f} s after the node loss")
        cluster.add_node("good-2b")
        cluster.add_node("nocreds", env=without_credentials(env))
        # (b) a node without credentials beside two healthy ones, against the two alone
        path = manifest(work / "b.parquet", rows, 64)
        output = "s3://bench-faults/b"
        started = time.perf_counter()
        process = submit(cluster, env, path, output, "--workers", "3", "--shard-size", "4")
        _out, err = process.communicate(timeout=600)
        seconds = time.perf_counter() - started
        not_ready = sum("is not ready" in line for line in err.splitlines())
        print(f"(b) 2 healthy nodes + 1 without S3 credentials: exit {process.returncode}; "
              f"{s3_counts(server, output, rows)}; workers not ready {not_ready}; {seconds:.1f} s")
        cluster.stop_node("nocreds")
        output = "s3://bench-faults/b2"
        started = time.perf_counter()
        process = submit(cluster, env, path, output, "--workers", "2", "--shard-size", "4")
        process.communicate(timeout=600)
        print(f"(b) the 2 healthy nodes alone: exit {process.returncode}; {s3_counts(server, output, rows)}; "
              f"{time.perf_counter() - started:.1f} s")
    finally:
        cluster.shutdown()
        server.kill()
        print(json.dumps({"work_dir": str(work)}))


if __name__ == "__main__":
    main()
