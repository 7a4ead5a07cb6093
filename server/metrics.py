"""Every Prometheus metric loragate exports, on one registry per app.

Label values come only from bounded sets (route templates, status codes, fixed kinds), never from
raw request strings.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
            "1 when the engine answers its health check, else 0.",
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
            "Adapter loads onto the engine, by result.",
            ["result"],
            registry=r,
        )
        self.adapter_unloads = Counter(
            "loragate_adapter_unloads_total",
            "Adapter unloads from the engine, by result.",
            ["result"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "loragate_adapter_load_seconds",
            "Time to load an adapter onto the engine.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapters_loaded = Gauge(
            "loragate_adapters_loaded",
            "Adapters loaded on the engine now.",
            registry=r,
        )
        # `model` is the base model's name or "<tenant>/<adapter>" from the registry, never the
        # raw request string: unknown names are refused before anything is counted.
        self.generation_requests = Counter(
            "loragate_generation_requests_total",
            "Generation requests served, by model.",
            ["model"],
            registry=r,
        )
        self.generation_tokens = Counter(
            "loragate_generation_tokens_total",
            "Tokens by model and kind (prompt, completion), from the engine's usage report.",
            ["model", "kind"],
            registry=r,
        )
        self.engine_restarts = Counter(
            "loragate_engine_restarts_total",
            "Local engine processes restarted after dying.",
            registry=r,
        )
