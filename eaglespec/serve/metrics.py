"""Prometheus metrics of one server, in a registry of its own (two apps in one process do
not share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.006, 0.008, 0.012, 0.016, 0.025, 0.05, 0.1, 0.25, 1.0)

BATCH_BUCKETS = tuple(float(1 << i) for i in range(10))  # 1, 2, 4, ..., 512


class ServerMetrics:
    def __init__(self, model_name: str, speculation: str, max_depth: int, max_batch_size: int = 0):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("eaglespec_requests", "Requests by final status: stop, length, abort, error "
                                "(engine) and rejected (4xx before the engine)", ["status"], registry=r)
        self.prompt_tokens = Counter("eaglespec_prompt_tokens", "Prompt tokens of requests that ran", registry=r)
        self.generation_tokens = Counter("eaglespec_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("eaglespec_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("eaglespec_num_requests_waiting", "Requests waiting for KV blocks or a row", registry=r)
        self.kv_in_use = Gauge("eaglespec_kv_blocks_in_use", "KV cache blocks held by requests", registry=r)
        self.kv_total = Gauge("eaglespec_kv_blocks_total", "KV cache blocks in the pool", registry=r)
        self.steps = Counter("eaglespec_engine_steps", "Engine steps by kind", ["kind"], registry=r)
        self.step_batch = Histogram("eaglespec_step_batch_size", "Requests in each decoding step (mixed, plain "
                                    "or speculative)", buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("eaglespec_engine_step_seconds", "Wall time of one engine step as the engine "
                                      "thread sees it (host work, and the device where the step waits), by kind and "
                                      "the speculation chosen", ["kind", "choice"], buckets=STEP_BUCKETS, registry=r)
        self.max_batch = Gauge("eaglespec_max_batch_size", "The most requests one step may run", registry=r)
        self.max_batch.set(max_batch_size)
        self.choices = Counter("eaglespec_speculation_steps", "Decoding steps by the speculation chosen for them "
                               "(a tree, or plain)", ["choice"], registry=r)
        self.decode_forwards = Counter("eaglespec_decode_forwards", "Decoding target forwards (plain or "
                                       "speculative steps) of finished requests", registry=r)
        self.decode_tokens = Counter("eaglespec_decode_tokens", "Tokens those forwards emitted (tau = "
                                     "decode_tokens / decode_forwards)", registry=r)
        self.tau = Gauge("eaglespec_tau", "Tokens emitted per decoding target forward, over finished requests",
                         registry=r)
        self.proposed = Counter("eaglespec_spec_proposed", "Speculative steps that proposed a draft at this depth",
                                ["depth"], registry=r)
        self.accepted = Counter("eaglespec_spec_accepted", "Drafts accepted at this depth", ["depth"], registry=r)
        self.acceptance = Gauge("eaglespec_spec_acceptance_rate", "Acceptance rate per draft depth", ["depth"],
                                registry=r)
        self.speculation = Gauge("eaglespec_speculation_info", "The speculation served (tree, or none)",
                                 ["model", "tree"], registry=r)
        self.speculation.labels(model=model_name, tree=speculation).set(1)
        self.ttft = Histogram("eaglespec_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("eaglespec_time_per_output_token_seconds", "Per request: (finish - first token) / "
                              "(tokens - 1)", buckets=LATENCY_BUCKETS, registry=r)
        self._depth_totals = [[0, 0] for _ in range(max_depth)]
        self._tau_totals = [0, 0]

    def observe_engine(self, core, step_seconds: float | None = None) -> None:
        """Gauges of the engine's state (called by the engine thread after each step, with the
        step's wall time when it ran one)."""
        self.running.set(core.num_running)
        self.waiting.set(core.num_waiting)
        self.kv_in_use.set(core.kv_blocks_in_use)
        self.kv_total.set(core.runner.allocator.num_blocks - 1)
        if core.last_step_kind:
            self.steps.labels(kind=core.last_step_kind).inc()
            if core.last_step_kind != "prefill":
                self.step_batch.observe(core.last_step_size)
            if core.last_step_kind != "prefill" and core.last_choice:
                self.choices.labels(choice=core.last_choice).inc()
            if step_seconds is not None:
                choice = core.last_choice if core.last_step_kind in ("decode", "speculative") else ""
                self.step_seconds.labels(kind=core.last_step_kind, choice=choice).observe(step_seconds)
            core.last_step_kind = ""

    def observe_finished(self, delta, handle, now: float) -> None:
        self.requests.labels(status=delta.finish_reason).inc()
        self.prompt_tokens.inc(delta.num_prompt_tokens)
        n = delta.num_output_tokens
        if handle.first_token_at is not None and n > 1:
            self.tpot.observe((now - handle.first_token_at) / (n - 1))
        forwards, tokens = delta.stats.get("decode_forwards", 0), delta.stats.get("decode_tokens", 0)
        if forwards:
            self.decode_forwards.inc(forwards)
            self.decode_tokens.inc(tokens)
            self._tau_totals[0] += tokens
            self._tau_totals[1] += forwards
            self.tau.set(self._tau_totals[0] / self._tau_totals[1])
        for d, (acc, prop) in enumerate(zip(delta.accepted_per_depth, delta.proposed_per_depth)):
            if d >= len(self._depth_totals):
                break
            self.proposed.labels(depth=str(d + 1)).inc(prop)
            self.accepted.labels(depth=str(d + 1)).inc(acc)
            totals = self._depth_totals[d]
            totals[0] += acc
            totals[1] += prop
            if totals[1]:
                self.acceptance.labels(depth=str(d + 1)).set(totals[0] / totals[1])

    def reject(self) -> None:
        self.requests.labels(status="rejected").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
