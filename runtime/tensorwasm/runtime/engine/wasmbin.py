"""A small reader/rewriter of the WebAssembly binary format: export every mutable global and table.

Why: instance reset and snapshots must restore *all* mutable globals (a bump allocator's heap
pointer is often not exported), and reset must notice a table that grew; the embedding API only
reaches exported ones. So before compiling, the engine adds exports named `__tw_global_<index>`
for hidden mutable globals and `__tw_table_<index>` for every table the module defines. Also
answers whether a module has a start function (guest code that runs at instantiation).
Pure bytes -> bytes; must not import wasmtime.
"""

from __future__ import annotations

from dataclasses import dataclass

from tensorwasm.runtime.engine.abi import GLOBAL_EXPORT_PREFIX

MAGIC = b"\0asm\x01\0\0\0"
_IMPORT, _TABLE, _GLOBAL, _EXPORT, _START = 2, 4, 6, 7, 8
TABLE_EXPORT_PREFIX = "__tw_table_"
_VALTYPES = {
    0x7F: "i32",
    0x7E: "i64",
    0x7D: "f32",
    0x7C: "f64",
    0x7B: "v128",
    0x70: "funcref",
    0x6F: "externref",
}


class WasmFormatError(ValueError):
    """The bytes are not a well-formed module (wasmtime's validator gives the precise reason)."""


@dataclass(frozen=True)
class MutableGlobal:
    index: int
    valtype: str
    exported_as: str | None


