"""What a `--model` name is: plain data the driver validates rows against before any model (or torch)
is loaded, and the worker loads from. Each model family's module lists its presets."""

from __future__ import annotations

from dataclasses import dataclass, field

# Qwen-Image's aspect-ratio table (from the model card), for text-to-image rows.
ASPECT_RATIOS = {
    "1:1": (1328, 1328),
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "4:3": (1472, 1104),
    "3:4": (1104, 1472),
    "3:2": (1584, 1056),
    "2:3": (1056, 1584),
}

# Qwen-Image's recommended prompt suffix ("positive magic") by language (text-to-image presets only).
PROMPT_SUFFIX = {
    "en": ", Ultra HD, 4K, cinematic composition.",
    "zh": ", 超清，4K，电影级构图.",
}

# The Lightning scheduler its authors publish (lightx2v/Qwen-Image-Lightning, generate_with_diffusers.py,
# also in diffusers' Qwen-Image docs): FlowMatchEulerDiscreteScheduler, base_shift = max_shift = log(3),
# dynamic exponential time shift, no terminal shift.
LIGHTNING_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 1.0986122886681098,  # math.log(3)
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 1.0986122886681098,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


@dataclass(frozen=True)
class MemoryFootprint:
    """What a model occupies, in GiB (2**30 bytes, what nvidia-smi and torch report as "GB"), for
    planning GPU offload (qwen_worker.offload). Weights are as loaded for inference (BF16, or DF11
    for a DFloat11 transformer); per-megapixel figures are for one image in one call. Built by
    qwen_worker.models.footprint from the parameter counts of the real configs."""

    text_encoder_gb: float
    vae_gb: float
    transformer_gb: float  # as held for inference: DF11-compressed when the preset uses DF11
    transformer_bf16_gb: float  # decoded to BF16 (the --device cpu path)
    block_offload_gb: float  # what DF11 CPU offload moves to host RAM per transformer block (0: no DF11)
    decode_buffer_gb: float  # DF11 decodes one block at a time into a BF16 buffer of the largest block
    activation_gb_per_mp: float  # transformer activations per image-megapixel (output and inputs) in one forward
    vae_decode_gb_per_mp: float  # VAE decode activations per image-megapixel
    host_overhead_gb: float  # Python, torch and the largest checkpoint file being read


@dataclass(frozen=True)
class Lightning:
    """A few-step LoRA for a model (lightx2v), found offline: `hf://repo/file` from the Hugging Face
    cache, or `<--model-dir>/lightning/<file>`. Tiny presets build theirs in code (`builtin`)."""

    steps: int
    source: str  # hf://owner/repo/file.safetensors, or builtin:<name>


@dataclass(frozen=True)
class ModelPreset:
    name: str
    family: str  # the module of qwen_worker.models that builds and renders it
    description: str
    base_repo: str | None  # diffusers pipeline (text encoder, VAE, processor, scheduler, transformer config)
    df11_repo: str | None  # DFloat11 transformer repo when the preset uses one ("": none published, make it
    # with `qwen-batch df11 compress` and pass --model-dir); None: a BF16 transformer
    needs_cuda: bool
    min_size: int
    max_size: int
    default_steps: int
    default_true_cfg_scale: float
    host_memory_gb: float  # host RAM one worker needs (CPU offload keeps weights in RAM)
    vram_gb: float  # GPU memory one worker needs with its default offload plan
    footprint: MemoryFootprint | None = None  # for offload planning; None: small, nothing to offload
    pipeline: str = ""  # the diffusers pipeline class (the family's default when empty)
    size_multiple: int = 16  # width and height must be multiples of this
    min_inputs: int = 0  # input images a row must give (`image` / `images`)
    max_inputs: int = 0
    mask: bool = False  # takes a `mask` (inpainting)
    prompt_suffix: bool = True  # append Qwen-Image's "positive magic" suffix for the prompt's language
    target_area: int = 1328 * 1328  # default output area (text-to-image: the aspect-ratio table's)
    size_from_input: str = ""  # "first" | "last": which input's aspect ratio sets the default output size
    input_area: int = 1024 * 1024  # edit: each input image is VAE-encoded at this area (its aspect kept)
    condition_area: int = 384 * 384  # edit-plus: and shown to the vision-language encoder at this area
    rgba: bool = False  # renders RGBA (PNG/WebP keep alpha; JPEG gets white behind)
    lightning: dict = field(default_factory=dict)  # "lightning-8" -> Lightning
    builtin: bool = False  # built in code (tiny presets): no files to load
    df11_in_code: bool = False  # tiny-df11: the tiny transformer through our DF11 codec

    def size_limits_text(self) -> str:
        return f"{self.min_size} and {self.max_size}"

    @property
    def takes_inputs(self) -> bool:
        return self.max_inputs > 0

    @property
    def uses_df11(self) -> bool:
        return self.df11_repo is not None or self.df11_in_code
