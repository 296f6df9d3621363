#!/usr/bin/env python3
"""Drives `infer-batch serve` with the openai SDK, as a user's script would.

    batch_api.py run BASE INPUT ENDPOINT OUTDIR     upload, create, poll until it ends, list,
                                                    download; prints the final batch as JSON
    batch_api.py submit BASE INPUT ENDPOINT         upload and create; prints the batch id
    batch_api.py wait BASE BATCH_ID OUTDIR          poll until it ends and download
    batch_api.py progress BASE BATCH_ID N           poll until N requests are done
    batch_api.py cancel BASE BATCH_ID               cancel; prints the status it answered
    batch_api.py bad BASE                           every kind of bad request, each checked
    batch_api.py local-only BASE                    a server with no key serves this machine only
    batch_api.py load BASE BATCH_ID SECONDS CLIENTS clients that upload, create and poll while
                                                    the batch BATCH_ID decodes

BASE is the server's root (http://127.0.0.1:PORT); the key, when the server wants one, is in
INFER_BATCH_KEY. Every batch and file object the server returns is parsed by the SDK's own type,
and a field the type does not declare is an error. Downloads go to OUTDIR/output.jsonl and
OUTDIR/error.jsonl (absent when the batch has no such file). Exits 1 on the first failed check.
"""
import json
import os
import statistics
import sys
import threading
import time

import http.client
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import openai
from openai import OpenAI
from openai.types import Batch, FileObject
from pydantic import BaseModel

TERMINAL = {"completed", "failed", "cancelled", "expired"}
DEADLINE = 900


def client(base, key=None):
    key = key if key is not None else os.environ.get("INFER_BATCH_KEY", "none")
    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def extras(model, path):
    """Fields the SDK's types do not declare, at any depth."""
    found = [f"{path}.{k}" for k in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name, None)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, BaseModel):
                found += extras(item, f"{path}.{name}[{i}]")
    return found


