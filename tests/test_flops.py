"""The analytical FLOPs function (flops_visor) against a hand computation for one small shape."""

from transformers import Qwen2Config, SiglipVisionConfig

from visor_hf.modeling.flops_visor import FlopsShape, decode_flops, prefill_flops, vision_flops

# L=2 layers, d=8, FFN 16, 2 query heads and 1 kv head of width 4, vocab 10
CONFIG = Qwen2Config(
    num_hidden_layers=2, hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
    vocab_size=10,
)
N_TEXT, N_VISUAL = 3, 5

# Per layer over n tokens (2 FLOPs per multiply-add):
#   q_proj 2*n*8*8 = 128n, k_proj + v_proj 2 * 2*n*8*4 = 128n, o_proj 2*n*8*8 = 128n, MLP 3 * 2*n*8*16 = 768n
#   -> 1152 n; attention: 2 (QK^T and AV) * 2 * heads(2) * head_dim(4) = 32 per visible (query, key) pair.
# LM head: 2 * 8 * 10 = 160 per token.
PER_TOKEN, PER_PAIR, HEAD = 1152, 32, 160


def test_shape_from_config():
    shape = FlopsShape.from_config(CONFIG)
    assert (shape.num_layers, shape.hidden_size, shape.intermediate_size) == (2, 8, 16)
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.vocab_size) == (2, 1, 4, 10)


def test_dense_prefill_by_hand():
    # N = 8 tokens, causal: 8*9/2 = 36 visible pairs; per layer 1152*8 + 32*36 = 9216 + 1152 = 10368
    expected = 2 * 10368 + HEAD
    assert expected == 2 * (PER_TOKEN * 8 + PER_PAIR * 36) + HEAD == 20896
    assert prefill_flops(FlopsShape.from_config(CONFIG), N_TEXT, N_VISUAL) == 20896
    # logits for every position: LM head on 8 tokens
    assert prefill_flops(FlopsShape.from_config(CONFIG), N_TEXT, N_VISUAL, lm_head_tokens=8) == 2 * 10368 + 8 * HEAD


def test_visor_prefill_by_hand():
    # layer 1: active SA layer over all 8 tokens = 10368
    # layer 0: text-only over 3 tokens: 1152*3 + 32*(3*4/2) = 3456 + 192 = 3648
    #          + CA block: q/o over the text 2*3*(64+64) = 768, text x visual pairs 32*3*5 = 480,
    #            k/v over the 5 visual tokens 2*5*2*8*4 = 640 -> 1888
    expected = 10368 + 3648 + 1888 + HEAD
    assert expected == 16064
    assert prefill_flops(FlopsShape.from_config(CONFIG), N_TEXT, N_VISUAL, sa_layers=[1], ca_layers=[0]) == 16064
    # CA only: both layers text-only, one CA block
    assert prefill_flops(FlopsShape.from_config(CONFIG), N_TEXT, N_VISUAL, sa_layers=[], ca_layers=[0]) == 2 * 3648 + 1888 + HEAD
    # no visual tokens: a plain LM, the CA block is skipped
    assert prefill_flops(FlopsShape.from_config(CONFIG), N_TEXT, 0, sa_layers=[1], ca_layers=[0]) == 2 * 3648 + HEAD


def test_decode_by_hand():
    shape = FlopsShape.from_config(CONFIG)
    # dense: per layer 1152 + 32 * (3 + 5 + 1) = 1152 + 288 = 1440
    assert decode_flops(shape, N_TEXT, N_VISUAL) == 2 * 1440 + HEAD == 3040
    # VISOR: SA layer 1 = 1440; text layer 0 = 1152 + 32 * (3 + 1) = 1280; CA = 2*1*(64+64) + 32*5 = 416
    # (visual k/v come from the cache at decode time)
    assert decode_flops(shape, N_TEXT, N_VISUAL, sa_layers=[1], ca_layers=[0]) == 1440 + 1280 + 416 + HEAD == 3296


def test_vision_by_hand():
    vision = SiglipVisionConfig(hidden_size=8, intermediate_size=16, patch_size=2, image_size=4, num_hidden_layers=1,
                                num_attention_heads=2)
    # 4 patches of 2x2x3: embedding 2*4*12*8 = 768; layer 2*4*(4*64 + 2*8*16) + 4*4*4*8 = 4096 + 512 = 4608
    assert vision_flops(vision, num_crops=2) == 2 * (768 + 4608)
    # projector 8 -> 6 -> 6 over 4 patches: 2*4*(8*6 + 6*6) = 672
    assert vision_flops(vision, num_crops=2, projector_out=6) == 2 * (768 + 4608 + 672)
