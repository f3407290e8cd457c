"""Hugging Face transformers models built from tiny configs (random weights, fixed seed, no
downloads): each recipe quantizes them, they run, save (model.save_pretrained and ts.save),
load back (ts.from_pretrained, transformers' own from_pretrained, and from_config + ts.load),
match the pre-save output exactly,
and generate() runs on the loaded GPT-2 and LLaMA.

Recipes per model are chosen so that together they cover every code path once per model
family without running every recipe on every model (the file stays well under a minute):
  - integer weight-only (int8 per channel and int4 g32 share WeightOnlyLinear, one is run),
  - a low-bit float format (fp8 / nvfp4 / mxfp4 share LowBitLinear, one is run),
  - W8A8 (static INT8; SmoothQuant on the decoder models, which fold into their norms),
  - AWQ and GPTQ (the block-by-block calibration pipeline, on every model).
"""
import pytest
import torch

import tensorslim as ts

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 96


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=1))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))


def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1))


def _bert():
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32))


MODELS = {  # name -> (builder, Auto class for loading)
    "gpt2": (_gpt2, "AutoModelForCausalLM"),
    "llama": (_llama, "AutoModelForCausalLM"),
    "t5": (_t5, "AutoModelForSeq2SeqLM"),
    "bert": (_bert, "AutoModel"),
}

RECIPES = {
    "gpt2": {"int4": lambda: ts.Int4WeightOnly(group_size=32), "nvfp4": lambda: ts.NVFP4(),
             "w8a8_smoothquant": lambda: ts.W8A8(smoothquant_alpha=0.5),
             "awq": lambda: ts.AWQ(group_size=32, n_grid=2), "gptq": lambda: ts.GPTQ(group_size=32)},
    "llama": {"int8": lambda: ts.Int8WeightOnly(), "mxfp4": lambda: ts.MXFP4(),
              "w8a8_smoothquant": lambda: ts.W8A8(smoothquant_alpha=0.5),
              "awq": lambda: ts.AWQ(group_size=32, n_grid=2), "gptq": lambda: ts.GPTQ(group_size=32)},
    "t5": {"int4": lambda: ts.Int4WeightOnly(group_size=32), "fp8": lambda: ts.FP8WeightOnly(),
           "w8a8": lambda: ts.W8A8(smoothquant=False),
           "awq": lambda: ts.AWQ(group_size=32, n_grid=2), "gptq": lambda: ts.GPTQ(group_size=32)},
    "bert": {"int8": lambda: ts.Int8WeightOnly(), "nvfp4": lambda: ts.NVFP4(),
             "w8a8": lambda: ts.W8A8(smoothquant=False),
             "awq": lambda: ts.AWQ(group_size=32, n_grid=2), "gptq": lambda: ts.GPTQ(group_size=32)},
}
CASES = [(m, r) for m in MODELS for r in RECIPES[m]]


def _inputs(model_name: str, seed: int) -> dict:
    ids = torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))
    if model_name == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :6]}
    return {"input_ids": ids}


def _output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def _build(model_name: str):
    torch.manual_seed(0)
    return MODELS[model_name][0]().eval()


def _tied_groups(model) -> set:
    """Names of parameters held by several modules, grouped (tied weights)."""
    by_id = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {frozenset(names) for names in by_id.values() if len(names) > 1}


def test_from_pretrained_builds_parameters_on_meta_and_buffers_as_usual():
    """ts.from_pretrained's skeleton: no float weights allocated (the file's tensors become the
    float layers' parameters), buffers the file does not hold computed as in a normal build."""
    from tensorslim.hf import _build

    config = _llama().config
    skeleton = _build(transformers.AutoModelForCausalLM, config)
    normal = transformers.AutoModelForCausalLM.from_config(config)
    assert all(p.is_meta for p in skeleton.parameters())
    buffers = dict(normal.named_buffers())
    assert buffers and all(torch.equal(b, buffers[n]) for n, b in skeleton.named_buffers())
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # the patch is gone afterwards


