"""Chaos runs (slow): a training job under ``moesys train --max-restarts`` and under ``moesys launch`` (Ray)
survives SIGKILLs (one while a checkpoint is being written), a SIGSTOPped worker (a hang, found by the
collective timeout) and, under torchrun, a SIGTERM (a preemption), and ends with the losses of an
uninterrupted run. The controller is :mod:`benchmarks.chaos` (``python benchmarks/chaos.py`` is the full
benchmark); these runs use fewer steps and faults.

What every run must show:

- exit code 0, every fault followed by a restart that logs steps again;
- each restart resumed from the newest checkpoint committed before it;
- steps recomputed per failure <= one checkpoint interval when no save was in flight. A SIGKILL during an
  asynchronous save (training goes on while it is written) can only fall back to the checkpoint before
  it, so there the bound is one interval plus the steps run since that save began; the SIGTERM loses none;
- the killed save's directory was not committed; 0 checkpoints corrupted (each committed one re-read
  with ``system.checkpoint.verify``) or lost; ``latest`` names a committed one;
- the final per-step losses equal the reference's within 1e-6 relative;
- no worker process alive once the launcher has exited.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import chaos

STEPS, INTERVAL = 80, 10
ARGS = ["--steps", str(STEPS), "--interval", str(INTERVAL), "--train-timeout", "20", "--save-delay", "1.0",
        "--recover-timeout", "180", "--run-timeout", "420", "--seed", "0"]
pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="the controller reads /proc (Linux)")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Per-step losses of the job without faults."""
    args = chaos.parse_args(ARGS)
    losses = chaos.reference_losses(tmp_path_factory.mktemp("chaos"),
                                    chaos.job_overrides(args.steps, args.interval, args.train_timeout))
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _check_run(run: dict, kinds: list[str]) -> None:
    context = f"aborted: {run['aborted']}; failures: {run['failures']}; attempts: {run['attempts']}"
    assert run["exit_code"] == 0 and run["aborted"] is None, context
    assert sorted(f["kind"] for f in run["failures"]) == sorted(kinds)
    for f in run["failures"]:
        assert f["fired"] and f["recovered"], f
        assert f["resumed_from_newest"], f"{f['kind']}: resumed at {f['resumed_at']}, newest committed " \
                                         f"{f['newest_committed_at_restart']}"
        assert f["steps_recomputed"] <= f["recompute_bound"], f
        if f["save_in_flight"] is None:
            assert f["steps_recomputed"] <= INTERVAL, f
        if f["kind"] == "sigkill_mid_save":
            assert not f["interrupted_save_committed_at_restart"], f
            assert f["resumed_at"] == f["save_in_flight"] - INTERVAL, f
        if f["kind"] == "sigterm":
            assert f["steps_recomputed"] == 0, f
        if f["kind"] == "sigstop":
            assert f["detected_s"] is not None and f["detected_s"] < 60, f
    ck = run["checkpoints"]
    assert not ck["corrupted"] and not ck["lost"] and ck["latest_is_committed"], ck
    assert ck["committed"] == ck["verified_ok"] and ck["latest"] == STEPS, ck
    assert run["completed_steps"] == STEPS and run["steps_computed"] >= STEPS
    assert run["losses"]["equal_within_1e-6"], run["losses"]
    assert not run["workers_left"], run["workers_left"]


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_torchrun_survives_kills_hang_and_preemption(reference: dict[int, float], tmp_path: Path) -> None:
    """``moesys train --max-restarts``: 2 SIGKILLs (one mid-save), 1 SIGSTOP, 1 SIGTERM."""
    args = chaos.parse_args(ARGS)
    kinds = chaos.fault_kinds(kills=2, stops=1, sigterms=1)
    run = chaos.run_torchrun(args, tmp_path, kinds, reference)
    _check_run(run, kinds)


@pytest.mark.slow
@pytest.mark.peers
@pytest.mark.timeout(480)
def test_ray_survives_kill_mid_save_and_hang(reference: dict[int, float], tmp_path: Path) -> None:
    """``moesys launch`` on two raylets: 1 SIGKILL (mid-save), 1 SIGSTOP."""
    pytest.importorskip("ray")
    args = chaos.parse_args(ARGS)
    kinds = chaos.fault_kinds(kills=1, stops=1, sigterms=0)
    run = chaos.run_ray(args, tmp_path, kinds, reference)
    _check_run(run, kinds)
    assert run["cluster_processes_left"] == [], run["cluster_processes_left"]


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_torchrun_recovers_from_a_hang_during_a_save(reference: dict[int, float], tmp_path: Path) -> None:
    """A rank SIGSTOPped while a checkpoint save is in flight: the peer's collective times out, it exits at
    once (its save thread, blocked on the stopped rank, must not keep it alive), and the job restarts."""
    args = chaos.parse_args([*ARGS, "--hang-watch", "180"])
    run = chaos.run_torchrun(args, tmp_path, [], reference, "torchrun_stop_in_save")
    _check_run(run, ["sigstop_mid_save"])
