#!/usr/bin/env bash
# VideoMAE V2 ViT-B dual-masking pre-training (32 GPUs).
#SBATCH --job-name=pretrain_vitb
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=80
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Every knob can be overridden: sbatch arguments for the directives above, the environment for
# the rest (see slurm/launch.sh), e.g.  SCALING_OVERRIDES="stages.pretrain.train.steps=100" sbatch slurm/pretrain_vitb.sh
export SCALING_PIPELINE=${SCALING_PIPELINE:-pipelines/vitb_k400.yaml}
export SCALING_STAGE=${SCALING_STAGE:-pretrain}
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
