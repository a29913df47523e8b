"""Offload plans (a pure function of the preset, free GPU memory and host RAM), the machine probes,
and `qwen-batch doctor` (which prints the plan auto would pick)."""

import json
import re
import socket
import sys
from dataclasses import replace

import pytest

from qwen_worker.errors import UserError
from qwen_worker.offload import (
    OffloadPlan,
    _budget,
    _cgroup_available,
    _meminfo_available,
    available_host_ram_gb,
    choose_offload_plan,
    detect_resources,
    parse_offload,
)
from qwen_worker.presets import PRESETS

DF11 = PRESETS["qwen-image-df11"]
BF16 = PRESETS["qwen-image"]
TINY = PRESETS["tiny"]
GIB = 2**30


def plan(requested="auto", *, preset=DF11, free=24.0, host=128.0, **kwargs) -> OffloadPlan:
    return choose_offload_plan(requested, preset=preset, free_vram_gb=free, host_ram_gb=host, **kwargs)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("value", ["blocks:x", "blocks:0", "blocks:61", "blocks:", "Blocks:3", "blocks:-1", "", "cpu", " none", "blocks:٣"])
def test_malformed_offload_values_are_refused_with_the_value(value):
    expected = (r"^`--offload` must be auto, none, model or blocks:N \(N = 1\.\.60\), optionally with \+prefetch, got: "
                + re.escape(repr(value)) + "$")
    with pytest.raises(UserError, match=expected):
        parse_offload(value)


def test_prefetch_is_a_suffix_that_only_block_offload_uses():
    assert parse_offload("blocks:7+prefetch") == ("blocks", 7)
    chosen = plan("auto+prefetch", free=24.0)
    assert (chosen.mode, chosen.prefetch) == ("blocks", True)
    assert chosen.expected_peak_vram_gb == pytest.approx(plan(free=24.0).expected_peak_vram_gb + DF11.footprint.block_offload_gb)
    assert chosen.reason.endswith("the next offloaded block is copied on a side stream while the current one runs")
    assert plan("auto+prefetch", free=80.0).prefetch is False  # nothing offloaded: nothing to prefetch


def test_offload_values_parse():
    assert [parse_offload(v) for v in ("auto", "none", "model", "blocks:1", "blocks:60", "blocks:07")] == [
        ("auto", None), ("none", None), ("model", None), ("blocks", 1), ("blocks", 60), ("blocks", 7)
    ]


def test_the_block_range_follows_the_model():
    assert parse_offload("blocks:70", num_blocks=80) == ("blocks", 70)
    with pytest.raises(UserError, match=r"^`--offload` must be auto, none, model or blocks:N \(N = 1\.\.2\), optionally with "
                                        r"\+prefetch, got: 'blocks:3'$"):
        plan("blocks:3", num_blocks=2)


# --------------------------------------------------------------------------- auto


def test_a_big_gpu_holds_the_whole_pipeline():
    assert (plan(free=80.0).mode, plan(free=80.0).cpu_offload_blocks) == ("none", None)


@pytest.mark.parametrize("free", [32.0, 40.0])
def test_32_gb_free_keeps_the_whole_df11_transformer_on_the_gpu(free):
    chosen = plan(free=free)
    assert (chosen.mode, chosen.cpu_offload_blocks, chosen.model_cpu_offload) == ("model", None, True)
    assert chosen.dfloat11_options() == {"cpu_offload": False, "cpu_offload_blocks": None, "pin_memory": False}
    assert chosen.expected_peak_vram_gb == 29.51
    assert chosen.reason == (
        f"{free:.1f} GB free GPU memory holds the whole DF11 transformer; text encoder, transformer and VAE "
        "take turns on the GPU (model CPU offload)"
    )


def test_a_24_gb_gpu_offloads_some_df11_blocks_and_pins_them():
    chosen = plan(free=24.0)
    assert chosen == OffloadPlan(
        mode="blocks",
        cpu_offload_blocks=18,
        pin_memory=True,
        expected_peak_vram_gb=22.03,
        host_ram_needed_gb=52.13,
        reason="24.0 GB free GPU memory: 18 of 60 DF11 transformer blocks stay in host RAM and are copied to "
        "the GPU each step, plus model CPU offload; host copies pinned",
        requested="auto",
        device="cuda",
        free_vram_gb=24.0,
    )
    assert chosen.dfloat11_options() == {"cpu_offload": True, "cpu_offload_blocks": 18, "pin_memory": True}
    assert chosen.model_cpu_offload


