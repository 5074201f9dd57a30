"""Reference greedy run of a program with the ExecuTorch Python runtime.

``record_greedy`` follows exactly the protocol of the app's decode loop
(Generator.kt): chat template -> ids, prefill in chunks of at most
``get_max_seq_len`` (each given the position of its first token), then one
token per call, greedy argmax, stop on an EOS id / ``max_new_tokens`` /
full context.  It records every forward call (tokens, position, top-k
logits, kv_stats) so the Kotlin loop can be replayed against it.
"""

from __future__ import annotations

from pathlib import Path

from kvexport.android.contract import chat_default_system, read_program, render_chatml


def record_greedy(program_dir, messages: list[dict], max_new_tokens: int = 24, top_k: int = 16) -> dict:
    import torch
    from executorch.runtime import Runtime
    from tokenizers import Tokenizer

    program_dir = Path(program_dir)
    info = read_program(program_dir)
    md = info.metadata
    default_system = chat_default_system(program_dir)
    prompt = render_chatml(messages, default_system, True)
    tok = Tokenizer.from_file(str(program_dir / "tokenizer.json"))
    ids = tok.encode(prompt, add_special_tokens=False).ids

    from executorch.exir._serialize._program import deserialize_pte_binary  # noqa: F401 (executorch present)

    from kvexport.android.opcheck import program_operators
    if any(op.startswith("kvexport::") for op in program_operators(info.pte)[0]):
        # a fused program: the ExecuTorch Python runtime needs our kernel library
        from kvexport.ops import load_executorch_kernels
        load_executorch_kernels()
    fwd = Runtime.get().load_program(str(info.pte)).load_method("forward")
    calls = []

    def forward(tokens: list[int], pos: int):
        logits, stats = fwd.execute([torch.tensor([tokens], dtype=torch.int64), torch.tensor([pos], dtype=torch.int64)])
        row = logits[0].float()
        vals, idx = torch.topk(row, top_k)
        arg = int(torch.argmax(row))  # first index among equal maxima, like Sampler.argmax
        if arg not in idx.tolist():   # a tie at the top-k boundary: make sure the argmax is recorded
            idx, vals = torch.cat([idx, torch.tensor([arg])]), torch.cat([vals, row[arg:arg + 1]])
        calls.append({"tokens": list(tokens), "pos": pos, "top_ids": idx.tolist(),
                      "top_vals": [float(v) for v in vals], "kv_stats": [float(v) for v in stats.tolist()]})
        return arg

    max_ctx, chunk, eos = md["get_max_context_len"], md["get_max_seq_len"], set(md["get_eos_ids"])
    if len(ids) > max_ctx:
        raise ValueError(f"prompt of {len(ids)} tokens exceeds the context of {max_ctx}")
    pos, nxt = 0, None
    for i in range(0, len(ids), chunk):
        nxt = forward(ids[i:i + chunk], pos)
        pos += len(ids[i:i + chunk])
    generated, reason = [], None
    while True:
        if nxt in eos:
            reason = "EOS"
            break
        generated.append(nxt)
        if len(generated) >= max_new_tokens:
            reason = "MAX_NEW_TOKENS"
            break
        if pos >= max_ctx:
            reason = "CONTEXT_FULL"
            break
        nxt = forward([nxt], pos)
        pos += 1
    return {
        "messages": messages,
        "default_system": default_system,
        "max_new_tokens": max_new_tokens,
        "metadata": md,
        "prompt_text": prompt,
        "prompt_ids": ids,
        "calls": calls,
        "generated": generated,
        "stop_reason": reason,
        "text": tok.decode(generated),
    }
