"""report.html: a self-contained gallery of a job, written at the output root.

Built from job.json + results.parquet only (no Ray, no model): a header with the job and exact
totals, then one card per row, FAILED rows first (with their error), then the rest in manifest
order. One HTML file with inline CSS and a little vanilla JS (filter by status, search); nothing
is fetched but the images themselves, and a Content-Security-Policy with hashes of the inline
style and script enforces that (an escaping mistake could not run an injected script).

Image links: relative keys (`images/a.png`) by default, local directory and S3 alike, since
report.html sits at the output root beside the images (open it through the same access as the
images). Presigned GET URLs are an explicit option (`link="presigned"`, s3:// only): a presigned
URL carries the access key id (not the secret) and, with temporary credentials, the session
token, and it stops working at the earlier of `expires` and the end of those credentials; the
report says which of the two it is.

Large jobs: at most `max_cards` cards (failed rows first, so none of them is hidden by the cap);
the totals always count every row, and results.parquet has the full list.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import io
import json
from urllib.parse import quote

from jobs.plan import JOB_RECORD_KEY, JobPlan
from jobs.results import RESULTS_KEY
from qwen_worker.errors import UserError
from qwen_worker.stores import Store

REPORT_KEY = "report.html"
LINK_MODES = ("relative", "presigned")
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # the SigV4 limit
DEFAULT_MAX_CARDS = 2000
_READ_BATCH_ROWS = 65536
_KNOWN_COLUMNS = (
    "id", "status", "keys", "sha256", "seed", "width", "height", "steps", "true_cfg_scale", "format", "prompt",
    "negative_prompt", "template", "render_s", "upload_s", "attempts", "rendered", "worker", "error",
    "inputs", "loras", "speed", "text_score", "text_read", "text_missing", "image_seeds", "rerolls",
)  # fmt: skip
_HIDDEN_COLUMNS = ("error_kind", "inputs_sha256", "loras_sha256")  # bookkeeping: not shown on the cards
_MAX_EXTRA_COLUMNS = 8
_MAX_EXTRA_CHARS = 200


def write_report(
    store: Store,
    *,
    link: str = "relative",
    expires: int = MAX_PRESIGN_SECONDS,
    max_cards: int = DEFAULT_MAX_CARDS,
) -> str:
    """Write report.html at the root of `store` from its job.json and results.parquet; return its key."""
    store.put(REPORT_KEY, render_report(store, link=link, expires=expires, max_cards=max_cards).encode(),
              content_type="text/html; charset=utf-8")  # fmt: skip
    return REPORT_KEY


def render_report(
    store: Store,
    *,
    link: str = "relative",
    expires: int = MAX_PRESIGN_SECONDS,
    max_cards: int = DEFAULT_MAX_CARDS,
) -> str:
    """The report's HTML text (what `write_report` stores)."""
    image_url, link_note = _linker(store, link, expires)
    if max_cards < 0:
        raise UserError(f"`max_cards` must be 0 or more, got: {max_cards}")
    try:
        plan = JobPlan.from_json(store.get(JOB_RECORD_KEY))
    except KeyError:
        raise UserError(f"no job found in {store.uri} (it has no {JOB_RECORD_KEY})") from None
    try:
        results = store.get(RESULTS_KEY)
    except KeyError:
        raise UserError(
            f"no {RESULTS_KEY} in {store.uri} yet: the job has not finished a run "
            f"(`qwen-batch status {store.uri}` shows its progress)"
        ) from None
    totals, failed, others = _scan(results, max_cards)
    shown = (failed + others)[:max_cards]
    input_url = _input_linker(store, link, image_url)
    cards = "\n".join(_card(row, image_url, input_url) for row in shown)
    return _page(plan, store.uri, totals, cards, len(shown), link_note)