@pytest.mark.parametrize("model_name,recipe", CASES)
def test_quantize_save_load_generate(model_name, recipe, tmp_path):
    model = _build(model_name)
    x = _inputs(model_name, 1)
    ref = _output(model, x)
    calib = [_inputs(model_name, s) for s in (2, 3)]
    report = ts.quantize(model, RECIPES[model_name][recipe](), calib_data=calib, progress=False)
    n_quantized = len(report.changed)
    assert n_quantized >= 8, report  # 2 blocks x at least 4 linears each
    if model_name == "gpt2":  # its attention and MLP layers are Conv1D: all 8 compressed
        assert sum(c.module_type == "Conv1D" for c in report.changed) == 8, report
    out = _output(model, x)
    assert torch.isfinite(out).all()
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.5, rel  # a working model, not noise (random tiny models quantize poorly)

    # Route 1: model.save_pretrained(dir) -> ts.from_pretrained(Auto class, dir)
    model.save_pretrained(tmp_path / "hf")
    auto = getattr(transformers, MODELS[model_name][1])
    loaded = ts.from_pretrained(auto, tmp_path / "hf")
    assert type(loaded) is type(model) and not loaded.training
    assert len(ts.summary(loaded).changed) == n_quantized
    assert torch.equal(_output(loaded, x), out)
    # built with its parameters on meta, then given the file's tensors: none left behind, ties kept
    assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())
    assert _tied_groups(loaded) == _tied_groups(model)

    # Route 1b: transformers' own from_pretrained, through the quantizer tensorslim registers
    plain = auto.from_pretrained(tmp_path / "hf").eval()
    assert len(ts.summary(plain).changed) == n_quantized
    assert torch.equal(_output(plain, x), out)

    # Route 2: ts.save(model, file) -> Auto class from_config(config) + ts.load
    ts.save(model, tmp_path / "model.slim.safetensors")
    fresh = auto.from_config(transformers.AutoConfig.from_pretrained(tmp_path / "hf")).eval()
    ts.load(fresh, tmp_path / "model.slim.safetensors")
    assert torch.equal(_output(fresh, x), out)

    if model_name in ("gpt2", "llama"):
        ids = x["input_ids"][:1, :5]
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=1)
        before = model.generate(ids, **kw)
        assert before.shape == (1, 9)
        assert torch.equal(loaded.generate(ids, **kw), before)
        assert torch.equal(fresh.generate(ids, **kw), before)
        assert torch.equal(plain.generate(ids, **kw), before)


def test_ts_from_pretrained_refuses_an_uncompressed_directory(tmp_path):
    """ts.from_pretrained refuses a directory tensorslim did not write (nothing to load into
    compressed layers), naming the right call."""
    model = _build("gpt2")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no tensorslim quantization_config"):
        ts.from_pretrained(transformers.AutoModelForCausalLM, tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        ts.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "missing")


def test_config_describes_the_compressed_layers():
    model = _build("gpt2")
    ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    qcfg = model.config.quantization_config
    assert qcfg["quant_method"] == "tensorslim"
    assert set(qcfg["layers"]) == {n for n, m in model.named_modules()
                                   if isinstance(m, (ts.WeightOnlyLinear, ts.QuantizedEmbedding))}
    assert not any(isinstance(m, Conv1D) for m in model.modules())


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_half_model_round_trip(model_name, tmp_path):
    """A model halved after quantization saves fp16 float layers and comes back in fp16. Both
    routes build the model as transformers does: LLaMA's rotary inv_freq stays fp32 (where
    .half() made it fp16), so the LLaMA halved by hand is compared with the two routes' models,
    and one loaded in bf16 the usual way comes back bit for bit (a cast of the whole model to
    the config's dtype moved it)."""
    model = _build(model_name)
    ts.quantize(model, ts.Int4WeightOnly(group_size=32), progress=False)
    model.half()
    x = _inputs(model_name, 1)
    out = _output(model, x)
    assert out.dtype == torch.float16
    model.save_pretrained(tmp_path)
    loaded = ts.from_pretrained(transformers.AutoModelForCausalLM, tmp_path)
    if model_name == "llama":
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.equal(_output(loaded, x), _output(plain, x))
        assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
        float_dir, bf16_dir = tmp_path / "float", tmp_path / "bf16"
        _build(model_name).save_pretrained(float_dir)
        usual = transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.bfloat16).eval()
        ts.quantize(usual, ts.Int4WeightOnly(group_size=32), progress=False)
        usual.save_pretrained(bf16_dir)
        again = ts.from_pretrained(transformers.AutoModelForCausalLM, bf16_dir)
        assert torch.equal(_output(again, x), _output(usual, x))
        return
    assert torch.equal(_output(loaded, x), out)
    if model_name == "gpt2":
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
        layer = plain.transformer.h[0].attn.c_attn
        assert layer.compute_dtype == torch.float16 and layer.scales.dtype == torch.float32
        assert torch.equal(_output(plain, x), out)
        plain.float()  # transformers' guard against casting quantized models does not apply
        assert layer.compute_dtype == torch.float32


