"""Offline Android checks of a program directory, without the test suite:

    python -m kvexport.android.check graphs/<name>

validates the I/O contract the app expects (as ``bundle`` does, writing
nothing) and runs the operator check against the provisioned Android runtime
library (arm64-v8a and x86_64).  Exit status 0 when the program is bundleable
and runs on the stock runtime, 1 otherwise (e.g. ``--ops fused`` programs,
which need a custom runtime build).
"""

from __future__ import annotations

import sys


def check(program_dir) -> bool:
    from kvexport.android import opcheck
    from kvexport.android.bundle import BundleError, build_contract
    from kvexport.android.provision import provision

    try:
        contract, warnings = build_contract(program_dir)
    except BundleError as e:
        print(f"contract: FAILED: {e}")
        return False
    md = contract["metadata"]
    print(f"contract: ok (layout {contract['layout_version']}, ops_mode {contract['ops_mode']}, "
          f"ctx {md['get_max_context_len']}, chunk {md['get_max_seq_len']}, vocab {md['get_vocab_size']})")
    for w in warnings:
        print(f"warning: {w}")
    tc = provision()
    problems = [k for k in tc.problems if k.startswith("npm:react-native-executorch")]
    if problems:
        print(f"operator check: SKIPPED: {tc.problems[problems[0]]}")
        return False
    ok = True
    for abi in ("arm64-v8a", "x86_64"):
        rep = opcheck.check_program_dir(program_dir, tc.libexecutorch(abi))
        print(rep.summary())
        bad = opcheck.inconsistent_ops_mode(rep)
        if bad:
            print(f"  inconsistent: {bad}")
        ok = ok and rep.ok_on_stock_runtime and not bad
    return ok


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(0 if check(sys.argv[1]) else 1)
