"""Warm ranks run the stages of a pipeline one after another in one process each: a finished
stage's DeepSpeed engine must not stay alive into the next (ZeRO-3 keeps module-level references
to it; scaling/pipeline/warm.py release_engines)."""
import subprocess
import sys

from helpers import SMOKE, env_for

STAGE_THEN_RELEASE = """
import argparse, gc, sys
from deepspeed import DeepSpeedEngine
from scaling.cli.train import cmd_train
from scaling.pipeline.warm import release_engines

def alive():
    gc.collect()
    return sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects())

for stage in (1, 2):  # two stages in turn, as warm ranks run them
    args = argparse.Namespace(command="train", config=sys.argv[1], trust_checkpoint=False, fresh=False,
                              allow_changed=False, overrides=["train.ranks=1", f"train.output_dir={sys.argv[2]}/s{stage}",
                              "train.steps=2", "optim.warmup_steps=1", "data.source=noise", "data.num_sample=1", "tracking.enabled=false"])
    assert cmd_train(args) == 0
    print(f"stage {stage}: engines alive after the stage {alive()}", flush=True)
    release_engines()
    print(f"stage {stage}: engines alive after release {alive()}", flush=True)
"""


def test_a_finished_stage_engine_is_released_before_the_next(tmp_path):
    done = subprocess.run([sys.executable, "-c", STAGE_THEN_RELEASE, str(SMOKE), str(tmp_path)], env=env_for(tmp_path),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for stage in (1, 2):
        assert f"stage {stage}: engines alive after the stage 1" in done.stdout, done.stdout  # what DeepSpeed leaves
        assert f"stage {stage}: engines alive after release 0" in done.stdout, done.stdout
