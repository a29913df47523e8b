"""GPU offload plans: how much of Qwen-Image stays on the GPU, decided before any weight is loaded.

`--offload` takes `auto`, `none`, `model` or `blocks:N`:

- `none`: the whole pipeline (text encoder, transformer, VAE) lives on the GPU. Fastest.
- `model`: diffusers' model CPU offload. Text encoder, transformer and VAE take turns on the GPU; the
  whole (DF11) transformer is on the GPU while it runs. What the DF11 model card calls "without CPU
  offloading" (its example always enables model CPU offload): ~27.7 GB peak at 1328x1328.
- `blocks:N`: DF11 CPU offload of N of the transformer's 60 blocks (their compressed weights live in
  host RAM, pinned when there is room, and are copied to the GPU block by block each forward), plus
  model CPU offload. Each offloaded block saves ~0.43 GB of GPU memory and costs a host-to-GPU copy
  per forward.

`auto` picks the fastest plan whose estimated peak fits the free GPU memory with some headroom
(`none`, then `model`, then the fewest offloaded blocks). Estimates come from the preset's
`MemoryFootprint` (published peaks of the DF11 model card and the block sizes of Qwen-Image);
`tests/gpu/run_gpu_checks.sh` measures them on a real GPU. All figures are GiB ("GB" as nvidia-smi
and torch print them).

`choose_offload_plan` is a pure function of its arguments; `detect_resources` reads the machine.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from qwen_worker.errors import UserError
from qwen_worker.presets import MemoryFootprint, ModelPreset

GIB = 2**30
QWEN_IMAGE_BLOCKS = 60
DEFAULT_MEGAPIXELS = 1328 * 1328 / 1e6  # Qwen-Image's largest aspect-ratio size (1:1)
DEFAULT_IMAGES_PER_CALL = 4  # the render micro-batch size (RenderWorker.render_shard's default)
HEADROOM_GB = 0.5  # cuBLAS/cuDNN workspaces, CUDA graphs of the attention kernels, ...
HEADROOM_FRACTION = 0.05  # allocator fragmentation
TEXT_ACTIVATION_GB_PER_IMAGE = 0.2  # 29 hidden states + logits of one prompt (and its negative)
PINNED_EXTRA_FRACTION = 0.5  # pinned host allocations round up to a power of two (~1.4x here)

MODES = ("none", "model", "blocks")


@dataclass(frozen=True)
class OffloadPlan:
    """Where the pipeline's weights live while it renders, and what that is expected to cost."""

    mode: str  # "none" | "model" | "blocks"
    cpu_offload_blocks: int | None  # blocks whose DF11 weights live in host RAM (mode "blocks")
    pin_memory: bool  # page-lock those host copies (faster copies, more host RAM)
    expected_peak_vram_gb: float  # estimated peak GPU memory while rendering
    host_ram_needed_gb: float  # estimated host RAM the worker needs
    reason: str  # why this plan, in words
    requested: str = "auto"  # the --offload value it answers
    device: str = "cuda"  # "cuda" | "cpu"
    free_vram_gb: float = 0.0  # free GPU memory the plan was made for (before the model loaded)
    prefetch: bool = False  # copy the next offloaded block's DF11 tensors on a side stream (qwen_worker.df11.prefetch)

    @property
    def label(self) -> str:
        """The --offload value that reproduces this plan."""
        return f"blocks:{self.cpu_offload_blocks}" if self.mode == "blocks" else self.mode

    @property
    def model_cpu_offload(self) -> bool:
        """Whether the pipeline should call `enable_model_cpu_offload()`."""
        return self.device == "cuda" and self.mode in ("model", "blocks")

    def dfloat11_options(self) -> dict:
        """Keyword arguments of `DFloat11Model.from_pretrained` for this plan."""
        blocks = self.mode == "blocks"
        return {
            "cpu_offload": blocks,
            "cpu_offload_blocks": self.cpu_offload_blocks if blocks else None,
            "pin_memory": self.pin_memory if blocks else False,
        }

    def to_dict(self) -> dict:
        """Plain JSON-able data (for job.json and logs)."""
        data = asdict(self)
        data["label"] = self.label
        return data

    def describe(self) -> str:
        """One log line."""
        return (
            f"offload {self.label} on {self.device}: peak ~{self.expected_peak_vram_gb:.1f} GB GPU memory, "
            f"~{self.host_ram_needed_gb:.1f} GB host RAM; {self.reason}"
        )

    def __str__(self) -> str:
        return self.describe()


PREFETCH_SUFFIX = "+prefetch"  # `--offload auto+prefetch`: copy the next offloaded block on a side stream


