"""Our decode step vs transformers' LlamaForCausalLM on the real 135M weights (FP32 KV)."""

import pytest
import torch

from kvexport.session import CacheOptions, Session

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def hf_model(real_model):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(real_model.source, dtype=torch.float32).eval()


def test_prefill_then_64_greedy_steps_match_transformers(real_model, hf_model):
    prompt = real_model.tokenizer.encode(
        "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type with an oil-based ink and a screw press adapted from the wine presses "
        "of the Rhineland, and within fifty years")
    prompt = prompt[:32]
    assert len(prompt) == 32
    session = Session(real_model, CacheOptions(policy="fp32", max_context=128, sinks=4, window=32))
    ours = session.prefill(prompt)[-1]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model(ids, use_cache=True)
    past = out.past_key_values
    theirs = out.logits[0, -1]
    worst = 0.0
    for step in range(64):
        delta = (ours - theirs).abs().max().item()
        worst = max(worst, delta)
        assert delta <= 1e-3, f"step {step}: max |dlogit| {delta}"
        tok = int(theirs.argmax())
        assert int(ours.argmax()) == tok, f"step {step}: greedy tokens differ"
        ours = session.step([tok])[-1]
        with torch.no_grad():
            out = hf_model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past, theirs = out.past_key_values, out.logits[0, -1]
    print(f"worst max|dlogit| over 64 steps: {worst:.2e}")


def test_fp16_generate_equals_transformers_greedy(real_model, hf_model):
    prompt = real_model.tokenizer.encode(real_model.tokenizer.apply_chat_template("Name three primary colors."))
    session = Session(real_model, CacheOptions(policy="fp16", max_context=256))
    ours = session.generate(prompt, 24)["new_ids"]
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                eos_token_id=real_model.tokenizer.eos_ids)[0, len(prompt):].tolist()
    assert ours == ref[: len(ours)] and len(ours) == len(ref)
