"""The speculative step of the engine: extend the head, draft trees, verify, accept, commit.

Per request, the head's not-yet-cached input pairs (the accepted path's target features and
the tokens that follow them) stay on the device in a slot of ``pending_*`` between steps, so a
whole step is one fixed-shape function, captured as one CUDA graph per batch bucket. The host
reads only the emitted tokens and their counts.

One runner holds several trees (``SpecConfig.trees``) and a plain decode step, sharing the
head's cache and the pending state: ``choose`` says which of them runs for a batch (the policy
of speculative/policy.py under ``tree="auto"``, else the forced tree). The plain step appends
its (feature, token) pair to those pending (ops/pending.py), so the next tree step caches every
position. The window holds one pair more than a tree step leaves, so a plain step after any tree
step keeps them all; only a longer run of plain steps leaves positions out of the head's cache,
which can only lower acceptance, never change an output.

Speculative steps overlap the host like plain ones: step n+1 of the same tree can be queued
before the host reads step n (``launch(..., follow=)``), its root tokens, cached lengths and
sampling counters advanced on the device from step n's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from eaglespec.config import SpecConfig
from eaglespec.engine.graphs import StepGraphs, bucket_for
from eaglespec.engine.request import Request
from eaglespec.engine.runner import DECODE_ROWS, DecodeFlight, ModelRunner, StepRows, write_padded
from eaglespec.engine.scheduler import is_ready
from eaglespec.kv_cache import KVCache, slots_for
from eaglespec.models.attention_step import PrefillStep
from eaglespec.models.eagle import EagleHead
from eaglespec.ops.attention import default_scale
from eaglespec.ops.pending import (append_pending, append_pending_ref, store_pending, store_pending_ref, take_pending,
                                   take_pending_ref)
from eaglespec.speculative.drafter import Drafter
from eaglespec.speculative.policy import PLAIN, SpeculationPolicy, drafts_priors
from eaglespec.speculative.tree import TreeShape, parse_tree
from eaglespec.speculative.verifier import verify_tree

# A speculative step reads, per request, the decode fields plus its pending-state slot and the
# target's cached length L (the root sits at position L).
SPEC_ROWS = DECODE_ROWS.extended(i64=("state_slots",), i32=("cached_lens",))


@dataclass(slots=True)
class SpecFlight:
    """A speculative step queued on the device whose outputs the host has not read yet."""

    reqs: list[Request]
    tree: str  # the tree it runs
    tokens_device: torch.Tensor  # [bucket, depth + 1] int64, -1 padded: the step's output buffer
    counts_device: torch.Tensor  # [bucket] int64 tokens emitted per row (accepted drafts + bonus)
    tokens_host: torch.Tensor  # [bucket, depth + 1] pinned twin, filled by a copy queued after the step (CUDA)
    counts_host: torch.Tensor  # [bucket]
    done: torch.cuda.Event | None  # recorded after those copies (None on the CPU: already done)

    def wait(self) -> list[list[int]]:
        """The tokens each request's step emitted (blocks until the step has run)."""
        if self.done is not None:
            self.done.synchronize()
        n = len(self.reqs)
        return [row[:c] for row, c in zip(self.tokens_host[:n].tolist(), self.counts_host[:n].tolist())]


@dataclass(slots=True)
class TreeProgram:
    """One tree's drafter and its step graphs (greedy and sampled batches)."""

    shape: TreeShape
    drafter: Drafter
    graphs: dict[bool, StepGraphs]