def split_prefetch(requested: str) -> tuple[str, bool]:
    """(the plan part of an `--offload` value, whether it asks for side-stream prefetching)."""
    if isinstance(requested, str) and requested.endswith(PREFETCH_SUFFIX):
        return requested[: -len(PREFETCH_SUFFIX)], True
    return requested, False


def parse_offload(requested: str, *, num_blocks: int = QWEN_IMAGE_BLOCKS) -> tuple[str, int | None]:
    """("auto" | "none" | "model" | "blocks", N or None) for an `--offload` value (a `+prefetch`
    suffix allowed: qwen_worker.df11.prefetch)."""
    plain, _prefetch = split_prefetch(requested)
    if plain in ("auto", "none", "model"):
        return plain, None
    match = re.fullmatch(r"blocks:([0-9]{1,4})", plain) if isinstance(plain, str) else None
    if match and 1 <= int(match.group(1)) <= num_blocks:
        return "blocks", int(match.group(1))
    raise UserError(
        f"`--offload` must be auto, none, model or blocks:N (N = 1..{num_blocks}), optionally with +prefetch, "
        f"got: {requested!r}"
    )


def _budget(free_vram_gb: float) -> float:
    """GPU memory a plan may use: the free memory less headroom."""
    return free_vram_gb * (1 - HEADROOM_FRACTION) - HEADROOM_GB


def _min_free_for(peak_gb: float) -> float:
    """The free GPU memory whose budget is `peak_gb` (inverse of `_budget`)."""
    return (peak_gb + HEADROOM_GB) / (1 - HEADROOM_FRACTION)


def _stage_peaks(fp: MemoryFootprint, mode: str, blocks: int, images: int, megapixels: float,
                 input_megapixels: float = 0.0) -> dict[str, float]:
    """Estimated GPU memory of each pipeline stage (GB) under a plan."""
    text_act = TEXT_ACTIVATION_GB_PER_IMAGE * images
    transformer_act = fp.activation_gb_per_mp * (megapixels + input_megapixels) * images  # inputs are tokens too
    vae_act = fp.vae_decode_gb_per_mp * megapixels * images
    if mode == "none":  # every weight resident; one stage's activations at a time
        weights = fp.text_encoder_gb + fp.vae_gb + fp.transformer_gb + fp.decode_buffer_gb
        return {"whole pipeline": weights + max(text_act, transformer_act, vae_act)}
    resident = fp.transformer_gb - blocks * fp.block_offload_gb
    in_flight = fp.block_offload_gb if blocks else 0.0  # the offloaded block being decoded
    return {
        "text encoder": fp.text_encoder_gb + text_act,
        "transformer": resident + in_flight + fp.decode_buffer_gb + transformer_act,
        "VAE decode": fp.vae_gb + vae_act,
    }


def _host_needed(fp: MemoryFootprint, mode: str, device: str) -> float:
    """Estimated host RAM (GB). With model offload every component lives in host RAM between turns;
    with none only the transformer passes through it (the others are read memory-mapped)."""
    if device == "cpu":
        return fp.text_encoder_gb + fp.vae_gb + fp.transformer_bf16_gb + fp.host_overhead_gb
    if mode == "none":
        return fp.transformer_gb + fp.host_overhead_gb
    return fp.text_encoder_gb + fp.vae_gb + fp.transformer_gb + fp.host_overhead_gb


def _largest(stages: dict[str, float]) -> tuple[str, float]:
    name = max(stages, key=stages.get)
    return name, stages[name]


