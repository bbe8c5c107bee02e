"""The guard of scaling/train/gloo_gather.py: the broadcast gather replaces DeepSpeed's only on
gloo and only while DeepSpeed's function is the one it was written against. (That it gives
DeepSpeed's parameters bit for bit: tests/integration/test_gloo_gather.py.)"""
import importlib
import types

import deepspeed.runtime.utils as ds_utils

from scaling.train import gloo_gather


def test_the_installed_deepspeed_has_the_expected_gather_in_every_caller():
    for name in gloo_gather.CALLERS:
        assert gloo_gather.deepspeed_gather_problem(importlib.import_module(name)) is None, name


def test_a_changed_deepspeed_keeps_its_own_gather(monkeypatch):
    def all_gather_dp_groups(groups_flat, partitioned_param_groups, dp_process_group):
        """A DeepSpeed whose gather lost two parameters."""

    monkeypatch.setattr(ds_utils, "all_gather_dp_groups", all_gather_dp_groups)
    caller = types.ModuleType("deepspeed.runtime.zero.stage_9")
    caller.all_gather_dp_groups = all_gather_dp_groups
    assert "takes ('groups_flat', 'partitioned_param_groups', 'dp_process_group')" in \
        gloo_gather.deepspeed_gather_problem(caller)
    caller.all_gather_dp_groups = lambda *a: None  # a caller that no longer calls DeepSpeed's
    assert "is not deepspeed.runtime.utils.all_gather_dp_groups" in gloo_gather.deepspeed_gather_problem(caller)


def test_nccl_keeps_deepspeeds_gather():
    message = gloo_gather.install("nccl")
    assert message == "ZeRO-1/2 gather parameters with DeepSpeed's all_gather_into_tensor (nccl)"
    for name in gloo_gather.CALLERS:
        assert importlib.import_module(name).all_gather_dp_groups is ds_utils.all_gather_dp_groups
