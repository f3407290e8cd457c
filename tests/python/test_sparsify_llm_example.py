"""examples/sparsify_llm.py runs as documented: 70% Wanda + OWL kept as masks, fine-tuned, then
stored as CSR int8: fine-tuning wins back most of the one shot's loss (6.496 -> 5.050, dense
4.776), storing keeps it, the linears shrink to a quarter and the file loads back."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_sparsify_llm_example():
    spec = importlib.util.spec_from_file_location("sparsify_llm", ROOT / "examples" / "sparsify_llm.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main()
    assert out["one_shot"] > out["fine_tuned"] + 1.0  # 6.496 -> 5.050
    assert out["fine_tuned"] < out["dense"] + 0.5  # against 4.776
    assert out["stored"] == pytest.approx(out["fine_tuned"], rel=0.01)  # int8 values on top
    assert out["linear_ratio"] < 0.3 and out["file_ratio"] < 0.4 and out["loaded_same"]
    assert all(c.action == "sparsified" and "csr int8" in c.format for c in out["report"].changed)
