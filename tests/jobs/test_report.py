"""report.html: built from hand-written job.json + results.parquet (local and real S3), from the CLI,
and from a real tiny job opened in real headless Chromium."""

import functools
import hashlib
import http.server
import io
import os
import subprocess
import threading
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import tiny_rows
from jobs.cli import main as cli_main
from jobs.plan import JobPlan
from jobs.report import REPORT_KEY, render_report, write_report
from jobs.results import result_schema as _result_schema
from jobs.submit_api import submit_job
from qwen_worker.errors import UserError
from qwen_worker.stores.s3 import S3Store
from qwen_worker.stores import LocalStore

CHROMIUM = "/usr/bin/chromium"
NASTY_PROMPT = '<script>alert("x")</script> a "quoted" <b>poster</b> & \'single\' 香港 旅游 指南'


# ------------------------------------------------------------------------------------ helpers
def png(width, height, color):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def result_row(id_, status, *, images=1, stored=None, **values):
    keys = [f"images/{id_}.png"] if images == 1 else [f"images/{id_}-{n}.png" for n in range(images)]
    stored = stored if stored is not None else (status == "done")
    row = {
        "id": id_, "status": status, "keys": keys, "sha256": [], "seed": 7, "width": 48, "height": 32, "steps": 2,
        "true_cfg_scale": 4.0, "format": "png", "prompt": f"prompt of {id_}", "negative_prompt": " ", "template": None,
        "render_s": None, "upload_s": None, "attempts": None, "rendered": None, "worker": None, "error": None,
        "campaign": "spring",
    }  # fmt: skip
    if status != "pending":
        row.update(render_s=0.5, upload_s=0.25, attempts=1, rendered=True, worker="host:1", error="")
    row.update(values)
    row["_images"] = {key: png(48, 32, (40 * n, 120, 200)) for n, key in enumerate(keys)} if stored else {}
    if stored:
        row["sha256"] = [hashlib.sha256(row["_images"][key]).hexdigest() for key in keys]
    elif status == "failed":
        row["sha256"] = [""] * len(keys)
    return row


def sample_rows():
    return [
        result_row("a-done", "done", prompt=NASTY_PROMPT, template="travel_guide"),
        result_row("b-failed", "failed", attempts=3, error='object exists with different content at <images/b> "x"'),
        result_row("c-two", "done", images=2, render_s=1.5, upload_s=0.75),
        result_row("d-pending", "pending"),
        result_row("e-failed", "failed", error="RuntimeError: CUDA out of memory"),
    ]


