"""Kinetics-710 label space and `scaling labels k710`: real class lists, shipped files, merging."""

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch

import scaling.data.kinetics as K
from scaling.cli import main
from scaling.cli.data import add_labels_parser, cmd_labels_k710

SHIPPED = Path(K.__file__).parent / "kinetics_labels"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kinetics"
# The upstream copy when this checkout has one; otherwise the shipped copies are the source.
SOURCE = SHARED if SHARED.is_dir() else SHIPPED


def real_lists():
    return {n: K.read_class_list(SOURCE / f"classes_k{n}.txt") for n in K.DATASETS}


def test_union_of_real_class_lists_is_710():
    lists = real_lists()
    for n, names in lists.items():
        assert len(names) == len(set(names)) == n
    assert len(set().union(*lists.values())) == 710
    k710 = K.load_k710_classes()
    assert len(k710) == len(set(k710)) == 710 and set(k710) == set().union(*lists.values())


def test_shipped_files_equal_regenerated(tmp_path):
    K.write_label_files(SOURCE, tmp_path)
    generated = sorted(p.name for p in tmp_path.iterdir())
    shipped = sorted(p.name for p in SHIPPED.iterdir() if p.is_file())
    assert shipped == generated
    for name in generated:
        assert (SHIPPED / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_label_order_is_k400_then_new_classes():
    k710, lists = K.load_k710_classes(), real_lists()
    assert k710[:400] == lists[400]
    assert K.index_map(400) == list(range(400))
    new600 = [c for c in lists[600] if c not in set(lists[400])]
    assert k710[400 : 400 + len(new600)] == new600


@pytest.mark.parametrize("n", K.DATASETS)
def test_every_class_maps_to_the_same_name(n):
    k710, names, idx = K.load_k710_classes(), K.load_class_list(n), K.index_map(n)
    assert names == real_lists()[n]
    assert len(idx) == len(set(idx)) == n
    assert [k710[i] for i in idx] == names


@pytest.mark.parametrize("n", K.DATASETS)
def test_sliced_head_gives_the_same_logits(n):
    torch.manual_seed(0)
    full = torch.nn.Linear(16, 710)
    x = torch.randn(5, 16)
    w, b = K.head_710_to(n, full.weight.detach(), full.bias.detach())
    head = torch.nn.Linear(16, n)
    head.load_state_dict({"weight": w, "bias": b})
    with torch.no_grad():
        torch.testing.assert_close(head(x), full(x)[:, K.index_map(n)])
    assert w.data_ptr() != full.weight.data_ptr()


def test_bad_target_and_shape_are_refused():
    with pytest.raises(ValueError):
        K.index_map(500)
    with pytest.raises(ValueError):
        K.head_710_to(400, torch.zeros(400, 8))


def test_renamed_spellings_are_harmonized():
    renames, k710 = K.load_renames(), set(K.load_k710_classes())
    assert len(renames) == 15 and set(renames.values()) <= k710
    # Exactly one old spelling is also a current class; it must keep its own meaning.
    assert [old for old in renames if old in k710] == ["throwing ball"]
    assert K.harmonize("throwing ball", k710, renames) == "throwing ball"
    for old, new in renames.items():
        if old != "throwing ball":
            assert K.harmonize(old, k710, renames) == new
    assert K.harmonize("dying hair", k710, renames) == "dyeing hair"
    assert K.harmonize("zumba", k710, renames) == "zumba"
    assert K.harmonize("not a class", k710, renames) is None


# ---------------------------------------------------------------- merging synthetic annotations


def write_csv(path, rows, extra_is_cc=False):
    header = ["label", "youtube_id", "time_start", "time_end", "split"] + (["is_cc"] if extra_is_cc else [])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for label, yid in rows:
            w.writerow([label, yid, 10, 20, "x"] + ([0] if extra_is_cc else []))
    return path


@pytest.fixture
def annotations(tmp_path):
    d = tmp_path / "ann"
    d.mkdir()
    return {
        # older K400 layout, with is_cc
        "k400_train": write_csv(d / "k400_train.csv", [
            ("abseiling", "a1"),
            ("balloon blowing", "a2"),  # -> inflating balloons
            ("throwing ball", "a3"),  # a current class: not renamed
            ("abseiling", "d1"),  # also in K600 train, same label
            ("dying hair", "c1"),  # also in K700 train as "making slime": conflict, K700 wins
            ("not a kinetics class", "u1"),  # unknown; its id still counts as a train video
            ("abseiling", "v1"),  # also in K400 val
        ], extra_is_cc=True),
        "k600_train": write_csv(d / "k600_train.csv", [
            ("abseiling", "d1"),
            ("cosplaying", "b1"),
            ("throwing ball", "d2"),  # also in K700 train, same label
        ]),
        "k700_train": write_csv(d / "k700_train.csv", [
            ("making slime", "c1"),
            ("throwing ball", "d2"),
            ("passing american football (not in game)", "e1"),  # -> capital A
        ]),
        "k400_val": write_csv(d / "k400_val.csv", [
            ("abseiling", "v1"),  # in K400 train
            ("yoga", "w1"),
            ("sniffing", "w2"),  # -> smelling feet
            ("zumba", "x1"),  # K600 val has x1 as yoga: conflict, K600 wins
            ("yoga", "u1"),  # id in a train file (with an unknown label there)
        ], extra_is_cc=True),
        "k600_val": write_csv(d / "k600_val.csv", [
            ("yoga", "x1"),
            ("bogus", "u2"),
            ("abseiling", "d1"),  # in K400 and K600 train
        ]),
    }


def read_out(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_merge_counts_and_rows_are_exact(tmp_path, annotations):
    out = tmp_path / "out"
    s = K.merge_annotations(out, **annotations)
    assert s["num_classes"] == 710
    assert s["train"] == dict(rows_read=13, kept=9, duplicates_removed=3, conflicting_labels=1,
                              unknown_label_rows=1, kept_by_source=dict(k700=3, k600=2, k400=4))
    assert s["val"] == dict(rows_read=8, kept=3, duplicates_removed=1, conflicting_labels=1, unknown_label_rows=1,
                            overlap_with_train_removed=3, kept_by_source=dict(k700=0, k600=1, k400=2))
    assert s["unknown_labels"] == {"bogus": 1, "not a kinetics class": 1}
    assert s["renamed_rows"] == {"balloon blowing": 1, "dying hair": 1, "passing american football (not in game)": 1,
                                 "sniffing": 1}
    assert s["conflicts"] == [
        dict(split="train", youtube_id="c1", kept_label="making slime", kept_source="k700",
             dropped_label="dyeing hair", dropped_source="k400"),
        dict(split="val", youtube_id="x1", kept_label="yoga", kept_source="k600",
             dropped_label="zumba", dropped_source="k400"),
    ]
    assert json.loads((out / "summary.json").read_text()) == s

    k710 = K.load_k710_classes()
    train = read_out(out / "k710_train.csv")
    assert [(r["youtube_id"], r["label"], r["source"]) for r in train] == [
        ("c1", "making slime", "k700"), ("d2", "throwing ball", "k700"),
        ("e1", "passing American football (not in game)", "k700"),
        ("d1", "abseiling", "k600"), ("b1", "cosplaying", "k600"),
        ("a1", "abseiling", "k400"), ("a2", "inflating balloons", "k400"), ("a3", "throwing ball", "k400"),
        ("v1", "abseiling", "k400"),
    ]
    val = read_out(out / "k710_val.csv")
    assert [(r["youtube_id"], r["label"], r["source"]) for r in val] == [
        ("x1", "yoga", "k600"), ("w1", "yoga", "k400"), ("w2", "smelling feet", "k400")]
    for r in train + val:
        assert k710[int(r["label_index"])] == r["label"]
        assert (r["time_start"], r["time_end"]) == ("10", "20")
    assert list(train[0]) == list(K.OUT_COLUMNS)
    assert not {r["youtube_id"] for r in val} & {r["youtube_id"] for r in train}


def test_cli_writes_all_outputs(tmp_path, annotations, capsys):
    parser = argparse.ArgumentParser(prog="scaling")
    add_labels_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli"
    argv = ["labels", "k710", "--out", str(out)]
    for key, path in annotations.items():
        argv += [f"--{key.replace('_', '-')}", str(path)]
    args = parser.parse_args(argv)
    assert args.func is cmd_labels_k710 and args.k700_val is None
    assert args.func(args) == 0
    assert "wrote 9 train / 3 val videos" in capsys.readouterr().out
    expected = {"k710_train.csv", "k710_val.csv", "summary.json", "k710_classes.txt",
                "k710_to_k400.json", "k710_to_k600.json", "k710_to_k700.json"}
    assert {p.name for p in out.iterdir()} == expected
    for name in ("k710_classes.txt", "k710_to_k400.json", "k710_to_k600.json", "k710_to_k700.json"):
        assert (out / name).read_bytes() == (SHIPPED / name).read_bytes()


def test_cli_missing_file_is_one_sentence_naming_the_flag(tmp_path, annotations, capsys):
    missing = tmp_path / "nope.csv"
    # user errors become one sentence and exit 2 in one place: scaling.cli.main
    argv = ["labels", "k710", "--out", str(tmp_path / "out"), "--k400-train", str(annotations["k400_train"]),
            "--k600-val", str(missing)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--k600-val" in err and str(missing) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_bad_header_is_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("youtube_id,start,end\nx,1,2\n")
    with pytest.raises(ValueError, match="--k700-train"):
        K.merge_annotations(tmp_path / "out", k700_train=bad)
