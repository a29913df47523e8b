"""How many workers a job asks for, what each asks Ray for, and when the pool adds and releases
workers (the GPU path decided without GPUs; the pool's decisions without Ray)."""

import subprocess
import sys

import pytest

from jobs.pool import (AUTO, BUSY, IDLE, NOT_READY, RELEASED, STARTING, PoolSize, WorkerPool, WorkerSlot, parse_workers,
                       pool_line, resolve_pool_size, worker_resources)
from qwen_worker.errors import UserError
from qwen_worker.presets import get_preset

GIB = 1024**3
DF11, TINY = get_preset("qwen-image-df11"), get_preset("tiny")


def test_each_worker_asks_for_one_gpu_with_its_host_ram_or_one_cpu():
    assert worker_resources(DF11) == {"num_gpus": 1, "num_cpus": 1, "memory": 48 * GIB}
    assert worker_resources(TINY) == {"num_cpus": 1}
    assert worker_resources(DF11, device="cpu") == {"num_cpus": 1, "memory": 48 * GIB}  # --device cpu


def test_workers_takes_n_a_range_or_auto():
    assert parse_workers("4") == PoolSize(1, 4, "4", exact=True)  # exactly 4, rendering with the first ready one
    assert parse_workers(4) == PoolSize(1, 4, "4", exact=True)  # from a schedule or Python
    assert parse_workers("0-16") == PoolSize(0, 16, "0-16")
    assert parse_workers(" 2 - 5 ") == PoolSize(2, 5, "2-5")
    assert parse_workers("auto") is AUTO and (AUTO.min_ready, AUTO.max_workers) == (0, 64)
    assert parse_workers(None) is None


@pytest.mark.parametrize(("value", "error"), [
    ("16-4", r"^`--workers` MIN must not exceed MAX, got: '16-4'$"),
    ("0", r"^`--workers` must be at least 1, got: '0'$"),
    ("0-0", r"^`--workers` MAX must be at least 1, got: '0-0'$"),
    ("four", r"^`--workers` must be a number of workers \(4\), a range MIN-MAX \(0-16\) or auto, got: 'four'$"),
    ("-3", r"must be a number of workers"),
    (2.5, r"got: 2\.5$"),
])
def test_bad_workers_values_are_one_clear_error(value, error):
    with pytest.raises(UserError, match=error):
        parse_workers(value)


def test_bad_workers_on_the_command_line_is_one_line_and_exit_2(write_manifest, tmp_path):
    result = subprocess.run([sys.executable, "-m", "jobs", "submit", "m.parquet", "--output", str(tmp_path / "out"),
                             "--workers", "8-2"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == ("error: Invalid value for '--workers': MIN must not exceed MAX, got: '8-2' "
                             "(see `qwen-batch submit --help`)\n")


def test_on_a_cluster_workers_stands_as_given_even_with_no_gpu_yet():
    """A cluster scaled to zero GPUs: the autoscaler adds them for the workers that wait."""
    assert resolve_pool_size(None, DF11, gpus=0, cluster=True) is AUTO
    assert resolve_pool_size(parse_workers("8"), DF11, gpus=2, cluster=True).max_workers == 8
    assert resolve_pool_size(parse_workers("0-16"), TINY, gpus=0, cluster=True) == PoolSize(0, 16, "0-16")


def test_on_one_machine_one_worker_per_gpu_and_never_more_than_the_gpus():
    assert resolve_pool_size(None, DF11, gpus=4, cluster=False).max_workers == 4
    assert resolve_pool_size(parse_workers("2"), DF11, gpus=4, cluster=False).max_workers == 2
    assert resolve_pool_size(parse_workers("8"), DF11, gpus=2, cluster=False).max_workers == 2
    assert resolve_pool_size(None, TINY, gpus=4, cluster=False).max_workers == 1  # CPU actors for the tiny model
    assert resolve_pool_size(parse_workers("3"), TINY, gpus=0, cluster=False).max_workers == 3
    assert resolve_pool_size(parse_workers("2"), DF11, gpus=0, cluster=False, device="cpu").max_workers == 2


def test_a_gpu_model_on_one_machine_without_gpus_is_a_clear_error():
    with pytest.raises(UserError, match=r"^model 'qwen-image-df11' needs GPUs and this Ray cluster has none"):
        resolve_pool_size(None, DF11, gpus=0, cluster=False)


def pool_with(size: str, *states: str, placed=True) -> WorkerPool:
    pool = WorkerPool(plan=None, options=None, store=None, size=parse_workers(size), resources={"num_gpus": 1})
    pool.any_ready = True  # (Ray is not running here: releasing a worker only changes its state)
    for n, state in enumerate(states):
        pool.slots.append(WorkerSlot(actor=object(), name=f"w{n}", state=state, placed=placed or state != STARTING))
    return pool


def test_the_pool_asks_for_what_the_work_can_use_up_to_max_and_never_replaces_a_refused_worker():
    pool = pool_with("0-16", BUSY, IDLE, NOT_READY)
    assert pool.wanted(work_units=40) == 15  # 16, less the worker that was not ready
    assert pool.wanted(work_units=3) == 3
    assert pool.room() == 13


def test_workers_n_asks_for_all_n_while_work_is_queued_a_range_only_for_what_the_shards_can_use():
    assert pool_with("4").wanted(work_units=1) == 4
    assert pool_with("0-4").wanted(work_units=1) == 1
    assert pool_with("4", BUSY, IDLE).wanted(work_units=1, queue_dry=True) == 1  # dry: the idle one goes


def test_when_the_queue_runs_dry_idle_and_waiting_workers_are_released_but_never_busy_ones():
    pool = pool_with("0-8", BUSY, IDLE, STARTING, STARTING, placed=False)
    pool.slots[2].placed = True  # placed and loading its model; slot 3 still waits for resources
    released = pool.shrink(work_units=1, queue_dry=False)  # one shard in flight, more may come back
    assert [s.name for s in released] == ["w3", "w2"]  # waiting for resources first, then starting
    assert [s.state for s in pool.slots] == [BUSY, IDLE, RELEASED, RELEASED]
    assert pool.shrink(work_units=1, queue_dry=True)[0].name == "w1"
    assert [s.state for s in pool.slots] == [BUSY, RELEASED, RELEASED, RELEASED]


def test_the_pool_line_says_what_it_waits_for():
    summary = {"ready": 2, "busy": 1, "starting": 1, "pending": 4, "draining": 1, "unit": "GPU", "per_worker": 1}
    assert pool_line(summary) == "2 ready (1 busy), 1 starting, waiting for 4 GPUs from the autoscaler, 1 draining"
    assert pool_line({"ready": 0, "pending": 1, "unit": "CPU", "per_worker": 1}) == (
        "0 ready, waiting for 1 CPU from the autoscaler")


def test_a_refused_worker_is_replaced_only_once_a_worker_was_ready_and_never_on_its_node():
    pool = pool_with("0-4", NOT_READY, BUSY)
    pool.slots[0].node_id = "n-bad"
    assert pool.room() == 2 and pool.refused_nodes() == ["n-bad"]  # new workers ask for any node but n-bad
    pool.any_ready = False  # refused before any worker was ready: maybe the job's fault (model files, output)
    assert pool.room() == 0
