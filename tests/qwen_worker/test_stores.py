"""S3Store against a real SeaweedFS server (and the Store contract shared with LocalStore)."""

import pickle
import socket
import time
import urllib.request

import pytest

from qwen_worker.errors import ObjectExistsError, StorageError, UserError
from qwen_worker.stores.s3 import S3Store
from qwen_worker.stores import LocalStore, PutOutcome, sha256_hex

FAST = dict(backoff_base=0.01, backoff_cap=0.05)  # our retries, without the waiting


@pytest.fixture(params=["local", "s3"])
def make_store(request, tmp_path):
    """Factory for a store of either kind on one fresh, empty destination."""
    if request.param == "local":
        return lambda **kw: LocalStore(tmp_path / "out", **kw)
    uri = request.getfixturevalue("s3_bucket")
    return lambda **kw: S3Store(uri, **kw)


def bucket_of(uri: str) -> str:
    return uri.removeprefix("s3://").split("/")[0]


# ---- the Store contract, for both kinds ----------------------------------------------------
def test_put_new_creates_then_same_bytes_are_already_stored(make_store):
    store = make_store()
    assert store.put_new("images/a.png", b"alpha") is PutOutcome.CREATED
    assert store.put_new("images/a.png", b"alpha") is PutOutcome.ALREADY_STORED
    assert store.get("images/a.png") == b"alpha"


def test_put_new_different_bytes_raise_exists_error(make_store):
    store = make_store()
    store.put_new("images/a.png", b"alpha")
    with pytest.raises(ObjectExistsError, match=r"object exists with different content at .*out/images/a\.png"):
        store.put_new("images/a.png", b"beta")
    assert store.get("images/a.png") == b"alpha"


def test_overwrite_store_replaces(make_store):
    make_store().put_new("images/a.png", b"alpha")
    store = make_store(overwrite=True)
    assert store.put_new("images/a.png", b"beta") is PutOutcome.REPLACED
    assert store.put_new("images/a.png", b"beta") is PutOutcome.ALREADY_STORED
    assert store.get("images/a.png") == b"beta"


def test_put_replaces_and_get_missing_raises_key_error(make_store):
    store = make_store()
    store.put("_ledger/shard-00000.parquet", b"one")
    store.put("_ledger/shard-00000.parquet", b"two")
    assert store.get("_ledger/shard-00000.parquet") == b"two"
    with pytest.raises(KeyError, match="images/missing.png"):
        store.get("images/missing.png")


def test_stored_sha256_and_exists(make_store):
    store = make_store()
    store.put_new("images/a.png", b"alpha")
    assert store.stored_sha256("images/a.png") == sha256_hex(b"alpha")
    assert store.stored_sha256("images/b.png") is None
    assert store.exists("images/a.png") and not store.exists("images/b.png")


def test_list_keys_lists_a_folder(make_store):
    store = make_store()
    for key in ("images/a.png", "images/b.png", "images2/c.png", "_ledger/shard-00000.parquet", "job.json"):
        store.put(key, key.encode())
    assert sorted(store.list_keys("images")) == ["images/a.png", "images/b.png"]
    assert sorted(store.list_keys("images/")) == ["images/a.png", "images/b.png"]
    assert sorted(store.list_keys("")) == [
        "_ledger/shard-00000.parquet", "images/a.png", "images/b.png", "images2/c.png", "job.json",
    ]  # fmt: skip
    assert list(store.list_keys("nothing")) == []


def test_check_writable_passes_and_leaves_nothing(make_store):
    store = make_store()
    store.check_writable()
    assert list(store.list_keys("")) == []


def test_pickled_store_works(make_store):
    store = make_store()
    store.put_new("images/a.png", b"alpha")
    copy = pickle.loads(pickle.dumps(store))
    assert copy.put_new("images/a.png", b"alpha") is PutOutcome.ALREADY_STORED
    assert copy.put_new("images/b.png", b"beta") is PutOutcome.CREATED
    assert store.get("images/b.png") == b"beta"