def test_less_gpu_memory_offloads_more_blocks_and_every_plan_fits_its_budget():
    blocks = []
    for tenths in range(180, 330, 5):
        free = tenths / 10
        chosen = plan(free=free)
        assert chosen.expected_peak_vram_gb <= _budget(free) + 0.005, free
        blocks.append(chosen.cpu_offload_blocks or 0)
    assert blocks == sorted(blocks, reverse=True)
    assert blocks[0] > plan(free=24.0).cpu_offload_blocks > blocks[-1] == 0


def test_fewer_or_smaller_images_per_call_need_fewer_blocks():
    assert plan(free=24.0, images_per_call=1).cpu_offload_blocks == 14
    assert plan(free=24.0, images_per_call=4, megapixels=1.0).cpu_offload_blocks == 16
    assert plan(free=24.0, images_per_call=8).cpu_offload_blocks == 23


def test_below_the_floor_auto_says_how_much_is_needed():
    with pytest.raises(UserError, match=r"^model 'qwen-image-df11' needs at least 17\.6 GB of free GPU memory \(with every "
                                        r"transformer block offloaded, its text encoder stage needs ~16\.2 GB\), this GPU "
                                        r"has 16\.0 GB free: use a GPU with more free memory, or --device cpu$"):
        plan(free=16.0)


def test_a_bf16_model_that_does_not_fit_points_to_the_df11_one():
    with pytest.raises(UserError, match=r"^model 'qwen-image' needs at least 43\.1 GB of free GPU memory \(its transformer "
                                        r"stage needs ~40\.4 GB\), this GPU has 24\.0 GB free: use a DFloat11 model such as "
                                        r"qwen-image-df11 \(fits 24 GB GPUs\), or a GPU with more memory$"):
        plan(preset=BF16, free=24.0)
    assert plan(preset=BF16, free=48.0).mode == "model"


def test_too_little_host_ram_says_how_much_is_needed_and_available():
    with pytest.raises(UserError, match=r"^model 'qwen-image-df11' with --offload blocks:18 needs about 48\.2 GB of host RAM, "
                                        r"this host has 40\.0 GB available$"):
        plan(free=24.0, host=40.0)


def test_tight_host_ram_offloads_without_pinning():
    chosen = plan(free=24.0, host=50.0)
    assert (chosen.cpu_offload_blocks, chosen.pin_memory, chosen.host_ram_needed_gb) == (18, False, 48.17)
    assert chosen.reason.endswith("; host copies not pinned (pinning needs ~4.0 GB more host RAM)")
    assert chosen.dfloat11_options()["pin_memory"] is False


def test_small_df11_models_take_explicit_block_offload():
    chosen = plan("blocks:1", preset=replace(TINY, df11_repo="t/df11"), free=8.0, host=4.0)
    assert (chosen.mode, chosen.cpu_offload_blocks, chosen.pin_memory) == ("blocks", 1, True)
    assert chosen.dfloat11_options() == {"cpu_offload": True, "cpu_offload_blocks": 1, "pin_memory": True}


def test_small_models_need_no_plan():
    chosen = plan(preset=TINY, free=8.0, host=4.0)
    assert (chosen.mode, chosen.expected_peak_vram_gb, chosen.reason) == ("none", 0.0, "model 'tiny' is small: no memory figures needed")


# --------------------------------------------------------------------------- explicit requests


def test_explicit_blocks_are_kept():
    chosen = plan("blocks:30", free=24.0)
    assert (chosen.mode, chosen.cpu_offload_blocks, chosen.label, chosen.requested) == ("blocks", 30, "blocks:30", "blocks:30")
    assert chosen.expected_peak_vram_gb == 16.75
    assert chosen.reason == "requested --offload blocks:30; host copies pinned"


