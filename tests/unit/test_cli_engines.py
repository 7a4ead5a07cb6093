"""`loragate engines list` against an in-memory admin API."""

from __future__ import annotations

from functools import partial

import httpx
import pytest
from typer.testing import CliRunner

from server import cli_adapters
from server.cli import app
from tests.support import ADMIN_KEY

ENGINES = [
    {"name": "10.0.0.5:8100", "url": "http://10.0.0.5:8100", "ready": True, "reason": None,
     "running": 3, "queued": 1, "adapters": ["ab" * 32, "cd" * 32]},
    {"name": "10.0.0.6:8100", "url": "http://10.0.0.6:8100", "ready": False,
     "reason": "the engine is not reachable [or not healthy]", "running": 0, "queued": 0,
     "adapters": []},
]  # fmt: skip


def test_engines_list_shows_each_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"object": "list", "data": ENGINES})

    transport = httpx.MockTransport(handler)
    monkeypatch.setattr(
        cli_adapters, "make_client", partial(cli_adapters.make_client, transport=transport)
    )
    env = {"LORAGATE_ADMIN_KEY": ADMIN_KEY, "LORAGATE_ADMIN_URL": "http://gw", "COLUMNS": "200"}
    result = CliRunner().invoke(app, ["engines", "list"], env=env)
    assert result.exit_code == 0, result.output
    assert [str(r.url) for r in seen] == ["http://gw/admin/v1/engines"]
    assert seen[0].headers["authorization"] == f"Bearer {ADMIN_KEY}"
    lines = result.output.splitlines()
    up = next(line for line in lines if "10.0.0.5:8100" in line)
    assert "up" in up and " 3 " in up and " 1 " in up and "2: abababababab, cdcdcdcdcdcd" in up
    down = next(line for line in lines if "10.0.0.6:8100" in line)
    assert "down the engine is not reachable [or not healthy]" in down  # not read as markup
    assert ADMIN_KEY not in result.output
