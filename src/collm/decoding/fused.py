"""One decoding step as one device program: the rest of the GPU fast path.

The static path (collm.backends.static) replays a graph for each model forward, but a token still costs a dozen small
launches between replays: the head, the threshold, the greedy pick, the writes into the token matrix, the EOS
check. At batch 1 on a GPU those launches, not the weights, set the pace (the compiled 1B step took 2.0 ms where
reading its weights takes 0.8). Here they join the writer's forward in one function over buffers this module
owns, with the step index on the device, so on CUDA one graph replay does all of it:

    finish step s:  token = argmax of the chosen model's logits; write it at column n; done |= EOS
    begin step s+1: the writer reads that token; head; route (threshold, or a benchmark's override table);
                    write defer_prob and source; flags = (rows per expert, all done)

and the host reads ``flags``: the one sync per token, which it needs to know whether to launch an expert's
catch-up (collm.backends.static, its own graphs) or stop. The same read brings the step's token, source and done
flags, for stop strings and streaming, which are host work. Greedy decoding only; sampling and the other modes
keep the step-by-step loop in collm.decoding.decode. On CPU the same functions run eagerly, which is how the tests
prove the fused step writes exactly what the loop writes.
"""

from __future__ import annotations

import torch

from collm.backends.static import StaticModel
from collm.core.head import DeferralHead, logits_to_log_probs
from collm.core.routing import defer_prob, route

MAX_EOS = 8  # EOS ids live in a fixed-size device buffer (-1 = unused) so a captured graph serves any set