class SpeculativeRunner:
    def __init__(self, runner: ModelRunner, head: EagleHead, spec: SpecConfig):
        self.runner = runner
        self.head = head.with_kernels(runner.backend)  # the target's kernel set (same weights)
        shapes = {tree: parse_tree(tree) for tree in spec.trees}
        self.depth = max(shape.depth for shape in shapes.values())
        self.width = self.depth + 1  # tokens one step can emit (accepted drafts + bonus)
        # Pairs a state slot keeps pending for the head: one more than a tree step leaves, so the
        # plain step after it (tree="auto", or decoding inside a prefill step) appends without
        # dropping the oldest, which would leave a position of the head's cache unwritten.
        self.window = self.width + 1
        lc = head.config.layer
        self.feature = "taps" if head.config.kind == "eagle3" else "hidden"
        dev, dtype = runner.device, runner.dtype
        # The head's cache shares block ids with the target: pair t sits where token t does.
        self.cache = KVCache.allocate(lc.num_layers, runner.cache.num_blocks, runner.cfg.block_size,
                                      lc.num_kv_heads, lc.head_dim, dtype, dev)
        self.vocab = self.head.draft_vocab(spec.draft_vocab_size)  # the [N, H] rows gathered once, here
        num_slots = 2 * runner.cfg.max_batch_size + 1  # the last one is the padding rows' slot
        self.pad_slot = num_slots - 1
        self.pending_feat = torch.zeros(num_slots, self.window, head.config.feature_size, dtype=dtype, device=dev)
        self.pending_tok = torch.zeros(num_slots, self.window, dtype=torch.int64, device=dev)
        self.pending_count = torch.ones(num_slots, dtype=torch.int64, device=dev)
        triton_ops = runner.backend == "triton"
        self.append_pending = append_pending if triton_ops else append_pending_ref
        self.take_pending = take_pending if triton_ops else take_pending_ref
        self.store_pending = store_pending if triton_ops else store_pending_ref
        self._free_slots = list(range(num_slots - 1))
        self._slot_of: dict[int, int] = {}
        use_graphs = runner.use_graphs
        self.programs: dict[str, TreeProgram] = {}
        for tree, shape in shapes.items():
            drafter = Drafter(self.head, self.vocab, shape, self.cache, runner.backend, default_scale(lc.head_dim))
            graphs = {greedy: StepGraphs(lambda x, g=greedy, t=tree: self._step_fn(x, t, g), self._static_inputs,
                                         use_graphs) for greedy in (True, False)}
            self.programs[tree] = TreeProgram(shape, drafter, graphs)
        self.plain_graphs = {greedy: StepGraphs(lambda x, g=greedy: self._plain_fn(x, g), self._static_inputs,
                                                use_graphs) for greedy in (True, False)}
        self.prefill_program = runner.make_prefill_program(self._prefill_fn, self._prefill_inputs, self._stage_prefill)
        self._host_buffers: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}  # _host_buffer
        # tree="auto": measured choice per step; a forced tree runs on every step.
        # The head's own evaluation (acceptance.json) seeds what each tree is believed to accept.
        self.policy = (SpeculationPolicy(list(shapes), priors=drafts_priors(head.acceptance, list(shapes)))
                       if spec.tree == "auto" else None)

    @torch.inference_mode()
    def calibrate(self, reps: int = 5, share: Callable[[list[float]], list[float]] = lambda times: times) -> None:
        """Under tree="auto" on a GPU: capture every choice's greedy graphs for every batch bucket
        now, not while serving, and seed the policy with their replay times (the engine's wall
        clock refines them, host work included, once serving starts). Sampled batches' graphs
        are captured on first use and timed online: calibrating them too doubled start-up (91 s
        for SmolLM2 on an H200, most of it compiling). ``share``: the times every rank seeds
        its policy with (tensor parallelism: rank 0's, so every rank's policy chooses alike)."""
        if self.policy is None or not self.runner.use_graphs:
            return
        from tqdm import tqdm

        steps = [(choice, bucket) for bucket in self.runner.buckets for choice in self.policy.choices]
        times = []
        for choice, bucket in tqdm(steps, desc="capturing and timing speculation choices", leave=False):
            graphs = (self.plain_graphs if choice == PLAIN else self.programs[choice].graphs)[True]
            self.stage_inputs(graphs, [], bucket)  # padding rows only: the scratch block and slot
            graphs.run(bucket)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                graphs.run(bucket)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000 / reps)
        for (choice, bucket), seconds in zip(steps, share(times)):
            self.policy.seed(choice, bucket, True, seconds)

    def choose(self, reqs: list[Request]) -> str:
        """What runs next for these requests: a tree spec, or ``PLAIN`` (policy.PLAIN)."""
        if self.policy is None:
            return next(iter(self.programs))
        return self.policy.choose(bucket_for(len(reqs), self.runner.buckets), _all_greedy(reqs))

    def observe(self, choice: str, reqs: list[Request], seconds: float, tokens_per_sequence: float,
                steady: bool) -> None:
        """Feed the policy one step's wall time and mean tokens per sequence (``steady``: the
        step followed one of the same choice, see SpeculationPolicy.observe)."""
        if self.policy is not None:
            self.policy.observe(choice, bucket_for(len(reqs), self.runner.buckets), _all_greedy(reqs), seconds,
                                tokens_per_sequence, steady)

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

    def prefill(self, reqs: list[Request], ends: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Prefill the target and the head (``ModelRunner.prefill``'s arguments and result)."""
        return self.runner.prefill(reqs, ends, self.prefill_program)

    def _prefill_inputs(self, tokens: int, seqs: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The head's share of a prefill's inputs (beside the target's, ``ModelRunner.prefill_inputs``),
        all padding: pair rows in the scratch slot, empty sequences, no pending slot."""
        i64 = dict(dtype=torch.int64, device=device)
        return {"head_rows": torch.zeros(tokens, **i64), "head_ids": torch.zeros(tokens, **i64),
                "head_positions": torch.zeros(tokens, **i64), "head_slots": torch.zeros(tokens, **i64),
                "head_cu_seqlens": torch.zeros(seqs + 1, dtype=torch.int32, device=device),
                "head_seq_lens": torch.zeros(seqs, dtype=torch.int32, device=device),
                "state_slots": torch.full((seqs,), self.pad_slot, **i64),
                "append_slots": torch.full((seqs,), self.pad_slot, **i64)}

    def _stage_prefill(self, host: dict[str, torch.Tensor], reqs: list[Request], new_counts: list[int]) -> None:
        """The head's pairs (feature_t, x_{t+1}) for t in [start, end - 2] of each request's
        prefilled tokens; the last one waits for the sampled x_end, pending in the request's
        state slot, unless the prefill was a chunk short of the request's length: then x_end is
        known, every pair of the chunk goes into the head's cache and nothing is left pending.
        A request decoding inside the prefill (ready: its one uncached token) appends that pair
        to those still pending, as a plain decoding step does."""
        bs = self.runner.cfg.block_size
        rows, ids, pos, slots, cu, lens, states, appends = [], [], [], [], [0], [], [], []
        offset = 0
        for r, n in zip(reqs, new_counts):
            start = r.num_cached  # not advanced yet
            whole = start + n == r.num_tokens
            m = n - 1 if whole else n
            rows += range(offset, offset + m)
            ids += r.all_ids[start + 1:start + 1 + m]
            pos += range(start, start + m)
            slots += slots_for(r.blocks, start, start + m, bs)
            cu.append(cu[-1] + m)
            lens.append(start + m)
            decoding = is_ready(r)
            states.append(self._slot(r) if whole and not decoding else self.pad_slot)
            appends.append(self._slot(r) if decoding else self.pad_slot)
            offset += n
        for name, values in (("head_rows", rows), ("head_ids", ids), ("head_positions", pos), ("head_slots", slots),
                             ("head_seq_lens", lens)):
            write_padded(host[name], values, 0)
        write_padded(host["state_slots"], states, self.pad_slot)
        write_padded(host["append_slots"], appends, self.pad_slot)
        write_padded(host["head_cu_seqlens"], cu, cu[-1])

    def _prefill_fn(self, x: dict[str, torch.Tensor], greedy: bool,
                    max_query_len: int | None = None) -> tuple[torch.Tensor, ...]:
        """The target's prefill, then the head's over the prompt pairs; each whole request's
        last pair (its last feature, the sampled token) is left pending, alone for a request
        whose prefill this is, behind the others for one decoding inside it."""
        tokens, out = self.runner.prefill_forward(x, greedy, max_query_len, want_hidden=self.feature == "hidden",
                                                  want_taps=self.feature == "taps")
        feats = out.hidden if self.feature == "hidden" else out.taps
        step = PrefillStep(x["head_slots"], x["block_tables"], x["head_cu_seqlens"], x["head_seq_lens"],
                           max_query_len or x["head_rows"].shape[0], default_scale(self.head.config.layer.head_dim),
                           self.runner.backend)
        self.head(feats.index_select(0, x["head_rows"]), x["head_ids"], x["head_positions"], step, self.cache)
        last = feats.index_select(0, x["last_rows"])
        states = x["state_slots"]  # the padding slot where nothing is left pending
        self.pending_feat[:, 0].index_copy_(0, states, last.to(self.pending_feat.dtype))
        self.pending_tok[:, 0].index_copy_(0, states, tokens)
        self.pending_count.index_fill_(0, states, 1)
        self.append_pending(self.pending_feat, self.pending_tok, self.pending_count, x["append_slots"], last,
                            tokens.contiguous())
        return (tokens,)

    # ------------------------------------------------------------------ the step

    def _static_inputs(self, bucket: int) -> dict[str, torch.Tensor]:
        inputs = self.runner.static_inputs(bucket, SPEC_ROWS)
        rows = StepRows(inputs["packed"], self.runner.max_blocks_per_seq, SPEC_ROWS)
        rows["state_slots"].fill_(self.pad_slot)
        rows["cached_lens"].fill_(self.window + 1)
        return inputs

    def _step_fn(self, x: dict[str, torch.Tensor], tree: str, greedy: bool) -> tuple[torch.Tensor, ...]:
        program = self.programs[tree]
        rows = StepRows(x["packed"], self.runner.max_blocks_per_seq, SPEC_ROWS)
        slot_ids, lens, tables = rows["state_slots"], rows["cached_lens"], rows.block_tables
        feats, tokens, counts = self.take_pending(self.pending_feat, self.pending_tok, self.pending_count, slot_ids)
        hidden, last = program.drafter.extend(feats, tokens, counts, lens - counts.to(lens.dtype), tables)
        tree_batch = program.drafter.build(hidden, last, rows["input_ids"], lens, tables)
        res = verify_tree(self.runner.model, self.runner.cache, tree_batch, lens, tables, rows.sampling(), greedy,
                          self.feature, program.shape.depth, self.runner.scale, self.runner.backend)
        # A shallower tree fills the first columns of the pending state.
        self.store_pending(self.pending_feat, self.pending_tok, self.pending_count, slot_ids, res.path_features,
                           res.accept.tokens, res.accept.num_emitted)
        return res.accept.tokens, res.accept.num_emitted

    def _plain_fn(self, x: dict[str, torch.Tensor], greedy: bool) -> tuple[torch.Tensor, ...]:
        """A plain decode step that leaves its (feature, next token) pair pending for the head."""
        rows = StepRows(x["packed"], self.runner.max_blocks_per_seq, SPEC_ROWS)
        tokens, out = self.runner.decode_forward(rows, greedy, want_hidden=self.feature == "hidden",
                                                 want_taps=self.feature == "taps")
        feats = out.hidden if self.feature == "hidden" else out.taps
        # The pair joins those still pending, so the next tree step caches every position.
        self.append_pending(self.pending_feat, self.pending_tok, self.pending_count, rows["state_slots"],
                            feats.contiguous(), tokens.contiguous())
        return (tokens,)

    @torch.inference_mode()
    def launch(self, reqs: list[Request], tree: str, follow: SpecFlight | None = None) -> SpecFlight:
        """Queue one speculative step of ``tree`` for running requests, without waiting for it;
        the requests' host state (``num_cached``, outputs) advances when the flight is read.

        With ``follow`` (the step before, same requests in the same order, not read yet, blocks
        grown for both steps) each request's root token is the last token that step emitted, and
        its cached length and sampling counter advance by that step's count, on the device."""
        bucket = bucket_for(len(reqs), self.runner.buckets)
        graphs = self.programs[tree].graphs[_all_greedy(reqs)]
        self.stage_inputs(graphs, reqs, bucket)
        prepare = None
        if follow is not None:
            n, prev_tokens, prev_counts = len(reqs), follow.tokens_device, follow.counts_device

            def prepare(static: dict[str, torch.Tensor]) -> None:
                rows = StepRows(static["packed"], self.runner.max_blocks_per_seq, SPEC_ROWS)
                counts = prev_counts[:n]
                last = torch.gather(prev_tokens[:n], 1, (counts - 1).clamp_min(0)[:, None])[:, 0]
                rows["input_ids"][:n].copy_(last)
                rows["cached_lens"][:n] += counts.to(torch.int32)
                rows["offsets"][:n] += counts
        tokens, counts = graphs.run(bucket, prepare)
        tokens_host, counts_host, done = tokens, counts, None  # on the CPU the step has already run
        if tokens.is_cuda:
            tokens_host, counts_host = self._host_buffer(bucket, tokens.shape[1])
            tokens_host.copy_(tokens, non_blocking=True)  # queued now: the next replay overwrites the outputs
            counts_host.copy_(counts, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return SpecFlight(reqs, tree, tokens, counts, tokens_host, counts_host, done)

    def _host_buffer(self, bucket: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pinned [bucket, width] tokens and [bucket] counts for a step's outputs. Two pairs per
        shape, used in turn: at most two steps are in flight, and the older one is read before
        a third starts."""
        pairs = self._host_buffers.get((bucket, width))
        if pairs is None:
            pairs = self._host_buffers[(bucket, width)] = [
                (torch.empty(bucket, width, dtype=torch.int64, pin_memory=True),
                 torch.empty(bucket, dtype=torch.int64, pin_memory=True)) for _ in range(2)]
        pairs.reverse()
        return pairs[0]

    def launch_plain(self, reqs: list[Request], follow: DecodeFlight | None = None) -> DecodeFlight:
        """Queue a plain decode step (overlapped like the plain engine's, see ModelRunner.launch_decode)."""
        return self.runner.launch_decode(reqs, follow, graphs=self.plain_graphs, fields=SPEC_ROWS,
                                         fill=self._fill_state_rows)

    def stage_inputs(self, graphs: StepGraphs, reqs: list[Request], bucket: int) -> None:
        """The runner's decode fields, then each request's state slot and cached length."""
        self._fill_state_rows(self.runner.stage_inputs(graphs, reqs, bucket, fields=SPEC_ROWS), reqs)

    def _fill_state_rows(self, rows: StepRows, reqs: list[Request]) -> None:
        """State slot and cached length per request; padding rows get the scratch slot and a
        length past the widest pending run (their head prefix stays non-negative)."""
        n = len(reqs)
        state_slots, cached_lens = rows["state_slots"].numpy(), rows["cached_lens"].numpy()
        state_slots[:n] = [self._slot(r) for r in reqs]
        state_slots[n:] = self.pad_slot
        cached_lens[:n] = [r.num_cached for r in reqs]
        cached_lens[n:] = self.window + 1


def _all_greedy(reqs: list[Request]) -> bool:
    """Greedy batches run their own graphs (an argmax instead of the sampling distribution)."""
    return all(r.params.temperature == 0 for r in reqs)
