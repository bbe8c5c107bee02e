#!/usr/bin/env bash
# ViT-g fine-tuning on Something-Something v2 from the pre-training export (not K710), segment sampling, 2x3-view test.
#SBATCH --job-name=finetune_vitg_ssv2
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
# the rest (see slurm/launch.sh), e.g.  SCALING_OVERRIDES="stages.finetune.train.steps=100" sbatch slurm/finetune_vitg_ssv2.sh
export SCALING_PIPELINE=${SCALING_PIPELINE:-pipelines/vitg_ssv2.yaml}
export SCALING_STAGE=${SCALING_STAGE:-finetune}
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