# ---- S3 specifics -------------------------------------------------------------------------
def test_objects_carry_sha256_metadata_under_the_prefix(s3_bucket, s3_server):
    S3Store(s3_bucket).put_new("images/a.png", b"alpha", content_type="image/png")
    head = s3_server.client().head_object(Bucket=bucket_of(s3_bucket), Key="out/images/a.png")
    assert head["Metadata"] == {"sha256": sha256_hex(b"alpha")}
    assert head["ContentType"] == "image/png"


def test_object_without_metadata_is_hashed(s3_bucket, s3_server):
    s3_server.client().put_object(Bucket=bucket_of(s3_bucket), Key="out/images/a.png", Body=b"alpha")
    store = S3Store(s3_bucket)
    assert store.stored_sha256("images/a.png") == sha256_hex(b"alpha")
    assert store.put_new("images/a.png", b"alpha") is PutOutcome.ALREADY_STORED
    with pytest.raises(ObjectExistsError, match="images/a.png"):
        store.put_new("images/a.png", b"beta")


def test_list_keys_follows_pages(s3_bucket):
    store = S3Store(s3_bucket, list_page_size=2)
    keys = {f"images/{i}.png" for i in range(5)}
    for key in keys:
        store.put(key, b"x")
    pages = []
    store.client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: pages.append(1))
    assert set(store.list_keys("images")) == keys
    assert len(pages) == 3


def test_presigned_url_serves_the_bytes(s3_bucket):
    store = S3Store(s3_bucket)
    store.put_new("images/a.png", b"alpha")
    url = store.presigned_url("images/a.png", expires=60)
    assert "Signature" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"alpha"


def test_pickle_carries_no_client_and_no_secret(s3_bucket, s3_server):
    store = S3Store(s3_bucket)
    store.put_new("images/a.png", b"alpha")
    data = pickle.dumps(store)
    assert s3_server.secret_key.encode() not in data
    assert pickle.loads(data)._client is None


def test_custom_endpoint_uses_path_style(s3_bucket, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint.replace("127.0.0.1", "localhost"))
    store = S3Store(s3_bucket, max_attempts=1, client_max_attempts=1)
    assert store.put_new("images/a.png", b"alpha") is PutOutcome.CREATED  # not http://<bucket>.localhost
    assert store.client.meta.config.s3["addressing_style"] == "path"