def test_explicit_plans_that_cannot_fit_are_refused():
    with pytest.raises(UserError, match=r"^`--offload none` needs about 51\.3 GB of free GPU memory for model 'qwen-image-df11', "
                                        r"this GPU has 24\.0 GB free \(use --offload auto to pick a plan that fits\)$"):
        plan("none", free=24.0)
    with pytest.raises(UserError, match=r"^`--offload blocks:2` needs about 29\.1 GB of free GPU memory"):
        plan("blocks:2", free=24.0)


def test_block_offload_needs_a_df11_model():
    for preset in (BF16, TINY):
        with pytest.raises(UserError, match=rf"^`--offload blocks:10` needs a DFloat11 model \(it offloads DF11-compressed "
                                            rf"transformer blocks\), model '{preset.name}' has none: use --offload model or none$"):
            plan("blocks:10", preset=preset, free=80.0)


def test_cpu_device_plans():
    chosen = plan(device="cpu", free=0.0, host=128.0)
    assert (chosen.device, chosen.mode, chosen.expected_peak_vram_gb, chosen.host_ram_needed_gb) == ("cpu", "none", 0.0, 59.74)
    assert chosen.reason == "CPU device: every weight in host RAM (the DF11 transformer decoded to BF16), no GPU"
    assert not chosen.model_cpu_offload
    with pytest.raises(UserError, match=r"^`--offload blocks:4` needs a CUDA GPU; with --device cpu use --offload auto or none$"):
        plan("blocks:4", device="cpu", free=0.0)
    with pytest.raises(UserError, match=r"^model 'qwen-image-df11' with --device cpu needs about 59\.7 GB of host RAM, "
                                        r"this host has 32\.0 GB available$"):
        plan(device="cpu", free=0.0, host=32.0)
    with pytest.raises(UserError, match=r"^`--device` must be auto, cuda or cpu, got: 'tpu'$"):
        plan(device="tpu")


def test_a_plan_serialises_for_job_json_and_logs_in_one_line():
    chosen = plan(free=24.0)
    data = json.loads(json.dumps(chosen.to_dict()))
    assert data == {
        "mode": "blocks", "cpu_offload_blocks": 18, "pin_memory": True, "expected_peak_vram_gb": 22.03,
        "host_ram_needed_gb": 52.13, "reason": chosen.reason, "requested": "auto", "device": "cuda", "label": "blocks:18",
        "free_vram_gb": 24.0, "prefetch": False,
    }
    assert str(chosen) == chosen.describe() == (
        "offload blocks:18 on cuda: peak ~22.0 GB GPU memory, ~52.1 GB host RAM; " + chosen.reason
    )


# --------------------------------------------------------------------------- the machine


def test_meminfo_and_cgroup_limits(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal:       65000000 kB\nMemAvailable:   52428800 kB\n")
    assert _meminfo_available(tmp_path / "meminfo") == 50 * GIB
    assert _meminfo_available(tmp_path / "absent") is None

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{40 * GIB}\n")
    (v2 / "memory.current").write_text(f"{12 * GIB}\n")
    (v2 / "memory.stat").write_text(f"anon 1\ninactive_file {2 * GIB}\n")
    assert _cgroup_available(v2) == 30 * GIB
    assert available_host_ram_gb(tmp_path / "meminfo", v2) == 30.0  # the container limit wins

    (v2 / "memory.max").write_text("max\n")
    assert _cgroup_available(v2) is None
    assert available_host_ram_gb(tmp_path / "meminfo", v2) == 50.0

    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{8 * GIB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{3 * GIB}\n")
    (v1 / "memory.stat").write_text(f"total_inactive_file {GIB}\n")
    assert _cgroup_available(tmp_path / "v1") == 6 * GIB


def test_detect_resources_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    free, host = detect_resources()
    assert free == 0.0
    assert 0.1 < host < 100_000


# --------------------------------------------------------------------------- qwen-batch doctor


def doctor(capsys, *args):
    from jobs.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["doctor", *args])
    return exited.value.code, capsys.readouterr().out.splitlines()


@pytest.fixture
def quiet_env(monkeypatch):
    """No S3 or Ray configured; a CPU-only torch, without cupy and dfloat11 (whatever the machine has)."""
    import torch

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "dfloat11", None)


