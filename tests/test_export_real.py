"""Integration: the real default model through ``kvexport build --target executorch`` (fused ops)
and ``--target onnx`` (learned policy, fp32 weights), each checked with the parity engine over 64
steps and against the reference's greedy text.

The ExecuTorch build lowers ~7,000 nodes to ExecuTorch/XNNPACK (about 15 minutes on 2 cores, the
longest test of the suite), the ONNX build about 8; each program is built once.
"""

import pytest

from kvexport.export.build import build
from kvexport.export.runners import open_runner
from kvexport.parity import run_parity
from kvexport.session import CacheOptions, Session

pytestmark = pytest.mark.real

OPTS = CacheOptions(policy="learned", budget_bits=4, max_context=256)
PROMPT = "The three largest cities in Germany are"


@pytest.fixture(scope="module", params=["executorch", "onnx"])
def real_program(request, real_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("graphs") / f"default-learned4-{request.param}"
    return build(real_model, OPTS, request.param, "fused", "fp32", out, log=lambda m: None)


def test_default_model_program_passes_parity_over_64_steps(real_program, real_model):
    result = run_parity(real_program, steps=64, loaded=real_model)
    assert result["passed"], {k: v for k, v in result.items() if k != "rows"}
    assert result["steps"] >= 64 and result["cache_state_equal"]
    assert result["rows"][-1]["avg_bits"] < 16  # tokens really left the window into quantized pools


def test_greedy_text_matches_the_reference(real_program, real_model):
    ids = real_model.tokenizer.encode(PROMPT)
    reference = Session(real_model, OPTS).generate(ids, max_new_tokens=24)["new_ids"]
    runner = open_runner(real_program)
    logits = runner.prefill(ids)
    program = []
    for _ in range(len(reference)):
        program.append(int(logits.argmax()))
        logits = runner.step([program[-1]])
    assert len(reference) > 8 and program == reference
