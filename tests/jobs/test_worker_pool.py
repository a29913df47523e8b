"""How many workers a job starts and what each asks Ray for (the GPU path, decided without GPUs)."""

import pytest

from jobs.pool import worker_pool
from qwen_worker.errors import UserError
from qwen_worker.presets import get_preset

GIB = 1024**3


def test_one_worker_per_gpu_each_pinned_to_a_gpu_with_its_host_ram():
    assert worker_pool(get_preset("qwen-image-df11"), 4, workers=None) == (
        4, {"num_gpus": 1, "num_cpus": 1, "memory": 48 * GIB})


def test_workers_caps_the_gpu_count_but_never_exceeds_it():
    assert worker_pool(get_preset("qwen-image-df11"), 4, workers=2)[0] == 2
    assert worker_pool(get_preset("qwen-image-df11"), 2, workers=8)[0] == 2


def test_tiny_model_uses_cpu_actors_even_when_gpus_exist():
    assert worker_pool(get_preset("tiny"), 4, workers=None) == (1, {"num_cpus": 1})
    assert worker_pool(get_preset("tiny"), 0, workers=3) == (3, {"num_cpus": 1})


def test_device_cpu_runs_a_real_preset_on_cpu_actors():
    assert worker_pool(get_preset("qwen-image-df11"), 0, workers=2, device="cpu") == (
        2, {"num_cpus": 1, "memory": 48 * GIB})


def test_a_gpu_model_on_a_cluster_without_gpus_is_a_clear_error():
    with pytest.raises(UserError, match=r"^model 'qwen-image-df11' needs GPUs and this Ray cluster has none"):
        worker_pool(get_preset("qwen-image-df11"), 0, workers=None)
