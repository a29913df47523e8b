"""--check-text on the worker: images read back (real OCR) on the store pool; those below the
minimum score rendered again with the next seed of their row; the best attempt stored; a killed
worker's attempts kept so a resume goes on from them."""

import pytest
from PIL import Image, ImageDraw

from text_images import FONT, NO_FONT
from qwen_worker.actor import RenderWorker
from qwen_worker.encode import read_provenance
from qwen_worker.render import reroll_seed
from qwen_worker.rows import RenderRow


class DrawsTextForSomeSeeds:
    """The tiny pipeline's images with the row's text drawn on them in a real CJK font: right for
    seeds divisible by 3, one character wrong otherwise (a model that misspells now and then)."""

    def __init__(self, pipe, text):
        self.pipe, self.text, self.seeds = pipe, text, []

    def __call__(self, **kwargs):
        from PIL import ImageFont

        output = self.pipe(**kwargs)
        font = ImageFont.truetype(str(FONT), 40)
        for image_index, generator in enumerate(kwargs["generator"]):
            seed = generator.initial_seed()
            self.seeds.append(seed)
            canvas = Image.new("RGB", (320, 96), "white")
            text = self.text if seed % 3 == 0 else self.text[:-1] + "8"
            ImageDraw.Draw(canvas).text((12, 20), text, fill="black", font=font)
            output.images[image_index] = canvas
        return output


def row(index, seed, text="SALE 50"):
    return RenderRow(row_index=index, id=f"r{index}", prompt=f'a poster "{text}"', negative_prompt=" ", width=32,
                     height=32, steps=2, true_cfg_scale=4.0, seed=seed, keys=(f"images/r{index}.png",),
                     expected_text=(text,))


def worker(tmp_path, tiny_pipe, **text_check):
    if not FONT.exists():
        pytest.skip(NO_FONT)
    made = RenderWorker(model="tiny", output_uri=str(tmp_path / "out"), check_stored=False,
                        text_check={"min_score": 0.99, "max_rerolls": 3, **text_check})
    made.model.pipe = DrawsTextForSomeSeeds(tiny_pipe, "SALE 50")
    return made


def first_good_attempt(seed):
    return next(n for n in range(10) if reroll_seed(seed, n) % 3 == 0)


def test_rows_whose_text_reads_back_wrong_are_rerolled_until_it_is_right(tmp_path, tiny_pipe):
    seeds = [3, 4, 5, 6, 7]
    rows = [row(n, seed) for n, seed in enumerate(seeds)]
    made = worker(tmp_path, tiny_pipe)
    results = {r.row_index: r for batch in made.render_shard(rows, batch_size=2) for r in batch}
    for n, seed in enumerate(seeds):
        result, attempts = results[n], first_good_attempt(seed)
        assert result.status.value == "done"
        assert (result.rerolls, result.text_score, result.text_missing) == (attempts, [1.0], [])
        assert result.image_seeds == [reroll_seed(seed, attempts)]
        stored = read_provenance((tmp_path / "out" / f"images/r{n}.png").read_bytes())
        assert (stored["seed"], stored.get("attempt_seed", seed), stored["text_score"]) == (seed, reroll_seed(seed, attempts), 1.0)
    assert not (tmp_path / "out" / "rerolls").exists() or not any((tmp_path / "out" / "rerolls").rglob("*.png"))


def test_the_best_attempt_is_stored_when_none_is_good_enough_and_rerolls_can_be_kept(tmp_path, tiny_pipe):
    made = worker(tmp_path, tiny_pipe, min_score=1.01, max_rerolls=2, keep_rerolls=True)  # never good enough
    [result] = [r for batch in made.render_shard([row(0, 4)], batch_size=1) for r in batch]
    assert result.rerolls == 2 and result.text_score[0] == pytest.approx(1.0)  # one of the 3 attempts was right
    kept = sorted(p.name for p in (tmp_path / "out" / "rerolls" / "images").iterdir())
    assert kept == ["r0-r0.png", "r0-r1.png"]  # the attempts that were beaten or re-rolled stay for review


class DiesOnCall:
    """Renders like `pipe` until its `call`-th call, which kills the render (like a lost process)."""

    def __init__(self, pipe, call):
        self.pipe, self.call, self.calls = pipe, call, 0

    def __call__(self, **kwargs):
        self.calls += 1
        if self.calls == self.call:
            raise RuntimeError("the worker process was killed")
        return self.pipe(**kwargs)


def test_a_killed_worker_resumes_from_the_attempts_it_kept(tmp_path, tiny_pipe):
    seed = next(s for s in range(100) if first_good_attempt(s) == 2)
    first = worker(tmp_path, tiny_pipe)
    drawing = first.model.pipe
    first.model.pipe = DiesOnCall(drawing, call=3)  # attempts 0 and 1 render (and are kept), attempt 2 dies
    [failed] = [r for batch in first.render_shard([row(0, seed)], batch_size=1) for r in batch]
    assert failed.status.value == "failed"
    kept = sorted(p.name for p in (tmp_path / "out" / "rerolls" / "images").iterdir())
    assert kept == ["r0-r0.png", "r0-r1.png"]

    second = worker(tmp_path, tiny_pipe)
    [done] = [r for batch in second.render_shard([row(0, seed)], batch_size=1, look_first=True) for r in batch]
    assert done.status.value == "done" and done.image_seeds == [reroll_seed(seed, first_good_attempt(seed))]
    assert second.model.pipe.seeds[0] == reroll_seed(seed, 2)  # attempts 0 and 1 were not rendered again
    assert done.rerolls == 2 and done.text_score == [1.0]  # the stored image is attempt 2
    assert not any((tmp_path / "out" / "rerolls").rglob("*.png"))  # the kept attempts are gone once a final is stored
