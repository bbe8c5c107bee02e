"""The Kinetics-710 label space: the shipped class lists (scaling/data/kinetics_labels/) and the
710 -> 400/600/700 maps, for the label tools (`scaling.data.kinetics`) and the model import
(`scaling.models.convert`) alike; no torch, no data pipeline, at import time."""
from __future__ import annotations

import json
from functools import cache
from importlib.resources import files

DATASETS = (400, 600, 700)
NUM_K710 = 710


def _shipped(name: str):
    return files("scaling.data").joinpath("kinetics_labels", name)


def _check_target(target: int) -> int:
    if target not in DATASETS:
        raise ValueError(f"target must be one of {DATASETS}, got {target!r}")
    return target


@cache
def _k710() -> tuple[str, ...]:
    return tuple(_shipped("k710_classes.txt").read_text(encoding="utf-8").splitlines())


@cache
def _class_list(target: int) -> tuple[str, ...]:
    return tuple(_shipped(f"classes_k{_check_target(target)}.txt").read_text(encoding="utf-8").splitlines())


@cache
def _index_map(target: int) -> tuple[int, ...]:
    return tuple(json.loads(_shipped(f"k710_to_k{_check_target(target)}.json").read_text()))


def load_k710_classes() -> list[str]:
    return list(_k710())


def load_class_list(target: int) -> list[str]:
    """K400/K600/K700 class names (current spellings) in that dataset's own order."""
    return list(_class_list(target))


def load_renames() -> dict[str, str]:
    """Older spelling -> current class name."""
    return json.loads(_shipped("renamed_classes.json").read_text(encoding="utf-8"))


def index_map(target: int) -> list[int]:
    """`idx[i]` = 710 index of class i of K`target`; `head_target = head_710[idx]`."""
    return list(_index_map(target))


def head_710_to(target: int, weight, bias=None):
    """Rows of a 710-way Linear (weight [710, D], bias [710] or None) for a K`target` head."""
    import torch  # here, so the label tools do not pay for importing torch

    if weight.shape[0] != NUM_K710:
        raise ValueError(f"expected a {NUM_K710}-row head weight, got shape {tuple(weight.shape)}")
    idx = torch.tensor(index_map(target), dtype=torch.long, device=weight.device)
    # index_select copies, so the new head does not share storage with the 710-way one.
    return weight.index_select(0, idx), None if bias is None else bias.index_select(0, idx)
