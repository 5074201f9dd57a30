"""Evaluation harness (``kvexport eval``): benchmark KV policies with the policy in the loop.

* :mod:`~kvexport.eval.tasks`     data loaders + lm-eval prompt formats (HellaSwag, ARC-C/E, OBQA)
* :mod:`~kvexport.eval.wikitext`  WikiText-2 perplexity and KL vs FP16 on the held-out half
* :mod:`~kvexport.eval.scoring`   the ``Scorer`` interface, the reference scorer, acc/acc_norm
* :mod:`~kvexport.eval.runner`    policies x tasks, resumable per-item records
* :mod:`~kvexport.eval.records`   the ``items.jsonl`` store and configuration hashes
* :mod:`~kvexport.eval.stats`     bootstrap CIs, paired bootstrap, McNemar
* :mod:`~kvexport.eval.report`    ``summary.json``, ``table.md``, ``acc_vs_bits.png``
* :mod:`~kvexport.eval.cli`       ``add_arguments(parser)`` / ``run(args)`` for ``kvexport eval``
"""
