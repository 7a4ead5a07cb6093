"""Merged adapters end to end: a gateway in front of a real vLLM base engine (adapters hot-
swapped) and a real vLLM merged engine (`loragate engine --merged`), sharing a file store.

The merged engine's greedy answers equal transformers+PEFT with the unmerged adapter; the same
name through the hot-swap path answers the same; a replaced adapter is never sent to the merged
copy of its old version, which the merged engine then retires by itself (and serves the adapter
again once its current version is promoted); stopping the merged engine falls back to hot-swap
with no failed request.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from server.engines.process import free_loopback_port
from tests.adapter_factory import write_peft_adapter
from tests.e2e.conftest import (
    LORAGATE,
    VLLM_START_TIMEOUT_S,
    ServeProcess,
    default_model_path,
    start_serve,
)
from tests.e2e.reference import greedy_references
from tests.e2e.test_fleet import EngineProc, wait_until
from tests.support import ADMIN_KEY, ENGINE_KEY, vllm_finished_requests

pytestmark = pytest.mark.e2e

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name a colour of the sky."}],
    [{"role": "user", "content": "Write one short sentence about cats."}],
]
MAX_TOKENS = 12
MIN_MARGIN = 0.02  # see test_adapters: near-ties may differ between two correct kernels
VISIBLE_SCALE = 3.0


@dataclass(frozen=True)
class Adapter:
    directory: Path
    references: list[str]  # transformers+PEFT greedy answer to each of PROMPTS


@dataclass
class Setup:
    gateway: ServeProcess
    base: EngineProc
    merged: EngineProc
    adapters: list[Adapter]
    spare_port: int  # in the gateway's pool, for a merged engine a test starts itself
    root: Path
    env: dict[str, str]  # what an engine of this set-up is started with

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return admin(self.gateway, method, path, **kwargs)

    def engines(self) -> dict[str, dict[str, Any]]:
        response = httpx.get(
            f"{self.gateway.url}/admin/v1/engines",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10,
        )  # fmt: skip
        return {e["url"]: e for e in response.json()["data"]}


def admin(gateway: ServeProcess, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method, f"{gateway.url}/admin/v1/tenants/acme/adapters/{path}",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=600, **kwargs,
    )  # fmt: skip


def make_adapters(root: Path, count: int) -> list[Adapter]:
    """`count` adapters whose references have clear margins on every prompt."""
    made: list[Adapter] = []
    seed = 300
    while len(made) < count:
        directory = write_peft_adapter(root / f"s{seed}", seed=seed, scale=VISIBLE_SCALE)
        refs = [
            greedy_references(default_model_path(), [directory], prompt, MAX_TOKENS)[0]
            for prompt in PROMPTS
        ]
        if all(r.min_margin >= MIN_MARGIN for r in refs):
            made.append(Adapter(directory, [r.text for r in refs]))
        seed += 1
        assert seed < 330, "near-ties should be the exception; the reference run looks broken"
    return made


def start_engine(root: Path, env: dict[str, str], port: int, *args: str) -> EngineProc:
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "engine.log"
    full_env = {**os.environ, **env, "LORAGATE_CACHE_DIR": str(root / "cache")}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [LORAGATE, "engine", "--host", "127.0.0.1", "--port", str(port), *args],
            env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return EngineProc(proc, port, log_path)


def wait_healthy(engine: EngineProc) -> None:
    def up() -> bool:
        assert engine.proc.poll() is None, engine.log()
        return engine.healthy()

    wait_until("healthy", up, VLLM_START_TIMEOUT_S, 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("merged")
    env = {
        "LORAGATE_STORE_URL": (root / "store").resolve().as_uri(),
        "LORAGATE_ENGINE__API_KEY": ENGINE_KEY,
        "LORAGATE_MODEL__PATH": str(default_model_path()),
        "LORAGATE_ENGINE__DTYPE": "float32",  # compared with transformers+PEFT in fp32
        "LORAGATE_ENGINE__MERGED_POLL_S": "0.5",
    }
    base = start_engine(root / "base", env, free_loopback_port())
    merged_port, spare_port = free_loopback_port(), free_loopback_port()
    merged: EngineProc | None = None
    gateway: ServeProcess | None = None
    try:
        adapters = make_adapters(root / "adapters", 2)  # while the engine starts
        wait_healthy(base)
        (root / "gateway").mkdir()
        urls = [
            arg
            for url in (base.url, *(f"http://127.0.0.1:{p}" for p in (merged_port, spare_port)))
            for arg in ("--engine-url", url)
        ]
        gateway = start_serve(
            root / "gateway", env={**env, "LORAGATE_ENGINE__HEALTH_INTERVAL_S": "0.5"}, args=urls
        )
        gateway.wait_ready(120)
        put = upload(gateway, adapters[0])
        assert put.status_code == 201, put.text
        promoted = admin(gateway, "POST", "hot/merge")
        assert promoted.status_code == 200, promoted.text
        [copy] = promoted.json()["merged"]
        assert copy["scheme"] == "none"
        merged = start_engine(root / "merged", env, merged_port, "--merged", "acme/hot")
        wait_healthy(merged)
        setup = Setup(gateway, base, merged, adapters, spare_port, root, env)
        digest = put.json()["digest"]
        wait_until(
            "the merged engine seen by the gateway",
            lambda: setup.engines()[merged.url]["merged"] == digest,
            30,
        )
        yield setup
    finally:
        if gateway is not None:
            gateway.stop()
        for engine in (merged, base):
            if engine is not None:
                engine.stop()


def upload(
    gateway: ServeProcess, adapter: Adapter, replace: bool = False, name: str = "hot"
) -> httpx.Response:
    files = {
        name: (path.name, path.read_bytes())
        for name, path in (
            ("adapter_config", adapter.directory / "adapter_config.json"),
            ("adapter_model", adapter.directory / "adapter_model.safetensors"),
        )
    }
    params = {"replace": "true"} if replace else {}
    return admin(gateway, "PUT", name, files=files, params=params)


def ask(setup: Setup, prompt: list[dict[str, str]], model: str = "hot") -> str:
    result = setup.gateway.client("acme", cached=False).chat.completions.create(
        model=model, messages=prompt, temperature=0, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
    )  # fmt: skip
    return result.choices[0].message.content or ""


def base_loads(setup: Setup) -> float:
    text = httpx.get(setup.gateway.metrics_url, timeout=10).text
    prefix = f'loragate_adapter_loads_total{{engine="{setup.base.name}",result="ok"}}'
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def served_as(setup: Setup, mode: str) -> float:
    text = httpx.get(setup.gateway.metrics_url, timeout=10).text
    prefix = f'loragate_generation_requests_total{{mode="{mode}",model="acme/hot"}}'
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_the_merged_engine_answers_as_transformers_peft_with_the_unmerged_adapter(
    setup: Setup,
) -> None:
    before = vllm_finished_requests(setup.merged.url)
    answers = [ask(setup, prompt) for prompt in PROMPTS]
    assert answers == setup.adapters[0].references
    assert vllm_finished_requests(setup.merged.url) >= before + len(PROMPTS)
    assert base_loads(setup) == 0  # never hot-swapped while the merged engine serves it


def test_a_replaced_adapter_hot_swaps_at_once_and_a_new_promotion_routes_back(
    setup: Setup,
) -> None:
    old, new = setup.adapters
    old_digest = setup.engines()[setup.merged.url]["merged"]
    replaced = upload(setup.gateway, new, replace=True)
    assert replaced.status_code == 201 and replaced.json()["merged"] == []
    served_merged = served_as(setup, "merged")
    # Nobody is sent to the old version's merged copy, from the next request on (which may
    # already be stopping: it retires the old version within a poll).
    assert [ask(setup, prompt) for prompt in PROMPTS] == new.references
    assert served_as(setup, "merged") == served_merged
    assert base_loads(setup) == 1
    # The merged engine retires its copy of the old version by itself (its vLLM stops); the
    # command stays up, waiting for a merged copy of the current version.
    wait_until("the old version retired", lambda: not setup.merged.healthy(), 60, 0.5)
    assert setup.merged.proc.poll() is None, setup.merged.log()

    # Back to the old content, promoted again (its merged copy is in the store already): the
    # waiting engine serves it again, and the gateway routes it there.
    assert upload(setup.gateway, old, replace=True).status_code == 201
    assert setup.admin("POST", "hot/merge").json()["merged"]
    wait_healthy(setup.merged)
    wait_until(
        "the merged engine back in the gateway's pool",
        lambda: (e := setup.engines()[setup.merged.url])["ready"] and e["merged"] == old_digest,
        60,
    )
    assert [ask(setup, prompt) for prompt in PROMPTS] == old.references
    assert vllm_finished_requests(setup.merged.url) >= len(PROMPTS)  # a new vLLM: from zero
    assert "was replaced" in setup.merged.log_path.read_text(errors="replace")


def test_stopping_the_merged_engine_falls_back_to_hot_swap_with_no_failed_request(
    setup: Setup,
) -> None:
    adapter = setup.adapters[0]
    count = 24

    def one(i: int) -> str:
        return ask(setup, PROMPTS[i % len(PROMPTS)])

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(count)]
        wait_until("a few answered", lambda: sum(f.done() for f in futures) >= 4, 120)
        setup.merged.proc.send_signal(signal.SIGTERM)  # the engine pod goes away
        answers = [f.result() for f in futures]  # any failure raises here
    assert answers == [adapter.references[i % len(PROMPTS)] for i in range(count)]
    setup.merged.proc.wait(60)
    # Served on, hot-swapped: counted as the fallback of a promoted adapter.
    fallbacks = served_as(setup, "fallback")
    assert [ask(setup, prompt) for prompt in PROMPTS] == adapter.references
    assert setup.engines()[setup.merged.url]["ready"] is False
    assert served_as(setup, "fallback") == fallbacks + len(PROMPTS)
    assert served_as(setup, "merged") > 0


def make_merge_only_adapter(out_dir: Path, seed: int, kind: str) -> Path:
    """An adapter hot-swapping cannot serve, made on the real base, with an effect that shows:
    `dora` (its magnitude vectors are the base's norms; lora_B scaled up), or
    `modules_to_save` (a trained copy of the LM head: the base's, plus seeded noise)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False, use_dora=kind == "dora",
        modules_to_save=["lm_head"] if kind == "modules_to_save" else None,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name and kind == "dora":
                    param.mul_(VISIBLE_SCALE)
                if ".modules_to_save." in name:
                    param.add_(torch.randn_like(param) * 0.01)
    model.save_pretrained(str(out_dir))
    (out_dir / "README.md").unlink(missing_ok=True)
    return out_dir


@pytest.mark.parametrize("kind", ["dora", "modules_to_save"])
def test_a_merge_only_adapter_is_refused_hot_swapped_and_served_merged_as_peft_answers(
    setup: Setup, kind: str
) -> None:
    name = kind.replace("_", "-")
    for seed in range(400, 420):
        directory = make_merge_only_adapter(setup.root / f"{name}{seed}", seed, kind)
        refs = [
            greedy_references(default_model_path(), [directory], prompt, MAX_TOKENS)[0]
            for prompt in PROMPTS
        ]
        if all(r.min_margin >= MIN_MARGIN for r in refs):
            break
    else:
        raise AssertionError(f"no {kind} adapter without near-ties in 20 seeds")
    put = upload(setup.gateway, Adapter(directory, []), name=name)
    assert put.status_code == 201, put.text
    assert put.json()["merge_only"] is True

    # Not served hot-swapped: a clear 503 until an engine serves it merged.
    with pytest.raises(openai.APIStatusError) as caught:
        ask(setup, PROMPTS[0], model=name)
    assert caught.value.status_code == 503
    assert "can only be served merged" in caught.value.message

    assert admin(setup.gateway, "POST", f"{name}/merge").status_code == 200
    engine = start_engine(
        setup.root / f"{name}-engine", setup.env, setup.spare_port, "--merged", f"acme/{name}"
    )
    try:
        wait_healthy(engine)
        digest = put.json()["digest"]
        wait_until(
            f"the {kind} merged engine seen by the gateway",
            lambda: setup.engines()[engine.url]["merged"] == digest,
            30,
        )
        answers = [ask(setup, prompt, model=name) for prompt in PROMPTS]
        assert answers == [r.text for r in refs]
        assert any(a != b for a, b in zip(answers, setup.adapters[0].references, strict=True))
    finally:
        engine.stop()