def choose_offload_plan(
    requested: str,
    *,
    preset: ModelPreset,
    free_vram_gb: float,
    host_ram_gb: float,
    num_blocks: int = QWEN_IMAGE_BLOCKS,
    images_per_call: int = DEFAULT_IMAGES_PER_CALL,
    megapixels: float | None = None,
    input_megapixels: float | None = None,
    device: str = "cuda",
) -> OffloadPlan:
    """The offload plan for `--offload requested` on a GPU with `free_vram_gb` free and a host with
    `host_ram_gb` available (GB). `images_per_call` x `megapixels` is the largest render call
    (micro-batch size x image size; default: the preset's largest default output), and
    `input_megapixels` the input images of one image (edit models: their tokens join the
    transformer's sequence; default: the preset's most inputs at its input area). Raises UserError for a malformed value, a plan that cannot
    fit, or too little host RAM."""
    kind, blocks = parse_offload(requested, num_blocks=num_blocks)
    if megapixels is None:
        megapixels = DEFAULT_MEGAPIXELS if preset.family == "qwen-image" else preset.target_area / 1e6
    if input_megapixels is None:
        input_megapixels = preset.max_inputs * preset.input_area / 1e6
    if device not in ("cuda", "cpu"):
        raise UserError(f"`--device` must be auto, cuda or cpu, got: {device!r}")
    name = preset.name
    fp = preset.footprint

    if device == "cpu":
        if kind not in ("auto", "none"):
            raise UserError(f"`--offload {requested}` needs a CUDA GPU; with --device cpu use --offload auto or none")
        need = _host_needed(fp, "none", "cpu") if fp else preset.host_memory_gb
        _check_host(name, "--device cpu", need, host_ram_gb)
        return OffloadPlan(
            mode="none",
            cpu_offload_blocks=None,
            pin_memory=False,
            expected_peak_vram_gb=0.0,
            host_ram_needed_gb=round(need, 2),
            reason="CPU device: every weight in host RAM"
            + (" (the DF11 transformer decoded to BF16)" if preset.df11_repo else "")
            + ", no GPU",
            requested=requested,
            device="cpu",
        )

    if fp is None:  # small models (tiny, test presets): nothing worth planning
        if kind == "blocks" and preset.df11_repo is None:
            raise UserError(_blocks_need_df11(requested, name))
        mode = "none" if kind == "auto" else kind
        label = f"blocks:{blocks}" if mode == "blocks" else mode
        _check_host(name, f"--offload {label}", preset.host_memory_gb, host_ram_gb)
        return OffloadPlan(
            mode=mode,
            cpu_offload_blocks=blocks,
            pin_memory=mode == "blocks",
            expected_peak_vram_gb=round(preset.vram_gb, 2),
            host_ram_needed_gb=round(preset.host_memory_gb, 2),
            reason=f"model {name!r} is small: no memory figures needed",
            requested=requested,
        )

    is_df11 = fp.block_offload_gb > 0
    budget = _budget(free_vram_gb)

    def peak(mode: str, n: int) -> float:
        return _largest(_stage_peaks(fp, mode, n, images_per_call, megapixels, input_megapixels))[1]

    if kind == "auto":
        none_peak, model_peak = peak("none", 0), peak("model", 0)
        if none_peak <= budget:
            mode, n, why = "none", 0, f"{free_vram_gb:.1f} GB free GPU memory holds the whole pipeline"
        elif model_peak <= budget:
            what = "DF11 transformer" if is_df11 else "transformer"
            mode, n, why = "model", 0, (
                f"{free_vram_gb:.1f} GB free GPU memory holds the whole {what}; text encoder, "
                "transformer and VAE take turns on the GPU (model CPU offload)"
            )
        else:
            mode, n = "blocks", _fewest_blocks(fp, budget, images_per_call, megapixels, input_megapixels)
            floor_stages = _stage_peaks(fp, "blocks" if is_df11 else "model", num_blocks if is_df11 else 0,
                                        images_per_call, megapixels, input_megapixels)
            stage, floor_peak = _largest(floor_stages)
            if not is_df11 or n > num_blocks or floor_peak > budget:
                raise UserError(_too_small(name, fp, free_vram_gb, stage, floor_peak, is_df11))
            why = (
                f"{free_vram_gb:.1f} GB free GPU memory: {n} of {num_blocks} DF11 transformer blocks "
                "stay in host RAM and are copied to the GPU each step, plus model CPU offload"
            )
    else:
        if kind == "blocks" and not is_df11:
            raise UserError(_blocks_need_df11(requested, name))
        mode, n = kind, (blocks or 0)
        if peak(mode, n) > free_vram_gb:
            raise UserError(
                f"`--offload {requested}` needs about {peak(mode, n):.1f} GB of free GPU memory for model "
                f"{name!r}, this GPU has {free_vram_gb:.1f} GB free (use --offload auto to pick a plan that fits)"
            )
        why = f"requested --offload {requested}"

    label = f"blocks:{n}" if mode == "blocks" else mode
    need = _host_needed(fp, mode, "cuda")
    _check_host(name, f"--offload {label}", need, host_ram_gb)
    pin = False
    if mode == "blocks":
        pinned_extra = PINNED_EXTRA_FRACTION * n * fp.block_offload_gb
        pin = host_ram_gb >= need + pinned_extra
        if pin:
            need += pinned_extra
            why += "; host copies pinned"
        else:
            why += f"; host copies not pinned (pinning needs ~{pinned_extra:.1f} GB more host RAM)"
    prefetch = split_prefetch(requested)[1] and mode == "blocks"
    if prefetch:
        why += "; the next offloaded block is copied on a side stream while the current one runs"
    return OffloadPlan(
        mode=mode,
        cpu_offload_blocks=n if mode == "blocks" else None,
        pin_memory=pin,
        expected_peak_vram_gb=round(peak(mode, n) + (fp.block_offload_gb if prefetch else 0.0), 2),
        host_ram_needed_gb=round(need, 2),
        reason=why,
        requested=requested,
        free_vram_gb=round(free_vram_gb, 2),
        prefetch=prefetch,
    )