class FusedStep:
    """Per-request state of greedy decoding on device buffers, and the step that advances it.

    ``writer``: the static runner of the model that writes every step (the base; the expert in mode "expert").
    ``num_experts``: how many expert logits buffers the pick chooses from (0 outside collm mode).
    ``head_outputs``: the head's width (1 or M+1); 0 when no head is consulted.
    """

    def __init__(self, writer: StaticModel, vocab: int, num_experts: int, head_outputs: int, hidden_size: int):
        self.writer, self.vocab, self.num_experts = writer, vocab, num_experts
        batch, width = writer.batch, writer.capacity
        device = writer.mask.device
        self.seq = torch.zeros(batch, width, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, width, dtype=torch.long, device=device)
        self.chosen = torch.zeros(batch, width, dtype=torch.long, device=device)  # indexed by step
        self.defer_probs = torch.zeros(batch, width, dtype=torch.float32, device=device)
        self.override = torch.full((width, batch), -1, dtype=torch.long, device=device)  # -1: the head decides
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.n = torch.zeros(1, dtype=torch.long, device=device)  # the column the next token goes to
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.eos = torch.full((MAX_EOS,), -1, dtype=torch.long, device=device)
        self.pad = torch.zeros((), dtype=torch.long, device=device)
        self.threshold = torch.zeros((), dtype=torch.float32, device=device)
        self.logits = torch.zeros(batch, vocab, dtype=torch.float32, device=device)
        self.hidden = torch.zeros(batch, hidden_size, dtype=writer.lm_head.weight.dtype, device=device)
        self.expert_logits = torch.zeros(max(num_experts, 1), batch, vocab, dtype=torch.float32, device=device)
        self.head_outputs = head_outputs
        self.head_weight = torch.zeros(max(head_outputs, 1), hidden_size, dtype=torch.float32, device=device)
        self.head_bias = torch.zeros(max(head_outputs, 1), dtype=torch.float32, device=device)
        self.experts_ids = torch.arange(1, num_experts + 1, device=device)
        # [rows per expert (M), all done, then the step just finished: token (B), source (B), done before it (B),
        #  then the step just routed: P(defer) as float32 bits (B)]
        self.flags = torch.zeros(num_experts + 1 + 4 * batch, dtype=torch.long, device=device)
        self.graph = None

    def start(self, seq, positions, prompt_len: int, logits, hidden, *, head: DeferralHead | None,
              threshold: float, eos_ids: tuple[int, ...], pad_id: int, table: torch.Tensor | None) -> list[int]:
        """Load a request whose prompt the writer has read (``logits``, ``hidden`` from that prefill); route
        step 0 and return its flags. ``table`` (steps, rows or 1): a router's fixed choices, -1 = the head's."""
        if len(eos_ids) > MAX_EOS:
            raise ValueError(f"at most {MAX_EOS} EOS ids on the fused path, got {len(eos_ids)}")
        width = seq.shape[1]
        self.seq.zero_()
        self.seq[:, :width].copy_(seq)
        self.positions[:, :width].copy_(positions)
        self.chosen.zero_()
        self.defer_probs.zero_()
        self.override.fill_(-1 if self.head_outputs else 0)
        if table is not None:
            self.override[: table.shape[0]].copy_(table.expand(-1, self.override.shape[1]))
        self.done.zero_()
        self.n.fill_(prompt_len)
        self.step.zero_()
        self.eos.fill_(-1)
        if eos_ids:
            self.eos[: len(eos_ids)].copy_(torch.tensor(eos_ids, dtype=torch.long))
        self.pad.fill_(pad_id)
        self.threshold.fill_(threshold)
        if head is not None:
            self.head_weight.copy_(head.linear.weight)
            self.head_bias.copy_(head.linear.bias)
        self.logits.copy_(logits)
        if hidden is not None:
            self.hidden.copy_(hidden)
        self._route()
        return self.flags.tolist()

    def set_expert_logits(self, k: int, logits: torch.Tensor) -> None:
        """Expert k's (1-based) next-token logits after its catch-up, for the rows that chose it."""
        self.expert_logits[k - 1].copy_(logits)

    def advance(self) -> list[int]:
        """Finish this step and begin the next: the token is written, the writer reads it, the head routes.
        Returns ``flags`` (see __init__): the one host sync per token."""
        if self.writer.graphs_on:
            if self.graph is None:
                self.graph = self._capture()
            self.graph.replay()
        else:
            self._step()
        self.writer.seen += 1
        return self.flags.tolist()

    def finish(self) -> list[int]:
        """The last step: write the token without reading it (nothing comes after); returns ``flags``."""
        self._finish()
        return self.flags.tolist()

    def stop_rows(self, rows: list[int]) -> list[int]:
        """Rows that a stop string ended (host work) are done from now on: route the next step again, as the
        step-by-step loop would have, and return the new flags."""
        self.done[rows] = True
        self._route()
        return self.flags.tolist()

    def _step(self) -> None:
        self._finish()
        self._read()
        self._route()

    def _finish(self) -> None:
        choice = self.chosen.index_select(1, self.step).squeeze(1)  # (B,)
        logits = self.logits
        for k in range(self.num_experts):
            logits = torch.where((choice == k + 1)[:, None], self.expert_logits[k], logits)
        token = torch.where(self.done, self.pad, logits.argmax(-1))  # (B,): finished rows write padding
        self.seq.index_copy_(1, self.n, token[:, None])
        self.flags[self.num_experts + 1 : self.num_experts + 1 + 3 * token.shape[0]].copy_(
            torch.cat([token, choice, self.done.long()]))
        self.done |= (token[:, None] == self.eos).any(-1)
        self.n += 1
        self.step += 1

    def _read(self) -> None:
        """The writer's forward over the column just written, at cache position n - 1."""
        column = self.n - 1
        writer = self.writer
        writer.ids[:, :1].copy_(self.seq.index_select(1, column))
        writer.pos[:, :1].copy_(self.positions.index_select(1, column))
        writer.start.copy_(column.squeeze(0))
        writer.last.zero_()
        logits, hidden = writer._step(1)
        self.logits.copy_(logits[:, : self.vocab])
        self.hidden.copy_(hidden)

    def _route(self) -> None:
        override = self.override.index_select(0, self.step).squeeze(0)  # (B,)
        if self.head_outputs:
            log_pz = logits_to_log_probs(torch.nn.functional.linear(self.hidden.float(), self.head_weight,
                                                                     self.head_bias))  # (B, M+1)
            defer_probs = defer_prob(log_pz)  # (B,)
            choice = torch.where(override >= 0, override, route(log_pz, self.threshold, defer_probs))
            self.defer_probs.index_copy_(1, self.step, defer_probs[:, None])
            self.flags[-self.writer.batch :].copy_(defer_probs.float().view(torch.int32).long())
        else:
            choice = override
        choice = choice.masked_fill(self.done, 0)
        self.chosen.index_copy_(1, self.step, choice[:, None])
        counts = (choice[:, None] == self.experts_ids).sum(0)  # (M,): no bincount, whose size needs a sync
        self.flags[: self.num_experts + 1].copy_(torch.cat([counts, self.done.all()[None].long()]))

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream, capture, then undo the warm-up: unlike a forward's (which writes only
        cache slots the next call overwrites), this step moves the request on."""
        state = [self.seq, self.chosen, self.defer_probs, self.done, self.n, self.step, self.logits, self.hidden,
                 self.flags]
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        for tensor, copy in zip(state, saved):
            tensor.copy_(copy)
        return graph


def fused_step(runners: dict, writer: StaticModel, vocab: int, num_experts: int,
               head: DeferralHead | None) -> FusedStep:
    """The writer runner's fused step for this layout, kept in ``runners`` (the engine's cache, beside the
    static runners) so its graph outlives one request."""
    outputs = 0 if head is None else head.linear.out_features
    hidden = writer.lm_head.weight.shape[1]
    key = ("fused", id(writer), vocab, num_experts, outputs)
    if key not in runners:
        runners[key] = FusedStep(writer, vocab, num_experts, outputs, hidden)
    return runners[key]
