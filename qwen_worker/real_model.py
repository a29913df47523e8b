"""Load the real Qwen-Image pipeline of a preset: from a local directory or the Hugging Face cache/Hub,
with its transformer in DFloat11 (decoded on the GPU by the `dfloat11` package, or on the CPU by our
codec) or in BF16, placed on the GPU by an offload plan (qwen_worker.offload).

Where the files come from:

- `model_dir` given: a directory laid out like the hub repo of the preset's `base_repo`
  (model_index.json, scheduler/, text_encoder/, tokenizer/, transformer/, vae/). For a DF11 preset the
  DF11 checkpoint (config.json with `dfloat11_config` + *.safetensors) is in `<model_dir>/df11/`, or
  in a second directory: `model_dir = "BASE<os.pathsep>DF11"` (on Linux `BASE:DF11`). Nothing is
  downloaded.
- otherwise the preset's repos (or local directories, when a repo field is a path), through
  `huggingface_hub.snapshot_download` and its cache. With HF_HUB_OFFLINE=1 only the cache is used.
  A DF11 preset never downloads the base repo's BF16 transformer weights (40.9 GB), only its config.

The DF11 transformer is built from its config on the meta device and materialised as uninitialised
BF16 (no weight initialisation, no memory touched: every weight then comes from the checkpoint,
which `check_df11_checkpoint` verifies by name and shape first). `dfloat11` is imported only on
the GPU path: it cannot even be imported without a CUDA driver.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from qwen_worker.errors import UserError
from qwen_worker.offload import (
    DEFAULT_IMAGES_PER_CALL,
    OffloadPlan,
    available_host_ram_gb,
    choose_offload_plan,
    detect_resources,
    parse_offload,
)
from qwen_worker.presets import ModelPreset

log = logging.getLogger(__name__)

DF11_SUBDIR = "df11"
DEVICES = ("auto", "cuda", "cpu")
# what a pipeline directory must hold besides the transformer's weights: model_index.json, the
# transformer's config, and a folder for every component model_index.json lists
PIPELINE_FILES = ("model_index.json", "transformer/config.json")
_TRANSFORMER_WEIGHTS = ["transformer/*.safetensors", "transformer/*.bin", "transformer/*.safetensors.index.json"]
_DF11_TENSOR_SUFFIXES = ("luts", "encoded_exponent", "sign_mantissa", "output_positions", "gaps", "split_positions")
_REQUIRED_DF11_SUFFIXES = ("luts", "encoded_exponent", "sign_mantissa", "output_positions", "gaps")


@dataclass(frozen=True)
class ModelFiles:
    """Local directories a preset loads from."""

    base_dir: Path  # the diffusers pipeline (hub layout)
    df11_dir: Path | None  # the DF11 transformer checkpoint, for DF11 presets


# --------------------------------------------------------------------------- entry point


def load_real_pipeline(
    preset: ModelPreset,
    *,
    model_dir: str | None = None,
    offload: str = "auto",
    device: str = "auto",
    images_per_call: int = DEFAULT_IMAGES_PER_CALL,
):
    """The ready-to-call pipeline of `preset` (its family's class: QwenImagePipeline,
    QwenImageEditPlusPipeline, QwenImage21Pipeline, ...).

    `offload`: auto|none|model|blocks:N (qwen_worker.offload); `images_per_call`: the largest
    micro-batch the worker will render (the plan sizes activations for it, at 1328x1328).
    `device`: "auto" (CUDA when visible; a preset that needs CUDA fails without it), "cuda", or
    "cpu" (everything on the CPU in BF16; a DF11 transformer is decoded by qwen_worker.df11.codec:
    slow, but needs neither a GPU nor the dfloat11 package). The chosen OffloadPlan is logged and
    kept on the pipeline as `pipe.qwen_batch_offload_plan`."""
    target = resolve_device(preset, device)
    parse_offload(offload)  # a malformed value fails before any file is looked up
    files = resolve_model_files(preset, model_dir)
    transformer_config = _read_json(files.base_dir / "transformer" / "config.json")
    num_blocks = int(transformer_config.get("num_layers", 60))
    if target == "cuda":
        free_vram, host_ram = detect_resources()
    else:
        free_vram, host_ram = 0.0, available_host_ram_gb()
    plan = choose_offload_plan(
        offload,
        preset=preset,
        free_vram_gb=free_vram,
        host_ram_gb=host_ram,
        num_blocks=num_blocks,
        images_per_call=images_per_call,
        device=target,
    )
    log.info("model %s from %s: %s", preset.name, files.base_dir, plan.describe())

    import torch

    from qwen_worker.models import family_module

    family = family_module(preset.family)
    pipeline_class = family.pipeline_class(preset)
    if files.df11_dir is not None:
        transformer_class = family.transformer_class()
        transformer = empty_transformer(transformer_class, transformer_class.load_config(os.fspath(files.base_dir),
                                                                                         subfolder="transformer"))
        if target == "cpu":
            decode_df11_into(transformer, files.df11_dir)
        else:
            _load_df11_with_dfloat11(transformer, files.df11_dir, plan)
            if plan.prefetch:
                from qwen_worker.df11.prefetch import enable_prefetch

                enable_prefetch(transformer)
        pipe = pipeline_class.from_pretrained(files.base_dir, transformer=transformer, dtype=torch.bfloat16)
    else:
        pipe = pipeline_class.from_pretrained(files.base_dir, dtype=torch.bfloat16)

    if target == "cuda":
        index = torch.cuda.current_device()
        if plan.model_cpu_offload:
            pipe.enable_model_cpu_offload(gpu_id=index)
        else:
            pipe.to(f"cuda:{index}")
    pipe.set_progress_bar_config(disable=True)
    pipe.qwen_batch_offload_plan = plan
    return pipe


def resolve_device(preset: ModelPreset, device: str = "auto") -> str:
    """The device `--device` (auto|cuda|cpu) means here: "cuda" or "cpu"; UserError when CUDA is
    needed but absent."""
    if device not in DEVICES:
        raise UserError(f"`--device` must be auto, cuda or cpu, got: {device!r}")
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise UserError("`--device cuda` but no CUDA GPU is visible to this worker (run `qwen-batch doctor`)")
    if preset.needs_cuda:
        raise UserError(
            f"model {preset.name!r} needs a CUDA GPU and none is visible to this worker (run `qwen-batch doctor`; "
            "use --device cpu to render on the CPU, very slowly, or --model tiny to try the pipeline)"
        )
    return "cpu"


# --------------------------------------------------------------------------- finding the files


def resolve_model_files(
    preset: ModelPreset, model_dir: str | os.PathLike | None = None, *, local_only: bool = False
) -> ModelFiles:
    """The local directories of `preset`'s pipeline and DF11 checkpoint, checked for the files the
    loader reads; downloads (or, offline or with `local_only`, finds in the cache) what is not local."""
    uses_df11 = preset.df11_repo is not None
    if preset.base_repo is None or preset.builtin:
        raise UserError(f"model {preset.name!r} has no files to load (it is built in code)")
    if model_dir is not None:
        parts = [p for p in os.fspath(model_dir).split(os.pathsep)]
        if len(parts) > 2 or not all(parts) or (len(parts) == 2 and not uses_df11):
            raise UserError(
                f"`--model-dir` must be one directory, or BASE{os.pathsep}DF11 for a DF11 model, got: {os.fspath(model_dir)!r}"
            )
        base = Path(parts[0]).expanduser()
        _check_pipeline_dir(base, preset, need_transformer_weights=not uses_df11, source="--model-dir")
        df11 = None
        if uses_df11:
            df11 = Path(parts[1]).expanduser() if len(parts) == 2 else base / DF11_SUBDIR
            _check_df11_dir(df11, preset, source="--model-dir")
        return ModelFiles(base, df11)

    if uses_df11 and not preset.df11_repo:
        raise UserError(
            f"model {preset.name!r} has no published DF11 transformer: make one with `qwen-batch df11 compress "
            f"MODEL_DIR/transformer MODEL_DIR/{DF11_SUBDIR}` from a download of {preset.base_repo} "
            f"(`hf download {preset.base_repo} --local-dir MODEL_DIR`) and pass --model-dir MODEL_DIR"
        )
    base = _local_or_snapshot(preset, preset.base_repo, _TRANSFORMER_WEIGHTS if uses_df11 else None,
                              local_only=local_only)
    _check_pipeline_dir(base, preset, need_transformer_weights=not uses_df11, source=preset.base_repo)
    df11 = None
    if uses_df11:
        df11 = _local_or_snapshot(preset, preset.df11_repo, None, local_only=local_only)
        _check_df11_dir(df11, preset, source=preset.df11_repo)
    return ModelFiles(base, df11)


def download_commands(preset: ModelPreset, local_dir: str | None = None) -> list[str]:
    """Shell commands that fetch what `preset` loads (into the HF cache, or into `local_dir` in the
    --model-dir layout)."""
    if preset.base_repo is None:
        return []
    exclude = " --exclude 'transformer/diffusion_pytorch_model*'" if preset.df11_repo else ""
    target = f" --local-dir {local_dir}" if local_dir else ""
    commands = [f"hf download {preset.base_repo}{exclude}{target}"]
    if preset.df11_repo:
        df11_target = f" --local-dir {local_dir}/{DF11_SUBDIR}" if local_dir else ""
        commands.append(f"hf download {preset.df11_repo}{df11_target}")
    return commands


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def _local_or_snapshot(preset: ModelPreset, repo: str, ignore_patterns: list[str] | None, *, local_only: bool = False) -> Path:
    """`repo` itself when it is a local directory, else its snapshot in the HF cache (downloaded
    unless offline)."""
    if os.path.isdir(os.path.expanduser(repo)):
        return Path(repo).expanduser()
    import huggingface_hub
    from huggingface_hub import constants

    try:
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = _hub_offline()
    try:
        path = huggingface_hub.snapshot_download(repo, ignore_patterns=ignore_patterns, local_files_only=offline or local_only)
    except LocalEntryNotFoundError as exc:
        why = "HF_HUB_OFFLINE is set" if offline else ("only local files were asked for" if local_only else "the Hugging Face Hub cannot be reached")
        commands = " && ".join(download_commands(preset))
        raise UserError(
            f"model {preset.name!r} needs {repo}, which is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and {why}: download it first where there is network, with the same HF_HOME: `{commands}` "
            f"(older huggingface_hub: `huggingface-cli download ...`), or pass --model-dir DIR "
            f"(`{' && '.join(download_commands(preset, 'DIR'))}`)"
        ) from exc
    except GatedRepoError as exc:
        raise UserError(f"{repo} is gated: accept its licence on huggingface.co and set HF_TOKEN ({exc.__class__.__name__})") from exc
    except RepositoryNotFoundError as exc:
        raise UserError(f"model {preset.name!r} needs {repo}, which the Hugging Face Hub does not have (or needs HF_TOKEN)") from exc
    return Path(path)


def _check_pipeline_dir(base: Path, preset: ModelPreset, *, need_transformer_weights: bool, source: str) -> None:
    if not base.is_dir():
        raise UserError(f"model directory {base} (from {source}) does not exist")
    missing = [name for name in PIPELINE_FILES if not (base / name).exists()]
    if (base / "model_index.json").is_file():
        components = [name for name, value in _read_json(base / "model_index.json").items()
                      if not name.startswith("_") and isinstance(value, list) and value[0] is not None]
        missing += [f"{name}/" for name in components if not (base / name).is_dir()]
    if need_transformer_weights and not _weight_files(base / "transformer"):
        missing.append("transformer/*.safetensors")
    if missing:
        raise UserError(
            f"{base} (from {source}) is not a complete Qwen-Image pipeline for model {preset.name!r}: missing "
            f"{', '.join(missing)} (expected the layout of the hub repo {preset.base_repo}: model_index.json and "
            "a folder per component it lists, e.g. scheduler/, text_encoder/, tokenizer/, transformer/, vae/)"
        )


def _check_df11_dir(df11: Path, preset: ModelPreset, *, source: str) -> None:
    problems = []
    if not df11.is_dir():
        problems.append("the directory does not exist")
    else:
        config = df11 / "config.json"
        if not config.is_file():
            problems.append("no config.json")
        elif not isinstance(_read_json(config).get("dfloat11_config"), dict):
            problems.append("config.json has no `dfloat11_config`")
        if not sorted(df11.glob("*.safetensors")):
            problems.append("no *.safetensors")
    if problems:
        raise UserError(
            f"DF11 transformer of model {preset.name!r} not found in {df11} (from {source}): {'; '.join(problems)} "
            f"(expected the files of {preset.df11_repo} in <model dir>/{DF11_SUBDIR}/, or --model-dir BASE{os.pathsep}DF11)"
        )


def _weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin"))


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return data


# --------------------------------------------------------------------------- the DF11 transformer


def empty_transformer(transformer_class, config: dict):
    """A transformer of `transformer_class` built from `config` with uninitialised BF16 weights:
    built on the meta device, then given untouched CPU memory (no init, no 41 GB written). Its
    RoPE tables are plain tensors computed at construction, as in a loaded model."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        transformer = transformer_class.from_config(config)
    torch.nn.Module.to(transformer, dtype=torch.bfloat16)  # still on meta: costs nothing
    transformer.to_empty(device="cpu")
    return transformer.eval()