# ------------------------------------------------------------------------------------------ links
def _linker(store: Store, link: str, expires: int):
    """(key -> URL, a sentence for the header) for the chosen link mode."""
    if link not in LINK_MODES:
        raise UserError(f"`link` must be one of {', '.join(LINK_MODES)}, got: {link!r}")
    presign = getattr(store, "presigned_url", None)
    if link == "presigned" and presign is None:
        raise UserError(f"`link` presigned needs an s3:// output, got the local directory {store.uri}")
    if link == "relative":
        return (lambda key: quote(key, safe="/")), "Images are linked relative to this file."
    if not 1 <= expires <= MAX_PRESIGN_SECONDS:
        raise UserError(
            f"`expires` must be between 1 and {MAX_PRESIGN_SECONDS} seconds (7 days, the S3 limit), got: {expires}"
        )
    requested = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=expires)
    session_end = getattr(store, "credentials_expiry", lambda: None)()
    if session_end is not None and session_end < requested:
        why = "when the temporary credentials that signed them expire"
        until = session_end
    else:
        why = f"{expires} s after they were made"
        until = requested
    note = (f"Image links are presigned URLs, valid until {until.strftime('%Y-%m-%d %H:%M UTC')} ({why}; "
            "regenerate with `qwen-batch report --link presigned`).")
    return (lambda key: presign(key, expires=expires)), note


# ------------------------------------------------------------------------------------ data
def _scan(data: bytes, max_cards: int):
    """Stream results.parquet: exact totals over every row (computed on whole columns), and at most
    `max_cards` failed rows plus at most `max_cards` other rows (manifest order) for the cards."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parquet_file = pq.ParquetFile(io.BytesIO(data))
    extra = [name for name in parquet_file.schema_arrow.names if name not in _KNOWN_COLUMNS + _HIDDEN_COLUMNS]
    extra = extra[:_MAX_EXTRA_COLUMNS]
    totals = {"rows": 0, "done": 0, "failed": 0, "pending": 0, "images": 0,
              "render_s_total": 0.0, "upload_s_total": 0.0}  # fmt: skip
    timed = {"render_s": 0, "upload_s": 0}  # rows with a time, for the means
    failed, others = [], []
    for batch in parquet_file.iter_batches(batch_size=_READ_BATCH_ROWS):
        names = batch.schema.names
        status = batch.column("status") if "status" in names else pa.nulls(batch.num_rows, pa.string())
        is_failed = pc.fill_null(pc.equal(status, "failed"), False)  # no status: pending
        done = pc.sum(pc.fill_null(pc.equal(status, "done"), False)).as_py() or 0
        failures = pc.sum(is_failed).as_py() or 0
        totals["rows"] += batch.num_rows
        totals["done"] += done
        totals["failed"] += failures
        totals["pending"] += batch.num_rows - done - failures
        if "sha256" in names:  # a digest per stored image
            digests = pc.list_flatten(batch.column("sha256"))
            totals["images"] += pc.sum(pc.fill_null(pc.not_equal(digests, ""), False)).as_py() or 0
        for name in timed:
            if name in names:
                values = pc.filter(batch.column(name), pc.fill_null(pc.greater(batch.column(name), 0), False))
                totals[f"{name}_total"] += pc.sum(values).as_py() or 0.0
                timed[name] += len(values)
        for target, wanted in ((failed, is_failed), (others, pc.invert(is_failed))):
            room = max_cards - len(target)
            if room <= 0:
                continue
            indices = pc.indices_nonzero(wanted)[:room]
            if len(indices):
                target.extend(_card_rows(batch.take(indices), extra))
    totals["render_s_mean"] = totals["render_s_total"] / timed["render_s"] if timed["render_s"] else None
    totals["upload_s_mean"] = totals["upload_s_total"] / timed["upload_s"] if timed["upload_s"] else None
    return totals, failed, others


def _card_rows(batch, extra: list[str]) -> list[dict]:
    """The rows of `batch` as the cards read them: the known columns, plus the pass-through ones
    (`_extra`) that have a value."""
    known = batch.select([name for name in _KNOWN_COLUMNS if name in batch.schema.names])
    shown = {name: _display_values(batch.column(name)) for name in extra}
    rows = known.to_pylist()
    for offset, row in enumerate(rows):
        for name in extra:
            row[name] = shown[name][offset]
        row["_extra"] = {name: row.get(name) for name in extra if row.get(name) is not None}
    return rows


def _display_values(column) -> list:
    """A pass-through column's values for the cards: as Python where they convert, else as Arrow
    prints them (timestamps beyond Python's range, odd time zones), else a placeholder."""
    import pyarrow as pa

    try:
        return column.to_pylist()
    except Exception:
        pass
    try:
        return column.cast(pa.string()).to_pylist()
    except Exception:
        return ["(not shown)" if valid else None for valid in column.is_valid().to_pylist()]


# ------------------------------------------------------------------------------------ HTML
def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _seconds(value) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:,.0f} s"
    return f"{value:.2f} s" if value >= 1 else f"{value:.3f} s"


