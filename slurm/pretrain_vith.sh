#!/usr/bin/env bash
# ViT-H dual-masking pre-training (64 GPUs): the ViT-B recipe with model.name=vit_h.
#SBATCH --job-name=pretrain_vith
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=80
#SBATCH --time=96:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Every knob can be overridden: sbatch arguments for the directives above, the environment for
# the rest (see slurm/launch.sh), e.g.  SCALING_OVERRIDES="stages.pretrain.train.steps=100" sbatch slurm/pretrain_vith.sh
export SCALING_PIPELINE=${SCALING_PIPELINE:-pipelines/vitb_k400.yaml}
export SCALING_STAGE=${SCALING_STAGE:-pretrain}
export SCALING_OVERRIDES="stages.pretrain.model.name=vit_h ${SCALING_OVERRIDES:-}"
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
