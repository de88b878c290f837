"""The deployment files (deploy/ray/*.yaml, Dockerfile, the Makefile's docker-test) and the README's "Run across
machines" commands: they parse, every `lowband` command they name is one our CLI accepts with a valid config,
and their torch / Ray pins agree with the Makefile's venv. Nothing here needs Docker, Ray or Kubernetes."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from deploy.cli import build_parser, recipe_path
from protocols.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def _makefile_torch() -> str:
    [version] = re.findall(r"install -q torch==([\w.]+)", (ROOT / "Makefile").read_text())
    return version


def _dockerfile_arg(name: str) -> str:
    [value] = re.findall(rf"^ARG {name}=(\S+)$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    return value


def _lowband_commands(text: str) -> list[list[str]]:
    """Every `lowband SUBCOMMAND ...` in shell text: as a command of its own, after `docker run ... IMAGE`, or
    quoted inside another command (`ray exec cluster.yaml 'lowband run ...'`)."""
    found: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|;", line):
            words = shlex.split(part)
            for i, word in enumerate(words):
                if word == "lowband":
                    found.append(words[i + 1:])
                elif word.startswith("lowband "):
                    found.extend(_lowband_commands(word))
    return found


def _accepted(argv: list[str]) -> RunConfig | None:
    """Parse `lowband ARGV` with our parser (a SystemExit means the CLI refuses it) and, for commands that take
    a recipe, load the config they name, overrides and all; the config, or None for other commands."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`lowband {shlex.join(argv)}` is refused by deploy/cli.py's parser")
    if not hasattr(args, "recipe"):
        return None
    return load_config(recipe_path(args.recipe), args.set)


def _readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Run across machines\n")
    end = readme.index("\n## ", start + 1)
    return readme[start:end]


def test_the_rayjob_runs_lowband_run_on_the_cluster_kuberay_starts() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy/ray/rayjob.yaml").read_text()))
    [job] = [d for d in docs if d["kind"] == "RayJob"]
    [claim] = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert job["apiVersion"] == "ray.io/v1"
    [argv] = _lowband_commands(job["spec"]["entrypoint"])
    args = build_parser().parse_args(argv)
    assert (args.command, args.address) == ("run", "auto")  # joins the cluster, starts no Ray of its own
    cfg = _accepted(argv)
    assert cfg is not None and cfg.run_dir == "/runs"

    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == _dockerfile_arg("RAY_VERSION")
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        [container] = pod["spec"]["containers"]
        assert container["image"].startswith("lowband:")
        assert {"name": "runs", "mountPath": cfg.run_dir} in container["volumeMounts"]
        volume = {"name": "runs", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
        assert volume in pod["spec"]["volumes"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # the worker pods hold the CPUs the run's actors ask for (the head runs only the driver)
    worker_cpus = sum(int(g["replicas"]) * float(g["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
                      for g in cluster["workerGroupSpecs"])
    assert worker_cpus >= cfg.cluster.workers * cfg.cluster.cpus_per_worker


def test_the_ray_cluster_yaml_installs_pinned_torch_first_and_starts_ray() -> None:
    spec = yaml.safe_load((ROOT / "deploy/ray/cluster.yaml").read_text())
    assert spec["provider"]["type"] == "local" and spec["provider"]["worker_ips"]
    # what `ray up` does first: fill in the defaults and check the result against Ray's own schema
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(spec)))
    setup = spec["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==" in c)
    lowband_at = next(i for i, c in enumerate(setup) if "lowband-src" in c and "pip install" in c)
    assert torch_at < lowband_at
    assert f"torch=={_makefile_torch()}" in setup[torch_at] and "whl/cpu" in setup[torch_at]
    assert f"ray[default]=={_dockerfile_arg('RAY_VERSION')}" in setup[lowband_at]
    assert any("ray start --head" in c for c in spec["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in c for c in spec["worker_start_ray_commands"])
    # the usage in its header comment: `#   ray exec deploy/ray/cluster.yaml 'lowband run ...'`
    usage = re.findall(r"^#   (ray .*)$", (ROOT / "deploy/ray/cluster.yaml").read_text(), flags=re.MULTILINE)
    commands = _lowband_commands("\n".join(usage))
    assert commands and all(build_parser().parse_args(c).address == "auto" for c in commands)
    for argv in commands:
        _accepted(argv)


def test_the_dockerfile_pins_the_makefiles_torch_and_installs_it_first() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert _dockerfile_arg("TORCH_VERSION") == _makefile_torch()
    assert _dockerfile_arg("TORCH_INDEX") == "https://download.pytorch.org/whl/cpu"  # CPU unless asked
    torch_at = dockerfile.index('"torch==${TORCH_VERSION}"')
    lowband_at = dockerfile.index('pip install --no-cache-dir ".')
    assert dockerfile.index('--index-url "${TORCH_INDEX}"') < torch_at < lowband_at
    # everything the install copies gets past .dockerignore
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for copied in re.findall(r"^COPY (\S+)", dockerfile, flags=re.MULTILINE):
        assert f"!{copied}" in ignore, copied


def test_docker_test_is_separate_from_make_test_and_runs_a_valid_job() -> None:
    makefile = (ROOT / "Makefile").read_text()
    [test_rule] = re.findall(r"^test:(.*)$", makefile, flags=re.MULTILINE)
    assert "docker" not in test_rule
    smoke = re.search(r"^DOCKER_SMOKE := (.*?)(?<!\\)\n", makefile, flags=re.MULTILINE | re.DOTALL)
    assert smoke is not None
    [argv] = _lowband_commands(smoke.group(1))
    cfg = _accepted(argv)
    assert cfg is not None and cfg.name == "smoke" and "runs/smoke/summary.json" in smoke.group(1)


def test_every_lowband_command_of_run_across_machines_is_accepted(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    section = _readme_section()
    blocks = re.findall(r"```\n(.*?)```", section, flags=re.DOTALL)
    inline = re.findall(r"`(lowband [^`]+|docker run [^`]+)`", section)
    commands = [c for text in [*blocks, *inline] for c in _lowband_commands(text)]
    subcommands = {c[0] for c in commands}
    assert {"coordinator", "worker", "run"} <= subcommands
    # The parser checks that TLS files exist: the certificate and key the commands name, made where they run.
    monkeypatch.chdir(tmp_path)
    for name in {word for argv in commands for word in argv if word.endswith((".pem", ".key"))}:
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text("-----BEGIN CERTIFICATE-----\n")
    for argv in commands:
        _accepted(argv)
    workers = [build_parser().parse_args(c) for c in commands if c[0] == "worker"]
    assert workers and all(w.join == "10.0.0.1:7070" and w.tls_ca and w.token for w in workers)
