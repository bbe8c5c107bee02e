"""The guard of scaling/train/shm_allreduce.py: DeepSpeed learns that all ranks are local only
when torchrun says so, and the shared-memory all-reduce stands in only for the DeepSpeed
all-reduce it was written against. (That it gives gloo's parameters bit for bit:
tests/integration/test_gloo_gather.py.)"""
from deepspeed.comm.torch import TorchBackend, stage_on_cpu

from scaling.train import shm_allreduce


def test_local_size_is_announced_only_when_every_rank_is_on_this_node(monkeypatch):
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two nodes of two ranks
    shm_allreduce.announce_local_ranks()
    assert "LOCAL_SIZE" not in shm_allreduce.os.environ
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    shm_allreduce.announce_local_ranks()
    assert shm_allreduce.os.environ["LOCAL_SIZE"] == "4"


def test_the_installed_deepspeed_has_the_expected_all_reduce():
    assert shm_allreduce.signature_problem(TorchBackend) is None


def test_a_changed_deepspeed_keeps_its_own_all_reduce():
    class ChangedBackend:
        @stage_on_cpu
        def all_reduce(self, tensor, op, group):
            """A DeepSpeed whose all_reduce lost async_op."""

    assert "takes ('self', 'tensor', 'op', 'group')" in shm_allreduce.signature_problem(ChangedBackend)
