"""`qwen-batch doctor`: check this machine (and the storage and cluster it is pointed at) for a model.

One line per check: `OK`, `FAIL` (needed for the chosen model and broken: what to fix), `WARN`
(broken but not needed for it, or worth knowing) or `SKIP` (not configured). Exit 0 when every
needed check is OK, 1 otherwise. Secrets are never printed: endpoints lose any user:password part,
keys are not shown.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import click

from jobs.cli.options import json_option, model_option

TIMEOUT_S = 3.0


@dataclass
class Check:
    name: str
    status: str  # OK | FAIL | WARN | SKIP
    detail: str

    def line(self) -> str:
        return f"{self.status:<5} {self.name}: {self.detail}"


def _result(name: str, ok: bool, needed: bool, good: str, bad: str) -> Check:
    """OK, or FAIL when needed, WARN when not."""
    if ok:
        return Check(name, "OK", good)
    return Check(name, "FAIL" if needed else "WARN", bad)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


def safe_endpoint(url: str) -> str:
    """`url` without user:password, query or fragment."""
    parts = urlsplit(url if "://" in url else f"//{url}")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    scheme = f"{parts.scheme}://" if parts.scheme else ""
    return f"{scheme}{host}{port}{parts.path}"


# --------------------------------------------------------------------------- checks


def check_torch(needs_gpu: bool) -> Check:
    import torch

    if torch.version.cuda:
        return Check("torch", "OK", f"torch {torch.__version__} built for CUDA {torch.version.cuda}")
    return _result(
        "torch", False, needs_gpu, "",
        f"torch {torch.__version__} is a CPU-only build: install a CUDA build "
        "(pip install torch --index-url https://download.pytorch.org/whl/cu126)",
    )


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        pass
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=TIMEOUT_S, check=True,
        ).stdout.split()
        return out[0] if out else None
    except Exception:
        return None


def check_gpus(needs_gpu: bool) -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        driver = _driver_version()
        why = f"driver {driver} found, but torch cannot use it" if driver else "no NVIDIA driver found"
        return [_result("gpu", False, needs_gpu, "", f"no CUDA GPU visible{hint}: {why}")]
    driver = _driver_version() or "unknown"
    checks = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        detail = (
            f"{props.name}, {total / 2**30:.1f} GB ({free / 2**30:.1f} GB free), "
            f"compute capability {props.major}.{props.minor}, driver {driver}"
        )
        if (props.major, props.minor) < (8, 0):
            checks.append(_result(f"gpu {index}", False, needs_gpu, "", detail + ": BF16 needs compute capability 8.0+ (Ampere or newer)"))
        else:
            checks.append(Check(f"gpu {index}", "OK", detail))
    return checks


def check_import(module: str, needed: bool, fix: str) -> Check:
    try:
        imported = __import__(module)
    except Exception as exc:  # dfloat11 raises non-ImportErrors without a CUDA driver
        return _result(module, False, needed, "", f"cannot import ({_first_line(exc)}): {fix}")
    version = getattr(imported, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(module)
        except Exception:
            version = "version unknown"
    return Check(module, "OK", f"{module} {version}")


def check_host() -> Check:
    from qwen_worker.offload import available_host_ram_gb

    return Check("host", "OK", f"{available_host_ram_gb():.1f} GB RAM available, {os.cpu_count()} CPUs")


def check_plan(preset, device: str, offload: str) -> Check:
    from qwen_worker.errors import UserError
    from qwen_worker.offload import available_host_ram_gb, choose_offload_plan, free_vram_gb

    try:
        plan = choose_offload_plan(
            offload,
            preset=preset,
            free_vram_gb=free_vram_gb() if device == "cuda" else 0.0,
            host_ram_gb=available_host_ram_gb(),
            device=device,
        )
    except UserError as exc:
        return Check("offload plan", "FAIL", str(exc))
    return Check("offload plan", "OK", plan.describe())


def check_model_files(preset, model_dir: str | None) -> Check:
    """Whether the model files are on this machine (never downloads)."""
    from qwen_worker.errors import UserError
    from qwen_worker.real_model import download_commands, resolve_model_files

    if preset.base_repo is None:
        return Check("model files", "OK", f"model {preset.name!r} is built in code")
    try:
        files = resolve_model_files(preset, model_dir, local_only=True)
    except UserError as exc:
        if model_dir is not None or preset.df11_repo == "":  # a DF11 transformer nobody publishes: say how to make it
            return Check("model files", "FAIL", str(exc))
        return Check(
            "model files", "WARN",
            f"not in the Hugging Face cache: workers download them on first use, or run `{' && '.join(download_commands(preset))}`",
        )
    where = f"{files.base_dir}" + (f" + {files.df11_dir}" if files.df11_dir else "")
    return Check("model files", "OK", where)


def _s3_configured() -> bool:
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_PROFILE")
    return any(os.environ.get(name) for name in names)


def check_s3() -> Check:
    if not _s3_configured():
        return Check("s3", "SKIP", "AWS_ENDPOINT_URL / AWS credentials not set (local output only)")
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    config = Config(
        connect_timeout=TIMEOUT_S,
        read_timeout=TIMEOUT_S,
        retries={"mode": "standard", "total_max_attempts": 1},
        signature_version="s3v4",
    )
    try:
        session = boto3.session.Session()
        region = session.region_name or "us-east-1"
        client = session.client("s3", region_name=region, config=config)
        endpoint = client.meta.endpoint_url
        host = urlsplit(endpoint).hostname or ""
        if not (host == "amazonaws.com" or host.endswith(".amazonaws.com")):
            client = session.client(
                "s3", region_name=region, endpoint_url=endpoint,
                config=config.merge(Config(s3={"addressing_style": "path"})),
            )
    except Exception as exc:
        return Check("s3", "FAIL", f"cannot make an S3 client ({_first_line(exc)}): check AWS_ENDPOINT_URL and AWS_REGION")
    shown = safe_endpoint(endpoint)
    try:
        buckets = client.list_buckets().get("Buckets", [])
    except NoCredentialsError:
        return Check("s3", "FAIL", f"{shown}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        if code in ("AccessDenied", "Forbidden"):
            return Check("s3", "OK", f"{shown} reachable, credentials accepted; list_buckets denied ({code}): fine for keys scoped to one bucket")
        return Check("s3", "FAIL", f"{shown} refused list_buckets ({code}): check the AWS credentials and AWS_ENDPOINT_URL")
    except (BotoCoreError, OSError) as exc:
        return Check("s3", "FAIL", f"cannot reach {shown} within {TIMEOUT_S:.0f} s ({exc.__class__.__name__}): check AWS_ENDPOINT_URL and that the server is running")
    return Check("s3", "OK", f"{shown} answers list_buckets ({len(buckets)} buckets visible)")


def check_ray() -> Check:
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        return Check("ray", "SKIP", "RAY_ADDRESS not set: submit starts a local Ray (or pass --address)")
    if address in ("auto", "local"):
        return Check("ray", "SKIP", f"RAY_ADDRESS={address}: a Ray instance on this machine, checked when a job starts")
    shown = safe_endpoint(address)
    parts = urlsplit(address if "://" in address else f"//{address}")
    if parts.scheme in ("http", "https"):
        import urllib.request

        url = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/api/version"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                info = json.loads(response.read().decode() or "{}")
        except Exception as exc:
            return Check("ray", "FAIL", f"cannot reach the Ray dashboard at {shown} ({_first_line(exc)}): check RAY_ADDRESS and that the head node is up")
        return Check("ray", "OK", f"Ray dashboard at {shown} answers (Ray {info.get('ray_version', 'unknown')})")
    default_port = 10001 if parts.scheme == "ray" else 6379
    try:
        host, port = parts.hostname, parts.port or default_port
    except ValueError:
        return Check("ray", "FAIL", f"RAY_ADDRESS is not host:port or a URL: {shown!r}")
    if not host:
        return Check("ray", "FAIL", f"RAY_ADDRESS is not host:port or a URL: {shown!r}")
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            pass
    except OSError as exc:
        return Check("ray", "FAIL", f"cannot connect to {shown} ({_first_line(exc)}): check RAY_ADDRESS and that the head node is up")
    return Check("ray", "OK", f"{shown} accepts connections")


def run_checks(model: str, *, device: str = "auto", offload: str = "auto", model_dir: str | None = None) -> list[Check]:
    from qwen_worker.presets import get_preset

    preset = get_preset(model)
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() or preset.needs_cuda else "cpu"
    needs_gpu = device == "cuda"
    needs_dfloat11 = needs_gpu and preset.df11_repo is not None
    gpu_extra = "pip install 'qwen-batch[gpu]' on a machine with a CUDA driver"
    checks = [check_torch(needs_gpu), *check_gpus(needs_gpu)]
    checks.append(check_import("cupy", needs_dfloat11, gpu_extra + " (cupy comes with dfloat11[cuda12])"))
    checks.append(check_import("dfloat11", needs_dfloat11, gpu_extra + " (it needs setuptools<81 for pkg_resources)"))
    checks.append(check_host())
    if needs_gpu and not torch.cuda.is_available():
        checks.append(Check("offload plan", "FAIL", f"model {preset.name!r} needs a CUDA GPU (or --device cpu)"))
    else:
        checks.append(check_plan(preset, device, offload))
    checks.append(check_model_files(preset, model_dir))
    checks.append(check_s3())
    checks.append(check_ray())
    return checks


@click.command()
@model_option
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="Where the model would run: auto (CUDA when visible), cuda, or cpu (slow, no GPU needed).")
@click.option("--offload", default="auto", show_default=True, help="CPU offload plan to check: auto|none|model|blocks:N.")
@click.option("--model-dir", default=None, help="Local model directory to check (as for submit).")
@json_option
def doctor(model, device, offload, model_dir, as_json):
    """Check GPUs, CUDA, dfloat11, host RAM, the offload plan, model files, S3 and Ray for MODEL."""
    checks = run_checks(model, device=device, offload=offload, model_dir=model_dir)
    ok = not any(c.status == "FAIL" for c in checks)
    if as_json:
        click.echo(json.dumps({"model": model, "ok": ok, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for check in checks:
            click.echo(check.line())
        click.echo(f"{'ready' if ok else 'not ready'} for model {model!r}")
    return 0 if ok else 1
