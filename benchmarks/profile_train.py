"""Where a training step's time goes (issue 10: the shipped recipe trained at 214k tokens/s on
2026-11-26 and at 101k on 2026-12-05).

GPU only:  python benchmarks/profile_train.py --config configs/smollm2-eagle1.toml --data DIR --out OUT
Times the parts of a step (target forward, head loss, backward, optimizer) with the device
synchronized around each, then prints the kernels of a few steps from torch.profiler.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eaglespec.train.cli import load_config, load_target  # noqa: E402
from eaglespec.train.dense import target_forward  # noqa: E402
from eaglespec.train.trainer import Trainer, eagle1_loss  # noqa: E402


def timed_parts(trainer: Trainer, steps: int) -> dict:
    """Mean ms per part over ``steps`` micro-batches (eagle1 only), synchronized around each part."""
    cfg = trainer.cfg
    batches = trainer._batches_of_epoch(0)
    parts = {"target_forward": 0.0, "head_loss": 0.0, "backward": 0.0, "optimizer": 0.0}
    tokens = 0

    def clock():
        torch.cuda.synchronize()
        return time.perf_counter()

    for indices in batches[:steps]:
        from eaglespec.train.dense import pad_batch
        tok, mask, lengths = pad_batch([trainer.data[i][0] for i in indices], [trainer.data[i][1] for i in indices])
        tok, mask = tok.to(trainer.device), mask.to(trainer.device)
        tokens += int(lengths.sum())
        t0 = clock()
        out = target_forward(trainer.target, tok, want_taps=False)
        t1 = clock()
        with trainer.autocast():
            res = eagle1_loss(trainer.head, tok, mask, out.hidden, out.logits, None, cfg.value_weight,
                              cfg.prob_weight, cfg.step_decay, cfg.placeholder_weight)
        t2 = clock()
        res.loss.backward()
        t3 = clock()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        t4 = clock()
        for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[name] += 1000 * dt / steps
    total = sum(parts.values())
    return {"ms": parts, "ms_total": total, "tokens_per_s": tokens / steps / (total / 1000)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/smollm2-eagle1.toml")
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = load_config(args.config, {"train.data_dir": args.data, "train.out_dir": "/tmp/profile-train"})
    target = load_target(cfg.target)
    trainer = Trainer(cfg.train, target.model)
    timed_parts(trainer, 5)  # warm-up: autotuning, allocator
    result = timed_parts(trainer, args.steps)
    print(json.dumps(result, indent=1))
    trainer.fit(max_steps_this_call=3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        trainer.fit(max_steps_this_call=5)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile-train.json"), "w") as f:
        json.dump({**result, "device": torch.cuda.get_device_name(), "torch": torch.__version__}, f, indent=1)
    with open(os.path.join(args.out, "profile-train-kernels.txt"), "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()
