"""Parse the Containerfile subset the project uses, and the .dockerignore rules of its build context.

Owns the reading of the recipe: instructions per stage, ARG/ENV expansion, the image config the
final stage declares, and which context files a `COPY .` takes. Pure: no file system writes, no
processes; it must not import the builder (build.py) nor anything outside the standard library.
Anything outside the subset is refused with its line number, so `make image` never silently
builds something other than what `docker build` would.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# What the daemonless builder can run; anything else in the Containerfile stops the build.
SUPPORTED = frozenset({"ARG", "FROM", "RUN", "COPY", "ENV", "LABEL", "WORKDIR", "USER", "ENTRYPOINT", "CMD"})
# The PATH Docker gives RUN when the base image's config names none (Debian's images set exactly this).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ContainerfileError(ValueError):
    """The Containerfile uses something the daemonless build does not support."""


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str  # the text after the keyword and its --flags, continuation lines joined
    flags: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class Stage:
    base: str  # as written (may hold ${ARG}s)
    name: str | None
    instructions: tuple[Instruction, ...]
    line: int


@dataclass(frozen=True)
class Containerfile:
    global_args: tuple[tuple[str, str | None], ...]
    stages: tuple[Stage, ...]


@dataclass
class StageState:
    """What the instructions so far have declared: the values RUN sees and the image config."""

    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    labels: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None

    def run_environment(self) -> dict[str, str]:
        """Environment of a RUN: ARGs, overridden by ENV (Docker's precedence)."""
        return {**self.args, **self.env}

    def config_env(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.env.items()]


_CONTINUATION = re.compile(r"\\[ \t]*$")


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """Join continuations as Docker does (the escape and newline removed, nothing else) and drop
    comment and empty lines, also inside a continuation."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if _CONTINUATION.search(raw):
            pending.append(_CONTINUATION.sub("", raw))
            continue
        pending.append(raw)
        yield start, "".join(pending).strip()
        pending = []
    if pending:
        raise ContainerfileError(f"line {start}: continuation runs past the end of the file")


def _split_flags(rest: str) -> tuple[tuple[str, ...], str]:
    flags: list[str] = []
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        flags.append(flag)
        rest = rest.lstrip()
    return tuple(flags), rest


def parse(text: str) -> Containerfile:
    """Parse a Containerfile into global ARGs and stages."""
    global_args: list[tuple[str, str | None]] = []
    stages: list[Stage] = []
    current: list[Instruction] | None = None
    base = ""
    name: str | None = None
    from_line = 0
    for number, line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword not in SUPPORTED:
            raise ContainerfileError(f"line {number}: {keyword} is not supported by the daemonless build")
        flags, value = _split_flags(rest.strip())
        if keyword == "FROM":
            if current is not None:
                stages.append(Stage(base, name, tuple(current), from_line))
            parts = value.split()
            if len(parts) == 3 and parts[1].upper() == "AS":
                base, name = parts[0], parts[2]
            elif len(parts) == 1:
                base, name = parts[0], None
            else:
                raise ContainerfileError(f"line {number}: FROM takes IMAGE [AS NAME], got {value!r}")
            if flags:
                raise ContainerfileError(f"line {number}: FROM flags {flags} are not supported")
            current, from_line = [], number
            continue
        if current is None:
            if keyword != "ARG":
                raise ContainerfileError(f"line {number}: {keyword} before the first FROM")
            global_args.append(_arg(value))
            continue
        current.append(Instruction(keyword, value, flags, number))
    if current is None:
        raise ContainerfileError("no FROM instruction")
    stages.append(Stage(base, name, tuple(current), from_line))
    return Containerfile(tuple(global_args), tuple(stages))


def _arg(value: str) -> tuple[str, str | None]:
    key, sep, default = value.partition("=")
    return key.strip(), _unquote(default) if sep else None


def _unquote(text: str) -> str:
    parts = shlex.split(text)
    return parts[0] if len(parts) == 1 else text


_VARIABLE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Docker's variable substitution for non-RUN instructions: $VAR, ${VAR}, ${VAR:-default}."""

    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bare")
        value = variables.get(name, "")
        if not value and match.group("default") is not None:
            return match.group("default")
        return value

    return _VARIABLE.sub(replace, text)


def _pairs(value: str, keyword: str, line: int) -> list[tuple[str, str]]:
    tokens = shlex.split(value)
    if tokens and "=" not in tokens[0]:
        if len(tokens) < 2:  # legacy `ENV KEY VALUE`
            raise ContainerfileError(f"line {line}: {keyword} needs KEY=VALUE")
        return [(tokens[0], value.split(None, 1)[1])]
    pairs = []
    for token in tokens:
        key, sep, item = token.partition("=")
        if not sep:
            raise ContainerfileError(f"line {line}: {keyword} needs KEY=VALUE, got {token!r}")
        pairs.append((key, item))
    return pairs


def _exec_form(value: str, keyword: str, line: int) -> list[str]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
        raise ContainerfileError(f"line {line}: {keyword} must use the JSON exec form, got {value!r}")
    return parsed


def global_arg_values(recipe: Containerfile, overrides: Mapping[str, str]) -> dict[str, str]:
    """Global ARGs (those before the first FROM) with --build-arg style overrides applied."""
    values: dict[str, str] = {}
    for key, default in recipe.global_args:
        if key in overrides:
            values[key] = overrides[key]
        elif default is not None:
            values[key] = expand(default, values)
    return values


def apply_metadata(
    state: StageState,
    instruction: Instruction,
    overrides: Mapping[str, str],
    global_args: Mapping[str, str] | None = None,
) -> None:
    """Apply one non-file-system instruction (ARG, ENV, LABEL, WORKDIR, USER, ENTRYPOINT, CMD).

    `overrides` are --build-arg values; `global_args` the values of the ARGs before the first FROM,
    which a stage's `ARG NAME` without a default inherits.
    """
    scope = state.run_environment()
    keyword, value, line = instruction.keyword, instruction.value, instruction.line
    if keyword == "ARG":
        key, default = _arg(value)
        if key in overrides:
            state.args[key] = overrides[key]
        elif default is not None:
            state.args[key] = expand(default, scope)
        elif global_args and key in global_args:
            state.args[key] = global_args[key]
    elif keyword == "ENV":
        for key, item in _pairs(value, keyword, line):
            state.env[key] = expand(item, {**scope, **state.env})
    elif keyword == "LABEL":
        for key, item in _pairs(value, keyword, line):
            state.labels[key] = expand(item, scope)
    elif keyword == "WORKDIR":
        path = expand(value, scope)
        state.workdir = path if path.startswith("/") else state.workdir.rstrip("/") + "/" + path
    elif keyword == "USER":
        state.user = expand(value, scope)
    elif keyword == "ENTRYPOINT":
        state.entrypoint = _exec_form(value, keyword, line)
        state.cmd = None  # Docker resets CMD inherited before an ENTRYPOINT
    elif keyword == "CMD":
        state.cmd = _exec_form(value, keyword, line)
    else:
        raise ContainerfileError(f"line {line}: {keyword} changes files; not metadata")


def final_image_state(recipe: Containerfile, overrides: Mapping[str, str] | None = None) -> StageState:
    """The config the last stage declares (the base image's own config aside from PATH)."""
    state = StageState()
    global_args = global_arg_values(recipe, overrides or {})
    for instruction in recipe.stages[-1].instructions:
        if instruction.keyword not in ("RUN", "COPY"):
            apply_metadata(state, instruction, overrides or {}, global_args)
    return state


# ---- .dockerignore ----


def parse_ignore(text: str) -> list[tuple[bool, str]]:
    """(excluded?, pattern) rules in file order; `!` re-includes. Last matching rule wins."""
    rules: list[tuple[bool, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line[1:].strip() if include else line
        pattern = pattern.strip("/")
        if pattern:
            rules.append((not include, pattern))
    return rules


def _match(pattern: str, path: str) -> bool:
    """Go filepath.Match per path component, plus `**` for any number of components."""
    return _match_parts(pattern.split("/"), path.split("/"))


def _match_parts(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match_parts(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    if not parts:
        return False
    return fnmatch.fnmatchcase(parts[0], pattern[0]) and _match_parts(pattern[1:], parts[1:])


def is_ignored(path: str, rules: list[tuple[bool, str]]) -> bool:
    """Docker's rule: a pattern matches a path or any of its parent directories."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for excluded, pattern in rules:
        if any(_match(pattern, prefix) for prefix in prefixes):
            ignored = excluded
    return ignored
