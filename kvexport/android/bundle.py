"""Stage an exported program into the Android demo's assets.

``bundle(program_dir, app_dir)`` validates ``graphs/<name>/`` against what the
app expects and copies into ``<app_dir>/app/src/main/assets/`` (a generated,
git-ignored folder that is replaced on each call):

* the ``.pte`` program (the app's Gradle config stores ``*.pte`` uncompressed),
* ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``,
* ``program_manifest.json`` (the program's manifest.json, for reference),
* ``io_contract.json``: methods, forward inputs/outputs (names, dtypes,
  shapes), metadata values, kv_stats field names, ops mode and the chat
  template's default system text — what ``ProgramContract.kt`` reads.

A program that does not match (layout version, methods, dtypes/shapes,
metadata disagreeing with the manifest, a tokenizer or chat template the app
does not implement) raises :class:`BundleError`, a ``ValueError`` with a
one-line message.  ``ops_mode == "fused"`` is allowed but reported in
``BundleResult.warnings``: the stock executorch-android runtime lacks the
``kvexport::`` kernels.

Intended CLI wiring: ``kvexport bundle graphs/<name> android_demo/`` ->
``bundle(program_dir, app_dir)`` and print ``result.summary()``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kvexport.android.contract import (
    FORWARD_INPUTS,
    LAYOUT_VERSION,
    METADATA_METHODS,
    TOKENIZER_FILES,
    ContractError,
    chat_default_system,
    check_tokenizer,
    read_program,
)
from kvexport.kv import stats as kv_stats

ASSETS_REL = Path("app/src/main/assets")


class BundleError(ContractError):
    """The program directory cannot be bundled into the app (one-line message)."""


@dataclass
class BundleResult:
    assets_dir: Path
    files: list[str]
    contract: dict
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        md = self.contract["metadata"]
        lines = [f"bundled {self.contract['program']} ({self.contract['ops_mode']}) into {self.assets_dir}: "
                 f"ctx={md['get_max_context_len']} chunk={md['get_max_seq_len']} vocab={md['get_vocab_size']}"]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def build_contract(program_dir) -> tuple[dict, list[str]]:
    """Validate ``program_dir`` and return (io_contract dict, warnings)."""
    try:
        info = read_program(program_dir)
        check_tokenizer(program_dir)
        default_system = chat_default_system(program_dir)
    except ContractError as e:
        raise BundleError(str(e)) from None
    contract = {
        "layout_version": LAYOUT_VERSION,
        "program": info.pte.name,
        "model": str(info.manifest.get("model", info.program_dir.name)),
        "ops_mode": info.ops_mode,
        "methods": {
            "forward": {"inputs": info.forward_inputs, "outputs": info.forward_outputs},
            **{m: {"inputs": [], "outputs": [{"dtype": "int64", "shape": [] if m != "get_eos_ids" else ["N"]}]}
               for m in METADATA_METHODS},
        },
        "metadata": info.metadata,
        "kv_stats_fields": list(kv_stats.FIELDS),
        "tokenizer": {"file": "tokenizer.json", "files": list(TOKENIZER_FILES)},
        "chat": {"format": "chatml", "default_system": default_system},
    }
    assert [i["name"] for i in contract["methods"]["forward"]["inputs"]] == [n for n, _ in FORWARD_INPUTS]
    return contract, info.warnings


def bundle(program_dir, app_dir) -> BundleResult:
    """Validate ``program_dir`` (graphs/<name>) and copy it into ``app_dir``'s assets.

    Returns a :class:`BundleResult`; raises :class:`BundleError` (one line) when the
    program does not match the app's contract or ``app_dir`` is not the demo project.
    """
    program_dir, app_dir = Path(program_dir), Path(app_dir)
    if not (app_dir / "app" / "build.gradle").is_file():
        raise BundleError(f"{app_dir} is not the android_demo project (no app/build.gradle)")
    contract, warnings = build_contract(program_dir)
    assets = app_dir / ASSETS_REL
    if assets.exists():
        shutil.rmtree(assets)
    assets.mkdir(parents=True)
    files = [contract["program"], *TOKENIZER_FILES]
    for f in files:
        shutil.copy2(program_dir / f, assets / f)
    shutil.copy2(program_dir / "manifest.json", assets / "program_manifest.json")
    (assets / "io_contract.json").write_text(json.dumps(contract, indent=1, ensure_ascii=False))
    files += ["program_manifest.json", "io_contract.json"]
    return BundleResult(assets, files, contract, warnings)