def write_job(store, rows):
    """job.json, results.parquet and the stored images of `rows` into `store`."""
    plan = JobPlan(
        job_id="qb-0123456789ab", manifest=f"{store.uri}/manifest.parquet", manifest_source="/data/<ads>.parquet",
        manifest_sha256="0" * 64, output=store.uri, model="tiny", seed=0, rows=len(rows), shard_size=4,
        created="2025-01-02T03:04:05+00:00",
    )  # fmt: skip
    store.put("job.json", plan.to_json())
    schema = pa.schema(_result_schema() + [("campaign", pa.string())])
    table = pa.Table.from_pylist([{k: v for k, v in row.items() if k != "_images"} for row in rows], schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    store.put("results.parquet", buffer.getvalue())
    for row in rows:
        for key, data in row["_images"].items():
            store.put(key, data)
    return plan


class Page(HTMLParser):
    """What a test needs from report.html: cards in order, images, totals, scripts, prompt texts."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.cards, self.imgs, self.totals, self.tags, self.prompts, self.body = [], [], {}, [], {}, {}
        self._capture = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "body":
            self.body = attrs
        if tag == "article":
            self.cards.append((attrs["id"].removeprefix("row-"), attrs["data-status"]))
        if tag == "img":
            self.imgs.append(attrs)
        if tag == "dd" and "data-total" in attrs:
            self._capture = ("total", attrs["data-total"], attrs.get("data-value"))
            self.totals[attrs["data-total"]] = [attrs.get("data-value"), ""]
        if tag == "p" and attrs.get("class") == "prompt":
            self._capture = ("prompt", self.cards[-1][0])
            self.prompts[self.cards[-1][0]] = ""

    def handle_endtag(self, tag):
        if tag in ("dd", "p"):
            self._capture = None

    def handle_data(self, data):
        if self._capture and self._capture[0] == "total":
            self.totals[self._capture[1]][1] += data
        elif self._capture and self._capture[0] == "prompt":
            self.prompts[self._capture[1]] += data


def expected_totals(results):
    rows = results.to_pylist()
    render = [r["render_s"] for r in rows if r["render_s"]]
    upload = [r["upload_s"] for r in rows if r["upload_s"]]
    return {
        "rows": len(rows),
        "done": sum(r["status"] == "done" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "pending": sum(r["status"] == "pending" for r in rows),
        "images": sum(1 for r in rows for digest in r["sha256"] if digest),
        "render_s_total": sum(render),
        "render_s_mean": sum(render) / len(render),
        "upload_s_mean": sum(upload) / len(upload),
    }


def assert_totals(page, results):
    for name, value in expected_totals(results).items():
        raw, text = page.totals[name]
        assert float(raw) == pytest.approx(value), name
        if isinstance(value, int):
            assert text == f"{value:,}", name


# ------------------------------------------------------------------------------------ local
def test_local_report_orders_failed_first_escapes_prompts_and_counts_exactly(tmp_path):
    store = LocalStore(tmp_path / "out")
    rows = sample_rows()
    write_job(store, rows)

    assert write_report(store) == REPORT_KEY
    text = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    page = Page(text)

    assert page.cards == [("b-failed", "failed"), ("e-failed", "failed"), ("a-done", "done"), ("c-two", "done"),
                          ("d-pending", "pending")]  # fmt: skip
    for row in rows:
        assert text.count(f'id="row-{row["id"]}"') == 1
    # the prompt is text, not markup: no <script> or <b> of its own, and it reads back exactly
    assert page.tags.count("script") == 1 and "b" not in page.tags
    assert '<script>alert("x")' not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert page.prompts["a-done"] == NASTY_PROMPT
    assert "&lt;images/b&gt; &quot;x&quot;" in text  # errors are escaped too
    assert "/data/&lt;ads&gt;.parquet" in text and "qb-0123456789ab" in text
    assert_totals(page, pq.read_table(tmp_path / "out" / "results.parquet"))
    # one thumbnail per stored image, linked relative to report.html, lazy, sized from the row
    assert [img["src"] for img in page.imgs] == ["images/a-done.png", "images/c-two-0.png", "images/c-two-1.png"]
    assert all((img["loading"], img["width"], img["height"]) == ("lazy", "48", "32") for img in page.imgs)
    assert all((tmp_path / "out" / img["src"]).is_file() for img in page.imgs)
    assert text.count('class="missing"') == 3  # b-failed, d-pending, e-failed have no stored image
    assert "spring" in text  # passthrough columns are shown
    assert "http://" not in text.replace('href="http', "") and "https://" not in text  # no external asset


def test_cards_are_capped_failed_first_while_totals_stay_exact(tmp_path):
    store = LocalStore(tmp_path)
    rows = [result_row(f"r{n:02d}", "done") for n in range(6)] + [result_row("zz-failed", "failed", error="boom")]
    write_job(store, rows)

    page = Page(render_report(store, max_cards=3))

    assert page.cards == [("zz-failed", "failed"), ("r00", "done"), ("r01", "done")]
    assert (page.totals["rows"][1], page.totals["done"][1], page.totals["images"][1]) == ("7", "6", "6")
    assert "Showing 3 of 7 rows (failed rows first)" in render_report(store, max_cards=3)
    assert "Showing" not in render_report(store)


def test_totals_and_cards_are_the_same_when_results_are_read_in_many_batches(tmp_path, monkeypatch):
    import jobs.report

    store = LocalStore(tmp_path)
    rows = sample_rows() + [result_row(f"r{n:02d}", "done") for n in range(4)] + [result_row("zz", "failed", error="x")]
    write_job(store, rows)
    whole = Page(render_report(store, max_cards=4))
    monkeypatch.setattr(jobs.report, "_READ_BATCH_ROWS", 2)  # totals summed and cards capped across batches

    batched = Page(render_report(store, max_cards=4))

    assert batched.cards == whole.cards == [("b-failed", "failed"), ("e-failed", "failed"), ("zz", "failed"),
                                            ("a-done", "done")]  # fmt: skip
    assert batched.totals == whole.totals
    assert_totals(batched, pq.read_table(tmp_path / "results.parquet"))


def test_report_refuses_what_it_cannot_do(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(UserError, match=r"no job found in .* \(it has no job.json\)"):
        write_report(store)
    write_job(store, sample_rows())
    store_without_results = LocalStore(tmp_path)
    (tmp_path / "results.parquet").unlink()
    with pytest.raises(UserError, match=r"no results.parquet in .* yet: the job has not finished a run"):
        write_report(store_without_results)
    with pytest.raises(UserError, match=r"`link` presigned needs an s3:// output, got the local directory "):
        write_report(store, link="presigned")
    with pytest.raises(UserError, match=r"`link` must be one of relative, presigned, got: 'http'"):
        write_report(store, link="http")
    assert not (tmp_path / "report.html").exists()


def test_cli_report_writes_and_says_where(tmp_path, capsys):
    write_job(LocalStore(tmp_path / "out"), sample_rows())
    with pytest.raises(SystemExit, match="^0$"):
        cli_main(["report", str(tmp_path / "out")])
    assert capsys.readouterr().out == f"wrote {tmp_path / 'out' / 'report.html'}\n"
    assert len(Page((tmp_path / "out" / "report.html").read_text(encoding="utf-8")).cards) == 5

    with pytest.raises(SystemExit, match="^1$"):
        cli_main(["report", str(tmp_path / "out"), "--link", "presigned"])
    assert "error: `link` presigned needs an s3:// output" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ S3
def fetch(url):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, never a proxy
    with opener.open(url, timeout=30) as response:
        return response.read()


def test_s3_report_links_images_relative_to_itself_by_default(s3_bucket, s3_env):
    store = S3Store(s3_bucket)
    write_job(store, sample_rows())
    write_report(store)
    text = store.get(REPORT_KEY).decode()
    assert [img["src"] for img in Page(text).imgs] == ["images/a-done.png", "images/c-two-0.png", "images/c-two-1.png"]
    assert "X-Amz-" not in text and os.environ["AWS_ACCESS_KEY_ID"] not in text  # no credential material
    assert "Images are linked relative to this file." in text


def test_s3_report_links_presigned_urls_that_download(s3_bucket, s3_env):
    store = S3Store(s3_bucket)
    rows = sample_rows()
    write_job(store, rows)

    assert write_report(store, link="presigned", expires=3600) == REPORT_KEY
    text = store.get(REPORT_KEY).decode()
    page = Page(text)

    bucket, prefix = s3_bucket.removeprefix("s3://").split("/", 1)
    sources = [img["src"] for img in page.imgs]
    assert len(sources) == 3
    stored = {key: data for row in rows for key, data in row["_images"].items()}
    for source, key in zip(sources, ["images/a-done.png", "images/c-two-0.png", "images/c-two-1.png"]):
        parts = urlsplit(source)
        assert f"{parts.scheme}://{parts.netloc}" == s3_env.endpoint
        assert parts.path == f"/{bucket}/{prefix}/{key}"
        query = parse_qs(parts.query)
        assert query["X-Amz-Expires"] == ["3600"] and query["X-Amz-Signature"]
        assert fetch(source) == stored[key]  # the link really downloads this image
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text
    assert "presigned URLs, valid until" in text and "(3600 s after they were made;" in text
    with pytest.raises(UserError, match=r"`expires` must be between 1 and 604800 seconds .*got: 604801"):
        write_report(store, link="presigned", expires=604801)
    relative = Page(render_report(store, link="relative"))
    assert [img["src"] for img in relative.imgs] == ["images/a-done.png", "images/c-two-0.png", "images/c-two-1.png"]


def test_cli_report_on_s3_prints_a_presigned_link_to_the_report(s3_bucket, capsys):
    write_job(S3Store(s3_bucket), sample_rows())
    with pytest.raises(SystemExit, match="^0$"):
        cli_main(["report", s3_bucket, "--link", "presigned", "--expires", "600"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"wrote {s3_bucket}/report.html"
    assert out[1].startswith("open it at http") and "X-Amz-Expires=600" in out[1]
    assert fetch(out[1].removeprefix("open it at ")) == S3Store(s3_bucket).get("report.html")


# ------------------------------------------------------------------------------------ Chromium
def chromium_dom(url, tmp_path, *extra):
    """The DOM of `url` after load (plus 10 s of virtual time) in real headless Chromium."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,2000",
        "--virtual-time-budget=10000", *extra, "--dump-dom", url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def serve_dir():
    """serve_dir(path) -> http://127.0.0.1:PORT/ serving `path` (stdlib http.server, in a thread)."""
    servers = []

    def serve(path):
        handler = functools.partial(QuietHandler, directory=str(path))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no {CHROMIUM}: apt-get install -y chromium")
def test_tiny_job_report_renders_every_image_in_chromium(ray_session, write_manifest, serve_dir, tmp_path):
    output = tmp_path / "out"
    (output / "images").mkdir(parents=True)
    (output / "images" / "row-003.png").write_bytes(b"someone else's file")  # row-003 will fail
    rows = tiny_rows(6)
    rows[1].update(prompt=NASTY_PROMPT, num_images=2, width=48)
    manifest = write_manifest(rows)

    outcome = submit_job(manifest, str(output), model="tiny", shard_size=4, show_progress=False, echo=lambda _: None)

    assert (outcome.done, outcome.failed) == (5, 1)
    results = pq.read_table(output / "results.parquet")
    stored_images = sum(1 for digests in results.column("sha256").to_pylist() for digest in digests if digest)
    assert stored_images == 6  # 4 rows x 1 image + row-001 x 2; row-003 none
    base = serve_dir(output)

    for url in (base + "report.html", (output / "report.html").as_uri()):  # served, and opened as a file
        dom = chromium_dom(url, tmp_path)
        page = Page(dom)
        assert page.body.get("data-loaded-images") == str(stored_images), url
        assert page.body.get("data-broken-images") == "0", url
        assert len(page.imgs) == stored_images
        assert page.cards[0] == ("row-003", "failed")
        assert [status for _, status in page.cards] == ["failed"] + ["done"] * 5
        assert [card_id for card_id, _ in page.cards[1:]] == [f"row-{n:03d}" for n in (0, 1, 2, 4, 5)]
        assert page.prompts["row-001"].startswith(NASTY_PROMPT) and "b" not in page.tags
        assert_totals(page, results)
        assert "object exists with different content at" in dom
    # the same page with one image deleted says so (the counter is not always "all loaded")
    (output / results.column("keys").to_pylist()[0][0]).unlink()
    page = Page(chromium_dom(base + "report.html", tmp_path))
    assert (page.body.get("data-loaded-images"), page.body.get("data-broken-images")) == (str(stored_images - 1), "1")

