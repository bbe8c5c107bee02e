"""Pieces of the supervised loop that the short pipeline test does not exercise."""
import torch

from scaling.config import load_config
from scaling.train.finetune import batches_from, criterion_for


def cfg_with(*overrides):
    return load_config("pipelines/pretrain_smoke.yaml", ["stage=finetune", "finetune.num_classes=5", *overrides])


def test_mixup_cutmix_make_soft_targets_on_video_clips(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)
    mixup, criterion = criterion_for(cfg_with("finetune.mixup=0.8", "finetune.cutmix=1.0", "finetune.label_smoothing=0.1"))
    video = torch.randn(4, 3, 4, 32, 32)  # (B, 3, T, H, W): timm's Mixup works on the last two dims
    mixed, target = mixup(video.clone(), torch.tensor([0, 1, 2, 3]))
    assert mixed.shape == video.shape and target.shape == (4, 5)
    torch.testing.assert_close(target.sum(-1), torch.ones(4))
    assert (target > 0).all(), "label smoothing leaves mass on every class"
    loss = criterion(torch.randn(4, 5), target)
    assert torch.isfinite(loss)
    mixup, criterion = criterion_for(cfg_with("finetune.mixup=0", "finetune.cutmix=0", "finetune.label_smoothing=0"))
    assert mixup is None and isinstance(criterion, torch.nn.CrossEntropyLoss)


class FakeLoader:
    """Two batches per epoch, each tagged with (epoch, batch)."""

    def __init__(self):
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return iter([(self.epoch, b) for b in range(self.skip_batches, 2)])


def test_batches_resume_inside_an_epoch_then_roll_over():
    it = batches_from(FakeLoader(), start_step=3, steps_per_epoch=2, grad_accum=1)
    assert [next(it) for _ in range(4)] == [(1, 1), (2, 0), (2, 1), (3, 0)]
