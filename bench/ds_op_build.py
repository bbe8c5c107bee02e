"""DeepSpeed's shm_comm op is built once per virtual environment, never again.

`scaling` points TORCH_EXTENSIONS_DIR at <venv>/torch_extensions (scaling/__init__.py), so two
venvs (two clones, each with the `.venv` its `make` built) each keep their own build and never
invalidate the other's, as they did in the user-wide ~/.cache/torch_extensions, where the
second venv's build flags made the first rebuild on its next load (~2 min, silently).

This loads the op the way `make setup` builds it, interleaved: venv A, venv B, A, B. B is a
new venv made here that sees A's packages through a .pth file (a second clone's own venv,
without a second 4-minute pip install), so B starts with no op. Expected: B's first load
builds (minutes), every other load takes seconds and leaves the .so file untouched.

    .venv/bin/python bench/ds_op_build.py [--venv .venv] [--out bench/results/ds_op_build.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = "import scaling; from deepspeed.comm.torch import build_shm_op; build_shm_op()"


def op_files(venv: Path) -> dict[str, int]:
    """The built op's shared objects in the venv -> their modification time (ns)."""
    return {str(p): p.stat().st_mtime_ns for p in (venv / "torch_extensions").rglob("*.so")}


def load(venv: Path, repo: Path) -> dict:
    before = op_files(venv)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env["PYTHONPATH"] = str(repo)
    start = time.perf_counter()
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", LOAD], env=env, capture_output=True, text=True,
                          timeout=1200)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = op_files(venv)
    return {"venv": str(venv), "seconds": round(seconds, 1), "built": before != after, "so_files": len(after),
            "loadavg": os.getloadavg()}


def second_venv(first: Path, where: Path) -> Path:
    """A new venv whose site-packages reach the first's (one .pth line), with no op of its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    site = next((where / "lib").glob("python*/site-packages"))
    theirs = next((first.resolve() / "lib").glob("python*/site-packages"))
    (site / "first_venv.pth").write_text(f"{theirs}\n")
    return where


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default=".venv")
    ap.add_argument("--out", default="bench/results/ds_op_build.json")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parent.parent
    a = Path(args.venv).absolute()
    with tempfile.TemporaryDirectory(prefix="second_venv_") as tmp:
        b = second_venv(a, Path(tmp) / "venv")
        rows = []
        for venv in (a, b, a, b):  # interleaved: B's build must not touch A's op, nor A's load B's
            rows.append(load(venv, repo))
            print(json.dumps(rows[-1]), flush=True)
    result = {"what": "shm_comm op load per venv, interleaved A, B (new), A, B", "rows": rows,
              "built_per_venv": {"A": sum(r["built"] for r in rows[0::2]), "B": sum(r["built"] for r in rows[1::2])}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}: builds per venv {result['built_per_venv']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
