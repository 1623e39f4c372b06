"""pipelines/tt_distill_quant_search.py: the flagship with its main knobs open to a search."""

from __future__ import annotations

from pathlib import Path

from kdcompress.cli import load_pipeline
from kdcompress.fingerprint import fingerprint_constant

ROOT = Path(__file__).resolve().parents[2]


def test_its_defaults_are_the_flagship_pipeline():
    searched = load_pipeline(ROOT / "pipelines" / "tt_distill_quant_search.py")
    flagship = load_pipeline(ROOT / "pipelines" / "tt_distill_quant.py")
    assert list(searched.params) == ["student.rank", "pruned.ratio", "fp32.tt_export"]
    assert [p.size for p in searched.params.values()] == [6, 9, 2]  # 108 value sets
    concrete = searched.concrete()
    assert concrete.order() == flagship.order()
    for name, stage in flagship.stages.items():
        mine = concrete.stages[name]
        assert mine.fn is stage.fn and mine.input_names == stage.input_names
        expected = dict(stage.constants)
        if name == "fp32":
            expected["tt_export"] = "factorized"  # export_onnx's default, written out
        assert fingerprint_constant(mine.constants) == fingerprint_constant(expected), name
