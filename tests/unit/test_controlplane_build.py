"""hack/controlplane/build.sh and its Go module agree: the versions in the cache key are the ones
go.mod builds, and every binary name the dev cluster runs is built (a symlink name the multi-call
binary dispatches on, or a main package of go.mod's tool directives). Building them:
tests/cluster/* through `make test`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tensorwasm.dev.cluster import COMPONENTS
from tensorwasm.dev.node import NODE_COMPONENTS

HERE = Path(__file__).resolve().parents[2] / "hack" / "controlplane"
BUILD = (HERE / "build.sh").read_text()
GO_MOD = (HERE / "go.mod").read_text()
MAIN_GO = (HERE / "cmd" / "tensorwasm-kube" / "main.go").read_text()

MODULES = {
    "KUBE_VERSION": "k8s.io/kubernetes",
    "ETCD_VERSION": "go.etcd.io/etcd/server/v3",
    "CONTAINERD_VERSION": "github.com/containerd/containerd/v2",
    "KWOK_VERSION": "sigs.k8s.io/kwok",
    "HELM_VERSION": "helm.sh/helm/v3",
}


def shell_array(name: str) -> list[str]:
    match = re.search(rf"^{name}=\(([^)]*)\)", BUILD, re.M)
    assert match, name
    return match.group(1).split()


def required(module: str) -> str:
    match = re.search(rf"^\s+{re.escape(module)} (v\S+)", GO_MOD, re.M)
    assert match, f"go.mod does not require {module}"
    return match.group(1)


@pytest.mark.parametrize("variable", sorted(MODULES))
def test_the_cache_key_versions_are_what_go_mod_builds(variable: str) -> None:
    match = re.search(rf"^{variable}=(\S+)", BUILD, re.M)
    assert match, variable
    assert required(MODULES[variable]) == match.group(1)


def test_every_binary_the_dev_cluster_runs_is_built() -> None:
    links = shell_array("KUBE_COMPONENTS")
    dispatched = set(re.findall(r'case "([a-z-]+)"', MAIN_GO)) | set(
        re.findall(r'^\t"([a-z-]+)": ', MAIN_GO, re.M)
    )
    assert set(links) <= dispatched, "a symlink name main.go does not dispatch on"
    tools = re.search(r"^tool \(([^)]*)\)", GO_MOD, re.M | re.S)
    assert tools, "go.mod has no tool block"
    own = shell_array("OWN_BINARIES")
    assert set(own) <= set(tools.group(1).split())
    built = set(links) | {path.rsplit("/", 1)[1] for path in own}
    # What tensorwasm.dev starts or calls by name from the bin directory.
    needed = {*COMPONENTS, *NODE_COMPONENTS, "kubectl", "ctr", "helm", "containerd-shim-runc-v2"}
    assert needed <= built, f"not built: {sorted(needed - built)}"


def run_check(tmp_path: Path, go_mod: str, **versions: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "go.mod").write_text(go_mod)
    function = re.search(r"^check_versions\(\) \{.*?^\}$", BUILD, re.M | re.S)
    assert function
    env = {var: re.search(rf"^{var}=(\S+)", BUILD, re.M).group(1) for var in MODULES}  # type: ignore[union-attr]
    env.update(versions)
    script = "\n".join(
        [*(f"{k}={v}" for k, v in env.items()), f"here={tmp_path}", function.group(0), "check_versions"]
    )
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False)


def test_check_versions_accepts_the_real_go_mod(tmp_path: Path) -> None:
    assert run_check(tmp_path, GO_MOD).returncode == 0


def test_check_versions_refuses_a_key_that_would_lie(tmp_path: Path) -> None:
    # A version bumped in build.sh (the cache key) but not in go.mod (what builds): refused by name.
    proc = run_check(tmp_path, GO_MOD, KWOK_VERSION="v9.9.9")
    assert proc.returncode != 0
    assert "sigs.k8s.io/kwok v9.9.9" in proc.stderr
    # And a version that only shares a prefix (v0.8.0 vs v0.8.01) is no match.
    proc = run_check(tmp_path, GO_MOD.replace("sigs.k8s.io/kwok v0.8.0", "sigs.k8s.io/kwok v0.8.01"))
    assert proc.returncode != 0


def build_kube_go_commands() -> list[str]:
    function = re.search(r"^build_kube\(\) \{.*?^\}$", BUILD, re.M | re.S)
    assert function
    return re.findall(r"&& (go (?:build|list) [^\n]*)", function.group(0))


def test_the_compiler_flags_are_part_of_the_cache_key() -> None:
    # Binaries built with other flags must not pass for these: the flags are hashed into the key.
    key_line = re.search(r"^sources_hash=.*$", BUILD, re.M)
    assert key_line
    assert "${GCFLAGS[*]}" in key_line.group(0)


def test_every_go_command_of_the_build_compiles_with_the_same_flags() -> None:
    # The standard library compiled beside the module download is reused by the go build only if
    # its flags are the build's (else it is compiled twice), and go list's Stale count (the progress
    # estimate) only counts what that go build compiles if it is asked with the same flags.
    commands = build_kube_go_commands()
    assert len(commands) == 3, commands  # go build std, go list, go build
    for command in commands:
        assert "-trimpath" in command and '"${GCFLAGS[@]}"' in command, command
    assert any(command.startswith("go build") and command.endswith(" std) &") for command in commands)