def auto_batch_size(plan: OffloadPlan, *, preset: ModelPreset, megapixels: float, input_megapixels: float = 0.0,
                    limit: int = 8) -> int:
    """`--batch-size auto`: the most images of `megapixels` each that one pipeline call can render
    under `plan` within the GPU memory the plan was made for (at least 1, at most `limit`).
    Small models and CPU workers get DEFAULT_IMAGES_PER_CALL."""
    fp = preset.footprint
    if plan.device == "cpu" or fp is None:
        return min(limit, DEFAULT_IMAGES_PER_CALL)
    budget = _budget(plan.free_vram_gb)
    blocks = plan.cpu_offload_blocks or 0
    best = 1
    for images in range(2, limit + 1):
        if _largest(_stage_peaks(fp, plan.mode, blocks, images, megapixels, input_megapixels))[1] > budget:
            break
        best = images
    return best


def _fewest_blocks(fp: MemoryFootprint, budget: float, images: int, megapixels: float, input_megapixels: float = 0.0) -> int:
    """The fewest offloaded DF11 blocks that bring the transformer stage within `budget`."""
    if fp.block_offload_gb <= 0:
        return 0
    whole = _stage_peaks(fp, "blocks", 1, images, megapixels, input_megapixels)["transformer"] + fp.block_offload_gb
    return max(1, math.ceil((whole - budget) / fp.block_offload_gb - 1e-9))


def _too_small(name: str, fp: MemoryFootprint, free: float, stage: str, stage_peak: float, is_df11: bool) -> str:
    if is_df11:
        how = f"with every transformer block offloaded, its {stage} stage needs ~{stage_peak:.1f} GB"
        fix = "use a GPU with more free memory, or --device cpu"
    else:
        how = f"its {stage} stage needs ~{stage_peak:.1f} GB"
        fix = "use a DFloat11 model such as qwen-image-df11 (fits 24 GB GPUs), or a GPU with more memory"
    return (
        f"model {name!r} needs at least {_min_free_for(stage_peak):.1f} GB of free GPU memory ({how}), "
        f"this GPU has {free:.1f} GB free: {fix}"
    )


def _blocks_need_df11(requested: str, name: str) -> str:
    return (
        f"`--offload {requested}` needs a DFloat11 model (it offloads DF11-compressed transformer blocks), "
        f"model {name!r} has none: use --offload model or none"
    )


def _check_host(name: str, what: str, need: float, have: float) -> None:
    if have < need:
        raise UserError(
            f"model {name!r} with {what} needs about {need:.1f} GB of host RAM, "
            f"this host has {have:.1f} GB available"
        )


# --------------------------------------------------------------------------- the machine


def detect_resources(device_index: int | None = None) -> tuple[float, float]:
    """(free GPU memory of CUDA device `device_index` (default: the current one), 0.0 without CUDA;
    available host RAM, within this process's cgroup limit), in GB."""
    return free_vram_gb(device_index), available_host_ram_gb()


def free_vram_gb(device_index: int | None = None) -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    index = torch.cuda.current_device() if device_index is None else device_index
    free, _total = torch.cuda.mem_get_info(index)
    return free / GIB


def available_host_ram_gb(meminfo: str | os.PathLike = "/proc/meminfo", cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> float:
    """Host RAM available now (psutil, else /proc/meminfo MemAvailable), capped by what the cgroup
    (container) limit leaves; 0.0 when nothing can be read."""
    available = None
    if os.fspath(meminfo) == "/proc/meminfo":
        try:
            import psutil

            available = psutil.virtual_memory().available
        except Exception:
            available = None
    if available is None:
        available = _meminfo_available(meminfo)
    in_cgroup = _cgroup_available(cgroup_root)
    candidates = [v for v in (available, in_cgroup) if v is not None]
    return min(candidates) / GIB if candidates else 0.0


def _meminfo_available(path: str | os.PathLike) -> int | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _cgroup_available(root: str | os.PathLike) -> int | None:
    """limit - usage (+ reclaimable page cache) of the cgroup, v2 or v1; None when unlimited/unknown."""
    root = Path(root)

    def read_int(path: Path) -> int | None:
        try:
            text = path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def inactive_file(path: Path) -> int:
        try:
            match = re.search(r"^(?:total_)?inactive_file (\d+)$", path.read_text(), re.MULTILINE)
        except OSError:
            return 0
        return int(match.group(1)) if match else 0

    for limit_file, usage_file, stat_dir in (
        (root / "memory.max", root / "memory.current", root),  # v2
        (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes", root / "memory"),  # v1
    ):
        limit = read_int(limit_file)
        if limit is None or limit >= 2**60:  # "max" or v1's "unlimited"
            continue
        usage = read_int(usage_file) or 0
        return max(0, limit - usage + inactive_file(stat_dir / "memory.stat"))
    return None
