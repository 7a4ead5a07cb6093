"""A gateway-only install (no engine extra: the `--engine-url` and Kubernetes gateway) has every
package the gateway imports, and the ones its frameworks load only on demand."""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata as md
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OWN_PACKAGES = {"server", "adapters", "tests"}
# Starlette parses multipart forms (adapter uploads) with python-multipart but declares it only
# as optional: without it every upload is a 500.
LOADED_ON_DEMAND = {"python-multipart"}
# Imported only where an engine runs, which has the engine extra: torch inside `loragate model
# prepare`, vllm inside the store resolver plugin (which runs in vLLM's own process), peft inside
# the merge worker (which a gateway without them refuses to start: 501).
ENGINE_HOST_ONLY = {"torch", "vllm", "peft"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def base_requirements(distribution: str = "loragate") -> set[str]:
    """The distribution's dependencies without extras, and theirs, transitively."""
    seen: set[str] = set()
    todo = [r for r in md.requires(distribution) or [] if "extra ==" not in r]
    while todo:
        name = _name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        with contextlib.suppress(md.PackageNotFoundError):
            todo += [r for r in md.requires(name) or [] if "extra ==" not in r]
    return seen


def imported_top_level_modules() -> set[str]:
    modules: set[str] = set()
    for path in [*ROOT.joinpath("server").rglob("*.py"), *ROOT.joinpath("adapters").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        # Imports under `if TYPE_CHECKING:` never run: type stubs need not be installed.
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
            for stmt in node.body
            for n in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module.split(".")[0])
    ignored = OWN_PACKAGES | ENGINE_HOST_ONLY | set(sys.stdlib_module_names) | {"__future__"}
    return modules - ignored


def test_packages_loaded_on_demand_are_declared() -> None:
    direct = {_name(r) for r in md.requires("loragate") or [] if "extra ==" not in r}
    assert direct >= LOADED_ON_DEMAND


def test_every_module_the_gateway_imports_comes_with_a_plain_install() -> None:
    installed = base_requirements()
    distributions = md.packages_distributions()
    for module in sorted(imported_top_level_modules()):
        names = {_name(d) for d in distributions.get(module, [])}
        assert names & installed, f"`import {module}` needs {names or '?'}, not a base dependency"
