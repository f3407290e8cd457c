"""examples/sparsify_cnn.py runs as documented: SparseGPT 2:4 keeps the digits ResNet's accuracy
in one shot where magnitude does not, 90% pruning with fine-tuning stored sparse keeps it too,
fine-tuning SparseGPT's 2:4 kept as masks wins back what the one shot lost,
every conv is stored sparse and the saved file loads to the same outputs."""
import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_sparsify_cnn_example(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # it imports quantize_cnn's timing helper
    spec = importlib.util.spec_from_file_location("sparsify_cnn", ROOT / "examples" / "sparsify_cnn.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    out = example.main(timing=False)
    acc = out["acc_fp32"]
    assert acc > 0.95
    shot = out["one_shot"]
    assert shot["sparsegpt"] > acc - 0.03 and shot["sparsegpt"] > shot["magnitude"] + 0.2
    assert out["acc_sparse"] > acc - 0.03
    one_shot, tuned = out["sparsegpt_masks"]  # 0.9822 -> 0.9956 (fp32 0.9911)
    assert one_shot == shot["sparsegpt"] and tuned > one_shot and tuned > acc - 0.01
    assert out["loaded_same"] and out["file_ratio"] < 0.25
    convs = [c for c in out["report"].changes if c.module_type == "Conv2d"]
    assert len(convs) == 9 and all(c.action == "sparsified" for c in convs)
