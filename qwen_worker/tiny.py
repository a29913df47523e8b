"""A tiny, randomly initialised Qwen-Image pipeline built entirely offline, in code.

Same classes as the real model (QwenImagePipeline, QwenImageTransformer2DModel,
AutoencoderKLQwenImage, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer), a few thousand
parameters each, seeded: the same seed builds the same weights, so the same row renders the same
bytes on any machine. Used by tests, the demo and benchmarks; renders noise-like images in ~50 ms.
"""

from __future__ import annotations

# The pipeline drops the first 34 tokens of its prompt template; our tokenizer must encode the
# template prefix to exactly that many tokens, or the prompt would be cut.
TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
TEMPLATE_DROP_TOKENS = 34
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# The tiny transformer: Qwen-Image's architecture (QwenImageTransformer2DModel) at toy width.
TINY_TRANSFORMER_CONFIG = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)

_CORPUS = [
    TEMPLATE_PREFIX,
    "<|im_end|>\n<|im_start|>assistant\n",
    "A bilingual travel guide page for Hong Kong, title \"香港 Hong Kong\", Ultra HD, 4K, cinematic composition.",
    "A luxury perfume advertisement with the slogan \"Timeless\" and price ¥899, studio lighting.",
    "一张官方通知，标题“关于春节放假的通知”，正文排版整齐，超清，4K，电影级构图。",
    "Restaurant menu, event poster, book cover, slide, shop sign 0123456789 ¥$€ .,:;!?\"'()[]",
    "故宫 北京 上海 杭州 西湖 长城 旅游 指南 产品 广告 海报 菜单 价格 春节 快乐",
]


def _train_tokenizer():
    """A byte-level BPE trained in-process, with the Qwen2 pre-tokenizer, wrapped as Qwen2Tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    from tokenizers import Regex

    def train(vocab_size: int):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_CORPUS, trainer=trainer)
        model = tok.to_str()
        import json

        spec = json.loads(model)["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
        qwen = Qwen2Tokenizer(vocab=spec["vocab"], merges=merges)
        qwen.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
        return qwen

    def prefix_tokens(vocab_size: int) -> int:
        return len(train(vocab_size)(TEMPLATE_PREFIX)["input_ids"])

    # More merges shorten the prefix. Bisect for the smallest vocabulary that encodes it in at most
    # 34 tokens, then step up until it is exactly 34 (training is deterministic).
    low, high = 260, 1200
    while low < high:
        middle = (low + high) // 2
        if prefix_tokens(middle) <= TEMPLATE_DROP_TOKENS:
            high = middle
        else:
            low = middle + 1
    for vocab_size in range(low, low + 40):
        tokenizer = train(vocab_size)
        if len(tokenizer(TEMPLATE_PREFIX)["input_ids"]) == TEMPLATE_DROP_TOKENS:
            return tokenizer
    raise RuntimeError("could not build a tiny tokenizer whose template prefix is 34 tokens")


def _text_encoder(vocab_size: int, dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": vocab_size,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
            "bos_token_id": None,
            "eos_token_id": None,
        },
        vision_config={"depth": 1, "hidden_size": 16, "out_hidden_size": 32, "num_heads": 2, "intermediate_size": 32},
        vocab_size=vocab_size,
        hidden_size=32,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)


def build_tiny_pipeline(*, seed: int = 0, dtype=None):
    """The tiny QwenImagePipeline; weights are a pure function of `seed`. BF16 by default, as the
    real models run: like them, a row's pixels then depend a little on the other prompts of its
    micro-batch (padding), which exactly-once must not rely on."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    dtype = dtype or torch.bfloat16
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 16,
        latents_std=[1.0] * 16,
    )
    if dtype != torch.float32:
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "modules ... should be kept in float32: []": there are none
        try:
            transformer, vae = transformer.to(dtype), vae.to(dtype)
        finally:
            diffusers_logging.set_verbosity(level)
    tokenizer = _train_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = _text_encoder(len(tokenizer), dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        use_dynamic_shifting=True,
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
