"""Where a training step's time goes (EAGLE-1 recipes).

GPU only:  python benchmarks/profile_train.py --config configs/smollm2-eagle1.toml --data DIR --out OUT
Times the parts of a step (target forward, head loss, backward, optimizer) on the device (CUDA
events) and on the host, then prints the kernels and the host's ops of a few steps (torch.profiler).
H200, 2026-12-05 (design note 32): target forward 67 ms, head loss 53, backward 61, optimizer 1
per 13.5k-token micro-batch, measured when the warm-up ran 5 of the 20 timed micro-batches and
training attention still took cuDNN's plans (note 45); not rerun since.
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
from eaglespec.train.dense import pad_batch, target_forward  # noqa: E402
from eaglespec.train.trainer import Trainer, eagle1_loss  # noqa: E402


def timed_parts(trainer: Trainer, steps: int) -> dict:
    """Per part of a micro-batch (eagle1 only; target forward, head loss, backward, optimizer),
    mean ms over ``steps`` micro-batches: ``device`` from CUDA events, ``host`` the host's time
    in the part without synchronizing (a part that blocks on the device counts its wait there),
    and ``wall`` per micro-batch. Since 2026-12-05 (third session) the target's logits of the scored
    rows are made inside the head loss, not in the target forward."""
    cfg = trainer.cfg
    batches = trainer._batches_of_epoch(0)
    names = ("target_forward", "head_loss", "backward", "optimizer")
    device = dict.fromkeys(names, 0.0)
    host = dict.fromkeys(names, 0.0)
    tokens = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    for indices in batches[:steps]:
        tok, mask, lengths = pad_batch([trainer.data[i][0] for i in indices], [trainer.data[i][1] for i in indices])
        tok = tok.to(trainer.device, non_blocking=True)  # the mask stays on the host, as in the trainer
        tokens += int(lengths.sum())
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(names) + 1)]
        clocks = [time.perf_counter()]
        events[0].record()
        out = target_forward(trainer.target, tok, want_taps=False)
        events[1].record()
        clocks.append(time.perf_counter())
        with trainer.autocast():
            res = eagle1_loss(trainer.head, tok, mask, out.hidden, trainer._target_logits(out.hidden), None,
                              cfg.value_weight, cfg.prob_weight)
        events[2].record()
        clocks.append(time.perf_counter())
        res.loss.backward()
        events[3].record()
        clocks.append(time.perf_counter())
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        events[4].record()
        clocks.append(time.perf_counter())
        torch.cuda.synchronize()
        for k, name in enumerate(names):
            device[name] += events[k].elapsed_time(events[k + 1]) / steps
            host[name] += 1000 * (clocks[k + 1] - clocks[k]) / steps
    wall = 1000 * (time.perf_counter() - start) / steps
    return {"device_ms": device, "host_ms": host, "wall_ms": wall, "device_ms_total": sum(device.values()),
            "tokens_per_s": tokens / steps / (wall / 1000)}


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
    # Warm up on the micro-batches it then times: autotuning and the allocator see each shape first here.
    timed_parts(trainer, args.steps)
    result = timed_parts(trainer, args.steps)
    print(json.dumps(result, indent=1))
    # The same micro-batches under the profiler (not ``fit``, whose last step saves a checkpoint).
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, acc_events=True) as prof:
        timed_parts(trainer, 5)
    table = (prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
             + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile-train.json"), "w") as f:
        json.dump({**result, "device": torch.cuda.get_device_name(), "torch": torch.__version__}, f, indent=1)
    with open(os.path.join(args.out, "profile-train-kernels.txt"), "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()
