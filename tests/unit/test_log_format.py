"""No log line can be forged: control characters in a record are escaped by the formatter
`loragate serve` installs, and tracebacks keep their lines but can never start a record."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import pytest

from server.cli import configure_logging
from server.log_format import EscapingFormatter, escape_controls

FORMAT = "%(levelname)s %(name)s: %(message)s"


def record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("server.test", logging.WARNING, __file__, 1, msg, args, None)


def test_controls_are_escaped_and_the_rest_kept() -> None:
    text = "x\nFAKE\rLINE\t\x1b[31m\x00\x7f\x85\u2028 é ü \\n"
    assert escape_controls(text) == "x\\nFAKE\\rLINE\\t\\x1b[31m\\x00\\x7f\\x85\\u2028 é ü \\n"


def test_formatter_makes_one_line_of_a_message_with_line_breaks() -> None:
    line = EscapingFormatter(FORMAT).format(record("upload %s refused", "x\nWARNING forged: yes"))
    assert line == "WARNING server.test: upload x\\nWARNING forged: yes refused"


def test_formatter_escapes_a_message_built_without_args() -> None:
    line = EscapingFormatter(FORMAT).format(record("a\r\nb\x1b[2Jc"))
    assert line == "WARNING server.test: a\\r\\nb\\x1b[2Jc"


def test_traceback_lines_are_indented_so_none_starts_a_record() -> None:
    try:
        raise ValueError("bad name\nWARNING forged: yes")
    except ValueError:
        exc = record("failed")
        exc.exc_info = sys.exc_info()
    lines = EscapingFormatter(FORMAT).format(exc).splitlines()
    assert lines[0] == "WARNING server.test: failed"
    assert len(lines) > 3 and all(line.startswith("    ") for line in lines[1:])
    assert "    WARNING forged: yes" in lines  # the exception's own text stays readable


@pytest.fixture
def restored_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("restored_root_logger")
def test_serve_logging_escapes_every_record(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    logging.getLogger("anything.else").warning("adapter %s", "x\nFAKE LINE")
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.rstrip("\n").endswith("WARNING anything.else: adapter x\\nFAKE LINE")
