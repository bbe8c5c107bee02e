"""Probing (`stage: probe`): a frozen encoder and a trained head, one rank's view.

Everything but the model is the fine-tune stage's (scaling/train/finetune.py): the finite
loader and its epochs, the DeepSpeed engine (ZeRO-3 works with the frozen trunk: its
parameters are partitioned like any other, gathered for the forward pass, and never reach
the optimizer), checkpoints, MLflow, and the multi-view test at the end. What differs:

- the model is `ProbeClassifier` (scaling/models/probe_heads.py): the trunk with
  `requires_grad=False`, always in eval mode and run without autograd, plus a linear (MAE) or
  attentive (V-JEPA) head;
- `finetune.init_from` fills the trunk the way it fills a classifier's encoder (the same
  key clean-up: a pre-training, fine-tune or probe export, or a public checkpoint); the head
  always starts fresh;
- the optimizer sees only the head: AdamW with decay on its weights, none on biases, norms
  and the attentive query. MAE's linear probe uses LARS at a batch of 16384; at the batches of
  these runs AdamW is the simpler choice and converges in a few epochs.
"""
from __future__ import annotations

from scaling.config import RunConfig
from scaling.models.convert import encoder_weights_for_classifier, load_checkpoint_file
from scaling.models.probe_heads import HEAD_PREFIX, ProbeClassifier, build_probe
from scaling.train.engine import param_groups
from scaling.train.finetune import SupervisedModel, run_finetune
from scaling.train.init_weights import load_gathered


def probe_for(cfg: RunConfig) -> ProbeClassifier:
    m = cfg.model
    return build_probe(m.name, cfg.finetune.num_classes, m.num_frames, m.input_size, head=cfg.probe.head)


def load_frozen_encoder(model: ProbeClassifier, cfg: RunConfig) -> list[str]:
    """The trunk from `finetune.init_from`; a head in the file (a classifier's, an earlier
    probe's) is left out by the clean-up: a probe measures the encoder, so its head always
    starts fresh."""
    ckpt = load_checkpoint_file(cfg.finetune.init_from, cfg.finetune.trust_checkpoint)
    return load_gathered(model, encoder_weights_for_classifier(ckpt, model), allow_missing=(HEAD_PREFIX,))


def describe_probe(cfg: RunConfig) -> str:
    start = cfg.finetune.init_from or "random weights"
    return f"{cfg.model.name} frozen ({start}), {cfg.probe.head} probe"


PROBE = SupervisedModel(build=probe_for, load=load_frozen_encoder, describe=describe_probe,
                        groups=lambda model, cfg: param_groups(model, cfg.optim.weight_decay))


def run_probe(cfg: RunConfig) -> dict:
    """Train the head for `train.epochs` (or `train.steps`), evaluate on `finetune.val_shards`."""
    return run_finetune(cfg, PROBE)
