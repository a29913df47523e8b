"""Parts of the tiny offline pipelines, built entirely in code: same classes as the real models
(Qwen2Tokenizer, Qwen2.5-VL with its vision tower, the Qwen-Image VAE), a few thousand parameters
each, seeded, so the same seed builds the same weights and the same row renders the same bytes on
any machine. Used by each family's tiny builder (tests, the demo, benchmarks).
"""

from __future__ import annotations

import json

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]  # fmt: skip

TINY_CORPUS = [
    "<|im_end|>\n<|im_start|>assistant\n",
    "A bilingual travel guide page for Hong Kong, title \"香港 Hong Kong\", Ultra HD, 4K, cinematic composition.",
    "A luxury perfume advertisement with the slogan \"Timeless\" and price ¥899, studio lighting.",
    "一张官方通知，标题“关于春节放假的通知”，正文排版整齐，超清，4K，电影级构图。",
    "Restaurant menu, event poster, book cover, slide, shop sign 0123456789 ¥$€ .,:;!?\"'()[]",
    "故宫 北京 上海 杭州 西湖 长城 旅游 指南 产品 广告 海报 菜单 价格 春节 快乐",
]

# The Qwen-Image VAE at toy width (AutoencoderKLQwenImage, 8x spatial, 16 latent channels).
TINY_VAE_CONFIG = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    latents_mean=[0.0] * 16,
    latents_std=[1.0] * 16,
)


def train_tokenizer(prefix: str, drop_tokens: int | None, corpus: list[str], special_tokens: list[str]):
    """A byte-level BPE trained in-process with the Qwen2 pre-tokenizer, wrapped as Qwen2Tokenizer,
    whose vocabulary makes `prefix` (the prompt template's system part, which the pipeline drops
    by count) exactly `drop_tokens` tokens long (None: a pipeline that counts them itself; 600
    tokens)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

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
            special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator([prefix, *corpus], trainer=trainer)
        spec = json.loads(tok.to_str())["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
        qwen = Qwen2Tokenizer(vocab=spec["vocab"], merges=merges)
        qwen.add_special_tokens({"additional_special_tokens": special_tokens[1:]})
        return qwen

    def prefix_tokens(vocab_size: int) -> int:
        return len(train(vocab_size)(prefix)["input_ids"])

    if drop_tokens is None:
        return train(600)

    # More merges shorten the prefix. Bisect for the smallest vocabulary that encodes it in at most
    # `drop_tokens` tokens, then step up until it is exactly that (training is deterministic).
    low, high = 260, 1500
    while low < high:
        middle = (low + high) // 2
        if prefix_tokens(middle) <= drop_tokens:
            high = middle
        else:
            low = middle + 1
    for vocab_size in range(low, low + 40):
        tokenizer = train(vocab_size)
        if len(tokenizer(prefix)["input_ids"]) == drop_tokens:
            return tokenizer
    raise RuntimeError(f"could not build a tiny tokenizer whose template prefix is {drop_tokens} tokens")


def qwen25vl_text_encoder(tokenizer, dtype):
    """A tiny Qwen2.5-VL (the Qwen-Image text encoder), vision tower included (the edit pipelines
    feed it pixel values), its special token ids those of `tokenizer`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab_size = len(tokenizer)
    vocab = tokenizer.get_vocab()
    ids = {name: vocab[token] for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")] if token in vocab}
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
        **ids,
    )
    # built in its dtype: casting after the build changes rotary buffers and breaks save/load equality
    return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)


def cast_quietly(modules: list, dtype) -> list:
    """`module.to(dtype)` without diffusers' "modules ... should be kept in float32: []" notice."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    if dtype == torch.float32:
        return modules
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return [module.to(dtype) for module in modules]
    finally:
        diffusers_logging.set_verbosity(level)


def qwen_image_scheduler():
    """Qwen-Image's own scheduler config (FlowMatchEulerDiscreteScheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        use_dynamic_shifting=True,
    )
