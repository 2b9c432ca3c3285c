"""The speculative step of the engine: extend the head, draft trees, verify, accept, commit.

Per request, the head's not-yet-cached input pairs (the accepted path's target features and
the tokens that follow them) stay on the device in a slot of ``pending_*`` between steps, so a
whole step is one fixed-shape function, captured as one CUDA graph per batch bucket. The host
reads only the emitted tokens and their counts.
"""

from __future__ import annotations

import torch

from eaglespec.config import SpecConfig
from eaglespec.engine.graphs import StepGraphs, bucket_for
from eaglespec.engine.request import Request
from eaglespec.engine.runner import DECODE_ROWS, ModelRunner, StepRows
from eaglespec.kv_cache import KVCache, block_table_tensor, slots_for
from eaglespec.models.attention_step import PrefillStep
from eaglespec.models.eagle import EagleHead
from eaglespec.models.llama import ModelOutput
from eaglespec.ops.attention import default_scale
from eaglespec.speculative.drafter import Drafter
from eaglespec.speculative.tree import parse_tree
from eaglespec.speculative.verifier import verify_tree

# A speculative step reads, per request, the decode fields plus its pending-state slot and the
# target's cached length L (the root sits at position L).
SPEC_ROWS = DECODE_ROWS.extended(i64=("state_slots",), i32=("cached_lens",))