def empty_bf16_transformer(base_dir: str | os.PathLike, transformer_class=None):
    """The transformer of the pipeline directory `base_dir` (its transformer/config.json), empty."""
    if transformer_class is None:
        from diffusers import QwenImageTransformer2DModel as transformer_class
    return empty_transformer(transformer_class, transformer_class.load_config(os.fspath(base_dir), subfolder="transformer"))


def _df11_file_index(df11_dir: Path) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    """name -> file, name -> shape, of every tensor in the checkpoint (headers only)."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(df11_dir.glob("*.safetensors")):
        with safe_open(os.fspath(path), framework="pt") as f:
            for name in f.keys():
                if name in where:
                    raise UserError(f"DF11 checkpoint {df11_dir}: tensor `{name}` is in {where[name].name} and {path.name}")
                where[name] = path
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return where, shapes


def _df11_units(transformer, pattern: dict) -> dict[str, list[str]]:
    """unit module name -> names of the weights it compresses, in pattern order."""
    units: dict[str, list[str]] = {}
    for regex, attrs in pattern.items():
        for name, _module in transformer.named_modules():
            if name and re.fullmatch(regex, name):
                units[name] = [f"{name}.{a}.weight" for a in attrs] if attrs else [f"{name}.weight"]
    return units


def check_df11_checkpoint(transformer, df11_dir: str | os.PathLike) -> tuple[dict, dict[str, list[str]]]:
    """Check that the DF11 checkpoint holds every tensor of the transformer (plain ones in their
    shapes, DF11 units with as many weights as their sub-layers), reading only file headers; tensors
    the transformer lacks are logged and ignored. Returns (dfloat11_config, units). The official
    loader only prints mismatches and leaves the weights it did not find uninitialised: this check
    makes them an error."""
    df11_dir = Path(df11_dir)
    df11_config = _read_json(df11_dir / "config.json").get("dfloat11_config")
    if not isinstance(df11_config, dict) or not isinstance(df11_config.get("pattern_dict"), dict):
        raise UserError(f"{df11_dir / 'config.json'} has no `dfloat11_config` with a `pattern_dict`")
    where, shapes = _df11_file_index(df11_dir)
    units = _df11_units(transformer, df11_config["pattern_dict"])
    state = transformer.state_dict()
    compressed = {w for weights in units.values() for w in weights}
    plain = {name: tuple(t.shape) for name, t in state.items() if name not in compressed}
    df11_names = {f"{u}.{s}" for u in units for s in _DF11_TENSOR_SUFFIXES}
    required = set(plain) | {f"{u}.{s}" for u in units for s in _REQUIRED_DF11_SUFFIXES}
    missing = sorted(required - set(where))
    unexpected = sorted(set(where) - set(plain) - df11_names)
    mismatched = [f"{n} {shapes[n]} vs {plain[n]}" for n in sorted(plain) if n in shapes and shapes[n] != plain[n]]
    for unit, weights in units.items():
        name = f"{unit}.sign_mantissa"
        expected = sum(state[w].numel() for w in weights if w in state)
        if name in shapes and (len(shapes[name]) != 1 or shapes[name][0] != expected):
            mismatched.append(f"{name} {shapes[name]} vs ({expected},)")
    problems = []
    for label, names in (("missing", missing), ("of another shape", mismatched)):
        if names:
            problems.append(f"{len(names)} tensors {label} (e.g. {', '.join(names[:3])})")
    if not units:
        problems.append(f"its pattern_dict matches no module of the transformer: {list(df11_config['pattern_dict'])}")
    if problems:
        raise UserError(f"DF11 checkpoint {df11_dir} does not fit the transformer config: {'; '.join(problems)}")
    if unexpected:  # the official loader skips them too
        log.warning("DF11 checkpoint %s: %d tensors the transformer does not have are ignored (e.g. %s)",
                    df11_dir, len(unexpected), ", ".join(unexpected[:3]))
    return df11_config, units


def decode_df11_into(transformer, df11_dir: str | os.PathLike) -> None:
    """Fill `transformer` (from `empty_bf16_transformer`) with the DF11 checkpoint, decoded on the
    CPU by qwen_worker.df11.codec, one unit at a time (host RAM: the BF16 model plus one unit)."""
    import torch
    from safetensors import safe_open

    from qwen_worker.df11.codec import decompress_state_dict

    df11_dir = Path(df11_dir)
    df11_config, units = check_df11_checkpoint(transformer, df11_dir)
    where, _shapes = _df11_file_index(df11_dir)
    targets = dict(transformer.named_parameters())
    targets.update(dict(transformer.named_buffers()))
    handles = {}

    def read(name: str) -> torch.Tensor:
        path = where[name]
        if path not in handles:
            handles[path] = safe_open(os.fspath(path), framework="pt")
        return handles[path].get_tensor(name)

    filled = set()
    with torch.no_grad():
        for unit, weights in units.items():
            tensors = {f"{unit}.{s}": read(f"{unit}.{s}") for s in _DF11_TENSOR_SUFFIXES if f"{unit}.{s}" in where}
            decoded = decompress_state_dict(tensors, df11_config, shapes={w: targets[w].shape for w in weights})
            for name in weights:
                targets[name].copy_(decoded[name])
                filled.add(name)
        df11_names = {f"{u}.{s}" for u in units for s in _DF11_TENSOR_SUFFIXES}
        for name in where:
            if name not in df11_names and name in targets:
                targets[name].copy_(read(name))
                filled.add(name)
    unfilled = sorted(set(transformer.state_dict()) - filled)
    if unfilled:  # check_df11_checkpoint makes this unreachable; keep garbage weights impossible
        raise UserError(f"DF11 checkpoint {df11_dir} left {len(unfilled)} tensors unset (e.g. {unfilled[:3]})")


def _import_dfloat11():
    try:
        from dfloat11 import DFloat11Model
    except Exception as exc:  # without a CUDA driver, cupy or pkg_resources it fails at import
        raise UserError(
            f"the dfloat11 package cannot be loaded ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "install the GPU extra on every GPU worker: pip install 'qwen-batch[gpu]' (dfloat11[cuda12], "
            "setuptools<81; needs a CUDA driver), or use --device cpu (run `qwen-batch doctor`)"
        ) from exc
    return DFloat11Model


def _load_df11_with_dfloat11(transformer, df11_dir: Path, plan: OffloadPlan) -> None:
    """The official loader: DF11 buffers into `transformer` (kept on the CPU; the pipeline places it),
    with `plan`'s block offload; weights are decoded on the GPU before each block runs."""
    check_df11_checkpoint(transformer, df11_dir)
    DFloat11Model = _import_dfloat11()
    DFloat11Model.from_pretrained(
        os.fspath(df11_dir),  # an existing local path: never downloads
        device="cpu",
        bfloat16_model=transformer,
        **plan.dfloat11_options(),
    )
