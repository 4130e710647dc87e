#!/usr/bin/env python3
"""Helpers for benches/bench.sh (python3 standard library only).

    benchlib.py ports N                       N free loopback TCP ports, one a line
    benchlib.py median V...                   median of the numbers (empty input: nothing)
    benchlib.py upstream-count LOG HEX        "GETS HEADS BYTES" for one blob in the nginx log
    benchlib.py wrk-parse FILE                "RPS NON2XX ERRORS REQUESTS" from wrk's output
    benchlib.py stime-parse FILE              "CONNS SECONDS" from `openssl s_time` output
    benchlib.py metric URL NAME [LABEL=V...]  sum of a Prometheus sample (0 when absent)
    benchlib.py cpu-snap ROOT NAME=PID...     "wall=S busy=S ours=S NAME=S..." CPU seconds so far
    benchlib.py cpu-diff "SNAP1" "SNAP2"      deltas, plus foreign= (CPU used by processes not ours)
    benchlib.py settle SECS MACHINE PID...    wait (at most SECS) until those trees (and, if MACHINE
                                              is 1, the whole machine) are idle
    benchlib.py wait-idle SECS                wait (at most SECS) until the machine is idle
    benchlib.py prefault MIB                  touch MIB of fresh memory once, then free it
    benchlib.py verified-fetch URL HEX        seconds to download URL while hashing it on a second
                                              thread (empty, and exit 1, when the digest differs)
    benchlib.py report FIGURES RESULTS        print the table, write it to RESULTS
"""

import hashlib
import os
import queue
import re
import socket
import threading
import statistics
import sys
import time
import urllib.request

HZ = os.sysconf("SC_CLK_TCK")


def ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        for s in socks:
            print(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()


def median(values):
    nums = [float(v) for v in values if v not in ("", "-")]
    if nums:
        print(f"{statistics.median(nums):.6f}")


def upstream_count(log, hexdigest):
    # log_format: $msec "$request_method $uri" $status $body_bytes_sent $request_time
    gets = heads = size = 0
    needle = f" /v2/library/bench/blobs/sha256:{hexdigest}\""
    with open(log, encoding="utf-8", errors="replace") as f:
        for line in f:
            if needle not in line:
                continue
            m = re.search(r'"(\w+) \S+" (\d+) (\d+)', line)
            if not m:
                continue
            if m.group(1) == "GET":
                gets += 1
                size += int(m.group(3))
            elif m.group(1) == "HEAD":
                heads += 1
    print(gets, heads, size)


def wrk_parse(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    rps = re.search(r"Requests/sec:\s*([\d.]+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    reqs = re.search(r"(\d+) requests in", text)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    print(
        rps.group(1) if rps else "0",
        non2xx.group(1) if non2xx else "0",
        sum(int(x) for x in errs.groups()) if errs else 0,
        reqs.group(1) if reqs else "0",
    )


def stime_parse(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    # "1234 connections in 5 real seconds, 0 bytes read per connection"
    m = re.search(r"(\d+) connections in (\d+(?:\.\d+)?) real seconds", text)
    print(*(m.groups() if m else ("0", "0")))


def metric(url, name, labels):
    want = dict(kv.split("=", 1) for kv in labels)
    total = 0.0
    with urllib.request.urlopen(url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("#"):
                continue
            m = re.match(r"([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)", line)
            if not m or m.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
            if all(got.get(k) == v for k, v in want.items()):
                total += float(m.group(4))
    print(f"{total:g}")


# ---------------------------------------------------------------------------------------------
# CPU accounting: who used the machine while we measured
# ---------------------------------------------------------------------------------------------


def proc_table():
    """pid -> (ppid, utime+stime+cutime+cstime in ticks) for every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        # fields[0] is state (field 3); utime..cstime are fields 14..17
        table[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    return table


def tree_ticks(table, root):
    children = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        total += table[pid][1]
        stack.extend(children.get(pid, []))
    return total


def busy_ticks():
    with open("/proc/stat") as f:
        cpu = f.readline().split()[1:]
    return int(cpu[0]) + int(cpu[1]) + int(cpu[2])  # user + nice + system


def cpu_snap(root, named):
    table = proc_table()
    out = [f"wall={time.time():.3f}", f"busy={busy_ticks() / HZ:.2f}", f"ours={tree_ticks(table, int(root)) / HZ:.2f}"]
    for kv in named:
        name, pid = kv.split("=", 1)
        out.append(f"{name}={tree_ticks(table, int(pid)) / HZ:.2f}" if pid.isdigit() else f"{name}=0")
    print(" ".join(out))


def cpu_diff(a, b):
    da = dict(kv.split("=", 1) for kv in a.split())
    db = dict(kv.split("=", 1) for kv in b.split())
    d = {k: float(db[k]) - float(da[k]) for k in db if k in da}
    wall = max(d.pop("wall", 0.0), 1e-6)
    busy, ours = d.pop("busy", 0.0), d.pop("ours", 0.0)
    foreign = max(0.0, busy - ours)
    out = [f"wall={wall:.2f}", f"foreign={foreign:.2f}", f"foreign_pct={100 * foreign / (wall * os.cpu_count()):.0f}"]
    out += [f"{k}={max(0.0, v):.2f}" for k, v in d.items()]
    print(" ".join(out))


def settle(secs, machine, pids):
    """Wait until the given process trees use (almost) no CPU for 0.4 s — a mirror's background
    work (the reference stores a blob after the client is served) must not leak into the next
    measurement — and the machine as a whole is under 15% busy (other tenants). Bounded by secs;
    prints the machine's busy percentage over the last window."""
    deadline = time.monotonic() + float(secs)
    last, quiet, frac = None, 0, 1.0
    b0, t0 = busy_ticks(), time.monotonic()
    while True:
        time.sleep(0.2)
        table = proc_table()
        now = sum(tree_ticks(table, int(p)) for p in pids if p.isdigit())
        b1, t1 = busy_ticks(), time.monotonic()
        frac = (b1 - b0) / HZ / ((t1 - t0) * os.cpu_count())
        b0, t0 = b1, t1
        if last is not None and now - last <= 1 and (frac < 0.15 or machine == "0"):
            quiet += 1
            if quiet >= 2:
                break
        else:
            quiet = 0
        last = now
        if time.monotonic() >= deadline:
            break
    print(f"{100 * frac:.0f}")


def wait_idle(secs):
    """Wait (bounded) until the whole machine is under 15% busy over one second; print the last
    busy fraction seen."""
    deadline = time.monotonic() + float(secs)
    frac = 1.0
    while True:
        b0, t0 = busy_ticks(), time.monotonic()
        time.sleep(1)
        frac = (busy_ticks() - b0) / HZ / ((time.monotonic() - t0) * os.cpu_count())
        if frac < 0.15 or time.monotonic() >= deadline:
            break
    print(f"{100 * frac:.0f}")


def prefault(mib):
    """Touch `mib` MiB of fresh anonymous memory, then free it. On a VM whose guest memory is
    backed lazily (Firecracker and the like), the first write to a never-used page costs a host
    fault (~2-3 s per GiB here); whoever writes new page-cache pages pays it. Touching the pages
    once up front gives every contender the same, reused pages."""
    n = int(mib) << 20
    if n <= 0:
        return
    t = time.monotonic()
    b = bytearray(n)
    b[:: 4096] = bytes(len(range(0, n, 4096)))
    del b
    print(f"{time.monotonic() - t:.1f}")


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def verified_fetch(url, hexdigest):
    """The least a client that verifies a blob while receiving it must do: one download over one
    connection, sha256 on a second thread as the bytes arrive. No disk, no second hop. Socket reads
    and hashing both release the GIL, so the two threads run on two cores."""
    m = re.match(r"http://([^/:]+):(\d+)(/.*)", url)
    host, port, path = m.group(1), int(m.group(2)), m.group(3)
    start = time.monotonic()
    conn = socket.create_connection((host, port))
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        more = conn.recv(65536)
        if not more:
            return None
        head += more
    head, first = head.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    h = hashlib.sha256(first)
    size = len(first)
    pool = queue.Queue()
    for _ in range(8):
        pool.put(bytearray(1 << 20))
    work = queue.Queue()

    def hasher():
        while True:
            item = work.get()
            if item is None:
                return
            buf, n = item
            h.update(memoryview(buf)[:n])
            pool.put(buf)

    t = threading.Thread(target=hasher)
    t.start()
    while True:
        buf = pool.get()
        n = conn.recv_into(buf)
        if n == 0:
            break
        size += n
        work.put((buf, n))
    work.put(None)
    t.join()
    conn.close()
    elapsed = time.monotonic() - start
    return elapsed if h.hexdigest() == hexdigest else None


def load(path):
    fig = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                fig[k] = v
    return fig


def num(fig, key):
    try:
        return float(fig[key])
    except (KeyError, ValueError):
        return None


def fmt(v, unit=""):
    if v is None:
        return "n/a"
    if abs(v) >= 1000:
        s = f"{v:,.0f}"
    elif abs(v) >= 100:
        s = f"{v:.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.3f}"
    return f"{s} {unit}".rstrip()


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def report(figures, results):
    f = load(figures)
    out = []
    p = out.append
    g = lambda k: num(f, k)  # noqa: E731
    mib = f.get("blob_mib", "256")

    p(f"regmirror benchmark  {f.get('date', '')}")
    p(f"  binary     {f.get('bin', '')} ({f.get('bin_mtime', '')})")
    p(f"  reference  {f.get('ref_version', '')} (proxy mode); nginx {f.get('nginx_version', '')}")
    p(f"  machine    {f.get('cpus', '?')} CPUs, {f.get('mem', '?')}; blob size {mib} MiB; all traffic on 127.0.0.1")
    p("")
    rows = []  # (section, label, regmirror, reference, baseline, note)

    def row(*cols):
        rows.append(cols)

    # 2. cold
    row("cold pull", f"{mib} MiB uncached blob, seconds (median of {f.get('cold_runs', '?')})",
        fmt(g("cold_rm_s"), "s"), fmt(g("cold_ref_s"), "s"), fmt(g("direct_s"), "s"),
        f"baseline = curl via the counting nginx (raw upstream {fmt(g('direct_raw_s'), 's')})")
    row("", "  ratio to direct", fmt(ratio(g("cold_rm_s"), g("direct_s")), "x"),
        fmt(ratio(g("cold_ref_s"), g("direct_s")), "x"), "1 x", "")
    row("", "  verifying reader", "", "", fmt(g("verified_s"), "s"),
        "the same download hashed on a 2nd thread as it arrives: the least a verifying mirror adds")
    row("", "  ratio to verifying reader", fmt(ratio(g("cold_rm_s"), g("verified_s")), "x"),
        fmt(ratio(g("cold_ref_s"), g("verified_s")), "x"), fmt(ratio(g("verified_s"), g("direct_s")), "x"),
        "baseline column: verifying reader / direct")
    row("", "  server CPU s per pull", fmt(g("cpu_cold_rm"), "s"), fmt(g("cpu_cold_ref"), "s"), "",
        "the reference's includes its separate background fetch that stores the blob")
    # 3. warm
    row("warm blob", f"MB/s (median of {f.get('warm_runs', '?')})", fmt(g("warm_rm_mbs")),
        fmt(g("warm_ref_mbs")), fmt(g("warm_nginx_mbs")), "baseline = nginx static, sendfile on")
    row("", "  ratio to nginx", fmt(ratio(g("warm_rm_mbs"), g("warm_nginx_mbs")), "x"),
        fmt(ratio(g("warm_ref_mbs"), g("warm_nginx_mbs")), "x"), "1 x", "")
    row("", "  server CPU s per download", fmt(g("cpu_warm_rm"), "s"), fmt(g("cpu_warm_ref"), "s"), "", "")
    # 4. manifests
    row("manifest by tag", f"req/s, wrk {f.get('wrk_args', '')}", fmt(g("man_rm_rps")), fmt(g("man_ref_rps")), "",
        f"non-2xx: {f.get('man_rm_non2xx', '?')} / {f.get('man_ref_non2xx', '?')}; "
        f"socket errors: {f.get('man_rm_errors', '?')} / {f.get('man_ref_errors', '?')}")
    row("", "  regmirror / reference", fmt(ratio(g("man_rm_rps"), g("man_ref_rps")), "x"), "", "", "")
    # 5. fan-out
    n = f.get("fanout", "16")
    row("fan-out", f"{n} clients, one uncached blob: wall s", fmt(g("fan_rm_s"), "s"), fmt(g("fan_ref_s"), "s"),
        fmt(g("fan_nginx_s"), "s"), "baseline = nginx static, same file")
    row("", "  upstream GETs for the blob", f.get("fan_rm_gets", "n/a"), f.get("fan_ref_gets", "n/a"), "",
        f"upstream bytes: {fmt(num(f, 'fan_rm_up_mib'), 'MiB')} / {fmt(num(f, 'fan_ref_up_mib'), 'MiB')}")
    row("", "  wall ratio to nginx", fmt(ratio(g("fan_rm_s"), g("fan_nginx_s")), "x"),
        fmt(ratio(g("fan_ref_s"), g("fan_nginx_s")), "x"), "1 x", "")
    row("", "  clients ok (200, full size)", f.get("fan_rm_ok", "?"), f.get("fan_ref_ok", "?"), f.get("fan_nginx_ok", "?"), "")
    row("", "  server CPU s, all clients", fmt(g("cpu_fan_rm"), "s"), fmt(g("cpu_fan_ref"), "s"), fmt(g("cpu_fan_nginx"), "s"), "")
    # 6. RSS
    row("peak RSS", "VmHWM after steps 2-5, MiB", fmt(g("rss_rm_mib")), fmt(g("rss_ref_mib")), "", "")
    # 7. TLS
    row("TLS (regmirror)", "new handshakes/s, openssl s_time -new", fmt(g("tls_hs_per_s")), "", "",
        f"1 client, sequential; server counted {f.get('tls_hs_metric', '?')} completed, "
        f"{f.get('tls_hs_failed', '?')} failed")
    row("", "  server CPU ms per handshake", fmt(g("tls_hs_cpu_ms"), "ms"), "", "", "")
    row("", "warm blob MB/s over TLS", fmt(g("warm_tls_mbs")), "", fmt(g("warm_rm_mbs")),
        "baseline = same blob, plain HTTP (step 3)")
    row("", "  TLS / plain", fmt(ratio(g("warm_tls_mbs"), g("warm_rm_mbs")), "x"), "", "", "")
    row("", "  server CPU s per download", fmt(g("cpu_warm_tls"), "s"), "", fmt(g("cpu_warm_rm"), "s"), "")
    row("", "manifest req/s over TLS (keep-alive)", fmt(g("man_tls_rps")), "", fmt(g("man_rm_rps")),
        "baseline = plain HTTP (step 4)")

    heads = ("", "measure", "regmirror", "reference", "baseline", "note")
    widths = [max(len(str(r[i])) for r in rows + [heads]) for i in range(5)]

    def line(cols):
        return "  ".join(str(c).ljust(widths[i]) if i < 5 else str(c) for i, c in enumerate(cols)).rstrip()

    p(line(heads))
    p("  ".join("-" * w for w in widths) + "  " + "-" * 4)
    for r in rows:
        p(line(r))
    p("")

    # Targets
    p("targets")
    results_ok = 0
    checks = []

    def check(name, ok, detail):
        checks.append((name, ok, detail))

    r = ratio(g("cold_rm_s"), g("direct_s"))
    floor = ratio(g("verified_s"), g("direct_s"))
    check("cold pull <= 1.2x direct", r is not None and r <= 1.2,
          f"{fmt(r, 'x')} (a verifying reader alone: {fmt(floor, 'x')})")
    r = ratio(g("warm_rm_mbs"), g("warm_nginx_mbs"))
    check("warm throughput >= 0.9x nginx static", r is not None and r >= 0.9, f"{fmt(r, 'x')}")
    r = ratio(g("man_rm_rps"), g("man_ref_rps"))
    ok = r is not None and r >= 50 and f.get("man_rm_non2xx") == "0" and f.get("man_rm_errors") == "0"
    check("manifest req/s >= 50x reference (and all 2xx)", ok, f"{fmt(r, 'x')}")
    check("fan-out: exactly 1 upstream GET", f.get("fan_rm_gets") == "1", f"{f.get('fan_rm_gets', 'n/a')} GET(s)")
    full = f.get("fan_rm_ok") == n
    r = ratio(g("fan_rm_s"), g("fan_ref_s"))
    check("fan-out wall <= 0.5x reference", full and r is not None and r <= 0.5, f"{fmt(r, 'x')}")
    r = ratio(g("fan_rm_s"), g("fan_nginx_s"))
    check("fan-out wall <= 1.5x nginx static", full and r is not None and r <= 1.5, f"{fmt(r, 'x')}")
    a, b = g("rss_rm_mib"), g("rss_ref_mib")
    check("peak RSS <= reference", a is not None and b is not None and a <= b, f"{fmt(a, 'MiB')} vs {fmt(b, 'MiB')}")
    w = max(len(c[0]) for c in checks)
    for name, ok, detail in checks:
        p(f"  {'PASS' if ok else 'MISS'}  {name.ljust(w)}  {detail}")
        results_ok += ok
    p(f"  {results_ok}/{len(checks)} targets met")
    busy = [(k[len("foreign_"):-len("_pct")], num(f, k)) for k in f if k.startswith("foreign_") and k.endswith("_pct")]
    busy = [(k, v) for k, v in busy if v is not None and v >= 10]
    if busy:
        p("  WARNING other processes used the machine during: "
          + ", ".join(f"{k} ({v:.0f}%)" for k, v in busy) + " - re-run on a quiet machine")
    notes = [v for k, v in sorted(f.items()) if k.startswith("note")]
    if notes:
        p("")
        p("notes")
        for v in notes:
            p(f"  - {v}")

    text = "\n".join(out) + "\n"
    sys.stdout.write(text)
    with open(results, "w", encoding="utf-8") as fh:
        fh.write(text)


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "ports":
        ports(int(args[0]))
    elif cmd == "median":
        median(args)
    elif cmd == "upstream-count":
        upstream_count(args[0], args[1])
    elif cmd == "wrk-parse":
        wrk_parse(args[0])
    elif cmd == "stime-parse":
        stime_parse(args[0])
    elif cmd == "metric":
        metric(args[0], args[1], args[2:])
    elif cmd == "cpu-snap":
        cpu_snap(args[0], args[1:])
    elif cmd == "cpu-diff":
        cpu_diff(args[0], args[1])
    elif cmd == "settle":
        settle(args[0], args[1], args[2:])
    elif cmd == "wait-idle":
        wait_idle(args[0])
    elif cmd == "prefault":
        prefault(args[0])
    elif cmd == "verified-fetch":
        secs = verified_fetch(argv[2], argv[3])
        if secs is None:
            sys.exit(1)
        print(f"{secs:.3f}")
    elif cmd == "report":
        report(args[0], args[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
