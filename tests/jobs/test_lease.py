"""One driver per output: the lease object, on a local directory and on a real S3 server."""

import json
import subprocess
import sys
import time

import pytest

from jobs.lease import LEASE_KEY, DriverLease
from qwen_worker.errors import JobBusyError
from qwen_worker.stores import LocalStore


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "out")
    from qwen_worker.stores.s3 import S3Store

    return S3Store(request.getfixturevalue("s3_bucket"))


def test_a_second_driver_is_refused_while_the_first_holds_the_lease(store):
    first = DriverLease(store, "qb-000000000001").acquire()
    with pytest.raises(JobBusyError, match=r"^this job is already being run in .* by another driver \(host .*, pid \d+"):
        DriverLease(store, "qb-000000000001").acquire()
    first.release()
    with DriverLease(store, "qb-000000000001") as second:  # released: the next driver takes it
        assert not second.lost
    with pytest.raises(KeyError):
        store.get(LEASE_KEY)  # released leases leave nothing behind


def test_an_expired_lease_is_taken_over_and_its_old_holder_notices(store):
    now = [1000.0]
    old = DriverLease(store, "qb-000000000002", ttl_s=30, clock=lambda: now[0]).acquire()
    old._stop.set()  # its heartbeat stops: a driver that hangs or lost its network
    old.holder["host"] = "elsewhere"  # not this host, so only the expiry frees it
    store.put(LEASE_KEY, old._record())
    old.version = store.get_versioned(LEASE_KEY)[1]
    now[0] += 31
    new = DriverLease(store, "qb-000000000002", ttl_s=30, clock=lambda: now[0]).acquire()
    assert json.loads(store.get(LEASE_KEY))["driver"] == new.holder["driver"]
    assert store.put_versioned(LEASE_KEY, old._record(), expected=old.version) is None  # the old one cannot renew
    new.release()


def test_a_lease_left_by_a_crashed_process_on_this_host_is_free_at_once(store):
    crashed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = DriverLease(store, "qb-000000000003")
    record = json.loads(lease._record())
    record["pid"] = int(crashed.stdout)  # that process has exited
    store.put(LEASE_KEY, json.dumps(record).encode())
    with DriverLease(store, "qb-000000000003"):
        pass


def test_the_heartbeat_renews_the_lease(store):
    lease = DriverLease(store, "qb-000000000004", ttl_s=0.6).acquire()
    first = json.loads(store.get(LEASE_KEY))["expires"]
    time.sleep(0.5)
    assert json.loads(store.get(LEASE_KEY))["expires"] > first
    assert not lease.lost
    lease.release()


def test_compare_and_swap_writes_never_both_win(store):
    first = store.put_versioned("job.json", b"one", expected=None)
    assert first and store.put_versioned("job.json", b"two", expected=None) is None
    second = store.put_versioned("job.json", b"three", expected=first)
    assert second and store.put_versioned("job.json", b"four", expected=first) is None
    assert store.get_versioned("job.json") == (b"three", second)


def test_a_driver_waits_out_a_submit_that_only_claims_the_output(store):
    import threading

    claim = DriverLease(store, "qb-000000000005", purpose="claim").acquire()
    threading.Timer(0.6, claim.release).start()
    started = time.monotonic()
    with DriverLease(store, "qb-000000000005"):  # the cluster-side driver of an earlier submit
        assert 0.5 < time.monotonic() - started < 10