def test_doctor_for_the_tiny_model_on_a_cpu_host_is_ready(capsys, quiet_env, monkeypatch):
    code, lines = doctor(capsys, "--model", "tiny")
    assert code == 0
    assert [line.split()[0] for line in lines[:-1]] == ["WARN", "WARN", "WARN", "WARN", "OK", "OK", "OK", "SKIP", "SKIP"]
    assert lines[1].startswith("WARN  gpu: no CUDA GPU visible")
    assert lines[5].startswith("OK    offload plan: offload none on cpu: peak ~0.0 GB GPU memory")
    assert lines[-1] == "ready for model 'tiny'"


def test_doctor_for_the_df11_model_without_a_gpu_says_what_to_fix(capsys, quiet_env, monkeypatch):
    code, lines = doctor(capsys, "--model", "qwen-image-df11")
    assert code == 1
    failed = [line.split(":")[0].split(None, 1)[1] for line in lines if line.startswith("FAIL")]
    assert failed == ["torch", "gpu", "cupy", "dfloat11", "offload plan"]
    assert "FAIL  dfloat11: cannot import (ModuleNotFoundError: import of dfloat11 halted; None in sys.modules): pip install 'qwen-batch[gpu]'" in "\n".join(lines)
    assert "FAIL  offload plan: model 'qwen-image-df11' needs a CUDA GPU (or --device cpu)" in lines
    assert lines[-1] == "not ready for model 'qwen-image-df11'"


def test_doctor_checks_s3_without_printing_secrets(capsys, quiet_env, s3_env, monkeypatch):
    code, lines = doctor(capsys, "--model", "tiny")
    assert code == 0
    assert f"OK    s3: {s3_env.endpoint} answers list_buckets" in "\n".join(lines)
    assert not any(s3_env.secret_key in line or s3_env.access_key in line for line in lines)


def test_doctor_fails_for_an_unreachable_s3_endpoint_and_ray_address(capsys, quiet_env, monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user:hunter2@127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    code, lines = doctor(capsys, "--model", "tiny")
    text = "\n".join(lines)
    assert code == 1
    assert f"FAIL  s3: cannot reach http://127.0.0.1:{port} within 3 s" in text
    assert f"FAIL  ray: cannot connect to 127.0.0.1:{port}" in text
    assert "hunter2" not in text and "s3cr3t" not in text and "AKIDEXAMPLE" not in text


def test_doctor_reaches_a_listening_ray_address(capsys, quiet_env, monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        code, lines = doctor(capsys, "--model", "tiny", "--json")
    report = json.loads("\n".join(lines))
    assert code == 0 and report["ok"] is True
    assert {"name": "ray", "status": "OK", "detail": f"127.0.0.1:{port} accepts connections"} in report["checks"]


def test_every_dfloat11_preset_and_qwen_image_2_1_get_a_plan_on_a_24_gb_card():
    """The plan each family's preset picks for 23.5 GB free: block offload for the DF11 presets
    (edit models offload more: their input images join the transformer's tokens), model CPU offload
    for 2.1 (its 8 B text encoder takes turns with the 7 B transformer)."""
    from qwen_worker.models import PRESETS

    chosen = {name: plan(preset=preset, free=23.5) for name, preset in PRESETS.items()
              if not preset.builtin and (preset.uses_df11 or preset.family == "qwen-image-2.1")}
    labels = {name: p.label for name, p in chosen.items()}
    assert labels == {"qwen-image-df11": "blocks:19", "qwen-image-2512-df11": "blocks:19",
                      "qwen-image-edit-df11": "blocks:20", "qwen-image-edit-2509-df11": "blocks:26",
                      "qwen-image-edit-2511-df11": "blocks:26", "qwen-image-2.1": "model", "qwen-image-2.1-df11": "model"}
    assert all(p.expected_peak_vram_gb <= 23.5 for p in chosen.values())
    with pytest.raises(UserError, match=r"model 'qwen-image-edit-2511' needs at least 46\.6 GB of free GPU memory"):
        plan(preset=PRESETS["qwen-image-edit-2511"], free=23.5)
