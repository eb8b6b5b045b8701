"""The chaos benchmark's verdicts and its markdown report (:mod:`benchmarks.chaos` runs the job and measures)."""

from __future__ import annotations

from typing import Any

from benchmarks.common import markdown_table, provenance_markdown
from system.checkpoint.writer import FAULT_WRITE_DELAY_ENV


def checks(run: dict[str, Any], interval: int) -> dict[str, bool]:
    """The issue's requirements for one chaos run, each met or not."""
    fired = [f for f in run["failures"] if f["fired"]]
    ck = run["checkpoints"]
    return {
        "exit code 0": run["exit_code"] == 0 and not run["aborted"],
        "every fault fired and the job recovered": run["all_recovered"],
        "steps recomputed per failure <= one interval": all(f.get("steps_recomputed", 1 << 30) <= interval
                                                            for f in fired),
        "steps recomputed <= interval + steps run while an interrupted save was in flight":
            all(f.get("steps_recomputed", 1 << 30) <= f.get("recompute_bound", -1) for f in fired),
        "resumed from the newest committed checkpoint": all(f.get("resumed_from_newest") for f in fired),
        "SIGTERM lost no step": all(f.get("steps_recomputed") == 0 for f in fired if f["kind"] == "sigterm"),
        "0 checkpoints corrupted or lost": not ck["corrupted"] and not ck["lost"],
        "latest names a committed checkpoint": ck["latest_is_committed"],
        "final losses equal the uninterrupted run's (1e-6 relative)": run["losses"]["equal_within_1e-6"],
        "no worker alive after the job": not run["workers_left"],
    }


def _fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def render_markdown(result: dict[str, Any]) -> str:
    """The results as markdown: per run a summary, a row per fault, the checks; the probe; provenance."""
    cfg = result["config"]
    lines = [
        f"# Chaos run ({result['device']}{cfg['tag']})", "",
        f"{result['date']}. Tiny config (d=64, 2 layers, 8 experts top-2, seq 64, batch 4 per rank), 2 ranks "
        f"(EP=2, Gloo), {cfg['steps']} steps, checkpoint every {cfg['interval']} steps (asynchronous; the save a "
        f"mid-save fault targets is held {cfg['save_delay']:g} s uncommitted by `{FAULT_WRITE_DELAY_ENV}`), "
        f"collective timeout after the first step {cfg['train_timeout']} s, seed {cfg['seed']}. Reference: the same "
        f"job without faults "
        f"({len(result['reference_losses'])} steps).", "",
    ]
    for name, run in result["runs"].items():
        probe = name == "torchrun_stop_in_save"
        lines += [f"## {name}: {run['launcher']}", ""]
        if not probe:
            ck, lo = run["checkpoints"], run["losses"]
            fired = [f for f in run["failures"] if f["fired"]]
            rec = [f["steps_recomputed"] for f in fired if "steps_recomputed" in f]
            lines += [markdown_table(
                ["exit", "wall s", "steps", "steps computed", "goodput", "attempts", "max recomputed",
                 "ckpts committed / verified", "corrupted", "lost", "latest", "losses vs reference",
                 "workers left"],
                [[run["exit_code"], _fmt(run["seconds"], 0), run["completed_steps"], run["steps_computed"],
                  _fmt(run["goodput"], 3), len(run["attempts"]), max(rec, default="-"),
                  f"{len(ck['committed'])} / {len(ck['verified_ok'])}", len(ck["corrupted"]), len(ck["lost"]),
                  f"step {ck['latest']}" + ("" if ck["latest_is_committed"] else " (NOT committed)"),
                  ("bitwise equal" if lo["bitwise_equal"] else f"max rel diff {_fmt(lo['max_rel_diff'], 2)}")
                  + (f", {len(lo['missing_steps'])} steps missing" if lo["missing_steps"] else ""),
                  len(run["workers_left"])]]), ""]
        rows = []
        for f in run["failures"]:
            if not f["fired"]:
                rows.append([f["kind"], f["target_step"], "-", "not fired"] + ["-"] * 7)
                continue
            rows.append([f["kind"], f["last_step_before"], f["victim"],
                         f"step {f['save_in_flight']}" if f["save_in_flight"] is not None else "no",
                         _fmt(f.get("detected_s")), _fmt(f.get("restart_loaded_s")), _fmt(f.get("recovery_s")),
                         _fmt(f.get("resumed_at")), _fmt(f.get("steps_recomputed")),
                         _fmt(f.get("resumed_from_newest")), _fmt(f.get("recovered"))])
        lines += [markdown_table(
            ["fault", "after step", "victim", "save in flight", "hang reported s", "restart loaded s",
             "first step after s", "resumed at", "recomputed", "from newest ckpt", "recovered"], rows), ""]
        if probe:
            lines += [_probe_text(run, cfg), ""]
        if name in result["checks"]:
            lines += ["Checks: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}"
                                             for k, v in result["checks"][name].items()) + ".", ""]
        if not probe:
            mids = [f for f in run["failures"] if f["kind"] == "sigkill_mid_save" and f.get("recovered")]
            for f in mids:
                lines += [f"Mid-save kill: step {f['save_in_flight']}'s directory held data files and no metadata.json "
                          f"when the signal went; at the restart it was "
                          f"{'committed' if f['interrupted_save_committed_at_restart'] else 'still uncommitted'}, "
                          f"`latest` named step {f['latest_at_restart']}, and the job resumed at step "
                          f"{f['resumed_at']}.", ""]
    lines += [
        "Columns: times are seconds from the signal (seen by the controller, polling every 10 ms); "
        "*hang reported*: the launcher's line that a collective timed out; *restart loaded*: the new attempt's "
        "resume marker (written after its checkpoint is loaded); *first step after*: its first logged step. "
        "*Recomputed*: last step the failed attempt logged minus the step the next attempt resumed from. "
        "*Goodput*: steps of the finished run / steps logged by all attempts.", "",
        provenance_markdown(result["provenance"]),
    ]
    return "\n".join(lines)


def _probe_text(run: dict[str, Any], cfg: dict[str, Any]) -> str:
    f = run["failures"][0]
    if not f["fired"]:
        return f"The probe's SIGSTOP did not fire ({run['aborted']})."
    text = f"SIGSTOP of {f['victim']} while step {f['save_in_flight']}'s save was held uncommitted. "
    if f.get("detected_s") is not None:
        text += f"The launcher reported a collective timeout {f['detected_s']:.1f} s after the signal. "
    if f.get("recovered"):
        return text + f"The job restarted and logged a step {f['recovery_s']:.1f} s after the signal."
    alive = ", ".join(f"pid {p['pid']} in state {p['state']} "
                      f"({'training rank' if 'system.train.main' in p['cmd'] else 'launcher'})"
                      for p in run["alive_at_abort"])
    return text + (f"No step followed within {cfg['hang_watch']:g} s of the signal; alive when the controller then "
                   f"ended the job (/proc states: S sleeping, T stopped): {alive or 'none'}.")
