"""Train video foundation models the VideoMAE V2 way on DeepSpeed ZeRO-3."""
import hashlib
import os
import sys

# DeepSpeed compiles its CPU ops (shm_comm for every CPU run, async_io for NVMe offload) with
# torch's extension loader, by default into one user-wide cache. Two virtual environments with
# different build flags then rebuild the same op in turn, ~2 minutes each, silently. Inside a
# virtual environment the ops live in it instead (`make setup` builds shm_comm there once);
# an explicit TORCH_EXTENSIONS_DIR is kept.
#
# A venv entered through a symlink (a checkout whose .venv links to another's) shows the compiler
# other paths in every include flag, and ninja rebuilds an op whose command line changed: in one
# shared folder, each entrance would rebuild the op the other built. So each entrance keeps its
# own build, in a subfolder named by the path it came in by.
if sys.prefix != sys.base_prefix:
    _venv = os.path.realpath(sys.prefix)
    _ops = os.path.join(_venv, "torch_extensions")
    if _venv != os.path.abspath(sys.prefix):
        _ops = os.path.join(_ops, "via-" + hashlib.sha1(os.path.abspath(sys.prefix).encode()).hexdigest()[:10])
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", _ops)
