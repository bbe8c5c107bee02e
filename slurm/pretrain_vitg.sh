#!/usr/bin/env bash
# VideoMAE V2 ViT-g dual-masking pre-training on the unlabeled hybrid (64 GPUs, ZeRO-3, activation checkpointing).
#SBATCH --job-name=pretrain_vitg
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=80
#SBATCH --time=120:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Every knob can be overridden: sbatch arguments for the directives above, the environment for
# the rest (see slurm/launch.sh), e.g.  SCALING_OVERRIDES="stages.pretrain.train.steps=100" sbatch slurm/pretrain_vitg.sh
export SCALING_PIPELINE=${SCALING_PIPELINE:-pipelines/vitg_k400.yaml}
export SCALING_STAGE=${SCALING_STAGE:-pretrain}
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