def test_a_directory_that_does_not_fit_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _build("gpt2")
    ts.quantize(model, ts.Int4WeightOnly(group_size=32), progress=False)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'transformer.h.0.attn.c_attn' is Conv1D.*file holds a .192, 64. int4"):
        ts.from_pretrained(transformers.AutoModelForCausalLM, tmp_path, n_embd=32, n_head=2)
    state = load_file(tmp_path / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.scales"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not match the model: missing \['transformer.h.1.mlp.c_fc.scales'\]"):
        ts.from_pretrained(transformers.AutoModelForCausalLM, tmp_path)


def test_both_routes_refuse_missing_tensors_and_corrupt_configs(tmp_path):
    """transformers' route filled a compressed layer's missing tensors with fresh memory
    (uninitialized scales, wrong or non-finite outputs); corrupt quantization_configs gave
    TypeError / AttributeError / KeyError, and a huge CSR nnz was allocated before any check."""
    import json

    from safetensors.torch import load_file, save_file

    model = _build("llama")
    ts.quantize(model, ts.Int4WeightOnly(group_size=32), progress=False)
    model.save_pretrained(tmp_path / "good")
    routes = (lambda d: ts.from_pretrained(transformers.AutoModelForCausalLM, d),
              lambda d: transformers.AutoModelForCausalLM.from_pretrained(d))

    def variant(name, edit_config=None, drop=None):
        d = tmp_path / name
        d.mkdir()
        config = json.loads((tmp_path / "good" / "config.json").read_text())
        if edit_config:
            edit_config(config["quantization_config"])
        (d / "config.json").write_text(json.dumps(config))
        state = load_file(tmp_path / "good" / "model.safetensors")
        if drop:
            del state[drop]
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
        return d

    layer = "model.layers.1.mlp.down_proj"
    cases = [(variant("no_scales", drop=f"{layer}.scales"), rf"{layer}.scales"),
             (variant("str_version", lambda q: q.update(format_version="1")), "format_version '1' is not an int"),
             (variant("no_layers", lambda q: q.update(layers={})), "'layers' must list"),
             (variant("spec_str", lambda q: q["layers"].update({layer: "int4"})), "lacks"),
             (variant("no_in", lambda q: q["layers"][layer].pop("in_features")), r"lacks \['in_features'\]"),
             (variant("big_group", lambda q: q["layers"][layer].update(group_size=64)), "the spec makes")]
    for directory, match in cases:
        for load in routes:
            with pytest.raises(ValueError, match=match):
                load(directory)


def test_t5_with_a_compressed_head_loads_through_transformers(tmp_path):
    """T5's config ties the head to the token tables again on load whatever the saved config
    says: transformers' from_pretrained raised '`weight` is not an nn.Parameter'."""
    model = _build("t5")
    ts.quantize(model, ts.Int8WeightOnly(skip_output_head=False), progress=False)
    x = _inputs("t5", 1)
    out = _output(model, x)
    model.save_pretrained(tmp_path)
    for loaded in (transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval(),
                   ts.from_pretrained(transformers.AutoModelForSeq2SeqLM, tmp_path)):
        assert isinstance(loaded.lm_head, ts.nn.CompressedLinear)
        assert torch.equal(_output(loaded, x), out)


def test_a_compressed_tied_head_loads_through_transformers(tmp_path):
    """skip_output_head=False compresses GPT-2's head, tied to its float token table: the
    config stops tying them, so transformers' own from_pretrained loads the directory (it raised
    '`weight` is not an nn.Parameter' while tying)."""
    model = _build("gpt2")
    assert model.config.tie_word_embeddings
    ts.quantize(model, ts.Int8WeightOnly(skip_output_head=False), progress=False)
    assert isinstance(model.lm_head, ts.nn.CompressedLinear) and not model.config.tie_word_embeddings
    x = _inputs("gpt2", 1)
    out = _output(model, x)
    model.save_pretrained(tmp_path / "hf")
    for loaded in (ts.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "hf"),
                   transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()):
        assert isinstance(loaded.lm_head, ts.nn.CompressedLinear)
        assert torch.equal(_output(loaded, x), out)


def test_from_pretrained_names_a_truncated_weights_file(tmp_path):
    model = _gpt2()
    ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{weights}: not a readable safetensors file"):
        ts.from_pretrained(transformers.GPT2LMHeadModel, tmp_path)
