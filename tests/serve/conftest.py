"""One real server for the whole test session: the embedded default model (with its shipped
head, drafting a chain of 3) on the CPU in fp32, uvicorn on 127.0.0.1 on a free port, and a plain LLM as reference."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")


class Served:
    def __init__(self, llm, app, engine, thread, port):
        self.llm, self.app, self.engine, self.thread, self.port = llm, app, engine, thread, port
        self.url = f"http://127.0.0.1:{port}"
        self.model = app.state.served.name

    @property
    def core(self):
        return self.llm.core

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kw)

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """Until the engine runs nothing and holds no KV block (read from the test thread)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.core.num_running == 0 and self.core.num_waiting == 0 and self.core.kv_blocks_in_use == 0:
                return True
            time.sleep(0.05)
        return False


@pytest.fixture(scope="session")
def served():
    from eaglespec import LLM, EngineConfig, SpecConfig
    from eaglespec.serve.server import ServerThread, build_server_app

    # The shipped head on a chain of 3: a small tree keeps the CPU steps cheap.
    llm = LLM(device="cpu", dtype="float32", spec=SpecConfig(tree="chain:3"),
              engine=EngineConfig(max_batch_size=16, max_model_len=512, kv_cache_tokens=8192))
    assert llm.core.speculative is not None  # the shipped head serves
    app, engine = build_server_app(llm)
    thread = ServerThread(app)
    port = thread.start()
    yield Served(llm, app, engine, thread, port)
    thread.stop()
    engine.stop()


@pytest.fixture(scope="session")
def reference():
    """Plain greedy decoding of the same model: speculative greedy output must equal it."""
    from eaglespec import LLM, EngineConfig

    return LLM(draft="none", device="cpu", dtype="float32", engine=EngineConfig(max_batch_size=16, max_model_len=512))
