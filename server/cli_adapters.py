"""`loragate adapters`: push, list, show and remove tenants' adapters through the admin API.

Every request goes through `make_client`, the one seam tests replace with an in-memory transport.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from adapters.types import CONFIG_FILE, WEIGHTS_FILE

adapters_app = typer.Typer(help="Tenants' adapters, through the admin API.", no_args_is_help=True)

out = Console()
err = Console(stderr=True)

DEFAULT_URL = "http://127.0.0.1:8000"
CONNECT_TIMEOUT_S = 10.0
# Uploads are hundreds of MB, and the server digests and validates them before it answers.
TRANSFER_TIMEOUT_S = 600.0
RESULT_HEADER = "x-loragate-result"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl"})
RECORD_FIELDS = ("tenant", "name", "digest", "rank", "alpha", "target_modules", "size_bytes")

UrlOption = Annotated[
    str, typer.Option("--url", envvar="LORAGATE_ADMIN_URL", help="Where loragate serves.")
]
AdminKeyOption = Annotated[
    str,
    typer.Option(
        "--admin-key",
        envvar="LORAGATE_ADMIN_KEY",
        show_default=False,
        help="Admin API key. Prefer the env var: other users can read a process's arguments.",
    ),
]
TenantOption = Annotated[str, typer.Option("--tenant", "-t", help="Tenant owning the adapter.")]
NameArgument = Annotated[str, typer.Argument(help="Adapter name.", show_default=False)]


def make_client(
    url: str, admin_key: str, transport: httpx.BaseTransport | None = None
) -> httpx.Client:
    """A client for the admin API under `url`; request paths are relative to /admin/v1/."""
    return httpx.Client(
        base_url=url.rstrip("/") + "/admin/v1/",
        headers={"Authorization": f"Bearer {admin_key}"},
        timeout=httpx.Timeout(TRANSFER_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        transport=transport,
    )


def fail(
    message: str, *, status: int | None = None, hint: str | None = None, code: int = 1
) -> NoReturn:
    # Messages carry server and file-system text: escape it, or rich would read "[x]" as markup.
    label = "error" if status is None else f"error ({status})"
    err.print(f"[red]{label}:[/red] {escape(message)}")
    if hint:
        err.print(f"  hint: {escape(hint)}")
    raise typer.Exit(code)


def checked_key(admin_key: str) -> str:
    key = admin_key.strip()
    # httpx and h11 quote a header value they refuse in their error message: the key would leak.
    if not key or not key.isascii() or not key.isprintable() or " " in key:
        fail("the admin key is empty or holds characters an HTTP header cannot carry", code=2)
    return key


@contextmanager
def admin_api(url: str, admin_key: str) -> Iterator[httpx.Client]:
    """The admin API client; a transport failure becomes one readable line and exit 1."""
    try:
        with make_client(url, checked_key(admin_key)) as client:
            yield client
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as e:
        fail(f"cannot reach loragate at {url}: {str(e) or type(e).__name__}")
    except httpx.TimeoutException:
        fail(f"loragate at {url} did not answer within {TRANSFER_TIMEOUT_S:.0f} s")
    except httpx.WriteError as e:
        # A server may refuse a large upload before reading it all and close the connection.
        fail(f"the upload to {url} broke off: {e}", hint="the server may have refused it early")
    except httpx.TransportError as e:
        fail(f"talking to loragate at {url} failed: {str(e) or type(e).__name__}")
    except httpx.InvalidURL as e:
        fail(f"invalid --url {url!r}: {e}", code=2)


def ok_json(response: httpx.Response, hints: dict[int, str] | None = None) -> Any:
    """The decoded body of a 2xx answer; anything else is reported and exits 1."""
    if response.is_success:
        try:
            return response.json()
        except ValueError:
            fail(f"unexpected answer from {response.url}: not JSON; is --url pointing at loragate?")
    error = envelope_error(response)
    message = str(error.get("message") or response.reason_phrase)
    details = ", ".join(f"{k}: {error[k]}" for k in ("param", "code") if error.get(k))
    hint = (hints or {}).get(response.status_code)
    if response.status_code == 401:
        hint = "check --admin-key or LORAGATE_ADMIN_KEY: it must be the admin key, not a tenant's"
    details = f" ({details})" if details else ""
    fail(message + details, status=response.status_code, hint=hint)


def envelope_error(response: httpx.Response) -> dict[str, Any]:
    """The `error` object of an OpenAI envelope, or a stand-in built from whatever came back."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"]  # type: ignore[no-any-return]
    # Not loragate's envelope (a proxy's page, another server): show the start of it.
    return {"message": f"{response.reason_phrase}: {response.text[:200].strip()}".rstrip(": ")}


