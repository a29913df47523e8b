"""Planning a job: its deterministic id, the job.json record at the output root, and its shards.

The job id is a pure function of (manifest sha256, model, seed, output, and the sha256 of every
template the manifest's rows use), so the same submit into the same output is the same job: running
it again resumes it. A template edited between a run and its resume makes another job (refused in
that output unless asked), so one job never mixes the prompts of two versions of a template.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass, field

from qwen_worker.errors import SystemError_, UserError
from qwen_worker.stores import Store

JOB_RECORD_KEY = "job.json"
MANIFEST_COPY_PREFIX = "manifests/"


def manifest_copy_key(manifest_sha256: str) -> str:
    """Where the output keeps its copy of a local manifest: named by its sha256, so a copy is
    never replaced by another manifest's and can be checked before it is read."""
    return f"{MANIFEST_COPY_PREFIX}{manifest_sha256}.parquet"


@dataclass
class JobPlan:
    job_id: str
    manifest: str  # where workers and resumes read the manifest (the copy in the output)
    manifest_source: str  # what the user gave
    manifest_sha256: str
    output: str
    model: str
    seed: int
    rows: int
    shard_size: int
    options: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: str = ""
    replaces: str | None = None
    manifest_version: str | None = None  # an s3:// manifest's ETag: every read is pinned to it
    templates: dict = field(default_factory=dict)  # name -> sha256 of each template the rows use
    input_base: str = ""  # the manifest's directory (or s3:// prefix): relative input and LoRA paths
    render: dict = field(default_factory=dict)  # job-wide render options: lora, speed, lightning_lora

    @property
    def shard_count(self) -> int:
        return -(-self.rows // self.shard_size)

    def shard_range(self, shard_index: int) -> tuple[int, int]:
        start = shard_index * self.shard_size
        return start, min(start + self.shard_size, self.rows)

    def shard_of_row(self, row_index: int) -> int:
        return row_index // self.shard_size

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> "JobPlan":
        values = json.loads(data)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})


