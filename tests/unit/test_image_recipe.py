"""The Containerfile and the daemonless build cannot drift: one recipe, parsed by the builder itself.

`make image` (hack/image/build.py) executes the Containerfile through hack/image/containerfile.py;
these tests pin what the recipe must say (user, entrypoint, extras, no compilers in the final
stage, a build context that holds every source root) and that the parser refuses what the builder
could not run the way `docker build` would.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO / "hack" / "image"


def _load(name: str) -> ModuleType:
    # hack/image holds scripts, not a package; build.py imports its siblings by name.
    if str(IMAGE_DIR) not in sys.path:
        sys.path.insert(0, str(IMAGE_DIR))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, IMAGE_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cf = _load("containerfile")
build = _load("build")
buildcontext = _load("buildcontext")
debianbase = _load("debianbase")
failures = _load("failures")

RECIPE = cf.parse((REPO / "Containerfile").read_text())
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMPILERS = ("gcc", "g++", "clang", "build-essential", "python3-dev", "cc", "make", "cpp")


def _stage_runs(stage: object) -> list[str]:
    return [i.value for i in stage.instructions if i.keyword == "RUN"]  # type: ignore[attr-defined]


def test_the_final_stage_runs_tensorwasm_as_65532_on_a_read_only_root() -> None:
    state = cf.final_image_state(RECIPE)
    assert state.entrypoint == ["tensorwasm"]
    assert state.user is not None and state.user.split(":")[0] == "65532"
    env = dict(item.split("=", 1) for item in state.config_env())
    assert env["PYTHONDONTWRITEBYTECODE"] == "1", "a read-only root: Python must not try to write .pyc"
    assert env["HOME"].startswith("/tmp"), "HOME must be writable where the chart mounts an emptyDir"
    assert env["PATH"].split(":")[0] == "/opt/tensorwasm/bin"
    assert state.workdir == "/tmp"


def test_every_stage_starts_from_a_base_the_daemonless_build_can_make() -> None:
    global_args = cf.global_arg_values(RECIPE, {})
    names = {stage.name for stage in RECIPE.stages if stage.name}
    for stage in RECIPE.stages:
        base = cf.expand(stage.base, global_args)
        if base not in names:
            assert debianbase.debian_suite(base) == "bookworm"


def test_the_build_installs_the_operator_runtime_and_gpu_extras_but_not_the_planner() -> None:
    state = cf.StageState()
    build_stage = RECIPE.stages[0]
    for instruction in build_stage.instructions:
        if instruction.keyword == "ARG":
            cf.apply_metadata(state, instruction, {})
    extras = state.args["EXTRAS"].split(",")
    assert sorted(extras) == ["gpu", "operator", "runtime"]
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])
    runs = _stage_runs(build_stage)
    deps_run = next(run for run in runs if "requirements.txt" in run)
    program = shlex.split(deps_run.split(" && ")[0])
    assert program[0] == "python3" and program[1] == "-c" and program[3] == "${EXTRAS}"
    # Run the recipe's own requirements one-liner on this checkout's pyproject.toml.
    code = program[2].replace("/src/pyproject.toml", str(REPO / "pyproject.toml"))
    printed = subprocess.run(
        [sys.executable, "-c", code, ",".join(extras)], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    wanted = PYPROJECT["project"]["dependencies"] + [
        dep for extra in extras for dep in PYPROJECT["project"]["optional-dependencies"][extra]
    ]
    assert printed[:-1] == wanted
    assert not any("matplotlib" in dep for dep in printed)
    assert any("pip install" in run and "--no-deps /src" in run for run in runs)


def test_bytecode_is_precompiled_so_it_never_goes_stale() -> None:
    runs = " ".join(_stage_runs(RECIPE.stages[0]))
    assert "compileall" in runs and "unchecked-hash" in runs


def test_no_compilers_in_the_final_stage_and_only_the_venv_comes_from_the_build() -> None:
    final = RECIPE.stages[-1]
    words = " ".join(_stage_runs(final)).replace("\\", " ").split()
    assert not [w for w in words if w in COMPILERS]
    copies = [i for i in final.instructions if i.keyword == "COPY"]
    assert [(i.flags, i.value) for i in copies] == [(("--from=build",), "/opt/tensorwasm /opt/tensorwasm")]


def test_the_build_context_holds_every_source_root_and_nothing_heavy() -> None:
    files = buildcontext.context_files(REPO)
    for package_dir in PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]:
        assert any(f.startswith(package_dir + "/") for f in files), f"{package_dir} missing from the context"
    assert "pyproject.toml" in files and PYPROJECT["project"]["readme"] in files
    tops = {f.split("/")[0] for f in files}
    assert not tops & {".git", ".venv", "tests", "bench", "helm", "hack", "docs"}
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]


def test_the_containerignore_is_the_dockerignore() -> None:
    # podman reads .containerignore first, docker only .dockerignore: one file for both.
    assert (REPO / ".containerignore").resolve() == (REPO / ".dockerignore").resolve()


def test_the_parser_joins_continuations_and_skips_comments() -> None:
    recipe = cf.parse(
        "# syntax=docker/dockerfile:1\nARG BASE=debian:bookworm-slim\nFROM ${BASE} AS one\n"
        "RUN --mount=type=cache,target=/c echo a \\\n  # a comment inside\n  && echo b\n"
        'FROM one\nENV A=1 B="two words"\nENV C ${A}-x\nUSER 1:1\nENTRYPOINT ["x"]\n'
    )
    assert [s.name for s in recipe.stages] == ["one", None]
    run = recipe.stages[0].instructions[0]
    assert run.flags == ("--mount=type=cache,target=/c",)
    assert run.value == "echo a   && echo b"  # Docker keeps the lines' own whitespace
    state = cf.final_image_state(recipe)
    assert state.env["B"] == "two words" and state.env["C"] == "1-x"
    assert state.user == "1:1" and state.entrypoint == ["x"]
    assert cf.global_arg_values(recipe, {"BASE": "debian:trixie-slim"}) == {"BASE": "debian:trixie-slim"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM debian:bookworm-slim\nADD x /x\n", "line 2: ADD is not supported"),
        ("FROM debian:bookworm-slim\nHEALTHCHECK CMD true\n", "HEALTHCHECK is not supported"),
        ("RUN true\n", "RUN before the first FROM"),
        ("FROM debian:bookworm-slim\nRUN a \\\n", "continuation runs past the end"),
    ],
)
def test_the_parser_refuses_what_the_builder_cannot_run(text: str, message: str) -> None:
    with pytest.raises(cf.ContainerfileError, match=message):
        cf.parse(text)


def test_shell_form_entrypoints_are_refused() -> None:
    recipe = cf.parse("FROM debian:bookworm-slim\nENTRYPOINT tensorwasm\n")
    with pytest.raises(cf.ContainerfileError, match="JSON exec form"):
        cf.final_image_state(recipe)


def test_other_bases_are_refused_with_a_reason() -> None:
    with pytest.raises(failures.BuildError, match="debian:<suite>-slim bases only"):
        debianbase.debian_suite("python:3.11-slim")


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("operator/tensorwasm/cli/main.py", False),
        ("operator/tensorwasm/cli/__pycache__/main.cpython-311.pyc", True),
        ("pyproject.toml", False),
        (".venv/bin/python", True),
        ("tests/unit/test_x.py", True),
        ("Makefile", True),
    ],
)
def test_dockerignore_rules_follow_docker(path: str, ignored: bool) -> None:
    rules = cf.parse_ignore((REPO / ".dockerignore").read_text())
    assert cf.is_ignored(path, rules) is ignored


def test_a_failed_step_names_the_missing_package_or_wheel() -> None:
    apt = "E: Unable to locate package python3-nosuch\nE: Package 'libfoo' has no installation candidate\n"
    pip = "ERROR: Could not find a version that satisfies the requirement wasmtime<1\n"
    pip += "ERROR: No matching distribution found for wasmtime<1\n"
    assert failures.diagnose(apt + pip) == [
        "missing Debian package: python3-nosuch",
        "missing Debian package: libfoo",
        "missing wheel: wasmtime<1",
    ]


def test_copy_sources_select_files_and_directories() -> None:
    files = ["README.md", "operator/a.py", "operator/b/c.py", "operatorx/d.py", "pyproject.toml"]
    assert buildcontext.select_sources(files, "pyproject.toml") == [("pyproject.toml", "pyproject.toml")]
    assert buildcontext.select_sources(files, "./operator/") == [
        ("operator/a.py", "a.py"),
        ("operator/b/c.py", "b/c.py"),
    ]
    assert buildcontext.select_sources(files, ".") == [(f, f) for f in files]
    assert buildcontext.select_sources(files, "nope") == []


def test_the_default_reference_is_the_project_version_dev() -> None:
    assert build.default_ref() == f"tensorwasm.io/tensorwasm:{PYPROJECT['project']['version']}-dev"
