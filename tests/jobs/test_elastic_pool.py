"""The elastic worker pool on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster,
one per module), the tiny model, and `qwen-batch submit --address <gcs>` as a user runs it (a subprocess
driver, so the session's own Ray in this process is never touched).

The head offers no worker capacity (num_cpus=0), like a GPU cluster's head; nodes are added, drained
and removed while jobs run. Tiny workers ask for one CPU each, so "capacity" here is CPUs; a GPU
preset's workers ask for one GPU each through the same code.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import tiny_rows

MB = 1024 * 1024


def slow_rows(count):
    """Rows of ~0.3 s each on a tiny CPU worker: a job long enough for nodes to join and leave mid-job."""
    return tiny_rows(count, size=256, steps=6)


class ElasticCluster:
    """A head without capacity; worker nodes added and removed by name."""

    def __init__(self):
        from ray.cluster_utils import Cluster

        address_file = Path("/tmp/ray/ray_current_cluster")  # Cluster rewrites it: keep `ray.init("auto")` users' one
        before = address_file.read_text() if address_file.exists() else None
        # Its nodes get this process's environment: token auth once the session's Ray is up here (ray.init set
        # RAY_AUTH_MODE=token, the token in ~/.ray/auth_token), none before. Drivers must do the same.
        self.auth_mode = "token" if os.environ.get("RAY_AUTH_MODE") == "token" else "disabled"
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "object_store_memory": 80 * MB})
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)
        self.nodes = {}
        self.address = self.cluster.address

    def add(self, name: str):
        self.nodes[name] = self.cluster.add_node(num_cpus=1, object_store_memory=80 * MB)
        return self.nodes[name]

    def remove(self, name: str) -> None:
        """Stop a node and wait until Ray knows it is gone (else Ray may still place workers there)."""
        node = self.nodes.pop(name, None)
        if node is None:
            return
        self.cluster.remove_node(node)
        deadline = time.monotonic() + 60
        while self.alive(node):
            assert time.monotonic() < deadline, f"Ray still lists node {name} as alive"
            time.sleep(0.2)

    def keep_only(self, *names: str) -> None:
        for name in [n for n in self.nodes if n not in names]:
            self.remove(name)
        for name in names:
            if name not in self.nodes:
                self.add(name)

    def alive(self, node) -> bool:
        return any(n["NodeID"] == node.node_id and n["Alive"] for n in self.cluster.global_state.node_table())

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def elastic():
    cluster = ElasticCluster()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def driver_env(cluster) -> dict:
    """This machine's environment for a driver of the test cluster, in the cluster's auth mode (with
    token auth the token is the one in ~/.ray/auth_token, as for every Ray started on this machine)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE=cluster.auth_mode, HF_HUB_OFFLINE="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return env


RUNNING: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_driver_left_behind():
    """A failed test leaves no driver running against the next test's cluster."""
    yield
    while RUNNING:
        process = RUNNING.pop()
        if process.poll() is None:
            process.kill()
            process.communicate()


