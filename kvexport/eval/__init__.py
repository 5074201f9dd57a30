"""Evaluation harness (``kvexport eval``): benchmark KV policies with the policy in the loop.

* :mod:`~kvexport.eval.tasks`     data loaders + lm-eval prompt formats (HellaSwag, ARC-C/E, OBQA)
* :mod:`~kvexport.eval.wikitext`  WikiText-2 perplexity and KL vs FP16 on the held-out half
* :mod:`~kvexport.eval.scoring`   the ``Scorer`` interface, the reference scorer, acc/acc_norm
* :mod:`~kvexport.eval.runner`    policies x tasks, resumable per-item records
* :mod:`~kvexport.eval.longctx`   long context: KL/NLL/top-1 vs FP16 per token at 512-8k, the passkey probe
* :mod:`~kvexport.eval.passkey`   passkey items generated offline (a key planted at a depth in filler)
* :mod:`~kvexport.eval.records`   the ``items.jsonl`` store and configuration hashes
* :mod:`~kvexport.eval.stats`     bootstrap CIs, paired bootstrap, McNemar
* :mod:`~kvexport.eval.report`    ``summary.json``, ``table.md``, ``acc_vs_bits.png``
* :mod:`~kvexport.eval.long_report`  ``long_summary.json``, ``long_table.md``, ``longppl.png``, ``passkey.png``
* :mod:`~kvexport.eval.cli`       ``add_arguments(parser)`` / ``run(args)`` for ``kvexport eval``
"""
