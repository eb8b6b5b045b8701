"""Launch layer: torchrun command building, validation, the shell launchers."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from system.cluster import LaunchSpec, build_torchrun_command, format_command, run_command
from system.cluster.torchrun import torchrun_has_shutdown_timeout

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_SH = REPO / "launchers" / "torchrun.sh"
SLURM_SBATCH = REPO / "launchers" / "slurm.sbatch"
ENV_KEY = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"

# torch 2.11's torchrun has no --shutdown-timeout: the launcher leaves it out for its own interpreter
# there (an interpreter it does not run, like "py" below, is assumed to be newer).
GRACE = ["--shutdown-timeout", "60"]

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not available")


def test_single_node_standalone() -> None:
    spec = LaunchSpec(nproc_per_node=4, python="py")
    argv, env = build_torchrun_command(spec, ["--config", "c.toml", "--train.steps", "5"])
    assert argv == [
        "py", "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc-per-node", "4", *GRACE,
        "-m", "system.train.main", "--config", "c.toml", "--train.steps", "5",
    ]  # fmt: skip
    assert env == {}


def test_default_python_is_current_interpreter() -> None:
    argv, _ = build_torchrun_command(LaunchSpec(nproc_per_node=1), [])
    assert argv[0] == sys.executable
    assert ("--shutdown-timeout" in argv) == torchrun_has_shutdown_timeout()  # what this torch's torchrun takes


def test_multi_node_c10d() -> None:
    spec = LaunchSpec(nproc_per_node=8, nnodes="2", rdzv_endpoint="node0:29500", rdzv_id="job7", python="py")
    argv, env = build_torchrun_command(spec, ["--config", "c.toml"])
    assert argv == [
        "py", "-m", "torch.distributed.run",
        "--nnodes", "2", "--nproc-per-node", "8",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29500", "--rdzv-id", "job7",
        "--max-restarts", "0", *GRACE,
        "-m", "system.train.main", "--config", "c.toml",
    ]  # fmt: skip
    assert "--node-rank" not in argv and "--standalone" not in argv
    assert env == {}


def test_one_node_with_endpoint_uses_c10d() -> None:
    argv, _ = build_torchrun_command(LaunchSpec(nproc_per_node=2, rdzv_endpoint="h:1234"), [])
    assert "--standalone" not in argv
    assert argv[argv.index("--rdzv-backend") + 1] == "c10d"


def test_elastic_range_sets_env() -> None:
    spec = LaunchSpec(nproc_per_node=8, nnodes="2:4", rdzv_endpoint="10.0.0.1:29500")
    argv, env = build_torchrun_command(spec, [])
    assert argv[argv.index("--nnodes") + 1] == "2:4"
    assert env == {ENV_KEY: "1"}


def test_fixed_range_is_not_elastic() -> None:
    spec = LaunchSpec(nproc_per_node=8, nnodes="3:3", rdzv_endpoint="h:29500")
    argv, env = build_torchrun_command(spec, [])
    assert argv[argv.index("--nnodes") + 1] == "3"
    assert env == {}


def test_restarts_set_env() -> None:
    spec = LaunchSpec(nproc_per_node=8, nnodes="2", rdzv_endpoint="h:29500", max_restarts=3)
    argv, env = build_torchrun_command(spec, [])
    assert argv[argv.index("--max-restarts") + 1] == "3"
    assert env == {ENV_KEY: "1"}


def test_standalone_restarts_kept() -> None:
    argv, env = build_torchrun_command(LaunchSpec(nproc_per_node=2, max_restarts=2), [])
    assert "--standalone" in argv and argv[argv.index("--max-restarts") + 1] == "2"
    assert env == {ENV_KEY: "1"}


def test_job_args_verbatim_and_custom_module() -> None:
    job_args = ["--config", "a b.toml", "--model.name", "x;y", "-m", "--weird"]
    argv, _ = build_torchrun_command(LaunchSpec(nproc_per_node=1, module="pkg.mod"), job_args)
    i = argv.index("pkg.mod")
    assert argv[i - 1] == "-m"
    assert argv[i + 1 :] == job_args


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nproc_per_node": 0}, "nproc_per_node"),
        ({"nproc_per_node": -2}, "nproc_per_node"),
        ({"nproc_per_node": 1, "nnodes": "x"}, "nnodes"),
        ({"nproc_per_node": 1, "nnodes": ""}, "nnodes"),
        ({"nproc_per_node": 1, "nnodes": "0"}, "nnodes"),
        ({"nproc_per_node": 1, "nnodes": "-1"}, "nnodes"),
        ({"nproc_per_node": 1, "nnodes": "4:2"}, "nnodes"),
        ({"nproc_per_node": 1, "nnodes": "0:2"}, "nnodes"),
        ({"nproc_per_node": 1, "nnodes": "1:2:3"}, "nnodes"),
        ({"nproc_per_node": 1, "nnodes": "2"}, "rdzv_endpoint"),
        ({"nproc_per_node": 1, "nnodes": "1:2"}, "rdzv_endpoint"),
        ({"nproc_per_node": 1, "nnodes": "2", "rdzv_endpoint": "node0"}, "rdzv_endpoint"),
        ({"nproc_per_node": 1, "nnodes": "2", "rdzv_endpoint": ":29500"}, "rdzv_endpoint"),
        ({"nproc_per_node": 1, "nnodes": "2", "rdzv_endpoint": "node0:abc"}, "rdzv_endpoint"),
        ({"nproc_per_node": 1, "nnodes": "2", "rdzv_endpoint": "node0:0"}, "1..65535"),
        ({"nproc_per_node": 1, "nnodes": "2", "rdzv_endpoint": "node0:65536"}, "1..65535"),
        ({"nproc_per_node": 1, "max_restarts": -1}, "max_restarts"),
    ],
)
def test_validation_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_torchrun_command(LaunchSpec(**kwargs), [])


def test_format_command_roundtrips() -> None:
    argv = ["py", "-m", "torch.distributed.run", "-m", "m", "--config", "a b.toml", "--x", "it's"]
    line = format_command(argv, {ENV_KEY: "1"})
    assert line.startswith(f"{ENV_KEY}=1 ")
    assert shlex.split(line) == [f"{ENV_KEY}=1", *argv]
    assert format_command(["a", "b c"], {}) == "a 'b c'"


def test_run_command_exit_code() -> None:
    assert run_command([sys.executable, "-c", "import sys; sys.exit(3)"], {}) == 3


def test_run_command_passes_env() -> None:
    code = "import os, sys; sys.exit(0 if os.environ.get('MOESYS_T') == 'v' and 'PATH' in os.environ else 5)"
    assert run_command([sys.executable, "-c", code], {"MOESYS_T": "v"}) == 0


def test_run_command_forwards_sigterm() -> None:
    child = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\ntime.sleep(30)"
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        rc = run_command([sys.executable, "-c", child], {})
    finally:
        timer.cancel()
    # 7: the child's handler ran; 143: the signal reached it before its handler was installed.
    assert rc in (7, 128 + signal.SIGTERM)


@needs_bash
@pytest.mark.parametrize("script", [TORCHRUN_SH, SLURM_SBATCH], ids=lambda p: p.name)
def test_launcher_syntax(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _run_sh(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPILOT_", "NNODES", "RDZV_", "NPROC_"))}
    base.pop("MAX_RESTARTS", None)
    base.pop("MASTER_PORT", None)
    base.pop(ENV_KEY, None)
    return subprocess.run(
        ["bash", str(TORCHRUN_SH), *args], env={**base, **env}, capture_output=True, text=True, timeout=30
    )


@needs_bash
def test_torchrun_sh_multi_node_needs_endpoint() -> None:
    result = _run_sh(["c.toml"], NNODES="2")
    assert result.returncode != 0
    assert "RDZV_ENDPOINT" in result.stderr


@needs_bash
def test_torchrun_sh_needs_config() -> None:
    result = _run_sh([])
    assert result.returncode != 0
    assert "CONFIG" in result.stderr


@needs_bash
def test_torchrun_sh_dry_run_matches_python() -> None:
    result = _run_sh(["c.toml", "--train.steps", "5"], DRY_RUN="1", NPROC_PER_NODE="3", PYTHON="py")
    assert result.returncode == 0, result.stderr
    spec = LaunchSpec(nproc_per_node=3, python="py")
    argv, _ = build_torchrun_command(spec, ["--config", "c.toml", "--train.steps", "5"])
    assert shlex.split(result.stdout) == argv


@needs_bash
def test_torchrun_sh_dry_run_elastic() -> None:
    result = _run_sh(
        ["c.toml", "--a.b", "x y"], DRY_RUN="1", NNODES="2:4", NPROC_PER_NODE="8", RDZV_ENDPOINT="h:29500", PYTHON="py"
    )
    assert result.returncode == 0, result.stderr
    spec = LaunchSpec(nproc_per_node=8, nnodes="2:4", rdzv_endpoint="h:29500", python="py")
    argv, _ = build_torchrun_command(spec, ["--config", "c.toml", "--a.b", "x y"])
    assert shlex.split(result.stdout) == [f"{ENV_KEY}=1", *argv]


@needs_bash
def test_torchrun_sh_skypilot_mapping() -> None:
    result = _run_sh(
        ["c.toml"],
        DRY_RUN="1",
        PYTHON="py",
        SKYPILOT_NUM_NODES="2",
        SKYPILOT_NUM_GPUS_PER_NODE="4",
        SKYPILOT_NODE_IPS="10.0.0.1\n10.0.0.2\n",
    )
    assert result.returncode == 0, result.stderr
    spec = LaunchSpec(nproc_per_node=4, nnodes="2", rdzv_endpoint="10.0.0.1:29500", python="py")
    argv, _ = build_torchrun_command(spec, ["--config", "c.toml"])
    assert shlex.split(result.stdout) == argv


@needs_bash
@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"NNODES": "4:2", "RDZV_ENDPOINT": "h:1"}, "NNODES"),
        ({"NNODES": "x"}, "NNODES"),
        ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE"),
        ({"MAX_RESTARTS": "-1"}, "MAX_RESTARTS"),
        ({"NNODES": "2", "RDZV_ENDPOINT": "h:70000"}, "RDZV_ENDPOINT"),
    ],
)
def test_torchrun_sh_validation(env: dict[str, str], match: str) -> None:
    result = _run_sh(["c.toml"], DRY_RUN="1", **env)
    assert result.returncode != 0
    assert match in result.stderr


def test_cli_accepts_negative_override_values(capsys) -> None:
    from system.cli import main

    assert main(["train", "--config", str(REPO / "configs/cpu-tiny.toml"), "--parallel.dp", "-1", "--dry-run"]) == 0
    assert "--parallel.dp -1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--config", str(REPO / "configs/cpu-tiny.toml"), "-x", "--dry-run"])