def _input_linker(store: Store, link: str, image_url):
    """input URI -> a URL the report can show it from, or None (then only its name is shown): a
    local file relative to a local report, an object of the output's bucket relative to it (or
    presigned, as the images are)."""
    import os
    from urllib.parse import quote

    uri = store.uri.rstrip("/")
    if not uri.startswith("s3://"):
        return lambda source: None if source.startswith("s3://") else quote(os.path.relpath(source, uri), safe="/.")
    bucket, _, prefix = uri[len("s3://"):].partition("/")

    def url(source: str):
        if not source.startswith(f"s3://{bucket}/"):
            return None
        key = source[len(f"s3://{bucket}/"):]
        if link == "presigned":
            return store.presigned_url(key[len(prefix) + 1:]) if key.startswith(prefix + "/") else None
        depth = len([part for part in prefix.split("/") if part])
        return quote("../" * depth + key, safe="/.")

    return url


def _text_html(row: dict) -> str:
    """--check-text: the score of each image, what was read, the expected strings it missed."""
    scores = [score for score in row.get("text_score") or [] if score is not None]
    if not scores:
        return ""
    missing = row.get("text_missing") or []
    read = " | ".join(text for text in row.get("text_read") or [] if text)
    shown = " ".join(f"{score:.2f}" for score in scores)
    low = " low" if missing else ""
    missed = "".join(f"<mark>{_e(text)}</mark> " for text in missing)
    rerolls = f" · re-rolled {row['rerolls']}×" if row.get("rerolls") else ""
    return (f'<p class="text{low}"><strong>text</strong> {_e(shown)}{_e(rerolls)} · read: {_e(read) or "(nothing)"}'
            + (f" · missing: {missed}" if missing else "") + "</p>")


