"""The analytical FLOPs function (flops_visor) against independent references: a hand computation for one small
shape, the weight shapes of real Qwen2 modules (LLaVA-OV 0.5B), and torch's FlopCounterMode on the running
transformers LLaVA-OV and VISOR models."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2Config, SiglipVisionConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from visor_hf.modeling.flops_visor import (
    FlopsShape,
    count_flops,
    decode_flops,
    prefill_flops,
    projector_flops,
    vision_flops,
)
from visor_hf.testing import IMAGE_ID, tiny_llava, visor_from_llava

# L=2 layers, d=8, FFN 16, 2 query heads and 1 kv head of width 4, vocab 10
CONFIG = Qwen2Config(
    num_hidden_layers=2, hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
    vocab_size=10,
)
N_TEXT, N_VISUAL = 3, 5

# Per layer over n tokens (2 FLOPs per multiply-add):
#   q_proj 2*n*8*8 = 128n, k_proj + v_proj 2 * 2*n*8*4 = 128n (GQA: 1 kv head of 4), o_proj 2*n*8*8 = 128n,
#   MLP 3 * 2*n*8*16 = 768n -> 1152 n; attention: 2 (QK^T and AV) * 2 * heads(2) * head_dim(4) = 32 per visible
#   (query, key) pair. LM head: 2 * 8 * 10 = 160 per token.
# CA block: q/o over the text 2*n_t*(64+64) = 256 n_t; attention 32 per (text, visual) pair; at prefill only, over
#   the visual tokens: k/v 2*n_v*2*8*4 = 128 n_v and the depth-wise position conv (kernel 7) 2*7*8 = 112 n_v.
PER_TOKEN, PER_PAIR, HEAD = 1152, 32, 160


def shape():
    return FlopsShape.from_config(CONFIG)


def test_shape_from_config():
    s = shape()
    assert (s.num_layers, s.hidden_size, s.intermediate_size) == (2, 8, 16)
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.vocab_size, s.position_kernel_size) == (2, 1, 4, 10, 7)


def test_dense_prefill_by_hand():
    # N = 8 tokens, causal: 8*9/2 = 36 visible pairs; per layer 1152*8 + 32*36 = 9216 + 1152 = 10368
    assert 2 * (PER_TOKEN * 8 + PER_PAIR * 36) + HEAD == 20896
    assert prefill_flops(shape(), N_TEXT, N_VISUAL) == 20896
    # logits for every position: LM head on 8 tokens
    assert prefill_flops(shape(), N_TEXT, N_VISUAL, lm_head_tokens=8) == 2 * 10368 + 8 * HEAD
    # VISOR with every layer an active SA layer and no CA layer is dense LLaVA-OV
    assert prefill_flops(shape(), N_TEXT, N_VISUAL, sa_layers=[0, 1], ca_layers=[]) == 20896


def test_visor_prefill_by_hand():
    # layer 1: active SA layer over all 8 tokens = 10368
    # layer 0: text-only over 3 tokens: 1152*3 + 32*(3*4/2) = 3456 + 192 = 3648
    #          + CA block: q/o 256*3 = 768, text x visual pairs 32*3*5 = 480 (every pair),
    #            k/v over the 5 visual tokens 128*5 = 640, position conv 112*5 = 560 -> 2448
    assert 10368 + 3648 + 2448 + HEAD == 16624
    assert prefill_flops(shape(), N_TEXT, N_VISUAL, sa_layers=[1], ca_layers=[0]) == 16624
    # CA only: both layers text-only, one CA block
    assert prefill_flops(shape(), N_TEXT, N_VISUAL, sa_layers=[], ca_layers=[0]) == 2 * 3648 + 2448 + HEAD
    # no visual tokens: a plain LM, the CA block is skipped
    assert prefill_flops(shape(), N_TEXT, 0, sa_layers=[1], ca_layers=[0]) == 2 * 3648 + HEAD
    assert prefill_flops(shape(), N_TEXT, 0) == 2 * 3648 + HEAD  # dense on text only: the same
    # the position conv follows the kernel of the shape (0: not counted)
    no_conv = FlopsShape(**{**shape().__dict__, "position_kernel_size": 0})
    assert prefill_flops(no_conv, N_TEXT, N_VISUAL, sa_layers=[1], ca_layers=[0]) == 16624 - 560


def test_decode_by_hand():
    s = shape()
    # dense: per layer 1152 + 32 * (3 + 5 + 1) = 1152 + 288 = 1440
    assert decode_flops(s, N_TEXT, N_VISUAL) == 2 * 1440 + HEAD == 3040
    # VISOR: SA layer 1 = 1440; text layer 0 = 1152 + 32 * (3 + 1) = 1280; CA = 256*1 + 32*5 = 416: the visual
    # K/V (and their position conv) come from the cache at decode time
    assert decode_flops(s, N_TEXT, N_VISUAL, sa_layers=[1], ca_layers=[0]) == 1440 + 1280 + 416 + HEAD == 3296
    # each later step sees one more text token: +32 per layer (both layers hold the text)
    steps = [decode_flops(s, N_TEXT + k, N_VISUAL, sa_layers=[1], ca_layers=[0]) for k in range(3)]
    assert steps == [3296, 3296 + 64, 3296 + 128]


def test_count_flops_one_call():
    count = count_flops(CONFIG, N_TEXT, N_VISUAL, sa_layers=[1], ca_layers=[0], decode_steps=2)
    assert count.prefill == 16624 and count.decode == [3296, 3360]
    assert count.dense_prefill == 20896 and count.dense_decode == [3040, 3104]
    assert count.prefill_ratio == pytest.approx(20896 / 16624)
    assert (count.vision_tower, count.projector) == (0, 0)
    assert count.total == 16624 + 3296 + 3360
    dense = count_flops(shape(), N_TEXT, N_VISUAL, decode_steps=1)
    assert (dense.prefill, dense.decode, dense.prefill_ratio) == (20896, [3040], 1.0)


def test_vision_and_projector_by_hand():
    vision = SiglipVisionConfig(hidden_size=8, intermediate_size=16, patch_size=2, image_size=4, num_hidden_layers=1,
                                num_attention_heads=2)
    # 4 patches of 2x2x3: embedding 2*4*12*8 = 768; layer 2*4*(4*64 + 2*8*16) + 4*4*4*8 = 4096 + 512 = 4608
    assert vision_flops(vision, num_crops=2) == 2 * (768 + 4608)
    # projector 8 -> 6 -> 6 over 4 patches: 2*4*(8*6 + 6*6) = 672
    assert projector_flops(vision, num_crops=2, projector_out=6) == 2 * 672
    assert vision_flops(vision, num_crops=2, projector_out=6) == 2 * (768 + 4608 + 672)
    # from a full LLaVA-OV config: tower and projector apart in count_flops
    llava_config = tiny_llava().config
    count = count_flops(llava_config, 10, 16, num_crops=3)
    assert count.vision_tower == vision_flops(llava_config, 3, projector_out=0)
    assert count.projector == projector_flops(llava_config.vision_config, 3, projector_out=32)
    assert count.vision_tower + count.projector == vision_flops(llava_config, 3)


def test_real_0_5b_shapes_from_module_weights():
    """LLaVA-OV 0.5B LLM (Qwen2-0.5B): the projection cost taken from the weights of a real Qwen2 decoder layer."""
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2)
    with torch.device("meta"):
        layer = Qwen2DecoderLayer(config, layer_idx=0)
    weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    kv_width = layer.self_attn.k_proj.weight.shape[0]
    assert kv_width == 128  # 2 kv heads x 64
    n_text, n_visual, layers = 64, 7290, 24
    total = n_text + n_visual
    per_pair = 2 * 2 * 896  # QK^T and AV over 14 heads x 64
    dense = layers * (2 * total * weights + per_pair * total * (total + 1) // 2) + 2 * 896 * 151936
    s = FlopsShape.from_config(config)
    assert prefill_flops(s, n_text, n_visual) == dense
    # VISOR, paper layout, 2 SA layers: 2 full layers, 22 text-only layers, 8 CA blocks
    text_layer = 2 * n_text * weights + per_pair * n_text * (n_text + 1) // 2
    ca_block = 2 * n_text * 2 * 896 * 896 + per_pair * n_text * n_visual + 2 * n_visual * (2 * 896 * kv_width + 7 * 896)
    visor = 2 * (dense - 2 * 896 * 151936) // layers + 22 * text_layer + 8 * ca_block + 2 * 896 * 151936
    ca = [0, 3, 6, 9, 12, 15, 18, 21]
    assert prefill_flops(s, n_text, n_visual, sa_layers=[2, 14], ca_layers=ca) == visor
    # decode step after the prompt: dense sees 7,355 keys per layer; VISOR's text layers 65, CA blocks 7,290
    dense_step = layers * (2 * weights + per_pair * (total + 1)) + 2 * 896 * 151936
    assert decode_flops(s, n_text, n_visual) == dense_step
    visor_step = (2 * (2 * weights + per_pair * (total + 1)) + 22 * (2 * weights + per_pair * (n_text + 1))
                  + 8 * (2 * 2 * 896 * 896 + per_pair * n_visual) + 2 * 896 * 151936)
    assert decode_flops(s, n_text, n_visual, sa_layers=[2, 14], ca_layers=ca) == visor_step


def test_bad_input_is_refused():
    s = shape()
    with pytest.raises(ValueError, match="n_text"):
        prefill_flops(s, -1, 5)
    with pytest.raises(ValueError, match="out of range"):
        prefill_flops(s, 3, 5, sa_layers=[2])
    with pytest.raises(ValueError, match="out of range"):
        prefill_flops(s, 3, 0, sa_layers=[], ca_layers=[7])  # checked even without visual tokens
    with pytest.raises(ValueError, match="disjoint"):
        prefill_flops(s, 3, 5, sa_layers=[0], ca_layers=[0])
    with pytest.raises(ValueError, match="sa_layers"):
        decode_flops(s, 3, 5, sa_layers=None, ca_layers=[0])
    with pytest.raises(TypeError, match="layer indices"):
        prefill_flops(s, 3, 5, sa_layers="max")
    with pytest.raises(ValueError, match="multiple"):
        FlopsShape(num_layers=2, hidden_size=8, intermediate_size=16, num_heads=3, num_kv_heads=2, head_dim=4,
                   vocab_size=10)
    with pytest.raises(ValueError, match="num_crops"):
        count_flops(s, 3, 5, num_crops=1)


# -- against FlopCounterMode on the real models ---------------------------------------------------------------------
# FlopCounterMode counts the matrix products and convolutions that run. An eager attention computes every (query,
# key) pair of its score matrix, masked or not, so over n tokens it counts n^2 pairs where flops_visor counts the
# n(n+1)/2 visible ones; the tests convert the counts with `square_minus_causal`.


def square_minus_causal(s: FlopsShape, n: int) -> int:
    return s.attention(n * n) - s.attention(n * (n + 1) // 2)


def test_dense_prefill_matches_flop_counter_on_transformers_llava():
    llava = tiny_llava(attn_implementation="eager")
    s = FlopsShape.from_config(llava.config)
    lm, n = llava.model.language_model, 11
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        hidden = lm(inputs_embeds=torch.randn(1, n, s.hidden_size)).last_hidden_state
        llava.lm_head(hidden[:, -1:])
    assert counter.get_total_flops() == prefill_flops(s, n, 0) + s.num_layers * square_minus_causal(s, n)


@pytest.mark.parametrize("request_layers", [[], [4], [1, 4]])
def test_visor_prefill_and_decode_match_flop_counter(request_layers):
    llava = tiny_llava(attn_implementation="eager")
    ca = [0, 3]
    visor = visor_from_llava(llava, attn_implementation="eager", cross_attention_layers=ca,
                             self_attention_layers=[1, 4], configurations=[[1, 4]], router_layer=None)
    s = FlopsShape.from_config(visor.config)
    before, n_visual, after = 3, 20, 5
    ids = torch.cat([torch.randint(10, 40, (1, before)), torch.full((1, n_visual), IMAGE_ID),
                     torch.randint(10, 40, (1, after))], 1)
    features = torch.randn(n_visual, s.hidden_size)
    visor.model.get_image_features = lambda *args, **kwargs: SimpleNamespace(pooler_output=[features])
    n_text, total = before + after, before + n_visual + after
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        out = visor(input_ids=ids, pixel_values=torch.zeros(1, 1), logits_to_keep=1,
                    visor_configuration=request_layers, use_cache=True)
    counts = counter.get_flop_counts()
    # the conv's image-boundary correction (a few slots per image) is left out of flops_visor on purpose
    correction = sum(
        flops for name, ops in counts.items() if name.endswith("position_embedding")
        for op, flops in ops.items() if "convolution" not in str(op)
    )
    expected = prefill_flops(s, n_text, n_visual, request_layers, ca)
    expected += len(request_layers) * square_minus_causal(s, total)
    expected += (s.num_layers - len(request_layers)) * square_minus_causal(s, n_text)
    # without autograd the position convolution runs tap by tap (element-wise multiply-adds, which the counter does
    # not see): its FLOPs, `2·k·d` per visual token and CA layer, are in `expected` only
    position_conv = len(ca) * 2 * s.position_kernel_size * s.hidden_size * n_visual
    assert counter.get_total_flops() - correction == expected - position_conv
    # one decoding step on the cache: the new token attends what each layer holds (no convention to convert)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        visor(input_ids=torch.tensor([[12]]), past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    assert counter.get_total_flops() == decode_flops(s, n_text, n_visual, request_layers, ca)


def test_count_flops_with_a_visor_config():
    visor = visor_from_llava(tiny_llava(), cross_attention_layers=[0, 3], self_attention_layers=[1, 4],
                             configurations=[[1], [1, 4]], router_layer=None)
    config, s = visor.config, FlopsShape.from_config(visor.config)
    assert count_flops(config, 7, 20, sa_layers=0).prefill == prefill_flops(s, 7, 20, [1], [0, 3])
    assert count_flops(config, 7, 20, sa_layers="max").prefill == prefill_flops(s, 7, 20, [1, 4], [0, 3])
    assert count_flops(config, 7, 20, sa_layers=[4]).decode == []
    assert count_flops(config, 7, 20, sa_layers=[4], decode_steps=1).decode == [decode_flops(s, 7, 20, [4], [0, 3])]
    # the model's own report agrees
    assert visor.visor_flops(7, 20, visor_configuration=1)["prefill"] == count_flops(config, 7, 20, sa_layers=1).prefill
    with pytest.raises(ValueError, match="configuration index"):
        count_flops(config, 7, 20, sa_layers=5)
    with pytest.raises(ValueError, match="VISOR config"):
        count_flops(CONFIG, 7, 20, sa_layers="max")
