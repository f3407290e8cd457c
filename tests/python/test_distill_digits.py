"""End to end on real data (examples/distill_digits.py): a student distilled from a wider
teacher beats the same student, same initialization and batches, trained on the labels
alone, in test accuracy and test cross-entropy, averaged over four seeds."""
import importlib.util
import pathlib

import torch

_EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "distill_digits.py"


def _example():
    spec = importlib.util.spec_from_file_location("distill_digits", _EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_distillation_beats_labels_alone_on_digits():
    ex = _example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [ex.run(seed) for seed in range(4)]
    finally:
        torch.set_num_threads(threads)
    mean = {k: [sum(r[k][i] for r in rows) / len(rows) for i in (0, 1)] for k in rows[0]}
    assert mean["teacher"][0] > mean["labels alone"][0]  # the teacher has something to teach
    assert mean["distilled"][0] > mean["labels alone"][0], mean  # accuracy
    assert mean["distilled"][1] < mean["labels alone"][1], mean  # cross-entropy