def test_aws_defaults_without_endpoint_or_region(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_REGION")
    client = S3Store("s3://some-bucket/out").client  # no request is made
    assert client.meta.region_name == "us-east-1"
    assert client.meta.endpoint_url.endswith(".amazonaws.com")
    assert (client.meta.config.s3 or {}).get("addressing_style") != "path"


def test_fault_proxy_forwards_chunked_uploads(s3_bucket, s3_server, fault_proxy):
    proxy = fault_proxy()
    url = s3_server.client(endpoint=proxy.endpoint).generate_presigned_url(
        "put_object", Params={"Bucket": bucket_of(s3_bucket), "Key": "out/chunked.bin"}, ExpiresIn=60
    )
    request = urllib.request.Request(url, data=iter([b"abc", b"defg"]), method="PUT")  # no length: chunked
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert S3Store(s3_bucket).get("chunked.bin") == b"abcdefg"
    assert proxy.requests == 1


# ---- faults -------------------------------------------------------------------------------
def test_transient_faults_are_retried_and_counted(s3_bucket, fault_proxy, monkeypatch):
    proxy = fault_proxy()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    store = S3Store(s3_bucket, client_max_attempts=1, **FAST)
    proxy.queue("slowdown", "error500", "reset")
    assert store.put_new("images/a.png", b"alpha") is PutOutcome.CREATED
    assert store.retries == 3
    assert proxy.injected == {"slowdown": 1, "error500": 1, "reset": 1}


def test_dropped_response_on_conditional_put_is_already_stored(s3_bucket, fault_proxy, monkeypatch):
    proxy = fault_proxy()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    store = S3Store(s3_bucket)  # botocore's own retry re-sends the put and gets a 412
    proxy.queue("drop")
    assert store.put_new("images/a.png", b"alpha") is PutOutcome.ALREADY_STORED
    assert (store.retries, proxy.injected["drop"]) == (1, 1)
    assert store.get("images/a.png") == b"alpha"


def test_many_writes_through_a_faulty_network_all_land_once(s3_bucket, s3_server, fault_proxy, monkeypatch):
    proxy = fault_proxy(seed=7, slowdown=0.2, reset=0.05, drop=0.1, delay=0.02, error500=0.02)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    store = S3Store(s3_bucket, client_max_attempts=1, max_attempts=20, **FAST)
    objects = {f"images/{i:03d}.png": f"image {i}".encode() * (1 + i % 7) for i in range(200)}
    outcomes = [store.put_new(key, data) for key, data in objects.items()]

    faults = sum(n for name, n in proxy.injected.items() if name != "delay")
    assert proxy.injected["drop"] >= 10 and proxy.injected["slowdown"] >= 20 and proxy.injected["reset"] >= 3
    assert store.retries == faults  # every fault cost exactly one retry, none was fatal
    assert set(outcomes) <= {PutOutcome.CREATED, PutOutcome.ALREADY_STORED}
    assert outcomes.count(PutOutcome.ALREADY_STORED) >= 1  # some drops hit a put
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    direct = S3Store(s3_bucket)
    assert sorted(direct.list_keys("")) == sorted(objects)
    assert all(direct.get(key) == data for key, data in objects.items())


def test_exhausted_retries_raise_storage_error_naming_the_key(s3_bucket, fault_proxy, monkeypatch):
    proxy = fault_proxy(slowdown=1.0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    store = S3Store(s3_bucket, client_max_attempts=1, max_attempts=3, **FAST)
    with pytest.raises(StorageError, match=r"PutObject images/a\.png .*3 attempts.*SlowDown"):
        store.put_new("images/a.png", b"alpha")
    assert store.retries == 2


# ---- user errors ----------------------------------------------------------------------------
def test_wrong_secret_is_a_user_error_without_the_secret(s3_bucket, monkeypatch):
    wrong = "WRONG-secret-0123456789abcdef"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    store = S3Store(s3_bucket, **FAST)
    bucket = bucket_of(s3_bucket)
    with pytest.raises(UserError, match=rf"s3://{bucket}/out .*SignatureDoesNotMatch.*AWS_SECRET_ACCESS_KEY") as info:
        store.check_writable()
    assert wrong not in str(info.value)
    with pytest.raises(UserError, match=rf"s3://{bucket}/out .*SignatureDoesNotMatch") as info:
        store.put_new("images/a.png", b"alpha")
    assert wrong not in str(info.value)
    assert store.retries == 0  # user errors are not retried


def test_unknown_access_key_is_a_user_error(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(UserError, match=r"InvalidAccessKeyId.*AWS_ACCESS_KEY_ID"):
        S3Store(s3_bucket, **FAST).check_writable()


def test_missing_bucket_is_a_user_error_naming_it(s3_env):
    store = S3Store("s3://no-such-bucket-here/out", **FAST)
    with pytest.raises(UserError, match=r"s3://no-such-bucket-here/out .*NoSuchBucket.*does not exist"):
        store.check_writable()


def test_unreachable_endpoint_is_a_quick_user_error(s3_env, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    store = S3Store("s3://somebucket/out", max_attempts=2, client_max_attempts=1, connect_timeout=1, **FAST)
    started = time.monotonic()
    with pytest.raises(UserError, match=rf"s3://somebucket/out at http://127.0.0.1:{closed_port} .*cannot reach"):
        store.check_writable()
    assert time.monotonic() - started < 5


# ---- crash ----------------------------------------------------------------------------------
def test_data_survives_a_server_crash(tmp_path, monkeypatch):
    from s3_server import start_s3_server

    server = start_s3_server(tmp_path / "data")
    try:
        monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
        server.client().create_bucket(Bucket="crash")
        store = S3Store("s3://crash/out", **FAST)
        store.put_new("images/a.png", b"alpha")
        server.kill()
        server.restart()
        assert store.get("images/a.png") == b"alpha"
        assert store.put_new("images/a.png", b"alpha") is PutOutcome.ALREADY_STORED
    finally:
        server.kill()