def _uleb(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WasmFormatError("truncated LEB128")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WasmFormatError("LEB128 too long")


def _sleb_skip(data: bytes, pos: int) -> int:
    while True:
        if pos >= len(data):
            raise WasmFormatError("truncated LEB128")
        byte = data[pos]
        pos += 1
        if not byte & 0x80:
            return pos


def _enc_uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _skip_const_expr(data: bytes, pos: int) -> int:
    """Skip an init expression (MVP + extended-const opcodes) up to and including `end`."""
    while True:
        if pos >= len(data):
            raise WasmFormatError("unterminated init expression")
        op = data[pos]
        pos += 1
        if op == 0x0B:
            return pos
        if op in (0x41, 0x42):  # i32.const / i64.const
            pos = _sleb_skip(data, pos)
        elif op == 0x43:
            pos += 4
        elif op == 0x44:
            pos += 8
        elif op in (0x23, 0xD2):  # global.get / ref.func
            _, pos = _uleb(data, pos)
        elif op == 0xD0:  # ref.null t
            pos += 1
        elif op in (0x6A, 0x6B, 0x6C, 0x7C, 0x7D, 0x7E):  # extended-const arithmetic
            continue
        else:
            raise WasmFormatError(f"unsupported opcode 0x{op:02x} in a global initializer")


def _sections(data: bytes) -> list[tuple[int, int, int, int]]:
    """(id, header start, payload start, payload end) of every section."""
    if data[:8] != MAGIC:
        raise WasmFormatError("not a WebAssembly 1.0 binary (bad magic/version)")
    out = []
    pos = 8
    while pos < len(data):
        sid = data[pos]
        size, start = _uleb(data, pos + 1)
        end = start + size
        if end > len(data):
            raise WasmFormatError(f"section {sid} runs past the end of the module")
        out.append((sid, pos, start, end))
        pos = end
    return out


def has_start(data: bytes) -> bool:
    """Whether the module declares a start function (code that runs when it is instantiated)."""
    return any(sid == _START for sid, _, _, _ in _sections(data))


def defined_tables(data: bytes) -> list[int]:
    """Indices of the tables the module defines (after any imported ones)."""
    secs = _sections(data)
    imported = sum(_imported_counts(data, s)[1] for sid, _, s, _ in secs if sid == _IMPORT)
    count = 0
    for sid, _, s, _ in secs:
        if sid == _TABLE:
            count += _uleb(data, s)[0]
    return [imported + i for i in range(count)]


def _imported_globals(data: bytes, start: int) -> int:
    return _imported_counts(data, start)[0]


def _imported_counts(data: bytes, start: int) -> tuple[int, int]:
    """(imported globals, imported tables) of an import section."""
    count, pos = _uleb(data, start)
    globals_ = tables = 0
    for _ in range(count):
        for _name in range(2):  # module, field
            n, pos = _uleb(data, pos)
            pos += n
        kind = data[pos]
        pos += 1
        if kind == 0x00:  # func: type index
            _, pos = _uleb(data, pos)
        elif kind == 0x01:  # table: reftype + limits
            tables += 1
            pos += 1
            pos = _skip_limits(data, pos)
        elif kind == 0x02:  # memory: limits
            pos = _skip_limits(data, pos)
        elif kind == 0x03:  # global: valtype + mut
            globals_ += 1
            pos += 2
        elif kind == 0x04:  # tag: attribute + type index
            pos += 1
            _, pos = _uleb(data, pos)
        else:
            raise WasmFormatError(f"unknown import kind {kind}")
    return globals_, tables


def _skip_limits(data: bytes, pos: int) -> int:
    flags = data[pos]
    pos += 1
    _, pos = _uleb(data, pos)
    if flags & 0x01:
        _, pos = _uleb(data, pos)
    return pos


def _exports(data: bytes, start: int) -> tuple[list[tuple[bytes, int, int]], int, int]:
    """(entries, position after the count, position after the last entry)."""
    count, pos = _uleb(data, start)
    first = pos
    out = []
    for _ in range(count):
        n, pos = _uleb(data, pos)
        name = data[pos : pos + n]
        pos += n
        kind = data[pos]
        index, pos = _uleb(data, pos + 1)
        out.append((name, kind, index))
    return out, first, pos


def mutable_globals(data: bytes) -> list[MutableGlobal]:
    """Every mutable global the module defines (not imports), with its export name if any."""
    secs = _sections(data)
    imported = sum(_imported_globals(data, s) for sid, _, s, _ in secs if sid == _IMPORT)
    exported: dict[int, str] = {}
    for sid, _, s, _ in secs:
        if sid == _EXPORT:
            for name, kind, index in _exports(data, s)[0]:
                if kind == 0x03:
                    exported.setdefault(index, name.decode("utf-8", "replace"))
    found = []
    for sid, _, s, _ in secs:
        if sid != _GLOBAL:
            continue
        count, pos = _uleb(data, s)
        for i in range(count):
            vt, mut = data[pos], data[pos + 1]
            pos = _skip_const_expr(data, pos + 2)
            if mut == 0x01:
                index = imported + i
                found.append(MutableGlobal(index, _VALTYPES.get(vt, f"0x{vt:02x}"), exported.get(index)))
    return found


def export_mutable_globals(data: bytes) -> bytes:
    """The module with an export `__tw_global_<index>` added for each hidden mutable global."""
    return export_hidden(data, tables=False)


def export_hidden(data: bytes, tables: bool = True) -> bytes:
    """The module with `__tw_global_<index>` exports for hidden mutable globals and, with
    `tables`, `__tw_table_<index>` for every defined table."""
    added = [
        (f"{GLOBAL_EXPORT_PREFIX}{g.index}", 0x03, g.index)
        for g in mutable_globals(data)
        if g.exported_as is None
    ]
    if tables:
        added += [(f"{TABLE_EXPORT_PREFIX}{i}", 0x01, i) for i in defined_tables(data)]
    if not added:
        return data
    secs = [sec for sec in _sections(data) if sec[0] == _EXPORT]
    if not secs:
        raise WasmFormatError("module has no export section (the guest ABI needs exports)")
    _, header, start, end = secs[0]
    entries, first, body_end = _exports(data, start)
    payload = bytearray(_enc_uleb(len(entries) + len(added)))
    payload += data[first:body_end]
    for text, kind, index in added:
        name = text.encode()
        payload += _enc_uleb(len(name)) + name + bytes([kind]) + _enc_uleb(index)
    section = bytes([_EXPORT]) + _enc_uleb(len(payload)) + bytes(payload)
    return data[:header] + section + data[end:]
