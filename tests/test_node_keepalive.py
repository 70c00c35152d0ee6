"""Against a real Node.js HTTP server with its default 5 s keep-alive.

Node closes idle sockets after ``keepAliveTimeout`` (5 s). A proxy that keeps
pooled connections longer sends the next request into a socket Node is
closing and answers 502: the classic stale keep-alive error. The idle gaps
here are the scenario under test, not synchronisation.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.router import StartRouter

NODE_SERVER = Path(__file__).parent / "node" / "upstream.js"
# Gaps longer than Node's default keepAliveTimeout of 5 s, and gaps right at
# it, where a request can cross Node's FIN on the wire.
IDLE_GAPS = (5.5, 4.95, 5.0, 5.05)


@pytest.fixture
async def node_upstream() -> AsyncIterator[str]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: ./dev test installs Debian's nodejs")
    proc = await asyncio.create_subprocess_exec(
        node,
        str(NODE_SERVER),
        env={**os.environ, "PORT": "0", "SESSIONS": "node-1"},
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), timeout=15)).decode()
    assert line.startswith("NODE READY "), line
    yield f"http://127.0.0.1:{int(line.split()[2])}"
    proc.terminate()
    await proc.wait()


async def test_idle_gaps_longer_than_node_keepalive_cause_no_errors(
    node_upstream: str, start_router: StartRouter
) -> None:
    router = await start_router([node_upstream], instance_key=None)
    statuses: list[int] = []
    async with router.client() as http:
        async with http.get(f"{node_upstream}/_node/stats") as resp:
            assert (await resp.json())["keepAliveTimeout"] == 5000
        for round_, gap in enumerate((0.0, *IDLE_GAPS)):
            await asyncio.sleep(gap)
            async with http.get(f"{router.url}/api/node-1/profile") as resp:
                statuses.append(resp.status)
            send = {"session": "node-1", "chatId": f"{round_}@c.us", "text": "hi"}
            async with http.post(f"{router.url}/api/sendText", json=send) as resp:
                statuses.append(resp.status)
        async with http.get(f"{node_upstream}/_node/stats") as resp:
            sends = (await resp.json())["sends"]
    assert statuses == [200, 201] * (len(IDLE_GAPS) + 1)
    assert sends == len(IDLE_GAPS) + 1
