# The two commands of the README: `make demo` and `make test`. Both set up everything first
# (system packages with apt-get where missing, a .venv with the pinned Python packages).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STEPS ?= 40
DEMO_MODEL := runs/smoke/finetune/export/model_fp32.pt
RANKS ?= 2
DEMO_DATA := data/synth/synth-000003.tar data/synth_val/synth-000001.tar

.PHONY: setup demo pretrain test test-fast lint bench clean

# $(call beat,WHAT,COMMAND): echo COMMAND and run it, printing "  ... WHAT (N s)" every 9 s
# until it ends, so that no step of set-up or the demo leaves the terminal silent for 10 s
# (pip -q and the op build say nothing for minutes). sleep's output goes to /dev/null so that
# a heartbeat killed mid-sleep leaves nothing holding the terminal or a pipe open.
beat = @echo '$(2)'; ( while sleep 9 >/dev/null 2>&1; do echo "  ... $(1) ($$SECONDS s)"; done ) & hb=$$!; \
	$(2); rc=$$?; kill $$hb 2>/dev/null; exit $$rc

setup: $(STAMP)

$(STAMP): pyproject.toml
	@# A C++ compiler builds DeepSpeed's shared-memory op on first use; libaio-dev lets its
	@# async_io op build for NVMe offload; the ffmpeg CLI makes test videos of other codecs.
	@# A stock Debian/Ubuntu python3 makes no venv without python3-venv (ensurepip).
	@# Installed only where missing (needs root).
	@if ! command -v g++ >/dev/null || ! command -v ffmpeg >/dev/null || ! [ -e /usr/include/libaio.h ] \
	    || ! python3 -c "import ensurepip" 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing system packages: g++ libaio-dev ffmpeg python3-venv"; \
	    apt-get update -qq && apt-get install -y -qq g++ libaio-dev ffmpeg python3-venv >/dev/null; \
	  else echo "please install g++, libaio-dev, ffmpeg and python3-venv (apt-get install g++ libaio-dev ffmpeg python3-venv)"; exit 1; fi; fi
	$(call beat,making the venv,test -x $(PY) || python3 -m venv $(VENV))
	$(call beat,upgrading pip,$(PY) -m pip install -q --upgrade pip wheel setuptools)
	@echo "installing the pinned packages of pyproject.toml into $(VENV) (about 4 min on a fresh machine)"
	$(call beat,installing packages,$(PY) -m pip install -q -e '.[test]')
	@echo "building DeepSpeed's shm_comm op into $(VENV)/torch_extensions (once per venv, ~2 min on 2 cores)"
	$(call beat,building the op,$(PY) -c "import scaling; from deepspeed.comm.torch import build_shm_op; build_shm_op()")
	touch $(STAMP)

data/synth/synth-000003.tar: | $(STAMP)
	$(call beat,writing synthetic videos,$(VENV)/bin/scaling synth --out data/synth --num-videos 64 --per-shard 16)

data/synth_val/synth-000001.tar: | $(STAMP)
	$(call beat,writing synthetic videos,$(VENV)/bin/scaling synth --out data/synth_val --num-videos 32 --per-shard 16 --seed 1)

# The three-stage pipeline at debug size on 2 local ranks (ZeRO-3, bf16, activation
# checkpointing): dual-masking pre-training -> post-pre-training -> fine-tuning + multi-view
# test, from synthetic mp4 shards. Run it again and finished stages are skipped, an
# interrupted one resumes from its last checkpoint.
demo: $(STAMP)
	@# The two sets are written side by side: each writer is one process on one core, and
	@# most of its time is the interpreter's start and the encoding (9 s less on 2 cores).
	@$(MAKE) --no-print-directory -j2 $(DEMO_DATA)
	$(VENV)/bin/scaling pipeline run pipelines/smoke.yaml
	@echo "MLflow: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db"
	@echo "Use the model it trained (README: 'Using trained weights'):"
	@echo "  $(VENV)/bin/scaling eval --weights $(DEMO_MODEL) --shards 'data/synth_val/synth-{000000..000001}.tar'"
	@echo "  tar -xf data/synth_val/synth-000000.tar 00000000.mp4 && $(VENV)/bin/scaling predict 00000000.mp4 --weights $(DEMO_MODEL)"
	@echo "  $(VENV)/bin/scaling features --weights $(DEMO_MODEL) --input 'data/synth_val/synth-{000000..000001}.tar' --out runs/smoke/features"

# Pre-training alone; `make pretrain STEPS=80` continues the same run (and MLflow run).
pretrain: $(STAMP) data/synth/synth-000003.tar
	$(VENV)/bin/scaling pretrain --config pipelines/pretrain_smoke.yaml train.steps=$(STEPS) train.ranks=$(RANKS)

# The full suite (what CI runs through .ci/run): the linter, then tests/unit and tests/integration.
test: $(STAMP) lint
	$(PY) -m pytest -q --durations=10

# The unit tier only (no ranks, no Slurm): the one to run while editing.
test-fast: $(STAMP) lint
	$(PY) -m pytest -q --durations=5 tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/step.py --model vit_b --batch 2 --masking dual --precision bf16 --attention both

clean:
	rm -rf runs mlruns mlflow.db data/synth data/synth_val