def _card(row: dict, image_url, input_url=lambda source: None) -> str:
    status = row.get("status") or "pending"
    width, height = row.get("width") or 0, row.get("height") or 0
    keys, digests = row.get("keys") or [], row.get("sha256") or []
    thumbs = []
    for n, key in enumerate(keys):
        if n < len(digests) and digests[n]:
            url = _e(image_url(key))
            thumbs.append(
                f'<a href="{url}" target="_blank" rel="noopener noreferrer" title="{_e(key)}">'
                f'<img src="{url}" loading="lazy" decoding="async" width="{int(width)}" height="{int(height)}" '
                f'alt="{_e(row.get("id"))} image {n + 1}"></a>'
            )
        else:
            what = "not stored" if status != "pending" else "pending"
            thumbs.append(f'<div class="missing" title="{_e(key)}"><span>{what}</span><code>{_e(key)}</code></div>')
    sources = []
    for n, source in enumerate(row.get("inputs") or []):
        url = input_url(source)
        name = source.rsplit("/", 1)[-1]
        sources.append(f'<a class="input" href="{_e(url)}" target="_blank" rel="noopener noreferrer" title="{_e(source)}">'
                       f'<img src="{_e(url)}" loading="lazy" alt="input {n + 1}: {_e(name)}"></a>' if url else
                       f'<div class="input missing" title="{_e(source)}"><code>{_e(name)}</code></div>')
    inputs_html = f'<div class="inputs"><span>inputs</span>{"".join(sources)}</div>' if sources else ""
    meta = [
        ("template", row.get("template") or "–"),
        ("seed", row.get("seed")),
        ("size", f"{width}×{height}"),
        ("steps", row.get("steps")),
        ("cfg", row.get("true_cfg_scale")),
        ("format", row.get("format")),
        ("attempts", row.get("attempts") if row.get("attempts") is not None else "–"),
        ("render", _seconds(row.get("render_s"))),
        ("upload", _seconds(row.get("upload_s"))),
    ]
    if row.get("loras"):
        meta.append(("LoRAs", ", ".join(lora.rsplit("/", 1)[-1] for lora in row["loras"])))
    if row.get("speed") and row["speed"] != "standard":
        meta.append(("speed", row["speed"]))
    if row.get("worker"):
        meta.append(("worker", row["worker"]))
    if row.get("rendered") is False and status == "done":
        meta.append(("rendered", "no (already stored)"))
    for name, value in row["_extra"].items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        meta.append((name, text if len(text) <= _MAX_EXTRA_CHARS else text[: _MAX_EXTRA_CHARS - 1] + "…"))
    meta_html = "".join(f"<dt>{_e(name)}</dt><dd>{_e(value)}</dd>" for name, value in meta)
    error = f'<p class="error">{_e(row.get("error"))}</p>' if row.get("error") else ""
    negative = row.get("negative_prompt")
    negative_html = ""
    if negative and negative.strip():
        negative_html = f'<p class="negative"><strong>negative</strong> {_e(negative)}</p>'
    return (
        f'<article class="card {_e(status)}" data-status="{_e(status)}" id="row-{_e(row.get("id"))}">'
        f'{inputs_html}<div class="thumbs n{min(len(keys), 4)}">{"".join(thumbs)}</div>'
        f'<div class="body"><h2><span class="badge {_e(status)}">{_e(status)}</span> '
        f'<code class="rid">{_e(row.get("id"))}</code></h2>{error}'
        f'<p class="prompt">{_e(row.get("prompt"))}</p>{negative_html}{_text_html(row)}<dl class="meta">{meta_html}</dl></div>'
        "</article>"
    )


