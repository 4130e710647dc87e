#!/usr/bin/env python3
"""Soak load for regmirror (python3 standard library only); run by benches/soak.sh.

    soak.py seed UPSTREAM IMAGES BLOB_KIB        push IMAGES single-layer images library/soak-N:latest
    soak.py run MIRROR PID DATA SECONDS CLIENTS  mixed load; a line of figures each minute

The load, per client, picked at random each round: pulls (manifest by tag, then the layer; with a
store bound smaller than the image set, many are uncached and fill from the upstream), aborted
downloads (the client hangs up after the first chunk), pushes to the private namespace (login
first), token requests, and HEADs. Each minute: the server's RSS and open file descriptors,
requests done and errors; at the end, staging files and upload sessions left behind.
"""

import base64
import hashlib
import http.client
import json
import os
import random
import sys
import threading
import time
import urllib.parse

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def request(host, method, path, body=None, headers=None, read=True, timeout=60):
    conn = http.client.HTTPConnection(host, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read() if read else resp.read(65536)
        return resp.status, dict(resp.getheaders()), data
    finally:
        conn.close()


def push_blob(host, repo, data, headers=None):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, hdrs, _ = request(host, "POST", f"/v2/{repo}/blobs/uploads/", headers=headers)
    if status != 202:
        return status, digest
    loc = hdrs.get("Location") or hdrs.get("location")
    parsed = urllib.parse.urlsplit(loc)
    path = parsed.path + ("?" + parsed.query + "&" if parsed.query else "?") + "digest=" + digest
    status, _, _ = request(host, "PUT", path, body=data, headers=dict(headers or {}, **{"Content-Type": "application/octet-stream"}))
    return status, digest


def seed(upstream, images, blob_kib):
    host = urllib.parse.urlsplit(upstream).netloc
    for i in range(images):
        layer = hashlib.sha256(f"layer {i}".encode()).digest() * (blob_kib * 1024 // 32)
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": i}).encode()
        repo = f"library/soak-{i}"
        s1, layer_digest = push_blob(host, repo, layer)
        s2, config_digest = push_blob(host, repo, config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": len(layer)}],
        }).encode()
        s3, _, _ = request(host, "PUT", f"/v2/{repo}/manifests/latest", body=manifest, headers={"Content-Type": OCI_MANIFEST})
        if (s1, s2, s3) != (201, 201, 201):
            sys.exit(f"seeding {repo}: {s1} {s2} {s3}")
    print(f"seeded {images} images of {blob_kib} KiB")


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.done = {}
        self.errors = {}
        self.samples = []

    def count(self, kind, ok, detail=""):
        with self.lock:
            self.done[kind] = self.done.get(kind, 0) + 1
            if not ok:
                key = f"{kind}: {detail}"
                self.errors[key] = self.errors.get(key, 0) + 1


def server_figures(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) // 1024
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


def client_loop(host, images, stop, stats, n, credentials):
    rnd = random.Random(n)
    auth = {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}
    accept = {"Accept": OCI_MANIFEST}
    small = [f"soak client {n} blob {k}".encode() * 512 for k in range(4)]
    while not stop.is_set():
        roll = rnd.random()
        image = f"library/soak-{rnd.randrange(images)}"
        try:
            if roll < 0.45:
                status, _, body = request(host, "GET", f"/v2/{image}/manifests/latest", headers=accept)
                if status != 200:
                    stats.count("pull", False, f"manifest {status}")
                    continue
                layer = json.loads(body)["layers"][0]["digest"]
                status, _, data = request(host, "GET", f"/v2/{image}/blobs/{layer}")
                ok = status == 200 and "sha256:" + hashlib.sha256(data).hexdigest() == layer
                stats.count("pull", ok, f"blob {status}")
            elif roll < 0.60:
                status, _, body = request(host, "GET", f"/v2/{image}/manifests/latest", headers=accept)
                if status == 200:
                    layer = json.loads(body)["layers"][0]["digest"]
                    status, _, _ = request(host, "GET", f"/v2/{image}/blobs/{layer}", read=False)
                stats.count("aborted", status == 200, str(status))
            elif roll < 0.75:
                status, _ = push_blob(host, f"private/soak-{n % 8}", rnd.choice(small), headers=auth)
                stats.count("push", status == 201, str(status))
            elif roll < 0.90:
                scope = urllib.parse.quote(f"repository:{image}:pull")
                status, _, body = request(host, "GET", f"/auth/token?service=regmirror&scope={scope}")
                stats.count("token", status == 200 and b"token" in body, str(status))
            else:
                status, _, _ = request(host, "HEAD", f"/v2/{image}/manifests/latest", headers=accept)
                stats.count("head", status == 200, str(status))
        except Exception as e:  # a failed request is counted, and the client goes on
            stats.count("exception", False, type(e).__name__)


def run(mirror, pid, data_dir, seconds, clients):
    host = urllib.parse.urlsplit(mirror).netloc
    images = int(os.environ.get("SOAK_IMAGES", "200"))
    credentials = os.environ.get("SOAK_CREDENTIALS", "soak:soak")
    stop = threading.Event()
    stats = Stats()
    threads = [threading.Thread(target=client_loop, args=(host, images, stop, stats, n, credentials), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    started = time.time()
    print(f"{'minute':>6} {'RSS MiB':>8} {'fds':>5} {'requests':>9} {'errors':>7}  by kind")
    minute = 0
    rows = []
    while time.time() - started < seconds:
        time.sleep(min(60, max(0.0, started + 60 * (minute + 1) - time.time())))
        minute += 1
        rss, fds = server_figures(pid)
        with stats.lock:
            total = sum(stats.done.values())
            errors = sum(stats.errors.values())
            kinds = " ".join(f"{k}={v}" for k, v in sorted(stats.done.items()))
        rows.append((minute, rss, fds, total, errors))
        print(f"{minute:>6} {rss:>8} {fds:>5} {total:>9} {errors:>7}  {kinds}", flush=True)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    # Quiet now: nothing may be left half-written.
    time.sleep(2)
    rss, fds = server_figures(pid)
    staging = len(os.listdir(os.path.join(data_dir, "tmp"))) if os.path.isdir(os.path.join(data_dir, "tmp")) else 0
    uploads = len(os.listdir(os.path.join(data_dir, "uploads"))) if os.path.isdir(os.path.join(data_dir, "uploads")) else 0
    print(f"after the load: RSS {rss} MiB, {fds} fds, staging files {staging}, upload sessions {uploads}")
    if stats.errors:
        print("errors:", json.dumps(stats.errors, sort_keys=True))
    later = rows[1:] or rows
    print(
        "summary: RSS {}-{} MiB, fds {}-{}, errors {} of {} requests, staging files left {}".format(
            min(r[1] for r in later), max(r[1] for r in later), min(r[2] for r in later), max(r[2] for r in later),
            rows[-1][4], rows[-1][3], staging,
        )
    )
    return 0 if staging == 0 else 1


if __name__ == "__main__":
    if sys.argv[1] == "seed":
        seed(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "run":
        sys.exit(run(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), int(sys.argv[6])))
    else:
        sys.exit(__doc__)
