"""The README stands on its own and its configuration table matches the settings model."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
ENV_PREFIX = "LORAGATE_"


def settings_env_vars(model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX) -> set[str]:
    """Every environment variable the settings model reads (nested groups joined with `__`)."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= settings_env_vars(annotation, f"{prefix}{name.upper()}__")
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


def documented_env_vars(text: str) -> set[str]:
    """The variables named in the first cell of the configuration table's rows. A cell may name
    several: `LORAGATE_LIMITS__MAX_N`, `__MAX_STOP` (a `__` name belongs to the group before it)."""
    section = text.split("## Configuration", 1)[1]
    names: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        group = ""
        for token in re.findall(r"`([A-Z0-9_]+)`", line.split("|")[1]):
            if token.startswith("__"):
                names.add(group + token)
            else:
                names.add(token)
                group = token.rsplit("__", 1)[0] if "__" in token else token
    return names


def test_every_setting_is_in_the_configuration_table() -> None:
    missing = settings_env_vars() - documented_env_vars(README.read_text())
    assert not missing, f"settings missing from the README's configuration table: {missing}"


def test_the_configuration_table_names_only_real_settings() -> None:
    unknown = documented_env_vars(README.read_text()) - settings_env_vars()
    assert not unknown, f"the README documents settings that do not exist: {unknown}"


def test_readme_never_points_outside_the_repository() -> None:
    text = README.read_text()
    assert "../" not in text, "the README points at a path outside the repository"
    for target in re.findall(r"\]\(([^)]+)\)", text):
        assert not re.match(r"[a-z]+://", target), f"external link in the README: {target}"
        assert (ROOT / target.split("#")[0]).exists(), f"the README links a missing file: {target}"