_STYLE = """
:root{--fg:#1d2330;--muted:#5d6678;--line:#dde1e8;--bg:#f5f6f8;--card:#fff;--done:#1f7a4d;--failed:#b42318;
--pending:#8a6d00}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI","Noto Sans","Noto Sans CJK SC","PingFang SC",
"Microsoft YaHei",sans-serif;color:var(--fg);background:var(--bg)}
header{padding:20px 28px 12px;background:var(--card);border-bottom:1px solid var(--line)}
h1{margin:0 0 4px;font-size:20px}
h1 code{font-size:18px}
.job{margin:0;color:var(--muted);display:flex;flex-wrap:wrap;gap:4px 18px}
.job strong{color:var(--fg);font-weight:600}
.totals{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0 6px;padding:0}
.totals div{background:var(--bg);border:1px solid var(--line);border-radius:8px;padding:6px 12px;min-width:92px}
.totals dt{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted)}
.totals dd{margin:0;font-size:18px;font-weight:600}
.totals .failed dd{color:var(--failed)}.totals .done dd{color:var(--done)}.totals .pending dd{color:var(--pending)}
.note{margin:6px 0 0;color:var(--muted)}
.note.warn{color:var(--failed)}
.controls{position:sticky;top:0;z-index:1;display:flex;flex-wrap:wrap;gap:8px;align-items:center;
padding:10px 28px;background:rgba(245,246,248,.95);border-bottom:1px solid var(--line)}
.controls button{font:inherit;padding:4px 12px;border:1px solid var(--line);border-radius:999px;background:var(--card);
cursor:pointer}
.controls button[aria-pressed=true]{background:var(--fg);color:#fff;border-color:var(--fg)}
.controls input{font:inherit;padding:5px 10px;border:1px solid var(--line);border-radius:6px;min-width:260px}
.controls .shown{color:var(--muted)}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:16px;padding:16px 28px 40px;
align-items:start}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;overflow:hidden;display:flex;
flex-direction:column}
.card.failed{border-color:var(--failed);box-shadow:0 0 0 1px var(--failed)}
.card[hidden]{display:none}
.thumbs{display:grid;gap:2px;background:#e9ecf1}
.thumbs.n2,.thumbs.n3,.thumbs.n4{grid-template-columns:repeat(2,1fr)}
.thumbs a{display:block;line-height:0}
.thumbs img{display:block;width:100%;height:auto;max-height:260px;object-fit:contain;background:#e9ecf1}
.missing{min-height:120px;display:flex;flex-direction:column;align-items:center;justify-content:center;gap:4px;
color:var(--muted);background:repeating-linear-gradient(45deg,#eef0f4,#eef0f4 8px,#e6e9ef 8px,#e6e9ef 16px)}
.missing span{font-weight:600;text-transform:uppercase;font-size:12px;letter-spacing:.05em}
.body{padding:10px 14px 12px}
h2{margin:0 0 6px;font-size:14px;display:flex;gap:8px;align-items:center}
.rid{word-break:break-all}
.badge{font-size:11px;text-transform:uppercase;letter-spacing:.05em;padding:1px 8px;border-radius:999px;color:#fff}
.badge.done{background:var(--done)}.badge.failed{background:var(--failed)}.badge.pending{background:var(--pending)}
.error{margin:0 0 8px;padding:6px 8px;border-radius:6px;background:#fdecea;color:var(--failed);
font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
.prompt{margin:0 0 6px;white-space:pre-wrap;word-break:break-word;max-height:9.5em;overflow:auto}
.negative{margin:0 0 6px;color:var(--muted);white-space:pre-wrap;word-break:break-word}
.inputs{display:flex;gap:4px;align-items:center;padding:6px 8px;background:var(--bg);font-size:11px;color:var(--muted)}
.inputs img{height:56px;width:auto;border-radius:4px;border:1px solid var(--line)}
.inputs .missing{padding:4px;border:1px dashed var(--line);border-radius:4px}
.text{margin:4px 0;font-size:12px}.text.low{color:var(--failed)}.text mark{background:#fde2e1}
.meta{display:grid;grid-template-columns:auto 1fr;gap:1px 10px;margin:0;font-size:12px}
.meta dt{color:var(--muted)}.meta dd{margin:0;word-break:break-word}
footer{padding:0 28px 28px;color:var(--muted)}
"""

