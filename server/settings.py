"""The one typed settings object: environment variables `LORAGATE_*`, nested groups with `__`.

Nothing else in loragate reads `os.environ`; the CLI builds a `Settings` and hands it down.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import (
    BaseModel,
    Field,
    HttpUrl,
    RedisDsn,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters.store_url import parse_store_url
from server.engines.dtype import check_quantized_dtype
from server.model_prepare import DEFAULT_MODEL_NAME


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("loragate"))


class ModelSettings(BaseModel):
    name: str = Field(DEFAULT_MODEL_NAME, min_length=1, max_length=128)
    # The dir the engine serves. Unset: <cache_dir>/models/<name>, or with `quantization`
    # <cache_dir>/models/<name>-<quantization>, both built by `loragate model prepare`. Set, it
    # is served as it is and must hold what `quantization` says (a quantized dir when set).
    path: Path | None = None
    # `w4a16`: serve the int4-weight copy `loragate model prepare --quantize w4a16` builds
    # beside the full-precision model (docs/quantization.md). It needs 16-bit activations:
    # bfloat16 on vLLM's CPU build, and a CPU with AVX512-BF16 or AMX.
    quantization: Literal["none", "w4a16"] = "none"
    # The Python that runs the quantizer (llmcompressor); unset: <cache_dir>/quantize-venv,
    # which `loragate model prepare --quantize` creates on first use.
    quantize_python: Path | None = None
    # Bounds each step of `model prepare --quantize`: the venv's pip install, then the
    # quantizer (about 4 minutes for the default model on 2 cores).
    quantize_timeout_s: float = Field(1800, gt=0, le=86400)
    max_model_len: int = Field(2048, ge=64, le=1_048_576)
    # Names the weights in result-cache keys; defaults to the digest in the manifest that
    # `loragate model prepare` writes. Set it when serving weights loragate did not build.
    revision: str | None = Field(None, min_length=1, max_length=128)


ENGINE_URL = re.compile(r"^(dns\+)?https?://[A-Za-z0-9.\-\[\]:]{1,253}(:\d{1,5})?/?$")


class EngineSettings(BaseModel):
    # An engine run elsewhere; when neither this nor `urls` is set, `loragate serve` starts one
    # locally. Kept beside `urls` for one-engine set-ups.
    url: HttpUrl | None = None
    # The engine pool: `http://host:port` each, or `dns+http://name:port` for every address the
    # name resolves to, re-resolved every `dns_refresh_s` (a Kubernetes headless Service).
    urls: list[str] = Field(default_factory=list, max_length=64)
    dns_refresh_s: float = Field(5, ge=0.5, le=300)
    max_engines: int = Field(64, ge=1, le=1024)  # bounds the pool (and its metric series)
    # The secret gateways and engines share: the gateway sends it on every engine call, and
    # `loragate engine` refuses every call without it but /health. Unset with `serve`'s local
    # engine: a random one per start.
    api_key: SecretStr | None = Field(None, min_length=16, max_length=256)
    # How an engine gets an adapter's files: `path` hands it a directory of the store (a local
    # engine, or one that mounts the store's volume at the same path); `store` names the digest
    # and the engine fetches and verifies it itself (`loragate engine`). `auto`: `store` with
    # an s3:// store, else `path`.
    adapter_source: Literal["auto", "path", "store"] = "auto"
    # `fake` runs loragate's deterministic fake engine instead of vLLM: for tests and for
    # measuring the gateway alone. Never for users.
    kind: Literal["vllm", "fake"] = "vllm"
    # Private loopback port of the local engine; 0 picks a free one.
    port: int = Field(0, ge=0, le=65535)
    # `auto`: on vLLM's CPU build bf16 where the CPU has AVX512-BF16 or AMX, else fp32 (bf16 is
    # ~1.8x faster with them, ~4x slower without); elsewhere vLLM's own choice.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # On the CPU build this is the host-memory fraction; vLLM's default is refused on 8 GiB nodes.
    gpu_memory_utilization: float = Field(0.4, gt=0, le=1)
    # KV cache size in GiB (vLLM --kv-cache-memory-bytes); 0 lets vLLM size it from
    # gpu_memory_utilization (what GPU hosts want). 2 GiB holds ~45k tokens of the default model;
    # the fraction alone took 8 GiB on a 24 GiB machine, too much for tests that run two engines.
    kv_cache_gib: float = Field(2, ge=0, le=4096)
    max_lora_rank: int = Field(16, ge=1, le=512)
    max_loras: int = Field(4, ge=1, le=256)  # adapters batched together on the engine
    extra_args: list[str] = Field(default_factory=list)
    startup_timeout_s: float = Field(600, gt=0)
    # What `loragate serve` does when its local engine dies: restart it, or exit non-zero
    # after `exit_grace_s` of answering 503 (time for a load balancer to see /readyz fail).
    restart: bool = False
    exit_grace_s: float = Field(5, ge=0, le=600)
    health_interval_s: float = Field(2, gt=0, le=60)
    # How often a ready engine's model list is read again: which adapters it holds, including
    # those other gateway replicas loaded or unloaded there.
    models_refresh_s: float = Field(15, ge=1, le=3600)
    # How often a ready engine's /metrics is read for its own running and waiting counts
    # (loragate_engine_reported_requests, part of the autoscalers' queue signal).
    load_poll_s: float = Field(5, ge=1, le=3600)
    # How often `loragate engine --merged` reads its adapter's record: it stops serving a
    # replaced, demoted or deleted version, and starts on a new merged copy, within this.
    merged_poll_s: float = Field(5, ge=0.2, le=3600)
    request_timeout_s: float = Field(600, gt=0)
    connect_timeout_s: float = Field(2, gt=0)

    @field_validator("urls")
    @classmethod
    def _engine_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if ENGINE_URL.fullmatch(url) is None:
                raise ValueError(
                    f"engine URL {url[:80]!r} is not http(s)://host:port or dns+http(s)://name:port"
                )
        return urls

    def pool_urls(self) -> list[str]:
        """Every configured engine URL, `url` first; empty: `serve` runs a local engine."""
        urls = ([str(self.url)] if self.url is not None else []) + self.urls
        return list(dict.fromkeys(u.rstrip("/") for u in urls))


# vLLM accepts only these values for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class AdapterSettings(BaseModel):
    max_upload_bytes: int = Field(256 << 20, ge=1 << 20, le=4 << 30)  # the whole PUT body
    max_config_bytes: int = Field(64 << 10, ge=1024, le=1 << 20)
    max_per_tenant: int = Field(1000, ge=1, le=100_000)
    # How long a request waits for an adapter slot when every loaded adapter is busy.
    wait_for_slot_s: float = Field(30, gt=0, le=600)
    # An unreferenced adapter version younger than this is not swept: another replica sharing
    # the store may be between storing it and writing its record.
    orphan_grace_s: float = Field(600, ge=60, le=86400)
    sweep_interval_s: float = Field(3600, ge=10, le=86400)  # also once at start-up
    # An s3:// registry serves a record from memory this long: a delete or replace through
    # another replica is honoured everywhere within it (file:// records are checked each time).
    record_ttl_s: float = Field(1, gt=0, le=60)
    # How long a merge (`adapters merge`: the base plus one adapter, in full precision) may run
    # before it is stopped; about 20 s for the default model.
    merge_timeout_s: float = Field(900, gt=0, le=86400)


class LimitSettings(BaseModel):
    max_body_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)
    max_tokens: int = Field(1024, ge=1)  # largest max_tokens a caller may ask for
    default_max_tokens: int = Field(256, ge=1)  # used when a request names none
    max_n: int = Field(4, ge=1, le=128)
    max_stop: int = Field(4, ge=0, le=64)
    max_messages: int = Field(256, ge=1, le=10_000)

    @model_validator(mode="after")
    def _default_within_max(self) -> LimitSettings:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must not exceed max_tokens")
        return self


class CacheSettings(BaseModel):
    """The result cache: Redis when `redis_url` is set, else an in-process LRU."""

    enabled: bool = True
    ttl_s: int = Field(3600, ge=1, le=30 * 86400)
    max_entry_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)  # larger results are not stored
    memory_max_bytes: int = Field(64 << 20, ge=1 << 20, le=64 << 30)  # the in-process LRU
    # How long an identical request waits for the one in flight before calling the engine itself.
    coalesce_wait_s: float = Field(120, gt=0, le=3600)
    # A coalescing claim in Redis expires this long after its last renewal (its leader renews it
    # every third of this while it computes): how long other replicas can be held up by the
    # claim of a replica that died.
    claim_ttl_s: float = Field(10, ge=3, le=3600)


class RedisSettings(BaseModel):
    # Every Redis command gets this long to answer; past it the request goes on without Redis.
    # Redis answers in well under a millisecond on a healthy network.
    timeout_s: float = Field(0.1, gt=0, le=10)
    # Opening a connection gets longer: a burst opens many at once. A dead Redis refuses them
    # at once; only an unreachable host costs this, once per retry period.
    connect_timeout_s: float = Field(1, gt=0, le=30)
    # This many failed calls in a row open the breaker (a refused connection opens it at once).
    # One slow reply is usually a busy host, not a dead Redis: it must not cost the cache.
    failure_threshold: int = Field(3, ge=1, le=1000)
    # An open breaker leaves Redis alone this long (requests go on without it), then one call
    # tries it again: success closes the breaker, failure opens it for another period.
    retry_after_s: float = Field(2, gt=0, le=300)
    # A tenant's concurrency lease in Redis expires this long after its last renewal; a running
    # request renews it every third of this. A replica that dies gives its slots back within it.
    lease_ttl_s: float = Field(30, ge=3, le=3600)
    key_prefix: str = Field("loragate", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")


class AdmissionSettings(BaseModel):
    """A bound on the work each engine holds: `max_running` requests sent to it at once, and
    `max_queued` more waiting in the gateway; beyond that, 503 with Retry-After."""

    max_running: int = Field(64, ge=1, le=100_000)
    max_queued: int = Field(256, ge=0, le=1_000_000)
    queue_timeout_s: float = Field(30, gt=0, le=3600)


class MetricsSettings(BaseModel):
    """The Prometheus listener, apart from the public port: its series name every tenant and
    adapter, and it has no key. Bind it where only the scraper reaches it."""

    host: str = Field("127.0.0.1", min_length=1, max_length=255)
    # 0 picks a free port (logged at start): for several gateways on one host, e.g. in tests.
    port: int = Field(9464, ge=0, le=65535)


class ServerSettings(BaseModel):
    """Bounds on what a connection to the public port may hold before any route, and so before
    authentication, runs: every caller gets them, keyed or not."""

    # The request line and headers together; a larger head gets 400 and the connection closed.
    max_header_bytes: int = Field(64 << 10, ge=4 << 10, le=1 << 20)
    # From connecting (or the first byte after a response) to the end of the request's headers;
    # the connection is closed past it. uvicorn has no such timeout: loragate adds it.
    header_timeout_s: float = Field(10, gt=0, le=300)
    # A response's writes may stall this long (the client reads nothing: its socket buffers are
    # full) before the connection is aborted and the request's engine slot and quota freed.
    send_timeout_s: float = Field(30, gt=0, le=3600)
    # An idle connection between requests is closed after this. Behind a load balancer that
    # reuses connections, set it above the balancer's idle timeout.
    keep_alive_timeout_s: int = Field(5, ge=1, le=3600)
    # Open connections (or requests in progress) at once; beyond, uvicorn answers 503. High:
    # it only stops a flood, the admission queue bounds the work.
    max_connections: int = Field(2048, ge=1, le=1_000_000)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LORAGATE_", env_nested_delimiter="__", extra="forbid"
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    cache_dir: Path = Field(default_factory=default_cache_dir)
    # Adapter files and the registry; defaults to <cache_dir>/store. With a pool, a volume
    # shared by every gateway replica and the engines, or `store_url`.
    store_dir: Path | None = None
    # Where adapters live: `file:///abs/path` (the layout of `store_dir`, which it replaces) or
    # `s3://bucket/prefix` on any S3-compatible service, configured as every AWS tool is
    # (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).
    store_url: str | None = Field(None, max_length=1024)
    # Adapters loaded on the engine at once (vLLM's --max-cpu-loras); the least asked-for
    # idle one is unloaded to make room.
    max_loaded_adapters: int = Field(8, ge=1, le=1024)
    tenants_file: Path | None = None
    # A tenants file marked `dev: true` (public keys) is refused on a non-loopback `host`
    # unless this says the exposure is meant (`loragate serve --allow-dev-tenants`).
    allow_dev_tenants: bool = False
    # Shared cache, coalescing and tenant limits across gateway replicas; unset: in-process only.
    redis_url: RedisDsn | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    model: ModelSettings = Field(default_factory=ModelSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    adapters: AdapterSettings = Field(default_factory=AdapterSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)

    @property
    def model_path(self) -> Path:
        """The dir the engine serves: `model.path`, or the one `model prepare` builds."""
        return self.model_dir(self.model.quantization)

    def model_dir(self, quantization: str) -> Path:
        """Where the base model is, full precision (`none`) or quantized: `model.path` when it
        names that form, else under the cache dir, the quantized dir beside the other."""
        model = self.model
        if model.path is not None and model.quantization == quantization:
            return model.path
        if model.path is not None and model.quantization == "none":
            full = model.path
        else:
            full = self.cache_dir / "models" / model.name
        return full if quantization == "none" else full.with_name(f"{full.name}-{quantization}")

    @property
    def store_path(self) -> Path:
        return self.store_dir or self.cache_dir / "store"

    @property
    def store_location(self) -> str:
        """`store_url`, or the store dir as a file:// URL."""
        return self.store_url or self.store_path.resolve().as_uri()

    @field_validator("store_url")
    @classmethod
    def _store_url(cls, url: str | None) -> str | None:
        if url is not None:
            parse_store_url(url)  # its ValueError says what is wrong
        return url

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.limits.max_tokens >= self.model.max_model_len:
            raise ValueError("limits.max_tokens must be below model.max_model_len")
        if self.engine.max_loras > self.max_loaded_adapters:
            raise ValueError(
                f"engine.max_loras ({self.engine.max_loras}) must not exceed "
                f"max_loaded_adapters ({self.max_loaded_adapters})"
            )
        if self.engine.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"engine.max_lora_rank must be one of {VLLM_LORA_RANKS}")
        if self.engine.kind == "vllm" and not self.engine.pool_urls():
            # Before anything starts: a quantized base the engine cannot run fails here, once.
            check_quantized_dtype(self.engine.dtype, self.model.quantization)
        return self
