"""Resident memory of a router process holding N mapped sessions (default 1,000,000).

    .venv/bin/python bench/memory.py [--sessions 1000000] [--id-style bench|uuid|waha]

Starts the real ``router.server.Server`` (memory store, four instances, the
benchmark config of ``bench/serve_router.py``) in a child process, maps the
sessions in batches of 100,000 through ``SessionMap.assign_many`` (the path
discovery and failover use), then reports the child's resident set size
(VmRSS) before and after, its peak (VmHWM) and the cost per session.
Target: at most 250 MB with 1,000,000 sessions.

Session id styles: ``bench`` (``sess-123456``, what peers.sh sends), ``uuid``
(36 characters, a worst case for typical ids) and ``waha`` (``tenant-00123-wa-04``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import subprocess
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH = 100_000
TARGET_MB = 250


def rss() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return out


def session_id(style: str, n: int) -> str:
    if style == "uuid":
        return str(uuid.UUID(int=n * 0x9E3779B97F4A7C15 % (1 << 128)))
    if style == "waha":
        return f"tenant-{n // 8:05d}-wa-{n % 8:02d}"
    return f"sess-{n}"


async def child(sessions: int, style: str) -> dict[str, float | int | str]:
    sys.path.insert(0, str(HERE))
    from serve_router import bench_config

    from router.server import Server

    server = Server(bench_config(0, sessions))
    await server.startup()
    try:
        rt = server.runtime
        assert rt is not None
        gc.collect()
        before = rss()
        names = [i.name for i in rt.fleet]
        for start in range(1, sessions + 1, BATCH):
            batch = {
                session_id(style, n): names[n % len(names)]
                for n in range(start, min(start + BATCH, sessions + 1))
            }
            await rt.smap.assign_many(batch)
            del batch
        gc.collect()
        after = rss()
        mapped = len(rt.smap)
    finally:
        await server.shutdown()
    return {
        "sessions": mapped,
        "style": style,
        "rss_before_mib": round(before["VmRSS"], 1),
        "rss_after_mib": round(after["VmRSS"], 1),
        "peak_mib": round(after["VmHWM"], 1),
        "bytes_per_session": round((after["VmRSS"] - before["VmRSS"]) * 1024 * 1024 / mapped),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=1_000_000)
    ap.add_argument("--id-style", choices=("bench", "uuid", "waha"), default="bench")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        logging.basicConfig(level=logging.CRITICAL)
        print(json.dumps(asyncio.run(child(ns.sessions, ns.id_style))))
        return
    cmd = [sys.executable, __file__, "--child", "--sessions", str(ns.sessions)]
    cmd += ["--id-style", ns.id_style]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    mb = result["rss_after_mib"] * 1.048576  # MiB -> MB
    verdict = "OK" if mb <= TARGET_MB else "OVER"
    print(
        f"{result['sessions']:,} sessions ({result['style']} ids): RSS "
        f"{result['rss_before_mib']} MiB empty -> {result['rss_after_mib']} MiB "
        f"({mb:.0f} MB, target <= {TARGET_MB} MB: {verdict}); peak {result['peak_mib']} MiB; "
        f"{result['bytes_per_session']} bytes per session"
    )


if __name__ == "__main__":
    main()
