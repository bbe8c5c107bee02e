"""Train video foundation models the VideoMAE V2 way on DeepSpeed ZeRO-3."""
import os
import sys

# DeepSpeed compiles its CPU ops (shm_comm for every CPU run, async_io for NVMe offload) with
# torch's extension loader, by default into one user-wide cache. Two virtual environments with
# different build flags then rebuild the same op in turn, ~2 minutes each, silently. Inside a
# virtual environment the ops live in it instead (`make setup` builds shm_comm there once);
# an explicit TORCH_EXTENSIONS_DIR is kept.
if sys.prefix != sys.base_prefix:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
