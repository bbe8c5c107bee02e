"""How `scaling export` cuts an NVMe-offloaded checkpoint's fp32 weights into optimizer sub-groups
(the split DeepSpeed's stage 3 makes: per param group, a sub-group closes once its partitions
reach sub_group_size), its one-sentence refusal of a truncated swap file, and the refusals to
resume such a checkpoint on another rank count or optimizer placement."""
import pytest
import torch

from scaling.train.checkpoint import NvmeExportError, read_swap_file, sub_group_numels


def test_sub_groups_close_at_size_and_at_each_param_group_end():
    shapes = [{"a": torch.Size([10]), "b": torch.Size([7]), "c": torch.Size([4])}, {"d": torch.Size([3])}]
    # 2 ranks: partitions 5, 4, 2 | 2; size 8 closes after a+b (9), c alone ends group 0.
    assert sub_group_numels(shapes, 2, 8) == [9, 2, 2]
    assert sub_group_numels(shapes, 1, 10**9) == [21, 3]


def test_swap_file_is_cut_to_its_sub_group_and_a_short_one_refused(tmp_path):
    values = torch.arange(260, dtype=torch.float32)  # 256 values + alignment padding
    values.numpy().tofile(tmp_path / "0_5.tensor.swp")
    assert torch.equal(read_swap_file(tmp_path / "0_5.tensor.swp", 256), values[:256])
    with pytest.raises(NvmeExportError, match="holds 260 values where its optimizer sub-group needs 300"):
        read_swap_file(tmp_path / "0_5.tensor.swp", 300)


def test_nvme_checkpoint_refuses_another_rank_count_or_optimizer_placement(tmp_path):
    from scaling.train.checkpoint import RunFailed, refuse_nvme_placement_change, refuse_nvme_reshard

    nvme, plain = tmp_path / "nvme", tmp_path / "plain"
    (nvme / "offloaded_tensors" / "rank00").mkdir(parents=True)
    plain.mkdir()
    with pytest.raises(RunFailed, match="written by 2 ranks, which cannot be re-split for 4; resume it with 2 ranks"):
        refuse_nvme_reshard(nvme, 2, 4)
    refuse_nvme_reshard(plain, 2, 4)  # DeepSpeed's universal conversion handles it
    with pytest.raises(RunFailed, match="device nvme and this run's is not nvme"):
        refuse_nvme_placement_change(nvme, nvme_now=False)
    with pytest.raises(RunFailed, match="device not nvme and this run's is nvme"):
        refuse_nvme_placement_change(plain, nvme_now=True)
    refuse_nvme_placement_change(nvme, nvme_now=True)
    refuse_nvme_placement_change(plain, nvme_now=False)
