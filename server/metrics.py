"""Every Prometheus metric loragate exports, on one registry per app.

Label values come only from bounded sets (route templates, status codes, fixed kinds), never from
raw request strings.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Cache and Redis calls: sub-millisecond when healthy, bounded by the Redis timeout when not.
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    20,
    40,
    80,
    160,
    320,
)


def adapter_label(tenant: str, adapter: str) -> str:
    """The `model` label of an adapter's generation series."""
    return f"{tenant}/{adapter}"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "loragate_requests_total",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "loragate_request_duration_seconds",
            "HTTP request latency until the last byte, by route and status.",
            ["route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "loragate_time_to_first_token_seconds",
            "Streaming requests: time from arrival to the engine's first chunk.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "loragate_requests_in_flight",
            "HTTP requests being served, by route.",
            ["route"],
            registry=r,
        )
        self.engine_up = Gauge(
            "loragate_engine_up",
            "1 when the engine answers its health check and serves our base model, else 0.",
            ["engine"],
            registry=r,
        )
        self.adapter_uploads = Counter(
            "loragate_adapter_uploads_total",
            "Adapter uploads by result (created, unchanged, replaced, rejected, conflict, error).",
            ["result"],
            registry=r,
        )
        self.adapter_loads = Counter(
            "loragate_adapter_loads_total",
            "Adapter loads onto an engine, by result.",
            ["engine", "result"],
            registry=r,
        )
        self.adapter_unloads = Counter(
            "loragate_adapter_unloads_total",
            "Adapter unloads from an engine, by result.",
            ["engine", "result"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "loragate_adapter_load_seconds",
            "Time to load an adapter onto an engine.",
            ["engine"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapters_loaded = Gauge(
            "loragate_adapters_loaded",
            "Adapters loaded on an engine now.",
            ["engine"],
            registry=r,
        )
        # `model` is the base model's name or "<tenant>/<adapter>" from the registry, never the
        # raw request string: unknown names are refused before anything is counted. `mode` is
        # how it was served: base, hotswap (a LoRA adapter on a base engine), merged (on an
        # engine serving it merged), fallback (promoted, but hot-swapped: no merged engine was
        # up or had room).
        self.generation_requests = Counter(
            "loragate_generation_requests_total",
            "Generation requests served, by model and serving mode.",
            ["model", "mode"],
            registry=r,
        )
        self.generation_tokens = Counter(
            "loragate_generation_tokens_total",
            "Tokens by model, serving mode and kind (prompt, completion), from the engine's "
            "usage report.",
            ["model", "mode", "kind"],
            registry=r,
        )
        self.engine_restarts = Counter(
            "loragate_engine_restarts_total",
            "Local engine processes restarted after dying.",
            ["engine"],
            registry=r,
        )
        self.cache_requests = Counter(
            "loragate_cache_requests_total",
            "Result cache lookups by result: hit, miss, bypass (not cacheable or opted out), "
            "error (the cache could not answer; served uncached).",
            ["result"],
            registry=r,
        )
        self.cache_seconds = Histogram(
            "loragate_cache_seconds",
            "Result cache operation latency, by operation (get, put). With Redis the first "
            "lookup is part of the admission script: see loragate_redis_call_seconds{op=admit}.",
            ["op"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.cache_coalesced = Counter(
            "loragate_cache_coalesced_total",
            "Requests answered by an identical request's engine call instead of their own, "
            "by where that call ran (local: this replica, remote: another replica).",
            ["scope"],
            registry=r,
        )
        self.redis_up = Gauge(
            "loragate_redis_up",
            "1 while Redis answers, 0 while the gateway serves without it (or none is configured).",
            registry=r,
        )
        self.redis_errors = Counter(
            "loragate_redis_errors_total",
            "Redis calls that failed or timed out, by operation.",
            ["op"],
            registry=r,
        )
        self.redis_call_seconds = Histogram(
            "loragate_redis_call_seconds",
            "Redis round trips that succeeded, by operation (admit: a request's limits, cache "
            "read and claim in one script), and how long each took.",
            ["op"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.limit_rejections = Counter(
            "loragate_limit_rejections_total",
            "Requests refused with 429 by tenant limit (requests_per_minute, tokens_per_minute, "
            "max_concurrent).",
            ["limit"],
            registry=r,
        )
        self.limit_fallbacks = Counter(
            "loragate_limit_local_fallbacks_total",
            "Limit checks made by this replica alone because Redis was unavailable.",
            registry=r,
        )
        self.engine_queue_depth = Gauge(
            "loragate_engine_queue_depth",
            "Requests waiting in the gateway for a slot on the engine.",
            ["engine"],
            registry=r,
        )
        self.engine_running = Gauge(
            "loragate_engine_requests_running",
            "Requests sent to the engine and not finished yet.",
            ["engine"],
            registry=r,
        )
        self.engine_reported = Gauge(
            "loragate_engine_reported_requests",
            "The engine's own count of requests it is running or holding in its queue, from "
            "every gateway (state: running, waiting), read every LORAGATE_ENGINE__LOAD_POLL_S; "
            "absent while the engine is down. Every replica reports the same engine: take the max "
            "over replicas, never the sum.",
            ["engine", "state"],
            registry=r,
        )
        self.engine_requests = Counter(
            "loragate_engine_requests_total",
            "Requests sent to an engine (each attempt of one retried on another counts).",
            ["engine"],
            registry=r,
        )
        self.engine_retries = Counter(
            "loragate_engine_retries_total",
            "Requests sent to another engine after this one failed before answering.",
            ["engine"],
            registry=r,
        )
        self.admission_rejections = Counter(
            "loragate_admission_rejections_total",
            "Requests refused with 503 because the engine's queue was full or the wait too long.",
            ["engine", "reason"],
            registry=r,
        )

    def forget_engine(self, name: str) -> None:
        """Drop every series of an engine that left the pool (DNS no longer lists it), so the
        exposition does not grow with every address an engine ever had."""
        for metric in self.engine_series():
            metric.remove_by_labels({"engine": name})

    def engine_series(self) -> list[Counter | Gauge | Histogram]:
        return [
            self.engine_up, self.engine_restarts, self.adapter_loads, self.adapter_unloads,
            self.adapter_load_seconds, self.adapters_loaded, self.engine_queue_depth,
            self.engine_running, self.engine_reported, self.engine_requests, self.engine_retries,
            self.admission_rejections,
        ]  # fmt: skip

    def forget_model(self, label: str) -> None:
        """Drop the generation series of `label` (a deleted adapter's), every token kind too,
        so the exposition does not grow with every adapter ever served. A request still running
        on the deleted adapter when it finishes counts into a fresh series."""
        self.generation_requests.remove_by_labels({"model": label})
        self.generation_tokens.remove_by_labels({"model": label})