_SCRIPT = """
(function () {
  var cards = Array.prototype.slice.call(document.querySelectorAll("main .card"));
  var texts = null, status = "all";
  var search = document.getElementById("search"), shown = document.getElementById("shown");
  function apply() {
    var q = search.value.trim().toLowerCase(), n = 0;
    if (q && texts === null) texts = cards.map(function (c) { return c.textContent.toLowerCase(); });
    cards.forEach(function (card, i) {
      var ok = (status === "all" || card.dataset.status === status) && (!q || texts[i].indexOf(q) >= 0);
      card.hidden = !ok;
      if (ok) n++;
    });
    shown.textContent = n + " of " + cards.length + " cards shown";
  }
  document.querySelectorAll(".controls button").forEach(function (button) {
    button.addEventListener("click", function () {
      status = button.dataset.filter;
      document.querySelectorAll(".controls button").forEach(function (b) {
        b.setAttribute("aria-pressed", String(b === button));
      });
      apply();
    });
  });
  search.addEventListener("input", apply);
  // Count thumbnails that decoded (naturalWidth > 0) and ones that failed, e.g. expired links.
  function count() {
    var loaded = 0, broken = 0;
    Array.prototype.forEach.call(document.images, function (img) {
      if (img.complete && img.naturalWidth > 0) loaded++;
      else if (img.dataset.broken) broken++;
    });
    document.body.dataset.loadedImages = loaded;
    document.body.dataset.brokenImages = broken;
    var warn = document.getElementById("broken");
    warn.hidden = broken === 0;
    warn.textContent = broken + " image(s) could not be loaded (deleted, or the links expired: run qwen-batch report again).";
  }
  document.addEventListener("load", function (e) { if (e.target.tagName === "IMG") count(); }, true);
  document.addEventListener("error", function (e) {
    if (e.target.tagName === "IMG") { e.target.dataset.broken = "1"; count(); }
  }, true);
  window.addEventListener("load", count);
  apply();
  count();
})();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_CSP = (
    f"default-src 'none'; img-src * data: blob: file:; style-src {_csp_hash(_STYLE)}; "
    f"script-src {_csp_hash(_SCRIPT)}; base-uri 'none'; form-action 'none'"
)


def _page(plan: JobPlan, uri: str, totals: dict, cards: str, shown: int, link_note: str) -> str:
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    def total(name, label, value=None, text=None):
        raw = totals[name] if value is None else value
        shown_text = text if text is not None else f"{raw:,}"
        data = "" if raw is None else f' data-value="{_e(raw)}"'
        return f'<div class="{name}"><dt>{label}</dt><dd data-total="{name}"{data}>{_e(shown_text)}</dd></div>'

    boxes = "".join([
        total("rows", "rows"), total("done", "done"), total("failed", "failed"), total("pending", "pending"),
        total("images", "images stored"),
        total("render_s_total", "render total", text=_seconds(totals["render_s_total"])),
        total("render_s_mean", "render mean/row", text=_seconds(totals["render_s_mean"])),
        total("upload_s_mean", "upload mean/row", text=_seconds(totals["upload_s_mean"])),
    ])  # fmt: skip
    capped = ""
    if shown < totals["rows"]:
        capped = (
            f'<p class="note warn" id="capped">Showing {shown:,} of {totals["rows"]:,} rows (failed rows first); '
            f"the totals above count every row, and {RESULTS_KEY} lists them all.</p>"
        )
    buttons = "".join(
        f'<button type="button" data-filter="{key}" aria-pressed="{str(key == "all").lower()}">{label}</button>'
        for key, label in (
            ("all", f"all {totals['rows']:,}"), ("failed", f"failed {totals['failed']:,}"),
            ("done", f"done {totals['done']:,}"), ("pending", f"pending {totals['pending']:,}"),
        )
    )  # fmt: skip
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">
<title>{_e(plan.job_id)} · qwen-batch report</title>
<style>{_STYLE}</style>
</head>
<body>
<header>
<h1>qwen-batch job <code id="job-id">{_e(plan.job_id)}</code></h1>
<p class="job"><span>model <strong>{_e(plan.model)}</strong></span><span>manifest <strong>{_e(plan.manifest_source)}</strong></span>
<span>created <strong>{_e(plan.created)}</strong></span><span>seed <strong>{_e(plan.seed)}</strong></span>
<span>output <strong>{_e(uri)}</strong></span></p>
<dl class="totals" id="totals">{boxes}</dl>
{capped}<p class="note">{_e(link_note)} Report generated {generated}. Mean times are per row over the rows that took time (rows found already stored are left out).</p>
<p class="note warn" id="broken" hidden></p>
</header>
<nav class="controls">{buttons}<input id="search" type="search" placeholder="search id, prompt, error…" aria-label="search"><span class="shown" id="shown"></span></nav>
<main>
{cards}
</main>
<footer>qwen-batch · {_e(RESULTS_KEY)} has every column of every row.</footer>
<script>{_SCRIPT}</script>
</body>
</html>
"""
