"""``eaglespec bench serve`` against the test server at tiny concurrency: JSON and plot written,
and its checks refuse a run that was not what its label says."""

from __future__ import annotations

import json

import pytest

from eaglespec.bench import serve as bench


def test_bench_serve_smoke(served, tmp_path):
    try:
        import matplotlib  # noqa: F401
        plot = []
    except ImportError:  # the plot extra is not installed: everything but the picture
        plot = ["--no-plot"]
    rc = bench.main(["--url", served.url, "--concurrency", "1,2", "--requests-per-client", "2", "--min-requests", "2",
                     "--sharegpt", "0", "--mtbench-tokens", "8", "--out", str(tmp_path), "--device", "cpu", "--no-warmup",
                     *plot])
    assert rc == 0
    [path] = list(tmp_path.glob("serve-*.json"))
    rec = json.loads(path.read_text())
    assert rec["speculation"] == served.llm.spec_config.tree and rec["label"] == "spec"
    assert [r["concurrency"] for r in rec["rows"]] == [1, 2]
    for row in rec["rows"]:
        assert row["completed"] == row["requests"] == 2 * row["concurrency"]
        assert row["max_in_flight"] == row["concurrency"]
        assert row["output_tokens"] == row["requests"] * 8
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"]
        assert row["tau"] >= 1.0
        assert row["server_peak_step_bound"] >= row["concurrency"]  # the server ran them together
    assert plot or (tmp_path / (path.stem + ".png")).is_file()
    assert served.wait_idle()


def test_checks_refuse_a_mislabelled_run():
    row = {"concurrency": 4, "requests": 8, "completed": 8, "failed": [], "max_in_flight": 3,
           "server_peak_step_bound": 4.0, "server_max_batch_size": 64.0}
    with pytest.raises(RuntimeError, match="in flight"):
        bench.check_level(row)
    with pytest.raises(RuntimeError, match="failed"):
        bench.check_level({**row, "max_in_flight": 4, "completed": 7})
    with pytest.raises(RuntimeError, match="largest step"):  # the server ran them one or two at a time
        bench.check_level({**row, "max_in_flight": 4, "server_peak_step_bound": 2.0})
    bench.check_level({**row, "max_in_flight": 4})
    bench.check_level({**row, "concurrency": 64, "max_in_flight": 64, "server_peak_step_bound": 8.0,
                       "server_max_batch_size": 8.0})  # a server limited to 8 at once, full


def test_percentile_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile([3.0], 99) == 3.0 and bench.percentile([], 50) == 0.0


def test_clients_spread_over_processes_share_the_count(served):
    """Three clients in two processes send exactly the requests asked for, all at once."""
    import asyncio

    import httpx

    prompts = [bench.BenchPrompt([{"role": "user", "content": "Hi"}], 4, "test")]
    model = httpx.get(f"{served.url}/v1/models", timeout=30).json()["data"][0]["id"]
    row = asyncio.run(bench.run_level(served.url, model, prompts, 3, 5, 120.0, clients_per_process=2))
    assert row["requests"] == row["completed"] == 5
    assert row["max_in_flight"] == 3
    assert row["output_tokens"] == 20
