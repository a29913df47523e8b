import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a model hub

import uuid  # noqa: E402

import pytest  # noqa: E402


# ---------------------------------------------------------------------------------------------
# S3: one real SeaweedFS server per session (tests/s3_server.py), a fresh bucket per test, and
# fault-injecting proxies in front of it (tests/fault_proxy.py).
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running SeaweedFS S3 server (auth on) for the whole session: an S3Server with
    .endpoint, .access_key, .secret_key, .client(). Sets no environment variables."""
    from s3_server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs") / "data")
    yield server
    server.kill()  # its data is thrown away: no need to wait for a clean shutdown


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS environment pointed at `s3_server` (endpoint, keys, region), isolated from
    ~/.aws and instance metadata, for this test only. Yields the server."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
                 "AWS_DEFAULT_REGION", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    yield s3_server


@pytest.fixture
def s3_bucket(s3_env):
    """A fresh, empty bucket for this test; yields the output URI 's3://<bucket>/out'."""
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3_env.client().create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/out"


@pytest.fixture
def fault_proxy(s3_server):
    """Factory: fault_proxy(seed=0, upstream=None, **rates) -> a started FaultProxy in front of
    `s3_server` (or `upstream`); all are stopped after the test. Point AWS_ENDPOINT_URL at
    `proxy.endpoint` to use it."""
    from fault_proxy import FaultProxy

    proxies = []

    def make(*, seed: int = 0, upstream: str | None = None, **rates) -> FaultProxy:
        proxy = FaultProxy(upstream or s3_server.endpoint, seed=seed, **rates).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


# ------------------------------------- end of S3 fixtures -------------------------------------


# ---------------------------------------------------------------------------------------------
# Ray and jobs: one local Ray instance for the whole session, small manifests written per test.
# ---------------------------------------------------------------------------------------------
RAY_INFO = {}


@pytest.fixture(scope="session")
def ray_dashboard(ray_session):
    """http://127.0.0.1:PORT of the session Ray's dashboard (the Ray Jobs API)."""
    return RAY_INFO["dashboard"]


@pytest.fixture(scope="session")
def ray_metrics_port(ray_session):
    """The port where the session Ray node exports Prometheus metrics."""
    return RAY_INFO["metrics_port"]


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """A local Ray instance shared by every test (start-up costs seconds on 2 cores).
    Yields its GCS address so CLI subprocesses can join it through RAY_ADDRESS.

    Workers inherit this process's environment at start-up, so the session S3 server's
    credentials are set first (jobs pass the endpoint itself to their workers)."""
    import ray

    os.environ.update(
        AWS_ACCESS_KEY_ID=s3_server.access_key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    import socket
    import sys

    def free_port():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    # Ray jobs run `qwen-batch submit` as their entrypoint: it must be on the workers' PATH.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    context = ray.init(
        address="local",  # never join a cluster started with `ray start` on this machine
        num_cpus=2,
        object_store_memory=80 * 1024 * 1024,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        logging_level="ERROR",
        log_to_driver=False,
    )
    RAY_INFO.update(dashboard=f"http://{context.dashboard_url}", metrics_port=ray._private.worker.global_worker.node.metrics_export_port)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_pipe():
    from qwen_worker.models.qwen_image import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_pipe_fp32():
    """The tiny pipeline in float32: numerics quiet enough to compare algorithms (batched vs one
    by one) within one 8-bit level; BF16 (the default, like the real models) differs by a few."""
    import torch

    from qwen_worker.models.qwen_image import build_tiny_pipeline

    return build_tiny_pipeline(seed=0, dtype=torch.float32)


@pytest.fixture
def write_manifest(tmp_path):
    """Factory: write_manifest(rows, name=..., **write_options) -> path of a Parquet manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(rows, name="manifest.parquet", schema=None, **options):
        path = tmp_path / name
        columns = list(dict.fromkeys(key for row in rows for key in row))  # every row's columns
        if schema is None:
            table = pa.table({column: [row.get(column) for row in rows] for column in columns})
        else:
            table = pa.Table.from_pylist(rows, schema=schema)
        pq.write_table(table, path, **options)
        return str(path)

    return write

