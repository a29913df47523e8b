"""Planning a job: its deterministic id, the job.json record at the output root, and its shards.

The job id is a pure function of (manifest sha256, model, seed, output), so the same submit into
the same output is the same job: running it again resumes it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass, field

from qwen_worker.errors import UserError
from qwen_worker.stores import Store

JOB_RECORD_KEY = "job.json"
MANIFEST_COPY_KEY = "manifest.parquet"


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


def make_job_id(manifest_sha256: str, model: str, seed: int, output: str) -> str:
    digest = hashlib.sha256(f"{manifest_sha256}|{model}|{seed}|{output.rstrip('/')}".encode()).hexdigest()
    return f"qb-{digest[:12]}"


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
    """Write job.json for a new job, or return the stored plan of the same job (a resume).

    A different job already in the output is refused unless the user says so explicitly.
    """
    try:
        stored = JobPlan.from_json(store.get(JOB_RECORD_KEY))
    except KeyError:
        stored = None
    if stored is None:
        store.put(JOB_RECORD_KEY, plan.to_json())
        return plan
    if stored.job_id == plan.job_id:
        return stored
    if not (resume_anyway or overwrite):
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
    store.put(JOB_RECORD_KEY, plan.to_json())
    return plan


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
