"""`loragate engine`'s supervisor: SIGTERM while the engine is still loading stops it at once
(a pod deleted during a minutes-long vLLM load must not wait for the load to finish)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from server.engine_servers.engine_command import supervise
from server.engines.process import EngineProcess, free_loopback_port
from tests.api.conftest import make_settings


async def test_a_stop_while_the_engine_loads_ends_at_once(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, engine={"startup_timeout_s": 600})
    # An engine that never answers /health: it only sleeps.
    process = EngineProcess([sys.executable, "-c", "import time; time.sleep(600)"], None)
    stop = asyncio.Event()
    url = f"http://127.0.0.1:{free_loopback_port()}"
    task = asyncio.create_task(supervise(process, settings, url, stop=stop))
    await asyncio.sleep(1.0)
    assert not task.done()
    started = time.monotonic()
    stop.set()
    assert await asyncio.wait_for(task, 30) == 0
    assert time.monotonic() - started < 10
    assert process.returncode() is not None
