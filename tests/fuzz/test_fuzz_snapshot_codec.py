"""Fuzz the snapshot reader (Hypothesis, fixed budget; seeds in tests/fuzz/corpus).

Property: whatever the bytes, `parse` -> `verify_all` -> `check_decodes` (what restore and
`tensorwasm snapshot inspect` run) either accept the blob or raise SnapshotRejected: never another
exception, and never before bounding what they would allocate; a blob signed with the seed's key
is accepted by `require` only with the seed's own header and manifest. Blobs are mutated three ways: raw
byte edits (caught by the checksums), and manifest edits resealed with a valid root checksum (the
attack from issue 13), at any path in the manifest, with any JSON value.
Why Hypothesis and not atheris: atheris needs libFuzzer/clang builds and has no wheels for every
Python we run; Hypothesis runs inside pytest on any machine, shrinks each failure to a minimal
blob, and replays the saved examples first. Not coverage-guided, so the mutations aim at structure.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tensorwasm.runtime.errors import SnapshotRejected
from tensorwasm.runtime.snapshots import codec, signing
from tests.fuzz.blobs import KEY, KEY_ID, corpus, crashes, manifest_of, reseal, seed_blob

BUDGET = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = [seed_blob("small"), seed_blob("gpu"), seed_blob("signed"), *corpus()]
REQUIRE = signing.SigningPolicy("require", ring=signing.KeyRing({KEY_ID: KEY}, KEY_ID))

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.sampled_from([0, 1, -1, 1 << 31, 1 << 32, 1 << 62, (1 << 62) + 1, 64 << 20, 1 << 40])
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["wasm_memory", "globals", "gpu_buffer", "zstd", "raw", "00000000"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def read_like_restore_and_inspect(blob: bytes) -> None:
    try:
        parsed = codec.verify_all(blob)
        m = parsed.manifest
        # Bounded before anything is allocated for it.
        assert m.region("globals").size <= codec.MAX_GLOBALS_BYTES
        assert m.region("wasm_memory").size <= codec.MAX_WASM_MEMORY_BYTES
        codec.check_decodes(blob, m)
        if REQUIRE.check(parsed) and parsed.signature is not None:
            # A blob the key vouches for has the signed seed's header and manifest, byte for byte.
            assert parsed.signature.message in {_signed_part(s) for s in SEEDS}
    except SnapshotRejected:
        pass


def _signed_part(seed: bytes) -> bytes:
    p = codec.parse(seed)
    return p.signature.message if p.signature is not None else b""


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, (*prefix, i))
    return out


def replaced(doc: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return doc


@BUDGET
@given(st.sampled_from(SEEDS), st.data())
def test_any_byte_edit_is_accepted_or_refused(seed: bytes, data: st.DataObject) -> None:
    blob = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    read_like_restore_and_inspect(bytes(blob[:cut] if data.draw(st.booleans()) else blob))


@BUDGET
@given(st.sampled_from(SEEDS), st.data(), json_values)
@example(seed=SEEDS[0], data=None, value=[])  # the manifest is a list, not an object
def test_any_resealed_manifest_edit_is_accepted_or_refused(seed: bytes, data: Any, value: Any) -> None:
    doc = manifest_of(seed)
    path = data.draw(st.sampled_from(paths(doc))) if data is not None else ()
    read_like_restore_and_inspect(reseal(seed, replaced(doc, path, value)))


def test_the_seeds_themselves_are_intact() -> None:
    for seed in [s for s in SEEDS if s not in set(crashes())]:
        parsed = codec.verify_all(seed)
        codec.check_decodes(seed, parsed.manifest)
