"""`make demo` on a fresh clone of this checkout, every output line timestamped.

Three runs in the clone: `fresh` (set-up, synthetic shards, the three stages), `again` (every
stage finished: skipped) and `after_clean` (`make clean` first: the demo after set-up). Per run:
the wall time, the longest silence between two lines (the demo promises under 10 s), the
set-up steps' times, and the training steps' own time (the sum of the `s/step` every step
logs), so "demo minus its steps" is the overhead. Writes bench/results/demo_time.json.

    python3 bench/demo_time.py [--work /tmp/demo_time] [--runs fresh,again,after_clean]
    python3 bench/demo_time.py --venv .venv --runs fresh   # reuse an installed venv (a symlink):
        # make's pip install is skipped; the op is built before timing
    python3 bench/demo_time.py --venv .venv --runs fresh --commits 742f2f8,HEAD --repeat 2  # A/B
    python3 bench/demo_time.py --analyze run.log   # a log of "<seconds> <line>" lines
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEP = re.compile(r"\[scaling\] step \d+/\d+ .* ([\d.]+) ?s/step")
STAGE_START = re.compile(r"\[pipeline\] stage (\d+)/\d+ (\S+): running")
STAGE_STEP = re.compile(r"\[scaling\] step (\d+)/(\d+) \(stage (\d+)/")
MARKS = {  # set-up and demo steps: the first line that starts each
    "pip install": "installing the pinned packages",
    "op build": "building DeepSpeed's shm_comm op",
    "synth": "scaling synth --out data/synth ",
    "pipeline": "scaling pipeline run",
}


def timestamped(cmd: list[str], cwd: Path, log: Path, env: dict | None = None) -> list[tuple[float, str]]:
    """Run cmd, echo and keep each line with the seconds since the start."""
    lines, start = [], time.monotonic()
    with open(log, "w") as out, subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                 text=True, bufsize=1, env=env) as proc:
        for line in proc.stdout:
            t = time.monotonic() - start
            lines.append((t, line.rstrip("\n")))
            out.write(f"{t:.1f} {lines[-1][1]}\n")
            print(f"{t:7.1f} {lines[-1][1]}", flush=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}); see {log}"
    return lines


def report(lines: list[tuple[float, str]]) -> dict:
    times = [t for t, _ in lines]
    gaps = sorted(((b - a, a, text[:120]) for (a, _), (b, text) in zip(lines, lines[1:])), reverse=True)
    marks = {name: next((t for t, text in lines if key in text), None) for name, key in MARKS.items()}
    steps = [float(m.group(1)) for _, text in lines if (m := STEP.search(text))]
    total = times[-1] if times else 0.0
    after_setup = total - marks["synth"] if marks["synth"] is not None else total
    return {"total_s": round(total, 1), "lines": len(lines), "longest_silence_s": round(gaps[0][0], 1) if gaps else 0,
            "silences_over_10_s": [{"s": round(g, 1), "at": round(a, 1), "before": t} for g, a, t in gaps if g > 10][:10],
            "starts_at_s": {k: (round(v, 1) if v is not None else None) for k, v in marks.items()},
            "demo_after_setup_s": round(after_setup, 1), "training_steps": len(steps),
            "training_steps_s": round(sum(steps), 1),
            "overhead_beyond_steps_s": round(after_setup - sum(steps), 1), "phases": phases(lines)}


def phases(lines: list[tuple[float, str]]) -> dict:
    """Where the pipeline's time goes: the driver's start (its command to stage 1), per stage the
    launch (stage line to its first step line), the steps (first to last step line) and the
    hand-over (last step line to the next stage's line, or to the summary), then the exit
    (summary to the last line)."""
    begin = next((t for t, text in lines if MARKS["pipeline"] in text), None)
    stages, order = {}, []
    for t, text in lines:
        if m := STAGE_START.search(text):
            order.append(m.group(1))
            stages[m.group(1)] = {"name": m.group(2), "start": t}
        elif (m := STAGE_STEP.search(text)) and m.group(3) in stages:
            stages[m.group(3)].setdefault("first_step", t)
            stages[m.group(3)]["last_step"] = t
    summary = next((t for t, text in lines if "[pipeline] summary" in text), None)
    out = {}
    if begin is not None and order:
        out["driver_start_s"] = round(stages[order[0]]["start"] - begin, 1)
    for i, key in enumerate(order):
        st = stages[key]
        nxt = stages[order[i + 1]]["start"] if i + 1 < len(order) else summary
        if "first_step" not in st:
            continue
        out[st["name"]] = {"launch_s": round(st["first_step"] - st["start"], 1),
                           "steps_s": round(st["last_step"] - st["first_step"], 1),
                           "hand_over_s": round(nxt - st["last_step"], 1) if nxt is not None else None}
    if summary is not None and lines:
        out["exit_s"] = round(lines[-1][0] - summary, 1)
    return out


def read_log(path: Path) -> list[tuple[float, str]]:
    out = []
    for line in path.read_text().splitlines():
        head, _, text = line.lstrip().partition(" ")
        try:
            out.append((float(head), text))
        except ValueError:
            continue  # a note such as "load ..."
    return out


def link_venv(clone: Path, venv: Path) -> tuple[list[str], dict]:
    """The clone's .venv is a link to `venv`, whose editable install points elsewhere: PYTHONPATH
    makes the clone's own package the one imported. The clone's pyproject.toml is dated before the
    venv's stamp so that make does not install again; the op is built before timing, as set-up does."""
    (clone / ".venv").symlink_to(os.path.realpath(venv))
    stamp = (clone / ".venv" / ".installed").stat().st_mtime
    os.utime(clone / "pyproject.toml", (stamp - 60, stamp - 60))  # installed: make must not install again
    env = dict(os.environ, PYTHONPATH=str(clone))
    subprocess.run([".venv/bin/python", "-c", "import scaling; from deepspeed.comm.torch import build_shm_op; "
                    "build_shm_op()"], cwd=clone, env=env, check=True)
    return ["make", "demo"], env


def fresh_clone(work: Path, commit: str | None, venv: str | None) -> tuple[Path, list[str], dict | None]:
    """A new clone at `work`/clone (the same path every time: the op built for it is reused)."""
    clone = work / "clone"
    if clone.exists():
        shutil.rmtree(clone)
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    if commit:
        subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
    if venv:
        return clone, *link_venv(clone, Path(venv))
    return clone, ["make", "demo"], None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="folder for the clone and the logs (default: a new temporary one)")
    ap.add_argument("--runs", default="fresh,again,after_clean")
    ap.add_argument("--analyze", default=None, metavar="LOG", help="only report on an existing timestamped log")
    ap.add_argument("--venv", default=None, help="an installed venv to link as the clone's .venv (its pip install "
                    "is set-up, which the demo's figures leave out anyway)")
    ap.add_argument("--commits", default="HEAD", help="commits to compare, e.g. 742f2f8,HEAD: each gets a fresh "
                    "clone per repeat, the arms interleaved (A, B, A, B) so that the machine's load hits both")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "demo_time.json"))
    args = ap.parse_args()
    if args.analyze:
        print(json.dumps(report(read_log(Path(args.analyze))), indent=1))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="demo_time_"))
    result = {"cores": os.cpu_count(), "venv": args.venv and os.path.realpath(args.venv), "arms": {}}
    for i in range(args.repeat):
        for commit in args.commits.split(","):
            clone, make, env = fresh_clone(work, commit, args.venv)
            sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
            arm = result["arms"].setdefault(commit, {"commit": sha, "repeats": []})
            runs = {}
            for run in args.runs.split(","):
                if run == "after_clean":
                    subprocess.run(["make", "clean"], cwd=clone, check=True, capture_output=True)
                load_before = os.getloadavg()
                lines = timestamped(make, clone, work / f"{commit}-{i}-{run}.log", env)
                runs[run] = {**report(lines), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
                print(json.dumps({f"{commit} #{i + 1} {run}": runs[run]}, indent=1), flush=True)
            arm["repeats"].append(runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} (logs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
