"""LoRA adapters on the real tiny transformer: key formats, header checks, hooks beside the weights
(plain BF16 and through the DF11 codec), and the worker's adapter cache."""

import io

import numpy as np
import pytest
import torch

from qwen_worker.lora.format import LoraFormatError, adapter_tensors, check_layout, layout_from_header, parse_header
from qwen_worker.lora.hooks import LoraHooks, linear_layers
from qwen_worker.lora.spec import LoraSpecError, parse_specs, split_spec
from qwen_worker.models.qwen_image import TINY_TRANSFORMER_CONFIG

TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.net.0.proj", "img_mlp.net.2")
RANK, ALPHA = 4, 2.0


def tiny_transformer(dtype=torch.float32):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG).to(dtype).eval()


def random_lora(linears, seed=2):
    """{module: (A, B, alpha)} on the TARGETS of every block."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name, (in_features, out_features) in sorted(linears.items()):
        parts = name.split(".", 2)
        if parts[0] == "transformer_blocks" and parts[2] in TARGETS:
            lora[name] = (torch.randn(RANK, in_features, generator=generator) * 0.3,
                          torch.randn(out_features, RANK, generator=generator) * 0.3, ALPHA)
    return lora


def as_format(lora, fmt):
    tensors = {}
    for module, (a, b, alpha) in lora.items():
        if fmt == "peft":  # diffusers/PEFT: no alpha, scale baked into B
            tensors[f"transformer.{module}.lora_A.weight"] = a
            tensors[f"transformer.{module}.lora_B.weight"] = b * (alpha / RANK)
        elif fmt in ("lightx2v", "ai-toolkit"):
            prefix = "diffusion_model." if fmt == "ai-toolkit" else ""
            tensors.update({f"{prefix}{module}.lora_down.weight": a, f"{prefix}{module}.lora_up.weight": b,
                            f"{prefix}{module}.alpha": torch.tensor(alpha)})
        else:  # kohya
            key = "lora_unet_" + module.replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(alpha)})
    return tensors


def inputs(batch=2, height=4, width=4, text=7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, height * width, TINY_TRANSFORMER_CONFIG["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(batch, text, TINY_TRANSFORMER_CONFIG["joint_attention_dim"], generator=generator),
        encoder_hidden_states_mask=torch.ones(batch, text, dtype=torch.long),
        timestep=torch.tensor([0.5] * batch),
        img_shapes=[[(1, height, width)]] * batch,
        return_dict=False,
    )


@torch.no_grad()
def forward(model):
    return model(**inputs())[0]


@pytest.mark.parametrize("fmt", ["peft", "lightx2v", "ai-toolkit", "kohya"])
def test_every_known_key_format_gives_the_same_adapter(fmt):
    model = tiny_transformer()
    linears = linear_layers(model)
    lora = random_lora(linears)
    adapter = adapter_tensors(as_format(lora, fmt), linears)
    assert sorted(adapter) == sorted(lora)
    for module, (a, b, alpha) in lora.items():
        got_a, got_b = adapter[module]
        assert torch.allclose(got_b @ got_a, (alpha / RANK) * b @ a, atol=1e-6)
    assert check_layout({k: list(v.shape) for k, v in as_format(lora, fmt).items()}, linears).rank == RANK


def test_hooks_add_the_lora_beside_the_weights_and_switch_without_reloading():
    model = tiny_transformer()
    linears = linear_layers(model)
    lora = random_lora(linears)
    base = forward(model)
    merged = tiny_transformer()
    with torch.no_grad():
        for module, (a, b, alpha) in lora.items():
            merged.get_submodule(module).weight += 0.8 * (alpha / RANK) * b @ a
    expected = forward(merged)
    hooks = LoraHooks(model)
    adapter = adapter_tensors(as_format(lora, "lightx2v"), linears)
    hooks.activate([(adapter, 0.8)], key=("brand", 0.8))
    assert torch.allclose(forward(model), expected, atol=1e-5)
    assert not torch.allclose(expected, base, atol=1e-3)  # the LoRA changes the output
    hooks.activate([], key=())
    assert torch.equal(forward(model), base)  # no set active: exactly the base model
    hooks.activate([(adapter, 0.4), (adapter, 0.4)], key=("twice",))
    assert torch.allclose(forward(model), expected, atol=1e-5)  # two adapters add up


def test_header_checks_name_the_first_key_that_does_not_fit():
    linears = linear_layers(tiny_transformer())
    lora = random_lora(linears)
    shapes = {k: list(v.shape) for k, v in as_format(lora, "lightx2v").items()}
    assert layout_from_header({**{k: {"shape": v} for k, v in shapes.items()}, "__metadata__": {}}, linears).rank == RANK
    with pytest.raises(LoraFormatError, match=r"has key 'text_encoder.layers.0.q.lora_down.weight' for module "
                                              r"'text_encoder.layers.0.q', which this model's transformer does not have"):
        check_layout({**shapes, "text_encoder.layers.0.q.lora_down.weight": [4, 8],
                      "text_encoder.layers.0.q.lora_up.weight": [8, 4]}, linears)
    with pytest.raises(LoraFormatError, match=r"has key 'transformer_blocks.0.attn.to_q.hada_w1_a' of no known LoRA format"):
        check_layout({**shapes, "transformer_blocks.0.attn.to_q.hada_w1_a": [4, 4]}, linears)
    bigger = {k: ([v[0], 3072] if k.endswith("to_q.lora_down.weight") else v) for k, v in shapes.items()}
    with pytest.raises(LoraFormatError, match=r"module 'transformer_blocks.0.attn.to_q': LoRA is 32x3072, the "
                                              r"transformer's layer is 32x32 \(a LoRA for another model size"):
        check_layout(bigger, linears)
    without_up = {k: v for k, v in shapes.items() if not k.startswith("transformer_blocks.1.attn.to_k.lora_up")}
    with pytest.raises(LoraFormatError, match=r"module 'transformer_blocks.1.attn.to_k' without its lora_B/lora_up"):
        check_layout(without_up, linears)


def test_a_safetensors_header_is_read_from_the_first_bytes():
    from safetensors.torch import save

    data = save({"transformer_blocks.0.attn.to_q.lora_down.weight": torch.zeros(4, 32)})
    header = parse_header(data[:4096])
    assert header["transformer_blocks.0.attn.to_q.lora_down.weight"]["shape"] == [4, 32]
    with pytest.raises(LoraFormatError, match=r"is not a safetensors file \(no valid header\)"):
        parse_header(b"PK\x03\x04 a zip file, not safetensors")


@pytest.mark.parametrize("text, expected", [
    ("brand.safetensors", ("brand.safetensors", 1.0)),
    ("s3://b/loras/brand.safetensors:0.8", ("s3://b/loras/brand.safetensors", 0.8)),
    ("hf://lightx2v/Qwen-Image-Lightning/x.safetensors:-0.5", ("hf://lightx2v/Qwen-Image-Lightning/x.safetensors", -0.5)),
    ("builtin:tiny-brand:0.3", ("builtin:tiny-brand", 0.3)),
])
def test_a_spec_is_a_source_and_an_optional_scale(text, expected):
    assert split_spec(text) == expected


@pytest.mark.parametrize("text, message", [
    ("brand.safetensors:lots", "scale after ':' must be a number, got 'lots'"),
    ("brand.bin", "must be a .safetensors file"),
    ("brand.safetensors:1e9", "scale must be a number between -10 and 10"),
])
def test_bad_specs_say_which_rule(text, message):
    with pytest.raises(LoraSpecError, match=message):
        split_spec(text)


def test_a_set_is_sorted_relative_to_the_manifest_and_names_each_file_once(tmp_path):
    refs = parse_specs("b.safetensors:0.5; a.safetensors", str(tmp_path))
    assert [(r.uri, r.scale) for r in refs] == [(str(tmp_path / "a.safetensors"), 1.0), (str(tmp_path / "b.safetensors"), 0.5)]
    assert parse_specs(["a.safetensors", "b.safetensors:0.5"], str(tmp_path)) == refs
    assert parse_specs("../x.safetensors", "s3://bucket/briefs/may")[0].uri == "s3://bucket/briefs/x.safetensors"
    with pytest.raises(LoraSpecError, match="names .*a.safetensors twice"):
        parse_specs("a.safetensors;a.safetensors:0.2", str(tmp_path))


def test_the_adapter_cache_reads_each_file_once_and_drops_the_least_recently_used():
    from qwen_worker.lora.builtin import builtin_lora_bytes
    from qwen_worker.lora.cache import AdapterCache

    linears = linear_layers(tiny_transformer())
    reads = []

    def read(uri):
        reads.append(uri)
        return builtin_lora_bytes(uri, linears)

    one = AdapterCache(read, linears).get("a")
    cache = AdapterCache(read, linears, budget_bytes=2 * one.nbytes)
    for uri in ["a", "b", "a", "b", "c", "a"]:
        cache.get(uri)
    # (the first "a" is the sizing read) c pushes out a, the least recently used; a comes back, pushing out b
    assert reads == ["a", "a", "b", "c", "a"]
    assert cache.holds() == ["c", "a"]


def test_df11_plus_lora_renders_the_same_bytes_as_bf16_plus_lora(tmp_path):
    """tiny-df11 runs the transformer through our DF11 codec and the CPU DF11 loader; with the same
    LoRA active it renders byte-identical images to the BF16 tiny model."""
    from qwen_worker.encode import encode_image
    from qwen_worker.lora.builtin import builtin_lora_bytes
    from qwen_worker.lora.cache import AdapterCache
    from qwen_worker.models import get_preset
    from qwen_worker.models.loading import load_model
    from qwen_worker.render import ImageTask
    from qwen_worker.rows import LoraRef, RenderRow

    row = RenderRow(row_index=0, id="r", prompt='a poster "SALE"', negative_prompt=" ", width=32, height=32, steps=2,
                    true_cfg_scale=4.0, seed=7, keys=("r.png",), loras=(LoraRef("builtin:brand", 0.8),))
    rendered = {}
    for name in ("tiny", "tiny-df11"):
        model = load_model(get_preset(name))
        linears = linear_layers(model.transformer)
        adapter = AdapterCache(lambda uri: builtin_lora_bytes(uri.split(":", 1)[1], linears), linears,
                               dtype=model.transformer.dtype).get("builtin:brand")
        model.prepare("standard", [(adapter.tensors, 0.8)], key=("brand",))
        with_lora = encode_image(model.render([ImageTask(row, 0)], {})[0], "png")
        model.prepare("standard", [], key=())
        without = encode_image(model.render([ImageTask(row, 0)], {})[0], "png")
        rendered[name] = (with_lora, without)
    assert rendered["tiny"][0] == rendered["tiny-df11"][0]
    assert rendered["tiny"][1] == rendered["tiny-df11"][1]
    assert rendered["tiny"][0] != rendered["tiny"][1]  # the LoRA changes the image
