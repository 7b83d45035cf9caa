"""One tenant's configuration as the shard sees it, from either tenant source.

Owns `TenantConfig` (frozen, comparable: the shard diffs old against new to decide what to reload)
and the bytes a spec only points at: the module and kernels of a local tenants-file entry (paths),
its token or tokenFile, and a Tenant resource whose module bytes, token and PTX the Kubernetes
source has already resolved. What a spec means (every field, default and bound) is
tensorwasm.api.tenant's alone; every bad input raises its `InvalidSpec` naming the field.
Pure: no I/O beyond reading the files a local entry names. Must not import wasmtime, cuda,
aiohttp or kubernetes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorwasm.api.fields import InvalidSpec, matches, parse_model
from tensorwasm.api.names import is_tenant_name
from tensorwasm.api.tenant import (
    FUNCTION_NAME_PATTERN,
    KERNEL_NAME_PATTERN,
    SHA256_PATTERN,
    GpuShare,
    IdlePolicy,
    Limits,
    RateLimit,
    is_http_url,
    parse_spec,
    stored_spec_notes,
)


@dataclass(frozen=True)
class ModuleSource:
    """Where a tenant's wasm module comes from; exactly one of path, url or data is set."""

    sha256: str
    path: Path | None = None
    url: str | None = None
    data: bytes | None = field(default=None, repr=False)  # resolved from a ConfigMap by the source
    origin: str = ""  # human-readable origin for messages, e.g. "configmap default/echo key module.wasm"

    def describe(self) -> str:
        if self.origin:
            return self.origin
        if self.path is not None:
            return f"file {self.path}"
        return f"url {self.url}" if self.url else "inline data"


# Token scopes (issue 14): an invoke token may also read; a read token lists functions and reads
# jobs, never invokes or cancels.
SCOPE_INVOKE, SCOPE_READ = "invoke", "read"
SCOPES = (SCOPE_INVOKE, SCOPE_READ)
# Secret keys (and their ids in the audit log): "token" and "token.<id>" invoke, "read-token" and
# "read-token.<id>" read. The id is what the audit log names, never the token.
TOKEN_KEY, READ_TOKEN_KEY = "token", "read-token"


def token_key_scope(key: str) -> str | None:
    """The scope a token Secret key grants (None: not a token key)."""
    for prefix, scope in ((TOKEN_KEY, SCOPE_INVOKE), (READ_TOKEN_KEY, SCOPE_READ)):
        if key == prefix or (key.startswith(prefix + ".") and len(key) > len(prefix) + 1):
            return scope
    return None


@dataclass(frozen=True)
class TenantConfig:
    """Everything the shard needs to serve one tenant; equal configs need no reload."""

    name: str
    token: str = field(repr=False)
    module: ModuleSource
    functions: tuple[str, ...] = ()  # empty: every function the module exports
    limits: Limits = field(default_factory=Limits)
    sm_percent: int | None = None
    kernels: tuple[tuple[str, str], ...] = ()  # (kernel name, PTX text)
    namespace: str = ""
    generation: int = 0
    uid: str = ""  # Kubernetes metadata.uid: a re-created Tenant is a new tenant (fresh state, own snapshots)
    # Tokens beyond `token` (which is key "token", scope invoke): (key, token, scope).
    extra_tokens: tuple[tuple[str, str, str], ...] = field(default=(), repr=False)
    rate_limit: RateLimit = field(default_factory=RateLimit)
    idle_after: str | None = None  # spec.idle.after; None: the shard's default (runtime/sleep.py)
    idle_prewarm: str | None = None  # spec.idle.prewarm: "history" wakes it ahead of predicted use
    # What the source let through with a warning (a Secret key it ignored, a stored idle.after under
    # the floor it raised): appended to the tenant's status message while it serves.
    notes: tuple[str, ...] = ()

    def all_tokens(self) -> tuple[tuple[str, str, str], ...]:
        """Every (key, token, scope) of this tenant, the primary first."""
        return ((TOKEN_KEY, self.token, SCOPE_INVOKE), *self.extra_tokens)

    def same_code(self, other: TenantConfig) -> bool:
        """True when only the token or the function list differ, so no reload is needed."""
        return (
            self.uid == other.uid
            and self.module == other.module
            and self.limits == other.limits
            and self.sm_percent == other.sm_percent
            and self.kernels == other.kernels
        )