class Raw:
    """A request the SDK would never send, through the standard library."""

    def __init__(self, status, text):
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def raw(method, url, headers=None, content=None, form=None):
    headers = dict(headers or {})
    if form is not None:
        boundary = "b0undary"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                 for k, v in form.items()]
        content = ("".join(parts) + f"--{boundary}--\r\n").encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    req = urllib.request.Request(url, data=content, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return Raw(r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        return Raw(e.code, e.read().decode())


def checked(obj, kind):
    bad = extras(obj, kind)
    assert not bad, f"fields the SDK does not declare: {bad}"
    return obj


def upload(c, path):
    with open(path, "rb") as f:
        up = checked(c.files.create(file=f, purpose="batch"), "file")
    assert up.purpose == "batch" and up.bytes == os.path.getsize(path), up
    assert checked(c.files.retrieve(up.id), "file").id == up.id
    assert up.id in [f.id for f in c.files.list()], "the upload is listed"
    return up


def submit(c, path, endpoint):
    up = upload(c, path)
    b = checked(
        c.batches.create(
            input_file_id=up.id,
            endpoint=endpoint,
            completion_window="24h",
            metadata={"suite": "serve"},
        ),
        "batch",
    )
    assert b.status == "validating" and b.metadata == {"suite": "serve"}, b
    return b


def poll(c, batch_id, until):
    start = time.time()
    while time.time() - start < DEADLINE:
        b = checked(c.batches.retrieve(batch_id), "batch")
        if until(b):
            return b
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} did not get there in {DEADLINE} s: {b}")


def download(c, b, outdir):
    os.makedirs(outdir, exist_ok=True)
    for file_id, name in [(b.output_file_id, "output.jsonl"), (b.error_file_id, "error.jsonl")]:
        if file_id:
            meta = checked(c.files.retrieve(file_id), "file")
            assert meta.purpose == "batch_output", meta
            data = c.files.content(file_id).content
            assert len(data) == meta.bytes, (len(data), meta.bytes)
            with open(os.path.join(outdir, name), "wb") as f:
                f.write(data)


def wait(c, batch_id, outdir):
    b = poll(c, batch_id, lambda b: b.status in TERMINAL)
    assert batch_id in [x.id for x in c.batches.list(limit=100)], "the batch is listed"
    counts = b.request_counts
    assert counts.completed + counts.failed <= counts.total, counts
    download(c, b, outdir)
    print(json.dumps(b.model_dump()))


def expect(status, fn, *args, **kwargs):
    """Calls fn and checks that it fails with HTTP `status` in OpenAI's error shape."""
    try:
        fn(*args, **kwargs)
    except openai.APIStatusError as e:
        assert e.status_code == status, f"{fn}: {e.status_code}, not {status}: {e.body}"
        body = e.response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["message"], body
        return body["error"]
    raise AssertionError(f"{fn} {args} {kwargs} did not fail")


def bad(base):
    c = client(base)
    good = os.path.join(os.environ["SCRATCH"], "good.jsonl")
    with open(good, "w") as f:
        f.write(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                            "body": {"messages": [{"role": "user", "content": "hi"}]}}) + "\n")
    # The key: missing and wrong.
    if os.environ.get("INFER_BATCH_KEY"):
        e = expect(401, client(base, key="wrong").files.list)
        assert e["code"] == "invalid_api_key", e
        r = raw("GET", f"{base}/v1/files")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert raw("GET", f"{base}/").status_code == 401, "the page wants the key too"
        assert raw("GET", f"{base}/v1/nothing").status_code == 401, "unknown routes too"
    auth = {"Authorization": f"Bearer {os.environ.get('INFER_BATCH_KEY', '')}"}
    # Uploads: wrong purpose, no file, malformed multipart, over the limit.
    with open(good, "rb") as f:
        e = expect(400, c.files.create, file=f, purpose="fine-tune")
    assert e["param"] == "purpose", e
    r = raw("POST", f"{base}/v1/files", headers=auth, form={"purpose": "batch"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file", r.text
    r = raw("POST", f"{base}/v1/files", headers={**auth, "Content-Type": "multipart/form-data; boundary=zz"},
            content=b"--zz\r\nnot a part\r\n")
    assert r.status_code == 400, r.text
    r = raw("POST", f"{base}/v1/files", headers={**auth, "Content-Type": "application/json"}, content=b"{}")
    assert r.status_code == 400, r.text
    big = os.path.join(os.environ["SCRATCH"], "big.jsonl")
    with open(big, "wb") as f:
        f.write(b"x" * (int(os.environ["MAX_UPLOAD"]) + 1))
    with open(big, "rb") as f:
        e = expect(413, c.files.create, file=f, purpose="batch")
    huge = os.path.join(os.environ["SCRATCH"], "huge.jsonl")
    with open(huge, "wb") as f:
        f.write(b"x" * (int(os.environ["MAX_UPLOAD"]) + 3 * 1024 * 1024))
    with open(huge, "rb") as f:
        expect(413, c.files.create, file=f, purpose="batch")
    # Batches: missing fields, unknown file, an endpoint not served, a bad window.
    up = upload(c, good)
    e = expect(400, c.batches.create, input_file_id=up.id, endpoint="/v1/moderations",
               completion_window="24h")
    assert e["param"] == "endpoint", e
    e = expect(400, c.batches.create, input_file_id="file-" + "0" * 32,
               endpoint="/v1/chat/completions", completion_window="24h")
    assert e["param"] == "input_file_id", e
    e = expect(400, c.batches.create, input_file_id=up.id, endpoint="/v1/chat/completions",
               completion_window="1h")
    assert e["param"] == "completion_window", e
    for missing in ["input_file_id", "endpoint", "completion_window"]:
        body = {"input_file_id": up.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        del body[missing]
        r = raw("POST", f"{base}/v1/batches", headers={**auth, "Content-Type": "application/json"},
                content=json.dumps(body).encode())
        assert r.status_code == 400 and r.json()["error"]["param"] == missing, r.text
    for ctype in ["application/json", "text/plain"]:
        r = raw("POST", f"{base}/v1/batches", headers={**auth, "Content-Type": ctype},
                content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["message"], r.text
    e = expect(400, c.batches.create, input_file_id=up.id, endpoint="/v1/chat/completions",
               completion_window="24h", metadata={"k": 1})
    assert e["param"] == "metadata", e
    # Ids that are not ours: never a path.
    for path in ["/v1/files/..%2F..%2Fetc%2Fpasswd", "/v1/files/..%2F..%2Finfer-batch.sqlite3/content",
                 "/v1/files/file-..%2F..%2Fx/content", "/v1/files/%2Fetc%2Fpasswd/content",
                 "/v1/batches/batch_..%2F..", "/v1/files/" + up.id.upper(), "/v1/nothing"]:
        r = raw("GET", f"{base}{path}", headers=auth)
        assert r.status_code == 404, (path, r.status_code, r.text)
        assert "root:" not in r.text and "SQLite" not in r.text, path
    expect(404, c.files.retrieve, "file-" + "1" * 32)
    expect(404, c.batches.retrieve, "batch_" + "1" * 32)
    expect(404, c.batches.cancel, "batch_" + "1" * 32)
    # A file with bad lines: the batch fails, and errors.data names each line.
    lines = [
        json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"messages": []}}),
        "{not json",
        json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}),
    ]
    badfile = os.path.join(os.environ["SCRATCH"], "bad.jsonl")
    with open(badfile, "w") as f:
        f.write("\n".join(lines) + "\n")
    b = submit(c, badfile, "/v1/chat/completions")
    b = poll(c, b.id, lambda b: b.status in TERMINAL)
    assert b.status == "failed" and b.failed_at, b
    got = [(e.line, e.code) for e in b.errors.data]
    assert got == [(2, "invalid_json_line"), (3, "mismatched_endpoint"), (4, "duplicate_custom_id")], got
    e = expect(409, c.batches.cancel, b.id)
    limits(base, auth)
    # Deleting a file.
    assert c.files.delete(up.id).deleted
    expect(404, c.files.retrieve, up.id)
    # And it still serves.
    assert checked(c.batches.retrieve(b.id), "batch").status == "failed"
    print("bad requests: all answered as expected")


