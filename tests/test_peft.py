"""PEFT LoRA on a converted VISOR model: LLM attention/MLP and CA blocks (not SigLIP), router as modules_to_save."""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText

import visor_hf  # noqa: F401
from visor_hf.conversion import convert
from visor_hf.testing import IMAGE_ID, build_batch, save_tiny_llava, word_ids

# The LLM's attention and MLP projections and the cross-attention blocks' projections; SigLIP's
# `vision_tower...self_attn.q_proj` must not match (PEFT matches a regex against the full module name).
LORA_TARGETS = (
    r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    r"|model\.cross_attention_blocks\.\d+\.cross_attn\.(q|k|v|o)_proj"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    save_tiny_llava(root / "src")
    return convert(root / "src", root / "visor")


def batch_for(model):
    route = model.config.routing_token_id
    samples = [
        {"text": word_ids("what is") + ["<image>"] + word_ids("the colour ?") + [route] + word_ids("red"), "images": [(16, 32)]},
        {"text": ["<image>"] + word_ids("how many ?") + [route] + word_ids("two"), "images": [(16, 16)]},
    ]
    batch = build_batch(model, samples)
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (labels == IMAGE_ID) | (labels == route)] = -100
    batch["labels"] = labels
    return batch


def test_lora_trains_saves_reloads_and_merges(folder, tmp_path):
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager")
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, modules_to_save=["router"])
    model = get_peft_model(base, config)

    wrapped = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped and not [n for n in wrapped if "vision_tower" in n or "multi_modal_projector" in n]
    assert any("cross_attention_blocks" in n for n in wrapped)
    assert any(re.search(r"language_model\.layers\.\d+\.mlp\.down_proj$", n) for n in wrapped)
    assert any("modules_to_save" in n and "router" in n for n, _ in model.named_parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "router" in n for n in trainable)

    batch = batch_for(base)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(4):
        configuration = ["max", "auto"][step % 2]  # "auto" runs the router (its copy gets gradients)
        output = model(**batch, visor_configuration=configuration, output_router_logits=True)
        loss = output.loss + output.router_logits.logsumexp(-1).mean() * 0.01
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs, visor_configuration="max").logits
        expected_router = model(**inputs, output_router_logits=True).router_logits

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager"), tmp_path / "adapter"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs, visor_configuration="max").logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded(**inputs, output_router_logits=True).router_logits, expected_router, atol=1e-5, rtol=1e-5)

    merged = reloaded.merge_and_unload()
    assert type(merged).__name__ == "VisorForConditionalGeneration"
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs, visor_configuration="max").logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(**inputs, output_router_logits=True).router_logits, expected_router, atol=1e-5, rtol=1e-5)
    # the merged model saves as a plain VISOR checkpoint and reloads to the same logits
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs, visor_configuration="max").logits, expected, atol=1e-5, rtol=1e-5)


def test_shipped_lora_targets_match_the_llm_and_ca_blocks_only(folder):
    """The training pipeline's `LORA_TARGET_MODULES` (PEFT full-matches a string regex against each module name)
    picks exactly the LLM attention/MLP projections and the CA blocks' projections: every one of them, no SigLIP
    projection (its `q_proj` has the same leaf name), nothing in the projector or the router."""
    from visor_hf.training.stages import LORA_TARGET_MODULES

    model = AutoModelForImageTextToText.from_pretrained(folder)
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    chosen = {n for n in names if re.fullmatch(LORA_TARGET_MODULES, n)}
    text = model.config.text_config
    expected = {
        f"model.language_model.layers.{i}.{p}"
        for i in range(text.num_hidden_layers)
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    expected |= {f"model.cross_attention_blocks.{i}.cross_attn.{p}_proj" for i in model.config.cross_attention_layers for p in "qkvo"}
    assert chosen == expected
    assert any(n.startswith("model.vision_tower.") and n.endswith("q_proj") for n in names)  # the trap exists
    assert {n for n in names if re.fullmatch(LORA_TARGETS, n)} == expected  # the adapter test above uses the same set
