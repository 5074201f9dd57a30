"""Operator check: does an Android ExecuTorch runtime library register every
kernel a program needs?

Program side: the operator table (``name`` + ``overload``) of every execution
plan in the ``.pte`` flatbuffer, and the ids of its delegate blobs
(e.g. ``XnnpackBackend``).

Runtime side: ExecuTorch registers kernels under their fully qualified name
``namespace::op.overload`` (e.g. ``aten::add.out``); codegen'd kernel tables
keep those names as NUL-terminated strings in ``.rodata`` that are referenced
from ``.data.rel.ro`` (relocations), and ``EXECUTORCH_LIBRARY`` custom ops
(e.g. ``llama::update_cache.out``) keep them in ``.rodata`` referenced from
code.  We read the ELF directly (no binutils needed): a kernel counts as
registered when its exact name is a NUL-terminated string in ``.rodata``;
``evidence`` tells whether a relocation references it (kernel table).
Backends are registered by id string; ``XnnpackBackend`` must appear in the
library for XNNPACK-delegated parts.

Limitations (stated in the report): string presence is strong evidence, not
proof, of registration; dtype-specialised kernel keys of selective builds are
not checked; the library's ExecuTorch version is unknown, so flatbuffer
schema compatibility is not proven here.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

OP_RE = re.compile(rb"(?<=\x00)([a-z_][a-z0-9_]*::[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)\x00")
CUSTOM_NAMESPACE = "kvexport"


@dataclass
class LibraryKernels:
    path: Path
    kernels: dict[str, str]          # name -> "table" | "string"
    rodata: bytes

    def has_backend(self, backend_id: str) -> bool:
        return backend_id.encode() + b"\x00" in self.rodata


@dataclass
class OpReport:
    program: Path
    library: Path
    ops_mode: str | None
    operators: list[str]
    delegates: list[str]
    registered: dict[str, str] = field(default_factory=dict)   # op -> evidence
    missing: list[str] = field(default_factory=list)
    custom_ops: list[str] = field(default_factory=list)         # kvexport:: ops
    missing_backends: list[str] = field(default_factory=list)

    @property
    def needs_custom_runtime(self) -> bool:
        return bool(self.custom_ops)

    @property
    def ok_on_stock_runtime(self) -> bool:
        return not self.missing and not self.missing_backends

    def summary(self) -> str:
        lines = [f"program {self.program.name} (ops_mode={self.ops_mode}) vs {self.library}:",
                 f"  {len(self.operators)} operators, {len(self.registered)} registered, delegates {self.delegates}"]
        if self.missing:
            lines.append(f"  MISSING kernels: {', '.join(self.missing)}")
        if self.custom_ops:
            lines.append(f"  needs a custom runtime build with kvexport kernels: {', '.join(self.custom_ops)}")
        if self.missing_backends:
            lines.append(f"  MISSING backends: {', '.join(self.missing_backends)}")
        if self.ok_on_stock_runtime:
            lines.append("  all operators and backends are present in this runtime library")
        return "\n".join(lines)


def _sections(b: bytes) -> dict[str, dict]:
    if b[:4] != b"\x7fELF" or b[4] != 2 or b[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", b, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", b, 0x3A)
    secs = []
    for i in range(shnum):
        name, typ, _flags, addr, off, size, _l, _i, _a, _e = struct.unpack_from("<IIQQQQIIQQ", b, shoff + i * shentsize)
        secs.append({"name": name, "type": typ, "addr": addr, "off": off, "size": size})
    strtab = secs[shstrndx]
    for s in secs:
        o = strtab["off"] + s["name"]
        s["name"] = b[o:b.index(b"\x00", o)].decode()
    return {s["name"]: s for s in secs}


def read_library(path) -> LibraryKernels:
    path = Path(path)
    b = path.read_bytes()
    secs = _sections(b)
    ro = secs[".rodata"]
    rodata = b[ro["off"]:ro["off"] + ro["size"]]
    strings = {m.group(1).decode(): ro["addr"] + m.start(1) for m in OP_RE.finditer(b"\x00" + rodata)}
    # OP_RE was run on b"\0"+rodata: shift offsets back by one
    strings = {k: v - 1 for k, v in strings.items()}
    refs: set[int] = set()
    for s in secs.values():
        if s["type"] == 4:  # SHT_RELA: r_offset, r_info, r_addend
            for off in range(s["off"], s["off"] + s["size"] - 23, 24):
                refs.add(struct.unpack_from("<q", b, off + 16)[0])
    for n in (".data.rel.ro", ".data"):
        if n in secs:
            s = secs[n]
            refs.update(struct.unpack_from(f"<{s['size'] // 8}Q", b, s["off"]))
    kernels = {k: ("table" if a in refs else "string") for k, a in strings.items()}
    return LibraryKernels(path, kernels, rodata)


def program_operators(pte) -> tuple[list[str], list[str]]:
    """(operator names 'ns::op[.overload]', delegate ids) used by all methods of a .pte."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    pf = deserialize_pte_binary(Path(pte).read_bytes())
    prog = getattr(pf, "program", pf)
    ops, delegates = set(), set()
    for plan in prog.execution_plan:
        for o in plan.operators:
            ops.add(f"{o.name}.{o.overload}" if o.overload else o.name)
        for d in plan.delegates:
            delegates.add(d.id)
    return sorted(ops), sorted(delegates)


def check_program(pte, library, ops_mode: str | None = None) -> OpReport:
    lib = read_library(library)
    ops, delegates = program_operators(pte)
    rep = OpReport(Path(pte), Path(library), ops_mode, ops, delegates)
    for op in ops:
        if op.startswith(CUSTOM_NAMESPACE + "::"):
            rep.custom_ops.append(op)
        if op in lib.kernels:
            rep.registered[op] = lib.kernels[op]
        else:
            rep.missing.append(op)
    rep.missing_backends = [d for d in delegates if not lib.has_backend(d)]
    return rep


def check_program_dir(program_dir, library) -> OpReport:
    """Operator check of ``graphs/<name>/`` (ops_mode from its manifest.json) against ``library``."""
    import json

    from kvexport.android.contract import find_pte
    program_dir = Path(program_dir)
    manifest = json.loads((program_dir / "manifest.json").read_text())
    rep = check_program(find_pte(program_dir, manifest), library, manifest.get("ops_mode"))
    return rep


def inconsistent_ops_mode(rep: OpReport) -> str | None:
    """A portable program must not use kvexport:: kernels."""
    if rep.ops_mode == "portable" and rep.custom_ops:
        return f"ops_mode=portable but the program uses {rep.custom_ops}"
    return None
