"""The counting primitives of `scaling memory` against answers worked out by hand, and
`scaling memory compare` end to end on the debug model."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scaling.memory.compare import CompareSpec, count_variant
from scaling.memory.counting import SavedTensors, count_flops, meta_counting, saved_tensor_bytes, step_flops
from scaling.models.vit import get_size

B, IN, HID, OUT = 4, 8, 16, 3
F32 = 4  # bytes


def test_linear_flops_forward_and_backward():
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT)
    x = torch.randn(B, IN, requires_grad=True)
    # Forward: one (B, IN) x (IN, OUT) matmul = B*IN*OUT multiply-adds = 2*B*IN*OUT FLOPs.
    assert count_flops(lambda: lin(x))["total"] == 2 * B * IN * OUT
    # Backward: grad input (B, OUT) x (OUT, IN) and grad weight (OUT, B) x (B, IN), each as
    # large as the forward matmul.
    split = step_flops(lambda: lin(x).sum())
    assert split["forward"]["total"] == 2 * B * IN * OUT
    assert split["backward"]["total"] == 2 * split["forward"]["total"]


def test_linear_backward_without_input_grad_is_weight_grad_only():
    lin = nn.Linear(IN, OUT)
    x = torch.randn(B, IN)  # data: no grad wanted, so no grad-input matmul
    assert step_flops(lambda: lin(x).sum())["backward"]["total"] == 2 * B * IN * OUT


def test_flops_are_attributed_to_modules():
    model = nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT))
    x = torch.randn(B, IN)
    split = step_flops(lambda: model(x).sum())
    assert split["forward"]["modules"]["Sequential.0"] == 2 * B * IN * HID
    assert split["forward"]["modules"]["Sequential.2"] == 2 * B * HID * OUT
    # Backward through module 2 includes its grad input; module 0 needs only its weight grad.
    assert split["backward"]["modules"]["Sequential.2"] == 2 * 2 * B * HID * OUT
    assert split["backward"]["modules"]["Sequential.0"] == 2 * B * IN * HID


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_cpu_attention_is_counted(device):
    # SDPA's CPU kernel is unknown to FlopCounterMode; on meta it would take the math path.
    # Both must count q @ k^T and attn @ v: 2 matmuls of b*h*n*n*d multiply-adds.
    b, h, n, d = 2, 3, 10, 4
    q = torch.randn(b, h, n, d, device=device, requires_grad=True)
    with meta_counting():
        split = step_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum())
    assert split["forward"]["total"] == 2 * 2 * b * h * n * n * d
    # Backward: the scores recomputed, then grad of scores, v, q and k: 5 such matmuls.
    assert split["backward"]["total"] == 5 * 2 * b * h * n * n * d


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT))


def test_saved_bytes_of_linear_relu_linear():
    model = mlp()
    x = torch.randn(B, IN, requires_grad=True)
    # Linear 1 saves x (for its weight grad) and its weight (for x's grad); ReLU saves its
    # output r (the mask for its backward); Linear 2 saves r again and its weight. Unique
    # activations: x and r. Biases are never saved (their grad is a sum).
    activations = F32 * (B * IN + B * HID)
    weights = F32 * (IN * HID + HID * OUT)
    assert saved_tensor_bytes(lambda: model(x).sum(), exclude=model.parameters()) == activations
    assert saved_tensor_bytes(lambda: model(x).sum()) == activations + weights


def test_same_storage_saved_twice_counts_once():
    class SaveTwice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x, x, x[1:])  # the tensor, again, and a view of it
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    x = torch.randn(B, IN, requires_grad=True)
    with SavedTensors() as saved:
        SaveTwice.apply(x)
    assert saved.count == 1
    assert saved.bytes == F32 * B * IN


def test_checkpointing_keeps_only_the_input():
    model = mlp()
    x = torch.randn(B, IN, requires_grad=True)
    plain = saved_tensor_bytes(lambda: model(x), exclude=model.parameters())
    ckpt = saved_tensor_bytes(lambda: checkpoint(model, x, use_reentrant=False), exclude=model.parameters())
    assert plain == F32 * (B * IN + B * HID)
    assert ckpt == F32 * B * IN  # the recomputation starts from x; r is gone


SMALL = dict(model="debug", frames=4, input_size=64, batch=2)  # 2 x 4 x 4 tokens


def test_dual_masking_cuts_decoder_flops_and_checkpointing_cuts_saved_bytes():
    spec = CompareSpec(**SMALL)
    dual, enc_only = count_variant("dual", spec), count_variant("encoder_only", spec)
    # Same encoder input (the tube mask keeps int(0.1 * 16) = 1 token per slot visible) ...
    assert dual["tokens"]["encoder"] == enc_only["tokens"]["encoder"] == 2 * (16 - int(0.9 * 16))
    assert dual["forward_flops"]["encoder"] == enc_only["forward_flops"]["encoder"]
    # ... but the running cell decodes half the clip instead of every hidden token.
    assert dual["tokens"]["predicted"] == 16 < enc_only["tokens"]["predicted"] == 28
    assert dual["forward_flops"]["decoder"] < enc_only["forward_flops"]["decoder"]
    assert dual["backward_flops"]["plain"]["decoder"] < enc_only["backward_flops"]["plain"]["decoder"]
    for v in (dual, enc_only):
        assert v["saved_bytes"]["checkpointing"] < v["saved_bytes"]["plain"]
        # Checkpointing trades memory for recomputation in backward.
        assert v["backward_flops"]["checkpointing"]["total"] > v["backward_flops"]["plain"]["total"]
        assert v["forward_macs"]["total"] * 2 == v["forward_flops"]["total"]


def test_mar_finetune_halves_the_blocks_and_bridging_costs_more_than_linear():
    spec = CompareSpec(**SMALL, finetune=True)
    assert spec.variants == ["dual", "encoder_only", "unmasked", "mar50_linear", "mar50_bridging"]
    full, mar, bridging = (count_variant(v, spec) for v in ("unmasked", "mar50_linear", "mar50_bridging"))
    n, b = 2 * 4 * 4, SMALL["batch"]
    assert full["tokens"]["encoder"] == n and mar["tokens"]["encoder"] == bridging["tokens"]["encoder"] == n // 2
    # By hand: the patch embedding (a matmul of 3 * 2 * 16 * 16 pixels to the width per token)
    # runs on every token in both; each block's linears (qkv, proj, 2 MLP layers) run on the
    # kept half, and its attention matmuls (q k^T, attn v) on a quarter of the pairs.
    size = get_size("debug")
    d, hidden = size.width, size.mlp_hidden
    patch = 2 * b * n * (3 * size.tubelet * size.patch**2) * d
    linears = lambda tokens: 2 * b * tokens * (4 * d * d + 2 * d * hidden) * size.depth  # noqa: E731
    attention = lambda tokens: 2 * 2 * b * tokens * tokens * d * size.depth  # noqa: E731
    assert full["forward_flops"]["encoder"] == patch + linears(n) + attention(n)
    assert mar["forward_flops"]["encoder"] == patch + linears(n // 2) + attention(n // 2)
    blocks_ratio = (mar["forward_flops"]["encoder"] - patch) / (full["forward_flops"]["encoder"] - patch)
    assert 0.45 < blocks_ratio < 0.5  # about half: attention shrinks to a quarter
    assert mar["forward_flops"]["encoder"] < full["forward_flops"]["encoder"]
    assert mar["backward_flops"]["plain"]["encoder"] < full["backward_flops"]["plain"]["encoder"]
    # The heads: linear on the pooled vector either way; bridging runs 2 blocks on the kept tokens.
    assert mar["forward_flops"]["other"] == full["forward_flops"]["other"] == 2 * b * d * spec.num_classes
    assert bridging["forward_flops"]["encoder"] == mar["forward_flops"]["encoder"]
    assert bridging["forward_flops"]["other"] > mar["forward_flops"]["other"]
    assert bridging["params"]["other"] > mar["params"]["other"] and mar["params"]["encoder"] == full["params"]["encoder"]
    # Fewer tokens, fewer activations kept for backward.
    assert mar["saved_bytes"]["plain"] < full["saved_bytes"]["plain"]
    for v in (full, mar, bridging):
        assert v["forward_flops"]["decoder"] == 0  # no reconstruction branch unless asked


@pytest.mark.parametrize("variant", ["dual", "unmasked", "mar50_bridging"])
def test_meta_counting_matches_real_tensors(variant):
    spec = CompareSpec(**SMALL, finetune=True)
    meta, real = count_variant(variant, spec, "meta"), count_variant(variant, spec, "cpu")
    for key in ("params", "forward_flops", "backward_flops", "saved_bytes", "tokens"):
        assert meta[key] == real[key], key


def run_cli(argv):
    from scaling.cli import main

    return main(["memory", "compare", *argv])


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    import mlflow

    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = run_cli(["--model", "debug", "--frames", "4", "--input-size", "64", "--with-unmasked", "--repeats", "1",
                  "--warmup", "0", "--out-dir", str(tmp_path / "out"), "--tracking-uri", uri, "--experiment", "mem-test"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "forward GMACs total" in printed and "n/a" in printed  # no GPU: no peak CUDA memory
    result = json.loads((tmp_path / "out" / "memory_compare_debug.json").read_text())
    assert list(result["variants"]) == ["dual", "encoder_only", "unmasked"]
    assert result["variants"]["dual"]["step_time"]["plain"]["median_s"] > 0
    assert (tmp_path / "out" / "memory_compare_debug.png").read_bytes()[:4] == b"\x89PNG"

    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["mem-test"], output_format="list")
    assert run.data.params["model"] == "debug"
    assert run.data.metrics["dual.forward_macs.total"] == result["variants"]["dual"]["forward_macs"]["total"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert artifacts == {"memory_compare_debug.json", "memory_compare_debug.png"}


def test_cli_finetune_variants_in_json(tmp_path, capsys):
    rc = run_cli(["--model", "debug", "--frames", "4", "--input-size", "64", "--finetune", "--finetune-reconstruction", "0.1",
                  "--no-time", "--no-mlflow", "--out-dir", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mar50_bridging / unmasked: forward FLOPs encoder x" in printed
    result = json.loads((tmp_path / "memory_compare_debug_finetune.json").read_text())
    assert list(result["variants"]) == ["dual", "encoder_only", "unmasked", "mar50_linear", "mar50_bridging"]
    assert result["spec"]["finetune_heads"] == ["linear", "bridging"] and result["spec"]["finetune_ratio"] == 0.5
    v = result["variants"]
    assert "running-cell mask drops 50%" in v["mar50_linear"]["description"]
    # With a reconstruction weight the MAR variants run the decoder on the dropped tokens.
    assert v["unmasked"]["forward_flops"]["decoder"] == 0 < v["mar50_linear"]["forward_flops"]["decoder"]
    assert v["mar50_linear"]["tokens"] == {"encoder": 16, "decoder": 32, "predicted": 16}
    ratios = result["mar_over_unmasked"]
    assert set(ratios) == {"mar50_linear", "mar50_bridging"}
    assert ratios["mar50_linear"]["forward_flops_encoder"] < 1 < ratios["mar50_bridging"]["forward_flops_other"]
    assert (tmp_path / "memory_compare_debug_finetune.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, words", [
    (["--model", "vit_x"], "unknown model 'vit_x'"),
    (["--model", "debug", "--encoder-ratio", "1.5"], "--encoder-ratio 1.5"),
    (["--model", "debug", "--decoder-ratio", "0.1"], "running-cell ratio 0.1"),
    (["--model", "debug", "--input-size", "50"], "input_size=50"),
    (["--model", "debug", "--finetune", "--finetune-heads", "linear,mlp"], "--finetune-heads linear,mlp"),
])
def test_cli_errors_are_one_sentence(argv, words, capsys):
    assert run_cli([*argv, "--no-mlflow", "--no-time"]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "Traceback" not in err and len(err.splitlines()) == 1
