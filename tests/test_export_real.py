"""Integration: the real default model as ``kvexport build`` makes it: fused ops, the GGUF's own 4-bit codes
(``--target executorch``: ``q4-q8``; ``--target onnx``: ``q4``); the ExecuTorch program with build's default
policy (``static-k4v2``), the ONNX one with the learned controller (B=4) inside the graph; each checked with
the parity engine over 64 steps and against the reference's greedy text.

The two builds are the longest tests of the suite (several minutes each on 2 cores); each program is
built once.
"""

import pytest

from kvexport.export.build import DEFAULT_WEIGHTS, build, read_manifest
from kvexport.export.runners import open_runner
from kvexport.parity import dynamic_activations, reference_model, run_parity
from kvexport.session import CacheOptions, Session

pytestmark = pytest.mark.real

OPTS = {"executorch": CacheOptions(policy="static-k4v2", max_context=256),
        "onnx": CacheOptions(policy="learned", budget_bits=4, max_context=256)}
PROMPT = "The three largest cities in Germany are"


@pytest.fixture(scope="module", params=["executorch", "onnx"])
def real_program(request, real_model, tmp_path_factory):
    opts = OPTS[request.param]
    out = tmp_path_factory.mktemp("graphs") / f"default-{opts.policy}-{request.param}"
    return build(real_model, opts, request.param, "fused", DEFAULT_WEIGHTS[request.param], out, log=lambda m: None)


def test_default_model_program_passes_parity_over_64_steps(real_program, real_model):
    result = run_parity(real_program, steps=64, loaded=real_model)
    assert result["passed"], {k: v for k, v in result.items() if k != "rows"}
    assert result["steps"] >= 64
    assert result["cache_state_equal"] or "noise_floor" in result  # classes may part only under the noise rule
    assert result["rows"][-1]["avg_bits"] < 16  # tokens really left the window into quantized pools


def test_greedy_text_matches_the_reference(real_program, real_model):
    """ONNX ``q4`` keeps fp32 activations: the program's greedy text is the reference's, token for token.
    ExecuTorch ``q4-q8`` quantizes activations at run time, so float noise may flip a near-tie and the texts
    part (kvexport.parity's noise floor); then the reference must find the program's text about as likely
    as its own: mean NLL per token within 1 nat (garbage costs 5-10)."""
    manifest = read_manifest(real_program)
    ids = real_model.tokenizer.encode(PROMPT)
    opts = OPTS[manifest["target"]]
    session = Session(real_model, opts, model=reference_model(real_model, manifest))  # the program's weights
    reference = session.generate(ids, max_new_tokens=24)["new_ids"]
    runner = open_runner(real_program)
    logits = runner.prefill(ids)
    program = []
    for _ in range(len(reference)):
        program.append(int(logits.argmax()))
        logits = runner.step([program[-1]])
    assert len(reference) > 8
    if not dynamic_activations(manifest):
        assert program == reference
        return

    def nll(continuation: list[int]) -> float:  # mean per token, under the reference
        return -session.score_continuations(ids, [continuation])[0] / len(continuation)

    assert nll(program) <= nll(reference) + 1.0, (program, reference)


def test_the_embedded_gguf_holds_its_q4_1_codes(real_model):
    """``kvexport build`` picks the 4-bit formats from this check; the converted GGUF's weights carry
    Hugging Face names (``model.layers...``)."""
    from kvexport.models.q4 import holds_q4_1_codes

    assert holds_q4_1_codes(real_model.state_dict)
