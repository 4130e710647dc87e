#!/usr/bin/env python3
"""Prometheus text helpers for the e2e suite (stdlib only).

  metrics.py delta BEFORE AFTER METRIC [LABEL=VALUE | LABEL=~REGEX]...
      Sum of (AFTER - BEFORE) over the series of METRIC whose labels match every filter.
  metrics.py value FILE METRIC [filters]...
      Sum over the matching series in FILE.
  metrics.py fromlogs REGMIRROR_JSON_LOG [UPSTREAM_NAME=REGISTRY_LOG]...
      Development fallback while the binary has no /metrics listener: rebuild
      regmirror_requests_total and regmirror_cache_requests_total from regmirror's JSON
      request log, and regmirror_upstream_requests_total from the upstream registries'
      logs (requests whose User-Agent is regmirror/*). Prints Prometheus text.
"""
import json
import re
import sys
from collections import Counter

LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(path):
    series = []
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except FileNotFoundError:
        return series
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            head, value = line.rsplit(" ", 1)
            value = float(value)
        except ValueError:
            continue
        if "{" in head:
            name, rest = head.split("{", 1)
            labels = dict((k, bytes(v, "utf-8").decode("unicode_escape"))
                          for k, v in LABEL.findall(rest[: rest.rfind("}")]))
        else:
            name, labels = head, {}
        series.append((name, labels, value))
    return series


def matcher(filters):
    tests = []
    for f in filters:
        if "=~" in f:
            k, v = f.split("=~", 1)
            rx = re.compile("^(?:%s)$" % v)
            tests.append(lambda l, k=k, rx=rx: rx.match(l.get(k, "")) is not None)
        else:
            k, v = f.split("=", 1)
            tests.append(lambda l, k=k, v=v: l.get(k, "") == v)
    return lambda labels: all(t(labels) for t in tests)


def total(path, metric, filters):
    ok = matcher(filters)
    return sum(v for n, l, v in parse(path) if n == metric and ok(l))


def fmt(x):
    return str(int(x)) if float(x).is_integer() else str(x)


def fromlogs(reglog, upstream_logs):
    requests, cache, upstream = Counter(), Counter(), Counter()
    try:
        lines = open(reglog, encoding="utf-8", errors="replace").read().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("target") != "regmirror::request":
            continue
        route, status, method = ev.get("route", ""), str(ev.get("status", "")), ev.get("method", "")
        requests[(method, route, status)] += 1
        outcome, up = ev.get("cache", ""), ev.get("upstream", "")
        if outcome and up:
            kind = "manifest" if "/manifests/" in route else "blob" if "/blobs/" in route else "other"
            cache[(kind, up, outcome)] += 1
    field = re.compile(r'([a-z.]+)=("(?:[^"\\]|\\.)*"|\S+)')
    for spec in upstream_logs:
        name, path = spec.split("=", 1)
        try:
            ulines = open(path, encoding="utf-8", errors="replace").read().splitlines()
        except FileNotFoundError:
            continue
        for line in ulines:
            if 'msg="response completed"' not in line and 'msg="response completed with error"' not in line:
                continue
            f = {k: v.strip('"') for k, v in field.findall(line)}
            if not f.get("http.request.useragent", "").startswith("regmirror/"):
                continue
            uri = f.get("http.request.uri", "")
            kind = "manifest" if "/manifests/" in uri else "blob" if "/blobs/" in uri else "tags" if "/tags/" in uri else "other"
            upstream[(name, kind, f.get("http.response.status", ""))] += 1
    out = ["# rebuilt from logs by tests/e2e/metrics.py (no /metrics listener)"]
    for (m, r, s), n in sorted(requests.items()):
        out.append('regmirror_requests_total{method="%s",route="%s",status="%s"} %d' % (m, r, s, n))
    for (k, u, o), n in sorted(cache.items()):
        out.append('regmirror_cache_requests_total{kind="%s",outcome="%s",upstream="%s"} %d' % (k, o, u, n))
    for (u, k, s), n in sorted(upstream.items()):
        out.append('regmirror_upstream_requests_total{kind="%s",status="%s",upstream="%s"} %d' % (k, s, u, n))
    print("\n".join(out))


def main(argv):
    if len(argv) >= 4 and argv[0] == "delta":
        print(fmt(total(argv[2], argv[3], argv[4:]) - total(argv[1], argv[3], argv[4:])))
    elif len(argv) >= 3 and argv[0] == "value":
        print(fmt(total(argv[1], argv[2], argv[3:])))
    elif len(argv) >= 2 and argv[0] == "fromlogs":
        fromlogs(argv[1], argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