def parse_local_tenant(entry: object, where: str, base_dir: Path) -> TenantConfig:
    """Parse one entry of a local tenants file; relative paths resolve against `base_dir`.

    The file's own fields (token, module.path, kernels[].path) are read here; limits and gpu are
    the Tenant resource's, parsed by its model.
    """
    raw = _mapping(entry, where)
    _reject_unknown(
        raw,
        where,
        {
            "name",
            "token",
            "tokenFile",
            "tokens",
            "module",
            "functions",
            "limits",
            "gpu",
            "kernels",
            "rateLimit",
            "idle",
        },
    )
    name = _string(raw.get("name"), f"{where}.name")
    if not is_tenant_name(name):
        raise InvalidSpec(
            f"{where}.name: {name!r} must be a DNS label (lowercase letters, digits, '-', at most 60)"
        )
    token = _local_token(raw, where, base_dir)
    module_raw = _mapping(raw.get("module"), f"{where}.module")
    _reject_unknown(module_raw, f"{where}.module", {"path", "url", "sha256"})
    sha = _matching(module_raw.get("sha256"), f"{where}.module.sha256", SHA256_PATTERN)
    has_path, has_url = "path" in module_raw, "url" in module_raw
    if has_path == has_url:
        raise InvalidSpec(f"{where}.module: set exactly one of path or url")
    if has_path:
        rel = Path(_string(module_raw["path"], f"{where}.module.path"))
        module = ModuleSource(sha256=sha, path=rel if rel.is_absolute() else base_dir / rel)
    else:
        url = _string(module_raw["url"], f"{where}.module.url")
        if not is_http_url(url):
            raise InvalidSpec(f"{where}.module.url: must be an absolute http:// or https:// URL, got {url!r}")
        module = ModuleSource(sha256=sha, url=url)
    kernels = []
    for i, k in enumerate(_list(raw.get("kernels", []), f"{where}.kernels")):
        kw = f"{where}.kernels[{i}]"
        km = _mapping(k, kw)
        _reject_unknown(km, kw, {"name", "path"})
        kpath = Path(_string(km.get("path"), f"{kw}.path"))
        kpath = kpath if kpath.is_absolute() else base_dir / kpath
        try:
            ptx = kpath.read_text()
        except OSError as exc:
            raise InvalidSpec(f"{kw}.path: cannot read {kpath}: {exc.strerror}") from exc
        kernels.append((_matching(km.get("name"), f"{kw}.name", KERNEL_NAME_PATTERN), ptx))
    functions = tuple(
        _matching(f, f"{where}.functions[{i}]", FUNCTION_NAME_PATTERN)
        for i, f in enumerate(_list(raw.get("functions", []), f"{where}.functions"))
    )
    if len(set(functions)) != len(functions):
        raise InvalidSpec(f"{where}.functions: lists a function twice")
    idle = parse_model(IdlePolicy, raw.get("idle") or {}, f"{where}.idle")
    return TenantConfig(
        name=name,
        token=token,
        module=module,
        functions=functions,
        limits=parse_model(Limits, raw.get("limits") or {}, f"{where}.limits"),
        sm_percent=parse_model(GpuShare, raw.get("gpu") or {}, f"{where}.gpu").sm_percent,
        kernels=tuple(kernels),
        extra_tokens=_local_extra_tokens(raw.get("tokens", []), where, base_dir),
        rate_limit=parse_model(RateLimit, raw.get("rateLimit") or {}, f"{where}.rateLimit"),
        idle_after=idle.after,
        idle_prewarm=idle.prewarm,
    )


