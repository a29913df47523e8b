"""The real-model loader on the CPU: device checks, where files come from (a --model-dir, a local
repo path, the Hugging Face cache offline), and the --device cpu DF11 path, all with the tiny
pipeline saved to disk. Nothing touches a hub (conftest sets HF_HUB_OFFLINE=1)."""

import importlib.util
import os
import shutil
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from qwen_worker.errors import UserError
from qwen_worker.presets import PRESETS
from qwen_worker.real_model import (
    check_df11_checkpoint,
    empty_bf16_transformer,
    load_real_pipeline,
    resolve_model_files,
)

HAS_CODEC = importlib.util.find_spec("qwen_worker.df11.codec") is not None
needs_codec = pytest.mark.skipif(not HAS_CODEC, reason="qwen_worker/df11_codec.py is not there yet")

# presets of the tiny pipeline's files on disk (footprint None: no memory figures to check)
LOCAL = replace(PRESETS["tiny"], name="local-test", base_repo="qwen-batch-test/tiny", df11_repo=None, builtin=False)
LOCAL_DF11 = replace(LOCAL, name="local-df11", df11_repo="qwen-batch-test/tiny-df11")


@pytest.fixture(scope="module")
def tiny_bf16():
    from qwen_worker.models.qwen_image import build_tiny_pipeline

    return build_tiny_pipeline(seed=0, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def saved(tiny_bf16, tmp_path_factory):
    """The tiny BF16 pipeline saved in the hub repo layout."""
    path = tmp_path_factory.mktemp("tiny") / "pipeline"
    tiny_bf16.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved_df11(tiny_bf16, saved, tmp_path_factory):
    """A pipeline directory without transformer weights, with the transformer in DF11 under df11/."""
    from qwen_worker.df11.codec import compress_state_dict, save_df11

    path = tmp_path_factory.mktemp("tiny-df11") / "pipeline"
    shutil.copytree(saved, path)
    for weights in (path / "transformer").glob("*.safetensors"):
        weights.unlink()
    compressed, config = compress_state_dict(tiny_bf16.transformer.state_dict())
    save_df11(path / "df11", compressed, config)
    return path


def render(pipe):
    """One 32x32 image, 2 steps, with CFG, seed 7 (as qwen_worker.render does it)."""
    generator = torch.Generator("cpu").manual_seed(7)
    output = pipe(
        prompt=["a bilingual poster 香港"], negative_prompt=[" "], true_cfg_scale=4.0, width=32, height=32,
        num_inference_steps=2, generator=[generator], output_type="np",
    )
    return output.images


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert different == []


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def no_hub(monkeypatch):
    """Any snapshot_download call fails the test."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"snapshot_download called: {args}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


# --------------------------------------------------------------------------- device and options


def test_gpu_preset_without_cuda_fails_before_looking_for_files(no_cuda, no_hub):
    with pytest.raises(UserError, match=r"^model 'qwen-image-df11' needs a CUDA GPU and none is visible to this "
                                        r"worker \(run `qwen-batch doctor`; use --device cpu to render on the CPU"):
        load_real_pipeline(PRESETS["qwen-image-df11"])


def test_device_cuda_without_cuda_is_refused(no_cuda, no_hub):
    with pytest.raises(UserError, match=r"^`--device cuda` but no CUDA GPU is visible to this worker"):
        load_real_pipeline(LOCAL, device="cuda")


def test_device_value_is_checked(no_hub):
    with pytest.raises(UserError, match=r"^`--device` must be auto, cuda or cpu, got: 'gpu'$"):
        load_real_pipeline(LOCAL, device="gpu")


def test_offload_value_is_checked_before_looking_for_files(no_hub):
    with pytest.raises(UserError, match=r"^`--offload` must be auto, none, model or blocks:N \(N = 1\.\.60\), optionally "
                                        r"with \+prefetch, got: 'blocks:x'$"):
        load_real_pipeline(LOCAL, device="cpu", offload="blocks:x")


def test_cpu_device_refuses_gpu_offload_plans(saved):
    with pytest.raises(UserError, match=r"^`--offload model` needs a CUDA GPU; with --device cpu use --offload auto or none$"):
        load_real_pipeline(LOCAL, model_dir=str(saved), device="cpu", offload="model")


# --------------------------------------------------------------------------- where files come from


def test_model_dir_pipeline_renders_the_same_image_as_the_in_memory_one(tiny_bf16, saved, no_hub):
    pipe = load_real_pipeline(LOCAL, model_dir=str(saved), device="cpu")
    assert pipe.transformer.dtype == torch.bfloat16
    plan = pipe.qwen_batch_offload_plan
    assert (plan.device, plan.mode, plan.expected_peak_vram_gb) == ("cpu", "none", 0.0)
    expected = render(tiny_bf16)
    image = render(pipe)
    assert image.shape == (1, 32, 32, 3)
    assert np.array_equal(image, expected)


def test_a_repo_field_that_is_a_local_directory_is_used_as_it_is(tiny_bf16, saved, no_hub):
    pipe = load_real_pipeline(replace(LOCAL, base_repo=str(saved)), device="cpu")
    assert_same_weights(pipe.transformer, tiny_bf16.transformer)


def test_offline_the_hugging_face_cache_is_used(tiny_bf16, saved, tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--qwen-batch-test--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(saved, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    files = resolve_model_files(LOCAL)
    assert files.base_dir == repo / "snapshots" / commit
    pipe = load_real_pipeline(LOCAL, device="cpu")
    assert_same_weights(pipe.vae, tiny_bf16.vae)


def test_offline_and_not_cached_says_how_to_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(UserError) as caught:
        load_real_pipeline(LOCAL_DF11, device="cpu")
    message = str(caught.value)
    assert message.startswith(
        "model 'local-df11' needs qwen-batch-test/tiny, which is not in the Hugging Face cache "
        f"({tmp_path / 'empty-hub'}) and HF_HUB_OFFLINE is set: download it first where there is network"
    )
    assert ("`hf download qwen-batch-test/tiny --exclude 'transformer/diffusion_pytorch_model*' && "
            "hf download qwen-batch-test/tiny-df11`") in message
    assert "or pass --model-dir DIR" in message
    assert "hf download qwen-batch-test/tiny-df11 --local-dir DIR/df11" in message


def test_incomplete_model_dir_names_what_is_missing(saved, tmp_path, no_hub):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    shutil.rmtree(broken / "vae")
    (next((broken / "transformer").glob("*.safetensors"))).unlink()
    with pytest.raises(UserError, match=r"is not a complete Qwen-Image pipeline for model 'local-test': missing "
                                        r"vae/, transformer/\*\.safetensors \(expected the layout"):
        load_real_pipeline(LOCAL, model_dir=str(broken), device="cpu")


def test_df11_model_dir_without_df11_files_says_where_they_go(saved, no_hub):
    with pytest.raises(UserError, match=r"^DF11 transformer of model 'local-df11' not found in .*/df11 \(from "
                                        r"--model-dir\): the directory does not exist \(expected the files of "
                                        r"qwen-batch-test/tiny-df11 in <model dir>/df11/, or --model-dir BASE:DF11\)$"):
        resolve_model_files(LOCAL_DF11, str(saved))


def test_model_dir_with_two_directories_is_only_for_df11_models(saved, no_hub):
    with pytest.raises(UserError, match=r"^`--model-dir` must be one directory, or BASE:DF11 for a DF11 model, got: "):
        resolve_model_files(LOCAL, f"{saved}{os.pathsep}{saved}")


# --------------------------------------------------------------------------- DF11


def test_empty_bf16_transformer_has_the_layout_of_a_loaded_one(tiny_bf16, saved):
    empty = empty_bf16_transformer(saved)
    reference = tiny_bf16.transformer.state_dict()
    got = empty.state_dict()
    assert {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in got.items()} == {
        k: (tuple(v.shape), v.dtype, "cpu") for k, v in reference.items()
    }
    assert torch.equal(empty.pos_embed.pos_freqs, tiny_bf16.transformer.pos_embed.pos_freqs)
    assert not empty.training


@needs_codec
def test_cpu_df11_path_renders_the_same_image_as_the_bf16_pipeline(tiny_bf16, saved_df11, no_hub):
    pipe = load_real_pipeline(LOCAL_DF11, model_dir=str(saved_df11), device="cpu")
    assert_same_weights(pipe.transformer, tiny_bf16.transformer)
    assert np.array_equal(render(pipe), render(tiny_bf16))


@needs_codec
def test_df11_dir_may_be_a_second_directory(saved_df11, no_hub):
    files = resolve_model_files(LOCAL_DF11, f"{saved_df11}{os.pathsep}{saved_df11 / 'df11'}")
    assert (files.base_dir, files.df11_dir) == (saved_df11, saved_df11 / "df11")


@needs_codec
def test_a_df11_checkpoint_that_does_not_fit_the_transformer_is_refused(tiny_bf16, saved, tmp_path):
    from qwen_worker.df11.codec import compress_state_dict, save_df11

    state = dict(tiny_bf16.transformer.state_dict())
    del state["norm_out.linear.bias"]
    state["proj_out.weight"] = state["proj_out.weight"][:, :8].contiguous()
    compressed, config = compress_state_dict(state)
    save_df11(tmp_path / "df11", compressed, config)
    with pytest.raises(UserError, match=r"does not fit the transformer config: 1 tensors missing \(e\.g\. "
                                        r"norm_out\.linear\.bias\); 1 tensors of another shape \(e\.g\. "
                                        r"proj_out\.weight \(64, 8\) vs \(64, 32\)\)$"):
        check_df11_checkpoint(empty_bf16_transformer(saved), tmp_path / "df11")


@needs_codec
def test_extra_tensors_in_a_df11_checkpoint_are_ignored_with_a_warning(tiny_bf16, saved, tmp_path, caplog):
    from qwen_worker.df11.codec import compress_state_dict, save_df11
    from qwen_worker.real_model import decode_df11_into

    state = dict(tiny_bf16.transformer.state_dict())
    state["extra.weight"] = torch.zeros(2, dtype=torch.bfloat16)
    compressed, config = compress_state_dict(state)
    save_df11(tmp_path / "df11", compressed, config)
    transformer = empty_bf16_transformer(saved)
    decode_df11_into(transformer, tmp_path / "df11")
    assert_same_weights(transformer, tiny_bf16.transformer)
    assert "1 tensors the transformer does not have are ignored (e.g. extra.weight)" in caplog.text


def test_gpu_path_without_a_loadable_dfloat11_says_how_to_install_it(tmp_path, monkeypatch):
    """dfloat11 fails at import with a non-ImportError where there is no CUDA driver."""
    from qwen_worker import real_model

    (tmp_path / "dfloat11").mkdir()
    (tmp_path / "dfloat11" / "__init__.py").write_text("raise RuntimeError('CUDA driver not found')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "dfloat11", raising=False)
    with pytest.raises(UserError, match=r"^the dfloat11 package cannot be loaded \(RuntimeError: CUDA driver not found\); "
                                        r"install the GPU extra on every GPU worker: pip install 'qwen-batch\[gpu\]'"):
        real_model._import_dfloat11()


@needs_codec
def test_gpu_path_hands_the_plan_to_dfloat11(saved_df11, monkeypatch):
    """What `DFloat11Model.from_pretrained` gets (the real one needs CUDA: tests/gpu runs it)."""
    from qwen_worker import real_model
    from qwen_worker.offload import choose_offload_plan

    calls = []

    class FakeDFloat11Model:
        @classmethod
        def from_pretrained(cls, path, **kwargs):
            calls.append((path, kwargs))

    monkeypatch.setattr(real_model, "_import_dfloat11", lambda: FakeDFloat11Model)
    plan = choose_offload_plan("auto", preset=PRESETS["qwen-image-df11"], free_vram_gb=24.0, host_ram_gb=128.0)
    transformer = empty_bf16_transformer(saved_df11)
    real_model._load_df11_with_dfloat11(transformer, saved_df11 / "df11", plan)
    assert calls == [(
        str(saved_df11 / "df11"),
        {"device": "cpu", "bfloat16_model": transformer, "cpu_offload": True, "cpu_offload_blocks": 18, "pin_memory": True},
    )]