def as_record(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        fail("unexpected answer from loragate: not an adapter record")
    return value


def adapter_path(tenant: str, name: str | None = None) -> str:
    # Quoted so that a typo like "a/b" reaches the server as one bad name, not as another route.
    path = f"tenants/{quote(tenant, safe='')}/adapters"
    return path if name is None else f"{path}/{quote(name, safe='')}"


def short_digest(digest: Any) -> str:
    return str(digest)[:12]


def human_time(value: Any) -> str:
    """created_at (ISO 8601, UTC) to the minute; anything unparsable is shown as it came."""
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%d %H:%M UTC")


def field_text(key: str, value: Any) -> str:
    if key == "target_modules" and isinstance(value, list):
        return ", ".join(str(m) for m in value)
    if key == "size_bytes" and isinstance(value, int):
        return f"{decimal(value)} ({value:,} bytes)"
    if key == "merged" and isinstance(value, list):
        copies = [
            f"{short_digest(c.get('key'))} ({c.get('scheme')}, base {c.get('base_revision')})"
            for c in value
            if isinstance(c, dict)
        ]
        return ", ".join(copies) or "no (hot-swapped only)"
    return str(value)


def record_table(record: dict[str, Any]) -> Table:
    """Every field of a record, known ones first; fields added by a newer server still show."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    keys = [*RECORD_FIELDS, "created_at"]
    keys += [k for k in record if k not in keys]
    for key in keys:
        if key in record:
            table.add_row(key, Text(field_text(key, record[key])))
    return table


def list_table(records: list[dict[str, Any]]) -> Table:
    table = Table("name", "digest", "rank", "alpha", "targets", "size", "created")
    for column in table.columns[:2]:
        column.no_wrap = True
    for r in records:
        size = r.get("size_bytes")
        cells = [
            r.get("name", ""),
            short_digest(r.get("digest", "")),
            r.get("rank", ""),
            r.get("alpha", ""),
            field_text("target_modules", r.get("target_modules", "")),
            decimal(size) if isinstance(size, int) else "",
            human_time(r.get("created_at", "")),
        ]
        table.add_row(*(Text(str(c)) for c in cells))
    return table


class CountingFile(io.FileIO):
    """A file that reports each read, so the progress bar follows httpx as it streams the body.

    A real FileIO (not a wrapper) so httpx finds fileno() and sends a Content-Length, which lets
    the server refuse an upload that is too large before it arrives.
    """

    def __init__(self, path: Path, on_read: Callable[[int], None]) -> None:
        super().__init__(path, "rb")
        self._on_read = on_read

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size) or b""
        self._on_read(len(chunk))
        return chunk


def adapter_files(adapter_dir: Path) -> tuple[Path, Path]:
    """The two files to upload, checked here so a wrong folder costs no upload."""
    config, weights = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    pickled = sorted(p.name for p in adapter_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if not weights.is_file() and pickled:
        fail(
            f"{adapter_dir} holds pickled weights ({', '.join(pickled)}), not {WEIGHTS_FILE}; "
            "loragate only accepts safetensors, since loading a pickle can run code",
            hint="convert it: load it with PEFT (PeftModel.from_pretrained(base_model, DIR)) and "
            "save it again with save_pretrained(OUT_DIR, safe_serialization=True)",
            code=2,
        )
    missing = [p.name for p in (config, weights) if not p.is_file()]
    if missing:
        fail(
            f"{adapter_dir} has no {' and no '.join(missing)}",
            hint=f"push takes the folder PEFT's save_pretrained writes: {CONFIG_FILE} and "
            f"{WEIGHTS_FILE}",
            code=2,
        )
    return config, weights


def upload(
    client: httpx.Client, path: str, files: tuple[Path, Path], *, replace: bool, label: str
) -> httpx.Response:
    """PUT both files as multipart, streamed from disk in httpx's 64 KiB chunks, with a bar."""
    config, weights = files
    total = config.stat().st_size + weights.stat().st_size
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    progress = Progress(*columns, TransferSpeedColumn(), TimeRemainingColumn(), console=err)
    with progress, ExitStack() as stack:
        task = progress.add_task(f"uploading {escape(label)}", total=total)
        sent = 0

        def on_read(n: int) -> None:
            nonlocal sent
            sent += n
            # Once every byte is out the server is digesting and validating: say so.
            done = "waiting for loragate to check it" if sent >= total else None
            progress.update(task, advance=n, description=done)

        def open_counting(file: Path) -> CountingFile:
            try:
                return stack.enter_context(CountingFile(file, on_read))
            except OSError as e:
                fail(f"cannot read {file}: {e.strerror}", code=2)

        parts = {
            "adapter_config": (CONFIG_FILE, open_counting(config), "application/json"),
            "adapter_model": (WEIGHTS_FILE, open_counting(weights), "application/octet-stream"),
        }
        params = {"replace": "true"} if replace else None
        response = client.put(path, files=parts, params=params)
        progress.update(task, description=f"sent {escape(label)}")
        return response


@adapters_app.command("push")
def push(
    adapter_dir: Annotated[
        Path,
        typer.Argument(
            metavar="DIR",
            exists=True,
            file_okay=False,
            help=f"Folder holding {CONFIG_FILE} and {WEIGHTS_FILE} (PEFT's save_pretrained).",
        ),
    ],
    tenant: TenantOption,
    name: Annotated[str, typer.Option("--name", "-n", help="Name the tenant will call it by.")],
    admin_key: AdminKeyOption,
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace the adapter if the name holds another.")
    ] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Upload an adapter for a tenant: created, unchanged (same content) or replaced."""
    files = adapter_files(adapter_dir)
    conflict_hint = f"pass --replace to replace what {tenant}/{name} holds now"
    with admin_api(url, admin_key) as client:
        response = upload(
            client, adapter_path(tenant, name), files, replace=replace, label=f"{tenant}/{name}"
        )
        record = as_record(ok_json(response, hints={409: conflict_hint}))
    default = "created" if response.status_code == 201 else "unchanged"
    result = response.headers.get(RESULT_HEADER, default)
    colour = "yellow" if result == "unchanged" else "green"
    out.print(f"[{colour}]{escape(result)}[/{colour}] {escape(tenant)}/{escape(name)}")
    out.print(record_table(record))


@adapters_app.command("list")
def list_adapters(
    tenant: TenantOption, admin_key: AdminKeyOption, url: UrlOption = DEFAULT_URL
) -> None:
    """A tenant's adapters, one line each."""
    with admin_api(url, admin_key) as client:
        body = ok_json(client.get(adapter_path(tenant)))
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        fail("unexpected answer from loragate: not an adapter list")
    if not data:
        err.print(f"tenant {escape(tenant)} has no adapters")
        return
    out.print(list_table([as_record(r) for r in data]))


@adapters_app.command("show")
def show(
    name: NameArgument,
    tenant: TenantOption,
    admin_key: AdminKeyOption,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Every field of one adapter."""
    with admin_api(url, admin_key) as client:
        record = as_record(ok_json(client.get(adapter_path(tenant, name))))
    out.print(record_table(record))


@adapters_app.command("rm")
def rm(
    name: NameArgument,
    tenant: TenantOption,
    admin_key: AdminKeyOption,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Delete an adapter; requests naming it fail from then on."""
    if not yes:
        typer.confirm(f"delete adapter {name} of tenant {tenant}?", abort=True)
    with admin_api(url, admin_key) as client:
        record = as_record(ok_json(client.delete(adapter_path(tenant, name))))
    digest = short_digest(record.get("digest", ""))
    out.print(f"deleted {escape(tenant)}/{escape(name)} (digest {escape(digest)})")


# A merge runs on the gateway for as long as the merge takes (LORAGATE_ADAPTERS__MERGE_TIMEOUT_S).
MERGE_TIMEOUT_S = 960.0


@adapters_app.command("merge")
def merge(
    name: NameArgument,
    tenant: TenantOption,
    admin_key: AdminKeyOption,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Promote an adapter: merge its current version into the base model and store it, for
    `loragate engine --merged TENANT/NAME` to serve with no LoRA cost. Requests for it go to
    such an engine while one is up, hot-swapped otherwise."""
    with (
        admin_api(url, admin_key) as client,
        err.status(f"merging {escape(tenant)}/{escape(name)}"),
    ):
        response = client.post(adapter_path(tenant, name) + "/merge", timeout=MERGE_TIMEOUT_S)
        record = as_record(ok_json(response))
    copies = record.get("merged") or []
    keys = ", ".join(short_digest(str(c.get("key", ""))) for c in copies if isinstance(c, dict))
    out.print(f"merged {escape(tenant)}/{escape(name)}: {escape(keys)}")
    out.print(f"serve it with: loragate engine --merged {escape(tenant)}/{escape(name)}")


@adapters_app.command("demote")
def demote(
    name: NameArgument,
    tenant: TenantOption,
    admin_key: AdminKeyOption,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Undo a promotion: the adapter is hot-swapped only, from the next request on."""
    with admin_api(url, admin_key) as client:
        ok_json(client.delete(adapter_path(tenant, name) + "/merge"))
    out.print(f"demoted {escape(tenant)}/{escape(name)}: hot-swapped only")
