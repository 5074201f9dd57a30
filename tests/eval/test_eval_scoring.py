"""acc/acc_norm arithmetic, lm-eval tokenisation, the scorer protocol on the tiny model, option parsing."""

import pytest
import torch

from kvexport.cli import main as eval_main
from kvexport.errors import KvxError
from kvexport.eval.cli import split_policies, split_tasks
from kvexport.eval.scoring import (
    ReferenceScorer,
    Scorer,
    choice_metrics,
    default_prefill_chunk,
    encode_pair,
    make_scorer,
)
from kvexport.kv.quant import bits_per_element
from kvexport.session import CacheOptions, Session


def test_acc_and_acc_norm_on_hand_made_scores():
    # raw: choice 2 best; per byte: -10/2=-5, -12/12=-1, -9/3=-3, -30/20=-1.5 -> choice 1
    m = choice_metrics([-10.0, -12.0, -9.0, -30.0], ["ab", "abcdefghijkl", "abc", "a" * 20], gold=1)
    assert (m["pred"], m["pred_norm"], m["acc"], m["acc_norm"]) == (2, 1, 0.0, 1.0)
    assert m["choice_bytes"] == [2, 12, 3, 20]


def test_acc_norm_uses_utf8_bytes_and_ties_go_first():
    # "é" is 2 bytes: -4/2 = -2 for choice 0 vs -3/1 = -3 for choice 1
    assert choice_metrics([-4.0, -3.0], ["é", "e"], gold=0)["pred_norm"] == 0
    m = choice_metrics([-1.0, -1.0, -2.0], ["a", "b", "c"], gold=1)
    assert m["pred"] == 0 and m["acc"] == 0.0
    with pytest.raises(ValueError):
        choice_metrics([-1.0], ["a", "b"], gold=0)


def test_encode_pair_moves_trailing_space(tiny_model):
    tok = tiny_model.tokenizer
    ctx, cont = encode_pair(tok, "Question: Why?\nAnswer:", " Because.")
    assert ctx == tok.encode("Question: Why?\nAnswer:")
    assert ctx + cont == tok.encode("Question: Why?\nAnswer: Because.")
    ctx2, cont2 = encode_pair(tok, "Question: Why?\nAnswer: ", "Because.")
    assert (ctx2, cont2) == (ctx, cont)


def _full_sequence_logprob(loaded, ctx, cont):
    s = Session(loaded, CacheOptions(policy="fp16", sinks=0, window=0, max_context=256))
    lp = torch.log_softmax(s.prefill(ctx + cont), dim=-1)
    return sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_fp16_scores_equal_full_sequence_logprobs(tiny_model):
    tok = tiny_model.tokenizer
    ctx = tok.encode("Roof shingle removal: A man is sitting on a roof. He pulls out a hammer and")
    conts = [
        tok.encode(" starts pulling up roofing."),
        tok.encode(" sings."),
        tok.encode(" is holding a rubik's cube today"),
    ]
    scorer = make_scorer("reference", tiny_model, CacheOptions(policy="fp16", sinks=4, window=8, max_context=256))
    assert isinstance(scorer, Scorer)
    got = scorer.score(ctx, conts)
    want = [_full_sequence_logprob(tiny_model, ctx, c) for c in conts]
    assert got == pytest.approx(want, abs=2e-3)
    st = scorer.kv_stats()
    assert st["tokens_cached"] == len(ctx) and st["avg_bits"] == 16.0  # the context only, continuations not committed


