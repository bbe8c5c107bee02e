#!/usr/bin/env bash
# ViT-g supervised post-pre-training on Kinetics-710 (32 GPUs), from the pre-training export.
#SBATCH --job-name=postpretrain_vitg
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=80
#SBATCH --time=72:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Every knob can be overridden: sbatch arguments for the directives above, the environment for
# the rest (see slurm/launch.sh), e.g.  SCALING_OVERRIDES="stages.postpretrain.train.steps=100" sbatch slurm/postpretrain_vitg.sh
export SCALING_PIPELINE=${SCALING_PIPELINE:-pipelines/vitg_k400.yaml}
export SCALING_STAGE=${SCALING_STAGE:-postpretrain}
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
