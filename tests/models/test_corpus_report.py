"""docs/models.md is generated from the corpus JSON: the GPU summary applies the bar, and the fp16
fidelity table lists the layers each fp16 build kept in fp32 (a failed build reads as err)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import corpus_models  # noqa: E402
import corpus_report  # noqa: E402


def _gpu(speedup: float, kept: int) -> dict:
    ok = {"build_s": 3.0, "rel_l2": 2e-3, "ms": 1.0, "speedup": speedup, "fp32_layers": 0}
    return {"ort": {"ep": "CUDAExecutionProvider", "ms": speedup},
            "tf32": dict(ok), "fp16": dict(ok, fp32_layers=kept, rel_l2=4e-3)}


def test_fidelity_table_and_bar(tmp_path):
    runnable = [m for m in corpus_models.MODELS if m.expect_error is None][:3]
    a, b, c = runnable
    doc = {"hosts": {}, "models": {
        a.name: {"gpu": _gpu(2.0, 7)},
        b.name: {"gpu": _gpu(0.9, 0)},
        c.name: {"gpu": dict(_gpu(3.0, 0), fp16={"error": "float16 x float32"})},
    }}
    out = tmp_path / "models.md"
    corpus_report.write_markdown(doc, out)
    text = out.read_text()
    assert "GPU tf32: 3 models timed" in text and "bar NOT met" in text  # b is below 1x
    table = text.split("## fp16 fidelity", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): [x.strip() for x in line.split("|")[2:5]]
            for line in table.splitlines() if line.startswith("| ") and "model" not in line}
    assert rows[a.name] == ["7", "4.0e-03", "2.0e-03"]
    assert rows[b.name][0] == "0"
    assert rows[c.name][:2] == ["err", "err"]
