"""`loragate engines list`: the gateway's engine pool, through the admin API."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from server.cli_adapters import DEFAULT_URL, AdminKeyOption, UrlOption, admin_api, ok_json

engines_app = typer.Typer(
    help="The gateway's engine pool, through the admin API.", no_args_is_help=True
)
out = Console()


@engines_app.command("list")
def list_engines(admin_key: AdminKeyOption, url: UrlOption = DEFAULT_URL) -> None:
    """Each engine: URL, up or down (and why), requests running and queued, adapters loaded."""
    with admin_api(url, admin_key) as client:
        engines = ok_json(client.get("engines"))["data"]
    table = Table("engine", "url", "state", "running", "queued", "adapters")
    for e in engines:
        reason = escape(e["reason"] or "")
        state = "[green]up[/green]" if e["ready"] else f"[red]down[/red] {reason}"
        adapters = ", ".join(d[:12] for d in e["adapters"])
        loaded = f"{len(e['adapters'])}: {adapters}" if adapters else "0"
        table.add_row(
            escape(e["name"]), escape(e["url"]), state, str(e["running"]), str(e["queued"]),
            escape(loaded),
        )  # fmt: skip
    out.print(table)
