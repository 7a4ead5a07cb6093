"""Log lines that a caller cannot forge: control characters (CR, LF, ESC, …) in anything logged
are shown as escapes, so one record is one line whatever a URL or upload put into it."""

from __future__ import annotations

import logging
import re

# C0 controls, DEL and C1 controls (NEL among them), and the Unicode line and paragraph
# separators that some log viewers break lines on.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character written as a Python-style escape (`\\n`, `\\x1b`)."""
    return _CONTROL.sub(_escape, text)


class EscapingFormatter(logging.Formatter):
    """A `logging.Formatter` whose record line has no control characters. Tracebacks and
    stacks keep their lines (they are read that way), each indented so that no line of one,
    an exception message included, can pass for the start of another record."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # A message's own trailing newline (uvicorn ends some with one) would only show as `\n`.
        return escape_controls(super().formatMessage(record).rstrip("\r\n"))

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    " + escape_controls(line) for line in text.splitlines())
