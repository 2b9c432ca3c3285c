"""``eaglespec serve``: load the model, start the engine thread, run uvicorn."""

from __future__ import annotations

import argparse
import os
import threading
import time

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=0,
                   help="prompt + generated tokens per request (default 0: the model's context length)")
    p.add_argument("--num-blocks", type=int, default=0, help="KV blocks (0: from free memory / --kv-cache-tokens)")
    p.add_argument("--kv-cache-tokens", type=int, default=16384, help="CPU pool size in tokens")
    p.add_argument("--gpu-memory-fraction", type=float, default=0.6)
    p.add_argument("--prefill-token-budget", type=int, default=8192, help="tokens prefilled per engine step")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--log-level", default="warning")


def build_llm(args):
    from eaglespec import LLM, EngineConfig, SpecConfig

    engine = EngineConfig(max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
                          num_blocks=args.num_blocks, kv_cache_tokens=args.kv_cache_tokens,
                          gpu_memory_fraction=args.gpu_memory_fraction,
                          prefill_token_budget=args.prefill_token_budget)
    spec = SpecConfig(tree=args.tree) if getattr(args, "tree", None) not in (None, "auto") else None
    return LLM(model=args.model, draft=args.draft, spec=spec, device=args.device, dtype=args.dtype, engine=engine,
               tensor_parallel_size=getattr(args, "tp", 1))


def build_server_app(llm, served_model_name: str | None = None, max_body_bytes: int = 1 << 20):
    """The app over an ``LLM``'s engine core, and its engine thread (started)."""
    from eaglespec.serve.app import ServedModel, build_app
    from eaglespec.serve.engine_thread import EngineThread
    from eaglespec.serve.metrics import ServerMetrics

    if llm.tokenizer is None:
        raise ValueError("serving needs a model with a tokenizer")
    core = llm.core
    name = served_model_name or DEFAULT_MODEL_NAME
    tree = llm.spec_config.tree if core.speculative is not None else "none"
    depth = core.speculative.depth if core.speculative is not None else 0
    metrics = ServerMetrics(name, tree, depth, llm.engine_config.max_batch_size)
    engine = EngineThread(core, metrics)
    served = ServedModel(name=name, tokenizer=llm.tokenizer, vocab_size=llm.model.config.vocab_size,
                         max_model_len=llm.engine_config.max_model_len)
    engine.start()
    return build_app(engine, served, metrics, max_body_bytes), engine


class ServerThread:
    """uvicorn serving an app from a background thread (tests, notebooks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="eaglespec-uvicorn", daemon=True)

    def start(self, timeout_s: float = 60.0) -> int:
        """Start and wait until listening; returns the port."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        sockets = [s for srv in self.server.servers for s in srv.sockets]
        return sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def cmd_serve(args) -> int:
    import uvicorn

    llm = build_llm(args)
    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model)) if args.model else None)
    app, engine = build_server_app(llm, name, args.max_body_bytes)
    spec = llm.spec_config.tree if llm.core.speculative is not None else "off"
    print(f"eaglespec serve: {app.state.served.name} on http://{args.host}:{args.port} "
          f"(speculation: {spec}, device {llm.device})", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()
        llm.close()  # stops the other ranks under --tp
    return 0
