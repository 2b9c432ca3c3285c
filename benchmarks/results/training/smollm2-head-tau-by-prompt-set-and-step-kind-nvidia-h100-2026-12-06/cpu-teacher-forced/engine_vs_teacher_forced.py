"""Depth-1 acceptance in the engine against teacher-forced top-1 agreement on the same text."""
import json, sys, torch
from eaglespec.config import SamplingParams
from eaglespec.models.eagle import load_head
from eaglespec.train.cli import TargetSection, load_target
from eaglespec.train.data import load_conversations
from eaglespec.train.dense import DenseCausalStep, target_forward
from eaglespec.train.trainer import chat_prompts, speculative_llm, evaluate_tau
from eaglespec.ops.attention import default_scale

torch.manual_seed(0)
n, max_tokens = int(sys.argv[1]), int(sys.argv[2])
target = load_target(TargetSection(device="cpu", dtype="float32"))
head = load_head("eaglespec/assets/smollm2-eagle", target.model)
model = target.model
# Prompt sets: NAME=FILE arguments after the two numbers (default: the three sets of this folder's run).
sources = [a.split("=", 1) for a in sys.argv[3:]] or [
    ("mtbench", ".carry/mtbench-question.jsonl"), ("sharegpt-train", ".carry/sharegpt-train-0-300.jsonl"),
    ("sharegpt-heldout", ".carry/sharegpt-heldout-16000-16300.jsonl")]
for name, src in sources:
    convs = [c for c in load_conversations(src, 0, n) if c]
    prompts = chat_prompts(target.tokenizer, [c[0] for c in convs])
    llm = speculative_llm(model, head, "chain:3", target.tokenizer, None, target.eos_ids)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = llm.generate(prompts, params)
    tau = sum(o.stats["new_tokens"] for o in outs) / sum(o.stats["target_forwards"] for o in outs)
    d1 = [o.stats["accept_rate_per_depth"][0] for o in outs]
    right = right16 = total = 0
    t2d = head.t2d if getattr(head, "t2d", None) is not None else None
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            toks = torch.tensor(list(p) + list(o.token_ids))[None]
            t = toks.shape[1]
            hid = target_forward(model, toks).hidden
            logits_t = model.compute_logits(hid).float()  # [T, V]
            x_next = torch.cat([toks[0, 1:], toks[0, -1:]])
            out = head(hid.float(), x_next, torch.arange(t), DenseCausalStep(1, t, default_scale(head.config.layer.head_dim)), None)
            dl = torch.nn.functional.linear(out.last, head.output_weight()).float()  # [T, V] row r predicts the target at r+1
            rows = torch.arange(len(p) - 1, t - 2)  # x_{r+2} a reply token
            tgt = logits_t[rows + 1].argmax(-1)
            right += (dl[rows].argmax(-1) == tgt).sum().item()
            total += rows.numel()
    print(json.dumps({"source": name, "prompts": len(prompts), "chain3_tau": round(tau, 3),
                      "depth1_accept_mean": round(sum(d1) / len(d1), 3),
                      "teacher_forced_top1": round(right / total, 3), "rows": total}), flush=True)
