"""Whole models: ember's outputs match ONNX Runtime (CPU) within relative L2 error 1e-5 in fp32.

Tiny `transformers` models with random weights (see zoo.py), exported by both torch exporters at opset 17
(the dynamo exporter's native opset 18 too) with a dynamic batch dim, plus opset-11 TorchScript exports;
each is run at two batch sizes. `test_export_matches_torch` checks the ONNX file itself against the torch
model, so a failure there is the exporter's (or zoo's), not ember's.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

import ember  # noqa: E402

MODELS = ("bert", "gpt2", "llama", "vit", "resnet", "mobilenet_v2")
CASES = (
    [(model, "torchscript", 17) for model in MODELS]
    + [(model, "dynamo", 17) for model in MODELS]
    + [(model, "dynamo", 18) for model in MODELS]  # what the dynamo exporter writes when left alone
    + [("bert_eager", "torchscript", 11), ("mobilenet_v2", "torchscript", 11)]
)
BATCHES = (1, 3)
RTOL_L2 = 1e-5


def _case_id(case) -> str:
    model, exporter, opset = case
    return f"{model}-{exporter}-opset{opset}"


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    expected64 = expected.astype(np.float64)
    return float(np.linalg.norm(actual.astype(np.float64) - expected64) / np.linalg.norm(expected64))


class _Runners:
    """One ORT session and one ember engine per exported file, for the whole session.

    A failed build is remembered and re-raised, so the second batch size does not pay for it again.
    """

    def __init__(self, zoo):
        self.zoo = zoo
        self._sessions: dict = {}
        self._engines: dict = {}
        self.build_seconds: dict[str, float] = {}

    def exported(self, case):
        return self.zoo.get(*case)

    def ort(self, case):
        if case not in self._sessions:
            path = str(self.exported(case).path)
            self._sessions[case] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return self._sessions[case]

    def ort_outputs(self, case, feeds) -> dict[str, np.ndarray]:
        session = self.ort(case)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))

    def engine(self, case):
        if case not in self._engines:
            path = str(self.exported(case).path)
            t0 = time.perf_counter()
            try:
                self._engines[case] = ember.build(path)
            except Exception as error:  # noqa: BLE001 - re-raised for every test of this file
                self._engines[case] = error
            self.build_seconds[_case_id(case)] = time.perf_counter() - t0
        engine = self._engines[case]
        if isinstance(engine, Exception):
            raise engine
        return engine


@pytest.fixture(scope="module")
def runners(zoo) -> _Runners:
    return _Runners(zoo)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_export_matches_torch(runners, case):
    exported = runners.exported(case)
    for batch in BATCHES:
        feeds = exported.feeds(batch)
        expected = exported.torch_outputs(feeds)
        actual = runners.ort_outputs(case, feeds)
        assert set(actual) == set(expected)
        for name, want in expected.items():
            assert actual[name].shape == want.shape, f"{name} at batch {batch}"
            err = rel_l2(actual[name], want)
            # torch vs ORT differ in kernels, not in semantics: 1e-5 holds with room to spare (~4e-7 seen)
            assert err <= RTOL_L2, f"ORT vs torch, output {name} at batch {batch}: relative L2 error {err:.2e}"


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_ember_matches_ort(runners, case, batch):
    exported = runners.exported(case)
    feeds = exported.feeds(batch)
    expected = runners.ort_outputs(case, feeds)
    engine = runners.engine(case)
    assert [spec.name for spec in engine.inputs] == list(exported.spec.input_names)
    assert [spec.name for spec in engine.outputs] == list(expected)
    actual = engine.run(feeds)
    assert set(actual) == set(expected), f"ember outputs {sorted(actual)}, ONNX outputs {sorted(expected)}"
    errors = {}
    for name, want in expected.items():
        got = np.asarray(actual[name])
        assert got.dtype == want.dtype, f"{name}: ember dtype {got.dtype}, ORT {want.dtype}"
        assert got.shape == want.shape, f"{name}: ember shape {got.shape}, ORT {want.shape}"
        assert np.isfinite(got).all(), f"{name}: ember output has NaN/Inf"
        errors[name] = rel_l2(got, want)
    bad = {name: f"{err:.2e}" for name, err in errors.items() if not err <= RTOL_L2}
    assert not bad, f"relative L2 error above {RTOL_L2:g}: {bad}"
