"""`ember perf` and `ember serve` from the command line."""
from __future__ import annotations

import csv

import pytest
from click.testing import CliRunner

from ember.cli.main import cli
from ember.serve.perf import PerfError, parse_range, parse_shapes

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("protocol,port_attr", [("http", "http_port"), ("grpc", "grpc_port")])
def test_perf_sweep_prints_and_writes_csv(server, tmp_path, protocol, port_attr):
    out = tmp_path / "perf.csv"
    result = CliRunner().invoke(cli, [
        "perf", "addsub", "-u", f"127.0.0.1:{getattr(server, port_attr)}", "-i", protocol,
        "--concurrency-range", "1:4:3", "--duration", "0.5", "--warmup", "0.1", "-b", "2", "-f", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split()[:6] == ["concurrency", "infer/s", "p50", "ms", "p90", "ms"]
    assert [ln.split()[0] for ln in lines[2:4]] == ["1", "4"]
    rows = list(csv.DictReader(out.open()))
    assert [r["concurrency"] for r in rows] == ["1", "4"]
    for r in rows:
        assert int(r["requests"]) > 0 and int(r["failures"]) == 0
        assert 0 < float(r["p50_ms"]) <= float(r["p90_ms"]) <= float(r["p99_ms"])
        assert float(r["throughput_infer_per_s"]) > 0


def test_perf_reports_failures_and_bad_targets(server):
    runner = CliRunner()
    r = runner.invoke(cli, ["perf", "ghost", "-u", f"127.0.0.1:{server.http_port}", "--duration", "0.2"])
    assert r.exit_code != 0 and "model 'ghost'" in str(r.exception or r.output)
    r = runner.invoke(cli, ["perf", "affine", "-u", "127.0.0.1:1", "--duration", "0.2"])
    assert r.exit_code != 0 and "is `ember serve` running?" in str(r.exception)
    r = runner.invoke(cli, ["perf", "affine", "-u", f"127.0.0.1:{server.http_port}", "-b", "9", "--duration", "0.3",
                            "--warmup", "0", "--concurrency-range", "1"])
    assert r.exit_code == 1 and "failed: HTTP 400" in r.output  # batch 9 > max_batch_size 8


def test_perf_parsers():
    assert parse_range("1:8:2") == [1, 3, 5, 7]
    assert parse_range("1,4,16,64") == [1, 4, 16, 64]
    assert parse_range("8") == [8]
    with pytest.raises(PerfError):
        parse_range("1:x")
    assert parse_shapes(("x:1,3,224,224",)) == {"x": [1, 3, 224, 224]}
    with pytest.raises(PerfError):
        parse_shapes(("x",))


def test_serve_help_and_usage_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["serve", "--help"])
    assert r.exit_code == 0
    for flag in ("--host", "--http-port", "--grpc-port", "--metrics-port", "--model-control-mode",
                 "--auth-token-file", "--max-request-size"):
        assert flag in r.output
    assert "127.0.0.1" in r.output
    r = runner.invoke(cli, ["serve", str(tmp_path / "missing")])
    assert r.exit_code != 0 and "does not exist" in r.output
    r = runner.invoke(cli, ["serve", str(tmp_path), "--max-request-size", "lots"])
    assert r.exit_code != 0 and "not a size" in r.output
