"""A real multi-node Ray cluster on one machine, for tests and benchmarks: `ray start --block`
processes, one per node, each with its own environment (so a node can lack S3 credentials, as a
node group without its IAM role does).

    cluster = RayCluster().start()                     # a head that offers no worker capacity
    cluster.add_node("good", num_cpus=1)               # waits until the node is alive
    cluster.add_node("nocreds", num_cpus=1, env=without_credentials(os.environ))
    cluster.gcs_address, cluster.dashboard              # for `qwen-batch submit --address ...`
    cluster.token                                       # clients set RAY_AUTH_TOKEN to it
    cluster.kill_node("good")                           # SIGKILL its raylet: a node loss
    cluster.shutdown()

Never `ray stop`: it kills every Ray process on the machine, the test session's own included.
Node temp dirs are short (/tmp/rq...): Ray's unix sockets must fit in 107 bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
AWS_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                            "AWS_DEFAULT_PROFILE")  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def without_credentials(env: dict) -> dict:
    """`env` as a node without S3 credentials sees it: no key variables, no config files, no
    instance metadata to fall back on."""
    env = {k: v for k, v in env.items() if k not in AWS_CREDENTIAL_VARIABLES}
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true")
    return env


def node_env(env: dict, token: str) -> dict:
    """What every node process gets on top of `env`: fast shutdown, no usage stats, and the
    cluster's own auth token (Ray 2.60 clusters use token auth; a worker node joins only with it)."""
    env = dict(env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=token)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    return env


class RayCluster:
    def __init__(self, env: dict | None = None):
        """A cluster with token auth on and a token of its own (`self.token`), as a remote one has:
        clients need RAY_AUTH_TOKEN set to it."""
        import secrets

        self.token = secrets.token_hex(32)
        self.temp_dir = tempfile.mkdtemp(prefix="rq", dir="/tmp")
        os.makedirs(os.path.join(self.temp_dir, "ray"))  # RAY_TMPDIR: its ray_current_cluster is ours alone
        self.env = self._node_env(env or os.environ)
        self.processes: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, str] = {}
        self.gcs_address = ""
        self.dashboard = ""

    def _node_env(self, env: dict) -> dict:
        return dict(node_env(env, self.token), RAY_TMPDIR=self.temp_dir)

    def _spawn(self, name: str, args: list[str], env: dict) -> None:
        """Start one node's `ray start --block`; on failure it is stopped again."""
        log = open(os.path.join(self.temp_dir, f"{name}.log"), "w")
        common = ["--block", "--disable-usage-stats", "--object-store-memory=80000000", f"--temp-dir={self.temp_dir}",
                  f"--dashboard-agent-listen-port={free_port()}", f"--resources={json.dumps({'qb-node-' + name: 1})}"]
        self.processes[name] = subprocess.Popen([RAY, "start", *args, *common], env=env, stdout=log,
                                                stderr=subprocess.STDOUT)
        try:
            if name == "head":
                self._wait_for_dashboard()
            self.node_ids[name] = self._wait_for_node(name)
        except BaseException:
            self.kill_node(name)
            raise

    def start(self) -> "RayCluster":
        """The head: dashboard and GCS, no CPUs for workers (a GPU cluster's head offers none)."""
        port, dashboard_port = free_port(), free_port()
        from ray._private.services import get_node_ip_address

        self.gcs_address = f"{get_node_ip_address()}:{port}"
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        try:
            self._spawn("head", ["--head", f"--port={port}", f"--dashboard-port={dashboard_port}",
                                 "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=0"], self.env)
        except BaseException:
            self.shutdown()  # never leave a half-started cluster behind
            raise
        return self

    def add_node(self, name: str, *, num_cpus: int = 1, env: dict | None = None) -> str:
        """Start a worker node (one at a time: two starting together clash on ports); its node id."""
        self._spawn(name, [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}"],
                    self._node_env(env) if env is not None else self.env)
        return self.node_ids[name]

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's raylet and its workers: the node is lost, as when a machine dies."""
        import psutil

        process = self.processes.pop(name)
        for child in psutil.Process(process.pid).children(recursive=True):
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        process.kill()
        process.wait()

    def stop_node(self, name: str) -> None:
        """SIGTERM the node's `ray start`: it drains, then stops (a spot preemption notice)."""
        process = self.processes.pop(name)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def shutdown(self) -> None:
        """Stop every node (workers first), then kill whatever of theirs is left."""
        import psutil

        for name in [n for n in self.processes if n != "head"] + ["head"]:
            if name in self.processes:
                self.stop_node(name)
        for process in psutil.process_iter(["cmdline"]):  # nothing of this cluster may outlive it
            try:
                if any(self.temp_dir in part for part in process.info["cmdline"] or ()):
                    process.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    # ------------------------------------------------------------------ waiting

    def alive_nodes(self) -> dict[str, dict]:
        """{node id: total resources} of the cluster's live nodes, from its dashboard's state API
        (HTTP with the auth header: this process need not be a Ray driver nor in token mode)."""
        request = urllib.request.Request(f"{self.dashboard}/api/v0/nodes?limit=1000&detail=false",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            nodes = json.loads(response.read())["data"]["result"]["result"]
        return {n["node_id"]: n.get("resources_total", {}) for n in nodes if n.get("state") == "ALIVE"}

    def node_ips(self) -> list[str]:
        from jobs.cluster_jobs import dashboard_node_ips

        os.environ.setdefault("RAY_AUTH_TOKEN", self.token)
        try:
            return dashboard_node_ips(self.dashboard)
        finally:
            if os.environ.get("RAY_AUTH_TOKEN") == self.token:
                del os.environ["RAY_AUTH_TOKEN"]

    def _wait_for_node(self, name: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                break
            try:
                for node_id, resources in self.alive_nodes().items():
                    if f"qb-node-{name}" in resources:
                        return node_id
            except Exception:
                pass
            time.sleep(0.2)
        log = open(os.path.join(self.temp_dir, f"{name}.log")).read()[-3000:]
        raise RuntimeError(f"Ray node {name!r} did not come up:\n{log}")

    def _wait_for_dashboard(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.dashboard + "/api/authentication_mode", timeout=1)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the Ray dashboard at {self.dashboard} did not come up")