class SpeculativeRunner:
    def __init__(self, runner: ModelRunner, head: EagleHead, spec: SpecConfig):
        self.runner = runner
        self.head = head.with_kernels(runner.backend)  # the target's kernel set (same weights)
        self.shape = parse_tree(spec.tree)
        self.width = self.shape.depth + 1  # tokens one step can emit (accepted drafts + bonus)
        lc = head.config.layer
        self.feature = "taps" if head.config.kind == "eagle3" else "hidden"
        dev, dtype = runner.device, runner.dtype
        # The head's cache shares block ids with the target: pair t sits where token t does.
        self.cache = KVCache.allocate(lc.num_layers, runner.cache.num_blocks, runner.cfg.block_size,
                                      lc.num_kv_heads, lc.head_dim, dtype, dev)
        self.drafter = Drafter(self.head, self.shape, self.cache, runner.backend, default_scale(lc.head_dim))
        num_slots = 2 * runner.cfg.max_batch_size + 1  # the last one is the padding rows' slot
        self.pad_slot = num_slots - 1
        self.pending_feat = torch.zeros(num_slots, self.width, head.config.feature_size, dtype=dtype, device=dev)
        self.pending_tok = torch.zeros(num_slots, self.width, dtype=torch.int64, device=dev)
        self.pending_count = torch.ones(num_slots, dtype=torch.int64, device=dev)
        self._free_slots = list(range(num_slots - 1))
        self._slot_of: dict[int, int] = {}
        use_graphs = runner.use_graphs
        self.graphs = {greedy: StepGraphs(lambda x, g=greedy: self._step_fn(x, g), self._static_inputs, use_graphs)
                       for greedy in (True, False)}

    @property
    def lookahead(self) -> int:
        return self.width

    # ------------------------------------------------------------------ slots

    def release(self, req: Request) -> None:
        slot = self._slot_of.pop(req.request_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    def _slot(self, req: Request) -> int:
        if req.request_id not in self._slot_of:
            if not self._free_slots:
                raise RuntimeError("no free speculative state slot (more live requests than 2 x max_batch_size)")
            self._slot_of[req.request_id] = self._free_slots.pop()
        return self._slot_of[req.request_id]

    # ------------------------------------------------------------------ prefill

    @torch.inference_mode()
    def after_prefill(self, reqs: list[Request], out: ModelOutput, sampled: torch.Tensor,
                      new_counts: list[int]) -> None:
        """Prefill the head with the prompt pairs and leave the last pair pending.

        ``out`` holds the target features of every prefilled token, packed by request;
        ``sampled`` [B] the token each request's prefill produced (still on the device).
        """
        feats = out.hidden if self.feature == "hidden" else out.taps
        bs = self.runner.cfg.block_size
        dev = self.runner.device
        rows, ids, pos, slots, cu, lens, last_rows = [], [], [], [], [0], [], []
        offset = 0
        for r, n in zip(reqs, new_counts):
            end = len(r.all_ids)  # the sampled token is not appended yet
            start = end - n
            # Pairs (feature_t, x_{t+1}) for t in [start, end - 2]; the last one waits for x_end.
            rows += range(offset, offset + n - 1)
            ids += r.all_ids[start + 1:end]
            pos += range(start, end - 1)
            slots += slots_for(r.blocks, start, end - 1, bs)
            cu.append(cu[-1] + n - 1)
            lens.append(end - 1)
            last_rows.append(offset + n - 1)
            offset += n
        if cu[-1] > 0:
            step = PrefillStep(torch.tensor(slots, dtype=torch.int64, device=dev),
                               block_table_tensor([r.blocks for r in reqs], self.runner.max_blocks_per_seq, dev),
                               torch.tensor(cu, dtype=torch.int32, device=dev),
                               torch.tensor(lens, dtype=torch.int32, device=dev),
                               max(cu[i + 1] - cu[i] for i in range(len(reqs))), self.drafter.scale,
                               self.runner.backend)
            self.head(feats.index_select(0, torch.tensor(rows, device=dev)), torch.tensor(ids, device=dev),
                      torch.tensor(pos, device=dev), step, self.cache)
        slot_ids = torch.tensor([self._slot(r) for r in reqs], device=dev)
        self.pending_feat[slot_ids, 0] = feats.index_select(0, torch.tensor(last_rows, device=dev))
        self.pending_tok[slot_ids, 0] = sampled
        self.pending_count[slot_ids] = 1

    # ------------------------------------------------------------------ the step

    def _static_inputs(self, bucket: int) -> dict[str, torch.Tensor]:
        inputs = self.runner.static_inputs(bucket, SPEC_ROWS)
        rows = StepRows(inputs["packed"], self.runner.max_blocks_per_seq, SPEC_ROWS)
        rows["state_slots"].fill_(self.pad_slot)
        rows["cached_lens"].fill_(self.width + 1)
        return inputs

    def _step_fn(self, x: dict[str, torch.Tensor], greedy: bool) -> tuple[torch.Tensor, ...]:
        rows = StepRows(x["packed"], self.runner.max_blocks_per_seq, SPEC_ROWS)
        slot_ids, lens, tables = rows["state_slots"], rows["cached_lens"], rows.block_tables
        counts = self.pending_count.index_select(0, slot_ids)
        hidden, logits = self.drafter.extend(self.pending_feat.index_select(0, slot_ids),
                                             self.pending_tok.index_select(0, slot_ids), counts,
                                             lens - counts.to(lens.dtype), tables)
        tree = self.drafter.build(hidden, logits, rows["input_ids"], lens, tables)
        res = verify_tree(self.runner.model, self.runner.cache, tree, lens, tables, rows.sampling(), greedy,
                          self.feature, self.shape.depth, self.runner.scale, self.runner.backend)
        self.pending_feat.index_copy_(0, slot_ids, res.path_features.to(self.pending_feat.dtype))
        self.pending_tok.index_copy_(0, slot_ids, res.accept.tokens.clamp_min(0))
        self.pending_count.index_copy_(0, slot_ids, res.accept.num_emitted)
        return res.accept.tokens, res.accept.num_emitted

    @torch.inference_mode()
    def step(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """One speculative step for running requests. Returns emitted tokens [B, depth+1]
        (-1 padded) and their counts [B], on the device."""
        bucket = bucket_for(len(reqs), self.runner.buckets)
        # Padding rows read and write only the scratch block; a length past the widest pending
        # run keeps their head prefix non-negative.
        greedy = all(r.params.temperature == 0 for r in reqs)
        graphs = self.graphs[greedy]
        self.stage_inputs(graphs, reqs, bucket)
        tokens, counts = graphs.run(bucket)
        return tokens[:len(reqs)], counts[:len(reqs)]

    def stage_inputs(self, graphs: StepGraphs, reqs: list[Request], bucket: int) -> None:
        """The runner's decode fields, then each request's state slot and cached length (padding
        rows: the scratch slot and a length past the widest pending run)."""
        rows = self.runner.stage_inputs(graphs, reqs, bucket, fields=SPEC_ROWS)
        n = len(reqs)
        state_slots, cached_lens = rows["state_slots"].numpy(), rows["cached_lens"].numpy()
        state_slots[:n] = [self._slot(r) for r in reqs]
        state_slots[n:] = self.pad_slot
        cached_lens[:n] = [r.num_cached for r in reqs]
        cached_lens[n:] = self.width + 1