def submit(cluster, manifest, output, *args, model="tiny"):
    command = [sys.executable, "-m", "jobs", "submit", manifest, "--output", str(output), "--model", model,
               "--address", cluster.address, "--no-progress", *args]
    process = subprocess.Popen(command, env=driver_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    RUNNING.append(process)
    return process


def wait_until(condition, process, timeout=120, what="the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the job ended before {what}: {process.communicate()}")
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(0.2)


def progress(output) -> dict:
    try:
        return json.loads((Path(output) / "_progress.json").read_text())
    except (OSError, ValueError):
        return {}


def stored(output) -> int:
    return len(list(Path(output).glob("images/*.png")))


def results(output) -> list[dict]:
    return pq.read_table(Path(output) / "results.parquet").to_pylist()


def job_workers(output) -> list[dict]:
    return json.loads((Path(output) / "job.json").read_text())["options"]["workers"]


def test_a_job_on_a_cluster_without_capacity_waits_visibly_and_starts_on_a_node_that_joins(
        elastic, write_manifest, tmp_path):
    elastic.keep_only()  # the head alone: no CPU for any worker
    output = tmp_path / "out"
    process = submit(elastic, write_manifest(tiny_rows(6)), output)  # --workers auto, the default on a cluster

    wait_until(lambda: progress(output).get("workers", {}).get("pending", 0) >= 1, process, what="pending worker")
    pool = progress(output)["workers"]
    assert (pool["ready"], pool["pending"], pool["unit"]) == (0, 1, "CPU")
    status = subprocess.run([sys.executable, "-m", "jobs", "status", str(output)], env=driver_env(elastic),
                            capture_output=True, text=True, timeout=120)
    assert "workers: 0 ready, waiting for 1 CPU from the autoscaler" in status.stdout, status.stdout + status.stderr
    time.sleep(2)  # still waiting, not failing
    assert process.poll() is None
    node = elastic.add("late")
    _out, err = process.communicate(timeout=180)

    assert process.returncode == 0, err
    assert "waiting for 1 CPU from the autoscaler" in err
    assert [r["status"] for r in results(output)] == ["done"] * 6
    [worker] = [w for w in job_workers(output) if w.get("node_id")]
    assert worker["node_id"] == node.node_id


def test_a_node_joining_mid_job_gets_a_worker_that_takes_shards(elastic, write_manifest, tmp_path):
    elastic.keep_only("a")
    output = tmp_path / "out"
    process = submit(elastic, write_manifest(slow_rows(64)), output, "--workers", "0-2",
                     "--shard-size", "2", "--batch-size", "1")
    wait_until(lambda: stored(output) >= 3 and progress(output).get("workers", {}).get("pending") == 1, process,
               what="rows stored by the first node's worker while the second waits")
    joined = elastic.add("b")
    _out, err = process.communicate(timeout=300)

    assert process.returncode == 0, err
    rows = results(output)
    assert [r["status"] for r in rows] == ["done"] * 64
    [on_b] = [w["name"] for w in job_workers(output) if w.get("node_id") == joined.node_id]
    assert sum(r["worker"] == on_b for r in rows) >= 1  # the results' worker column shows it


def test_a_drained_node_stops_taking_work_and_costs_no_row_an_attempt(elastic, write_manifest, tmp_path):
    elastic.keep_only("a", "b")
    leaving = elastic.nodes["b"]
    output = tmp_path / "out"
    process = submit(elastic, write_manifest(slow_rows(64)), output, "--workers", "2",
                     "--shard-size", "3", "--batch-size", "1")
    wait_until(lambda: progress(output).get("workers", {}).get("ready") == 2 and stored(output) >= 4, process,
               what="two working workers")
    deadline_s = 45
    drained = subprocess.run(  # what the autoscaler and a spot preemption notice do: drain with a deadline
        [os.path.join(os.path.dirname(sys.executable), "ray"), "drain-node", "--address", elastic.address,
         "--node-id", leaving.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot notice",
         "--deadline-remaining-seconds", str(deadline_s)], env=driver_env(elastic), capture_output=True, text=True, timeout=60)
    assert drained.returncode == 0, drained.stderr
    drained_at = time.monotonic()
    terminated = threading.Event()

    def cloud_terminates_at_the_deadline():
        while process.poll() is None and time.monotonic() - drained_at < deadline_s:
            time.sleep(0.2)
        if elastic.alive(leaving):
            terminated.set()
            elastic.remove("b")

    cloud = threading.Thread(target=cloud_terminates_at_the_deadline)
    cloud.start()
    _out, err = process.communicate(timeout=300)
    cloud.join()

    assert process.returncode == 0, err
    rows = results(output)
    assert [r["status"] for r in rows] == ["done"] * 64
    assert {r["attempts"] for r in rows} == {1}  # no row paid an attempt for the node leaving
    [line] = [line for line in err.splitlines() if "its node is draining" in line]
    assert "stops taking work" in line
    [on_b] = [w for w in job_workers(output) if w.get("node_id") == leaving.node_id]
    assert on_b["state"] == "drained"
    assert not terminated.is_set()  # the node was idle and gone before its deadline: nothing had to kill it
    assert not elastic.alive(leaving)
    elastic.nodes.pop("b", None)


def test_a_job_that_never_gets_a_worker_ends_within_its_limit_with_exit_4_and_one_line(
        elastic, write_manifest, tmp_path):
    output = tmp_path / "out"
    manifest = write_manifest([{"id": "a", "prompt": "a poster", "aspect_ratio": "16:9"}])
    started = time.monotonic()
    process = submit(elastic, manifest, output, "--first-worker-timeout", "5", model="qwen-image-df11")
    _out, err = process.communicate(timeout=120)  # its worker asks for a GPU, which no node has

    assert process.returncode == 4, err
    assert time.monotonic() - started < 60
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [err.strip().splitlines()[-1]], err
    assert errors[0].startswith("error: no worker became ready within 5 s: waiting for 1 GPU from the autoscaler")
    assert "Traceback" not in err
    assert progress(output)["state"] == "failed" and progress(output)["workers"]["pending"] == 1
