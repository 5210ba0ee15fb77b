"""`ember serve` on CUDA engines (skipped without a GPU): the digits CNN in fp16 and a small ResNet-like
model exported with torch, served from model.engine files, hammered by concurrent HTTP (binary) and
gRPC clients with 1 to 4 rows per request; every response is compared with ONNX Runtime on the CPU.
Also: instances run staged on their own streams, batch buckets are captured at load, and traffic
allocates no GPU memory.

The same harness runs once on the CPU with ``emulated_graphs()`` (the last test), so its logic is
checked on machines without a GPU too.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import ember
from ember.runtime.buckets import bucket_size
from ember.runtime.context import emulated_graphs

from .conftest import start_server

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits" / "digits_cnn.onnx"
pytestmark = pytest.mark.timeout(900)


def export_resnet_like(path: Path) -> Path:
    """Stem, two residual blocks, a strided conv, one more block, global pool, classifier; batch dynamic.
    BatchNorm statistics are randomized so that folding them is exercised."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                                      nn.ReLU())
            self.blocks = nn.Sequential(Block(16), Block(16))
            self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.block3 = Block(32)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.block3(torch.relu(self.down(self.blocks(self.stem(x)))))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    m = Net().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
    torch.onnx.export(m, (torch.randn(2, 3, 32, 32),), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


MODELS = {  # name: (onnx, input, item shape, max batch, instances)
    "digits": ("digits", "image", (1, 8, 8), 32, 2),
    "resnetlike": ("resnetlike", "images", (3, 32, 32), 16, 1),
}


def _repository(tmp: Path, device: str, precision: str) -> tuple[Path, dict[str, Path]]:
    onnx_files = {"digits": DIGITS, "resnetlike": export_resnet_like(tmp / "resnetlike.onnx")}
    repo = tmp / "repo"
    for name, (src, inp, item, mbs, instances) in MODELS.items():
        profile = {inp: ((1, *item), (max(mbs // 2, 1), *item), (mbs, *item))}
        engine = ember.build(str(onnx_files[src]), device=device, precision=precision, profiles=[profile],
                             timing_cache=None)
        (repo / name / "1").mkdir(parents=True)
        engine.save(str(repo / name / "1" / "model.engine"))
        (repo / name / "config.yaml").write_text(
            f"max_batch_size: {mbs}\ndynamic_batching: {{max_queue_delay_us: 500}}\ninstance_count: {instances}\n")
    return repo, onnx_files


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _hammer(srv, onnx_files: dict[str, Path], tol: float, clients: int = 16, requests: int = 10) -> dict[str, set]:
    """Concurrent clients over HTTP (binary) and gRPC; each response checked against ONNX Runtime.
    Returns the batch sizes each model formed."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import tritonclient.http as httpclient

    sessions = {name: ort.InferenceSession(str(onnx_files[src]), providers=["CPUExecutionProvider"])
                for name, (src, *_) in MODELS.items()}
    lock = threading.Lock()
    errors: list[str] = []
    digits = np.load(ROOT / "examples" / "digits" / "samples.npz")["image"]
    barrier = threading.Barrier(clients)
    before = {name: srv.service.repository.get(name, None).stats.as_dict()["execution_count"] for name in MODELS}

    def client(i: int) -> None:
        rng = np.random.default_rng(100 + i)
        grpc = i % 2 == 1
        mod = grpcclient if grpc else httpclient
        c = (grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}") if grpc
             else httpclient.InferenceServerClient(f"127.0.0.1:{srv.http_port}"))
        try:
            barrier.wait(60)
            for r in range(requests):
                name = "digits" if (i + r) % 2 else "resnetlike"
                _, inp, item, _, _ = MODELS[name]
                rows = int(rng.integers(1, 5))
                if name == "digits":
                    x = digits[rng.integers(0, len(digits), rows)] + 0.05 * rng.standard_normal((rows, *item))
                else:
                    x = rng.standard_normal((rows, *item))
                x = x.astype(np.float32)
                t = mod.InferInput(inp, list(x.shape), "FP32")
                t.set_data_from_numpy(x)
                res = c.infer(name, [t])
                with lock:
                    want = sessions[name].run(None, {inp: x})
                logits = res.as_numpy("logits")
                if logits.shape != want[0].shape or not _rel(logits, want[0]) <= tol:
                    errors.append(f"client {i} {name} rows {rows}: logits off by {_rel(logits, want[0]):.2e}")
                if name == "digits":  # the engine's ArgMax agrees with its own logits, but for near ties
                    top2 = np.sort(logits, axis=1)[:, -2:]
                    clear = top2[:, 1] - top2[:, 0] > 1e-2
                    if not np.array_equal(res.as_numpy("digit")[clear], logits.argmax(1)[clear]):
                        errors.append(f"client {i}: digit {res.as_numpy('digit')} vs argmax {logits.argmax(1)}")
        except Exception as e:
            errors.append(f"client {i}: {type(e).__name__}: {e}")
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:5]
    formed = {}
    for name in MODELS:
        stats = srv.service.repository.get(name, None).stats.as_dict()
        assert stats["execution_count"] > before[name]
        formed[name] = {b["batch_size"] for b in stats["batch_stats"]}
    return formed


def _check_instances(srv) -> None:
    for name, (_, _, _, mbs, instances) in MODELS.items():
        runners = srv.service.repository.get(name, None).batcher.runners
        assert len(runners) == instances and all(r.staged and r.depth == 2 for r in runners), name
        want = sorted({bucket_size(n) for n in range(1, mbs + 1)})
        assert all(r.captured == want for r in runners), (name, [r.captured for r in runners])
        if runners[0].ctx.cuda:
            assert len({id(r.ctx.stream) for r in runners}) == instances  # each instance its own stream


@pytest.mark.cuda
@pytest.mark.parametrize("precision, tol", [("fp16", 2e-2), ("fp32", 1e-3)])
def test_serve_cuda_engines_under_concurrency_match_onnxruntime(tmp_path, precision, tol):
    repo, onnx_files = _repository(tmp_path, "cuda", precision)
    srv = start_server(repo, cache_dir=tmp_path / "cache")
    try:
        _check_instances(srv)
        formed = _hammer(srv, onnx_files, tol)
        assert any(max(s) > 1 for s in formed.values()), formed  # requests shared batches
        plans = {n: [len(r.ctx._plans) for r in srv.service.repository.get(n, None).batcher.runners] for n in MODELS}
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        _hammer(srv, onnx_files, tol, requests=6)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == allocated, "traffic allocated GPU memory"
        assert plans == {n: [len(r.ctx._plans) for r in srv.service.repository.get(n, None).batcher.runners]
                         for n in MODELS}, "traffic made new plans (captures) after load"
    finally:
        srv.stop()


def test_the_harness_on_the_cpu_with_emulated_graphs(tmp_path):
    """The same server, clients and checks on CPU engines whose contexts run the GPU path's plans."""
    repo, onnx_files = _repository(tmp_path, "cpu", "fp32")
    with emulated_graphs():
        srv = start_server(repo, cache_dir=tmp_path / "cache")
    try:
        _check_instances(srv)
        formed = _hammer(srv, onnx_files, 1e-4, clients=8, requests=6)
        assert any(max(s) > 1 for s in formed.values()), formed
    finally:
        srv.stop()