def local_only(base):
    """Without a key, only requests that name this machine as their Host are served."""
    netloc = urlsplit(base).netloc
    port = netloc.rsplit(":", 1)[1]
    r = raw("GET", f"{base}/v1/batches", headers={"Host": f"evil.example:{port}"})
    assert r.status_code == 403 and r.json()["error"]["message"], r.text
    r = raw("GET", f"{base}/v1/batches", headers={"Host": f"localhost:{port}"})
    assert r.status_code == 200, r.text
    r = raw("POST", f"{base}/v1/batches", headers={"Content-Type": "text/plain"},
            content=b'{"input_file_id": "x", "endpoint": "/v1/chat/completions"}')
    assert r.status_code == 400, r.text
    r = raw("DELETE", f"{base}/v1/batches")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    print("local only: checked")


def limits(base, auth):
    """Oversized bodies and heads, and a client too slow to send its head."""
    r = raw("POST", f"{base}/v1/batches", headers={**auth, "Content-Type": "application/json"},
            content=b" " * (2 << 20))
    assert r.status_code == 413, (r.status_code, r.text)
    netloc = urlsplit(base).netloc
    host, port = netloc.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"GET /v1/files HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (256 << 10) + b"\r\n\r\n")
        s.settimeout(30)
        answer = read_all(s)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:100]
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"GET /v1/files HTTP/1.1\r\nHost: x\r\n")
        s.settimeout(30)
        start = time.time()
        answer = read_all(s)
        waited = time.time() - start
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert 5 < waited < 25, f"a half-sent head was dropped after {waited:.1f} s"


def read_all(s):
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def load(base, running, seconds, clients):
    """`clients` threads while batch `running` decodes: a third upload and create a one-request
    batch (SMALL_INPUT), then every one polls its batch."""
    c = client(base)
    poll(c, running, lambda b: b.status == "in_progress" and b.request_counts.completed > 0)
    latencies, errors, created = [], [], []
    lock = threading.Lock()
    stop = time.time() + seconds

    def worker(i):
        # One kept-alive connection a client, as a polling script holds.
        conn = http.client.HTTPConnection(urlsplit(base).netloc, timeout=30)
        mine = running
        if i % 3 == 0:
            try:
                mine = submit(client(base), os.environ["SMALL_INPUT"], "/v1/chat/completions").id
                with lock:
                    created.append(mine)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    errors.append(repr(e))
        while time.time() < stop:
            t = time.perf_counter()
            conn.request("GET", f"/v1/batches/{mine}", headers={"Authorization": "Bearer none"})
            r = conn.getresponse()
            body = r.read()
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                if r.status != 200:
                    errors.append(f"{r.status} {body[:200]}")
            time.sleep(0.05)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    ids = [b.id for b in c.batches.list(limit=100)]
    for b in created + [running]:
        assert ids.count(b) == 1, f"batch {b} listed {ids.count(b)} times"
    ends = {b: poll(c, b, lambda x: x.status in TERMINAL).status for b in created + [running]}
    assert set(ends.values()) == {"completed"}, ends
    q = statistics.quantiles(latencies, n=100)
    print(json.dumps({"polls": len(latencies), "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3,
                      "batches": len(created) + 1}))


def main(argv):
    cmd, base = argv[1], argv[2]
    c = client(base)
    if cmd == "run":
        b = submit(c, argv[3], argv[4])
        wait(c, b.id, argv[5])
    elif cmd == "submit":
        print(submit(c, argv[3], argv[4]).id)
    elif cmd == "wait":
        wait(c, argv[3], argv[4])
    elif cmd == "progress":
        n = int(argv[4])
        poll(c, argv[3], lambda b: b.request_counts.completed + b.request_counts.failed >= n
             or b.status in TERMINAL)
    elif cmd == "local-only":
        local_only(base)
    elif cmd == "cancel":
        print(checked(c.batches.cancel(argv[3]), "batch").status)
    elif cmd == "bad":
        bad(base)
    elif cmd == "load":
        load(base, argv[3], float(argv[4]), int(argv[5]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
