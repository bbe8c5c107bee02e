"""Validation during fine-tuning (`finetune.eval_every`, in epochs) and the best weights.

Every `eval_every` epochs the stage runs a cheap test on `finetune.val_shards`: one view per
video (the middle clip's centre crop) instead of clips x crops, logged as `val/top1`,
`val/top5` (MLflow and `<output_dir>/val.jsonl`). When the top-1 beats every earlier one, the
ranks save a DeepSpeed checkpoint into `<output_dir>/best/` (one tag kept); at the end of the
run rank 0 consolidates it into `<output_dir>/export/model_best_fp32.pt`, beside the last
weights that the pipeline exports as `export/model_fp32.pt`. `finetune.test_with: best` loads
the best checkpoint back into the engine before the final multi-view test (training is over,
so its optimizer state may be overwritten too).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from scaling.config import RunConfig, to_dict
from scaling.evaluate import evaluate
from scaling.train import checkpoint

BEST = "best"
BEST_EXPORT = Path("export") / "model_best_fp32.pt"


class Validation:
    def __init__(self, cfg: RunConfig, rank: int, world: int, steps_per_epoch: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.out = Path(cfg.train.output_dir)
        self.every_steps = cfg.finetune.eval_every * steps_per_epoch
        record = self.out / BEST / "best.json"  # a resumed run keeps beating the same best
        self.best = json.loads(record.read_text()) if record.is_file() else None

    def after_step(self, engine, tracker, step: int, state: dict) -> None:
        """Validate at the end of every `eval_every`-th epoch; save the best (all ranks call this)."""
        if not self.every_steps or step % self.every_steps:
            return
        results = evaluate(engine, self.cfg, self.rank, self.world, clips=1, crops=1)  # every rank gets the totals
        metrics = {"val/top1": results["top1"], "val/top5": results["top5"]}
        improved = self.best is None or results["top1"] > self.best["top1"]
        if self.rank == 0:
            tracker.log_metrics(metrics, step=step)
            with open(self.out / "val.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            print(f"[scaling] validation at step {step}: top1 {results['top1']:.2f} top5 {results['top5']:.2f} "
                  f"(1 view per video){', best so far' if improved else ''}", flush=True)
        if improved:
            checkpoint.save(engine, self.out / BEST, step, state, keep=1)
            self.best = {"step": step, "top1": results["top1"], "tag": checkpoint.tag_for(step)}
            if self.rank == 0:
                checkpoint.write_atomic(self.out / BEST / "best.json", json.dumps(self.best))

    def load_for_test(self, engine) -> None:
        """`finetune.test_with: best`: the best weights into the engine for the final test."""
        if self.cfg.finetune.test_with != "best" or self.best is None:
            return
        if self.rank == 0:
            print(f"[scaling] final test with the best weights (step {self.best['step']}, validation top1 "
                  f"{self.best['top1']:.2f})", flush=True)
        engine.load_checkpoint(str(self.out / BEST), tag=self.best["tag"])

    def export_best(self, tracker) -> None:
        """Rank 0 consolidates the best checkpoint beside the last export (the others wait)."""
        if self.best is not None and self.rank == 0:
            path = checkpoint.export_fp32(self.out / BEST, self.out / BEST_EXPORT, tag=self.best["tag"],
                                          extra={"config": to_dict(self.cfg), "val_top1": self.best["top1"]})
            tracker.log_metrics({"val/best_top1": self.best["top1"]}, step=self.best["step"])
            print(f"[scaling] best weights (validation top1 {self.best['top1']:.2f} at step {self.best['step']}) "
                  f"exported to {path}", flush=True)
        if dist.is_initialized():
            dist.barrier()