def make_job_id(manifest_sha256: str, model: str, seed: int, output: str, templates: dict | None = None,
                render: dict | None = None) -> str:
    identity = f"{manifest_sha256}|{model}|{seed}|{output.rstrip('/')}"
    if templates:  # the templates' text is part of what the job renders
        identity += "|" + ",".join(f"{name}={sha}" for name, sha in sorted(templates.items()))
    if render:  # so are job-wide LoRAs and the speed preset
        identity += "|" + json.dumps(render, sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()
    return f"qb-{digest[:12]}"


def _changed_templates(stored: "JobPlan", plan: "JobPlan") -> list[str]:
    """Names of the templates whose text differs between two plans of the same manifest."""
    return sorted(name for name in set(stored.templates) | set(plan.templates)
                  if stored.templates.get(name) != plan.templates.get(name))


def file_sha256(source: str) -> str:
    """sha256 of a local file or s3:// object, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    if source.startswith("s3://"):
        from jobs.s3_files import open_s3_input

        stream = open_s3_input(source)
    else:
        stream = open(source, "rb")
    with stream:
        while chunk := stream.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("qwen-batch", "diffusers", "transformers", "torch", "ray", "dfloat11"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def claim_job(store: Store, plan: JobPlan, *, resume_anyway: bool, overwrite: bool) -> JobPlan:
    """Claim the output for `plan` with a conditional put of job.json, or return the stored plan
    of the same job (a resume). A different job already in the output is refused unless the user
    says so explicitly; two claims at once never both win."""
    for _ in range(5):
        try:
            data, version = store.get_versioned(JOB_RECORD_KEY)
        except KeyError:
            if store.put_versioned(JOB_RECORD_KEY, plan.to_json(), expected=None):
                return plan
            continue  # someone claimed it just now: look at what they wrote
        stored = JobPlan.from_json(data)
        if stored.job_id == plan.job_id:
            return stored
        if not (resume_anyway or overwrite):
            changed = _changed_templates(stored, plan)
            if changed and (stored.manifest_sha256, stored.model, stored.seed) == (plan.manifest_sha256, plan.model, plan.seed):
                raise UserError(
                    f"output {store.uri} holds job {stored.job_id} of this manifest, rendered with another version of "
                    f"template(s) {', '.join(changed)} (the file changed since; sha256 "
                    f"{stored.templates.get(changed[0], 'none')[:12]}… then, {plan.templates.get(changed[0], 'none')[:12]}… now): "
                    "resuming would mix prompts of both versions in one job. Restore the template, use another output, "
                    "or pass --resume-anyway to keep the images stored there or --overwrite to re-render them"
                )
            raise UserError(
                f"output {store.uri} already holds job {stored.job_id} (manifest sha256 "
                f"{stored.manifest_sha256[:12]}…, model {stored.model}, seed {stored.seed}); this submit is job "
                f"{plan.job_id} (manifest sha256 {plan.manifest_sha256[:12]}…, model {plan.model}, seed {plan.seed}). "
                "Use another output, or pass --resume-anyway to keep the images stored there "
                "or --overwrite to re-render and replace them"
            )
        plan.replaces = stored.job_id
        if resume_anyway:
            plan.options["existing"] = "any"  # keep the images stored there, on this run and resumes
        if store.put_versioned(JOB_RECORD_KEY, plan.to_json(), expected=version):
            return plan
    raise SystemError_(f"could not claim {store.uri}: job.json keeps changing under us (another submit?)")


def open_job_manifest(plan: JobPlan, store: Store):
    """The job's manifest as a ParquetFile, checked first: the output's copy must still have the
    job's sha256; an s3:// manifest read in place is pinned to the version the job started with."""
    from jobs.manifest import open_parquet

    copy_key = manifest_copy_key(plan.manifest_sha256)
    if plan.manifest.rstrip("/") == f"{store.uri.rstrip('/')}/{copy_key}":
        stored = store.stored_sha256(copy_key)
        if stored != plan.manifest_sha256:
            what = "is missing" if stored is None else f"has sha256 {stored[:12]}…"
            raise SystemError_(
                f"the job's manifest copy {plan.manifest} {what}, the job needs {plan.manifest_sha256[:12]}…: "
                "submit the original manifest again to restore it"
            )
    return open_parquet(plan.manifest, version=plan.manifest_version)


def update_job_record(store: Store, plan: JobPlan, *, tries: int = 5) -> bool:
    """Rewrite job.json with `plan` (e.g. its workers), unless the output now holds another job:
    a newer claim is never overwritten. True when written."""
    for _ in range(tries):
        try:
            data, version = store.get_versioned(JOB_RECORD_KEY)
        except KeyError:
            return False
        if JobPlan.from_json(data).job_id != plan.job_id:
            return False
        if store.put_versioned(JOB_RECORD_KEY, plan.to_json(), expected=version):
            return True
    return False


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def resolve_context(plan: JobPlan, template_dirs=(), *, model_dir: str | None = None, store_options: dict | None = None):
    """The ResolveContext rows of `plan` are resolved with (on the driver, for planning and results)."""
    from jobs.manifest import ResolveContext
    from qwen_worker.presets import get_preset

    render = plan.render or {}
    return ResolveContext(preset=get_preset(plan.model), job_seed=plan.seed, template_dirs=tuple(template_dirs),
                          base=plan.input_base or None, job_loras=tuple(render.get("lora", ())),
                          speed=render.get("speed", "standard"), lightning_lora=render.get("lightning_lora"),
                          model_dir=model_dir, store_options=dict(store_options or {}))


def render_options(lora=(), speed: str = "standard", lightning_lora: str | None = None) -> dict:
    """Job-wide render options as the job's identity records them (defaults left out, so a job
    without them keeps the id it always had); UserError for a bad speed."""
    from jobs.manifest.loras import SPEEDS

    if speed not in SPEEDS:
        raise UserError(f"`--speed` must be one of {', '.join(SPEEDS)}, got: {speed!r}")
    render: dict = {}
    if lora:
        render["lora"] = list(lora)
    if speed != "standard":
        render["speed"] = speed
    if lightning_lora:
        render["lightning_lora"] = lightning_lora
    return render