def test_policy_matters_and_window_zero_decodes_token_by_token(tiny_model):
    tok = tiny_model.tokenizer
    ctx = tok.encode("The quick brown fox jumps over the lazy dog because it was in a hurry to get home before dark")
    conts = [tok.encode(" and it ran."), tok.encode(" so it slept.")]
    paper = CacheOptions(policy="static-2", sinks=0, window=0, max_context=256)
    assert default_prefill_chunk(paper) == 1
    token_by_token = ReferenceScorer(tiny_model, paper)
    assert token_by_token.session.max_chunk == 1
    q2 = token_by_token.score(ctx, conts)
    st = token_by_token.kv_stats()
    assert st["class_histogram"]["2"] == len(ctx) and st["avg_bits"] == pytest.approx(bits_per_element(2, 32))
    fp = ReferenceScorer(tiny_model, CacheOptions(policy="fp16", sinks=0, window=0, max_context=256)).score(ctx, conts)
    chunked = ReferenceScorer(tiny_model, paper, prefill_chunk=64).score(ctx, conts)
    assert max(abs(a - b) for a, b in zip(q2, fp)) > 1e-2  # 2-bit keys/values change the scores
    assert max(abs(a - b) for a, b in zip(q2, chunked)) > 1e-4  # chunked prefill sees the chunk at full precision
    # fp16 does not depend on the chunking
    fp_chunked = ReferenceScorer(
        tiny_model, CacheOptions(policy="fp16", sinks=0, window=0, max_context=256), prefill_chunk=64
    ).score(ctx, conts)
    assert fp_chunked == pytest.approx(fp, abs=2e-3)


def test_describe_changes_with_options(tiny_model):
    a = ReferenceScorer(tiny_model, CacheOptions(policy="static-4", window=8)).describe()
    b = ReferenceScorer(tiny_model, CacheOptions(policy="static-4", window=16)).describe()
    assert a != b and a["prefill_chunk"] == 8 and a["backend"] == "reference"


def test_split_policies():
    assert split_policies("fp16,static-8,static-4,static-2,random:4,rule") == [
        "fp16",
        "static-8",
        "static-4",
        "static-2",
        "random:4",
        "rule",
    ]
    assert split_policies("fp16,random:0.5,0.5,0,0,static-4") == ["fp16", "random:0.5,0.5,0,0", "static-4"]
    assert split_policies("random:0.25,0.25,0.25,0.25;learned:/x/c,1.safetensors") == [
        "random:0.25,0.25,0.25,0.25",
        "learned:/x/c,1.safetensors",
    ]
    assert split_policies("fp16,fp16") == ["fp16"]
    for bad in ("fp16,static-3", "random:0.5,0.5", "fp16,,static-4", "nope"):
        with pytest.raises(KvxError):
            split_policies(bad)


def test_split_tasks():
    assert split_tasks("arc_easy,hellaswag") == ["arc_easy", "hellaswag"]
    assert split_tasks("all")[-1] == "wikitext" and len(split_tasks("all")) == 5
    with pytest.raises(KvxError, match="unknown task 'mmlu'"):
        split_tasks("mmlu")


@pytest.mark.parametrize(
    "backend,extra,needle",
    [
        ("executorch", [], "needs --program graphs/<name>"),
        ("reference", ["--program", "graphs/x"], "--program needs --backend"),
        ("tflite", [], "unknown --backend"),
    ],
)
def test_bad_backend_options_are_one_line_errors(backend, extra, needle, capsys):
    assert eval_main(["eval", "--backend", backend, *extra, "--tasks", "arc_easy", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvexport: error:") and needle in err[0]


def test_items_that_fill_the_context_score_one_after_another(tiny_model):
    """Room is checked from the empty cache each item starts from, not from where the last item left it."""
    sc = ReferenceScorer(tiny_model, CacheOptions(max_context=40, window=8, sinks=2))
    ctx, conts = list(range(100, 138)), [[5, 6], [7]]  # 38 + 2 = 40 tokens
    first = sc.score(ctx, conts)
    assert sc.score(ctx, conts) == first
    assert sc.token_logprobs(ctx + [5, 6]).shape == (39, tiny_model.args.vocab_size)
    with pytest.raises(KvxError, match="41 tokens exceed the cache's context of 40"):
        sc.score(ctx, [[5, 6, 7]])
