"""`--batch-size auto`: images per pipeline call from the worker's offload plan and the image size."""

from qwen_worker.offload import DEFAULT_IMAGES_PER_CALL, auto_batch_size, choose_offload_plan
from qwen_worker.presets import get_preset

DF11 = get_preset("qwen-image-df11")


def batch_for(free_vram_gb, megapixels, host_ram_gb=128.0):
    plan = choose_offload_plan("auto", preset=DF11, free_vram_gb=free_vram_gb, host_ram_gb=host_ram_gb)
    return auto_batch_size(plan, preset=DF11, megapixels=megapixels)


def test_smaller_images_and_bigger_cards_fit_more_images_per_call():
    big_24, small_24 = batch_for(23.5, 1328 * 1328 / 1e6), batch_for(23.5, 512 * 512 / 1e6)
    big_80 = batch_for(79.0, 1328 * 1328 / 1e6)
    assert 1 <= big_24 <= small_24 <= 8
    assert big_24 < small_24  # a 512x512 image needs far less activation memory than 1328x1328
    assert big_24 <= big_80


def test_the_chosen_batch_fits_the_plan_budget():
    plan = choose_offload_plan("auto", preset=DF11, free_vram_gb=23.5, host_ram_gb=128.0)
    megapixels = 1328 * 1328 / 1e6
    chosen = auto_batch_size(plan, preset=DF11, megapixels=megapixels)
    fits = choose_offload_plan(plan.label, preset=DF11, free_vram_gb=23.5, host_ram_gb=128.0,
                               images_per_call=chosen, megapixels=megapixels)
    assert fits.expected_peak_vram_gb <= 23.5
    assert plan.free_vram_gb == 23.5


def test_cpu_workers_and_small_models_use_the_default():
    cpu = choose_offload_plan("auto", preset=DF11, free_vram_gb=0.0, host_ram_gb=128.0, device="cpu")
    assert auto_batch_size(cpu, preset=DF11, megapixels=1.76) == DEFAULT_IMAGES_PER_CALL
    tiny = get_preset("tiny")
    plan = choose_offload_plan("auto", preset=tiny, free_vram_gb=8.0, host_ram_gb=16.0)
    assert auto_batch_size(plan, preset=tiny, megapixels=0.01) == DEFAULT_IMAGES_PER_CALL