def parse_kube_tenant(
    obj: Mapping[str, Any],
    *,
    token: str,
    module_data: bytes | None,
    module_origin: str = "",
    kernels: tuple[tuple[str, str], ...] = (),
    extra_tokens: tuple[tuple[str, str, str], ...] = (),
    notes: tuple[str, ...] = (),
) -> TenantConfig:
    """Parse a Tenant whose token, module bytes (configMapRef) and PTX the source has resolved;
    `extra_tokens` are the Secret's other token keys, (key, token, scope); `notes`, what the source
    ignored (for the status message)."""
    meta = _mapping(obj.get("metadata"), "metadata")
    spec = parse_spec(obj.get("spec"), from_api_server=True)
    if spec.module.config_map is not None:
        if module_data is None:
            raise InvalidSpec("spec.module.configMapRef: module data was not resolved")
        module = ModuleSource(sha256=spec.module.sha256, data=module_data, origin=module_origin)
    else:
        module = ModuleSource(sha256=spec.module.sha256, url=spec.module.url)
    if not token:
        raise InvalidSpec("spec.authSecretRef: the token Secret has an empty 'token' key")
    generation = meta.get("generation", 0)
    return TenantConfig(
        name=str(meta.get("name", "")),
        token=token,
        module=module,
        functions=spec.functions,
        limits=spec.limits,
        sm_percent=spec.gpu.sm_percent,
        kernels=kernels,
        namespace=str(meta.get("namespace", "")),
        generation=generation if isinstance(generation, int) else 0,
        uid=str(meta.get("uid", "")),
        extra_tokens=extra_tokens,
        rate_limit=spec.rate_limit,
        idle_after=spec.idle.after,
        idle_prewarm=spec.idle.prewarm,
        notes=(*notes, *stored_spec_notes(obj.get("spec"))),
    )


def _local_extra_tokens(raw: object, where: str, base_dir: Path) -> tuple[tuple[str, str, str], ...]:
    """`tokens: [{id, token | tokenFile, scope: invoke | read}]`: the Secret's extra keys, locally."""
    out, seen = [], {TOKEN_KEY}
    for i, entry in enumerate(_list(raw, f"{where}.tokens")):
        tw = f"{where}.tokens[{i}]"
        m = _mapping(entry, tw)
        _reject_unknown(m, tw, {"id", "token", "tokenFile", "scope"})
        scope = m.get("scope", SCOPE_INVOKE)
        if scope not in SCOPES:
            raise InvalidSpec(f"{tw}.scope: must be one of {', '.join(SCOPES)}, got {scope!r}")
        ident = _matching(m.get("id"), f"{tw}.id", r"^[A-Za-z0-9_-]{1,63}$")
        key = f"{TOKEN_KEY if scope == SCOPE_INVOKE else READ_TOKEN_KEY}.{ident}"
        if key in seen:
            raise InvalidSpec(f"{tw}.id: {ident!r} is used twice for scope {scope}")
        seen.add(key)
        out.append((key, _local_token(m, tw, base_dir), scope))
    return tuple(out)


def _local_token(raw: Mapping[str, Any], where: str, base_dir: Path) -> str:
    if ("token" in raw) == ("tokenFile" in raw):
        raise InvalidSpec(f"{where}: set exactly one of token or tokenFile")
    if "token" in raw:
        token = _string(raw["token"], f"{where}.token")
    else:
        path = Path(_string(raw["tokenFile"], f"{where}.tokenFile"))
        path = path if path.is_absolute() else base_dir / path
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise InvalidSpec(f"{where}.tokenFile: cannot read {path}: {exc.strerror}") from exc
    check_token_strength(token, where)
    return token


# A token's length: at least MIN (guessable below), at most MAX (a longer one could never authenticate:
# the HTTP server refuses request headers over 8190 bytes, yet it would sit in every auth table).
MIN_TOKEN_CHARS, MAX_TOKEN_CHARS = 8, 4096


def check_token_strength(token: str, where: str) -> None:
    """Every bearer token, from the tenants file or a Secret key: 8 to 4096 characters, no whitespace."""
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise InvalidSpec(f"{where}: a token needs at least {MIN_TOKEN_CHARS} characters and no whitespace")
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidSpec(f"{where}: a token has at most {MAX_TOKEN_CHARS} characters, this one {len(token)}")


def _matching(raw: object, where: str, pattern: str) -> str:
    value = _string(raw, where)
    if not matches(pattern, value):
        raise InvalidSpec(f"{where}: {value!r} does not match {pattern}")
    return value


def _string(raw: object, where: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise InvalidSpec(f"{where}: expected a non-empty string, got {raw!r}")
    return raw


def _list(raw: object, where: str) -> list[Any]:
    if not isinstance(raw, list):
        raise InvalidSpec(f"{where}: expected a list, got {type(raw).__name__}")
    return raw


def _mapping(raw: object, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        got = "nothing" if raw is None else type(raw).__name__
        raise InvalidSpec(f"{where}: expected a mapping, got {got}")
    return raw


def _reject_unknown(m: Mapping[str, Any], where: str, known: set[str]) -> None:
    unknown = sorted(set(m) - known)
    if unknown:
        raise InvalidSpec(f"{where}: unknown field(s) {', '.join(unknown)}")
