"""examples/quantize_cnn.py runs as documented: W8A8 keeps the digits ResNet's accuracy, the
Report accounts for every conv and BatchNorm, and the saved file loads to the same outputs."""
import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_quantize_cnn_example():
    spec = importlib.util.spec_from_file_location("quantize_cnn", ROOT / "examples" / "quantize_cnn.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    out = example.main(epochs=3, timing=False)
    assert out["acc_fp32"] > 0.95 and out["acc_int8"] >= out["acc_fp32"] - 0.01
    assert out["loaded_same"]
    rows = {c.name: c for c in out["report"].changes}
    convs = [c for c in rows.values() if c.module_type == "Conv2d"]
    assert len(convs) == 9 and all(c.action == "quantized" for c in convs)
    assert "requantize for conv2 fused" in rows["layer1.conv1"].reason
    assert sum(c.action == "folded" for c in rows.values()) == 9
