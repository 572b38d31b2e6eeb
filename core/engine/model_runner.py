"""Runs one scheduled batch: build the flat token batch and metadata once, run the model, sample on device."""
from __future__ import annotations

import logging

import torch

from loraplex.engine.cuda_graph import CUDAGraphRunner
from loraplex.engine.sampling_metadata import build_sampling_batch, gather_logprobs, min_tokens_mask
from loraplex.layers.attention import AttentionMetadata
from loraplex.layers.sampler import sample
from loraplex.sequence import Sequence

logger = logging.getLogger("loraplex.engine")


# Prompt positions whose logits are computed at once for prompt logprobs (bounds the [rows, vocab] buffers).
PROMPT_LOGPROBS_CHUNK = 512


class StepResult:
    __slots__ = ("token_ids", "logprobs", "prompt_logprobs")

    def __init__(self, token_ids: list[int], logprobs: list | None, prompt_logprobs: dict | None = None):
        self.token_ids = token_ids
        self.logprobs = logprobs  # per seq: None or (chosen_lp, rank, top_ids, top_lps)
        # seq row -> (chosen_lps, ranks, top_ids, top_lps), one entry per prompt token after the first
        self.prompt_logprobs = prompt_logprobs or {}


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _spread(values: list, rows: list[int], n: int) -> list:
    out = [None] * n
    for v, i in zip(values, rows):
        out[i] = v
    return out


class PendingStep:
    """A launched step. Its sampled tokens travel to pinned host memory behind one CUDA event, so reading them
    waits for this step only, not for a step launched after it (see LLMEngine's async scheduling)."""

    __slots__ = ("seqs", "num_new", "tokens", "rows", "_host", "_event", "_prompt_rows", "_prompt_host")

    def __init__(self, seqs: list[Sequence], num_new: list[int], tokens: torch.Tensor, logprobs: tuple = (),
                 prompt_logprobs: tuple | None = None, rows: list[int] | None = None):
        self.seqs = seqs
        self.num_new = num_new
        self.tokens = tokens  # [num sampled rows] int64 on the device: a look-ahead step's input ids
        # The rows of seqs that sampled (None: all); the others are prefill chunks before their prompt's last.
        self.rows = rows
        self._host = [_to_host(t) for t in (tokens, *logprobs)]
        # prompt_logprobs: ([(seq row, num prompt positions)], (chosen, ranks, top_ids, top_lps) flat over rows)
        self._prompt_rows, self._prompt_host = [], []
        if prompt_logprobs is not None:
            self._prompt_rows = prompt_logprobs[0]
            self._prompt_host = [_to_host(t) for t in prompt_logprobs[1]]
        self._event = None
        if tokens.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> StepResult:
        if self._event is not None:
            self._event.synchronize()
        token_ids = self._host[0].tolist()
        sampled = self.seqs if self.rows is None else [self.seqs[i] for i in self.rows]
        logprobs = None
        if len(self._host) > 1:
            chosen, ranks, top_ids, top_lps = (t.tolist() for t in self._host[1:])
            logprobs = []
            for i, s in enumerate(sampled):
                k = s.params.logprobs
                logprobs.append(None if k is None else (chosen[i], ranks[i], top_ids[i][:k], top_lps[i][:k]))
        if self.rows is not None:  # back to one entry per row of seqs, None for rows that sampled nothing
            token_ids = _spread(token_ids, self.rows, len(self.seqs))
            logprobs = _spread(logprobs, self.rows, len(self.seqs)) if logprobs is not None else None
        prompt = {}
        if self._prompt_rows:
            chosen, ranks, top_ids, top_lps = (t.tolist() for t in self._prompt_host)
            start = 0
            for i, count in self._prompt_rows:
                k = self.seqs[i].prompt_logprobs.num_logprobs
                end = start + count
                prompt[i] = (chosen[start:end], ranks[start:end], [r[:k] for r in top_ids[start:end]],
                             [r[:k] for r in top_lps[start:end]])
                start = end
        return StepResult(token_ids, logprobs, prompt)


class ModelRunner:
    def __init__(self, model, device: torch.device, dtype: torch.dtype, block_size: int, num_blocks: int,
                 max_model_len: int, max_num_seqs: int, eos_token_ids: tuple[int, ...], lora_manager=None,
                 seed: int | None = 0, enforce_eager: bool = True):
        self.model = model
        self.cfg = model.cfg
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.eos_token_ids = eos_token_ids
        self.lora_manager = lora_manager
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed if seed is not None else torch.seed())
        self._allocate_kv_cache()
        # Adapters may target this model's MoE experts: only then does a step look for such adapters.
        self.has_expert_lora = lora_manager is not None and bool(lora_manager.layout.expert_layers)
        self.graph_runner = None
        if device.type == "cuda" and not enforce_eager:
            self.graph_runner = CUDAGraphRunner(self, max_num_seqs)
            self.graph_runner.capture_all()

    def _allocate_kv_cache(self) -> None:
        cfg = self.cfg
        shape = (cfg.num_hidden_layers, self.num_blocks, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.attn.k_cache = self.k_cache[i]
            layer.self_attn.attn.v_cache = self.v_cache[i]

    @staticmethod
    def kv_bytes_per_block(cfg, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem

    # ------------------------------------------------------------------ inputs
    def _prepare(self, seqs: list[Sequence], num_new: list[int], input_ids_dev: torch.Tensor | None = None):
        """Flat batch inputs. With input_ids_dev (a look-ahead decode step), each seq's newest token is still on
        the device and not yet appended on the host, so it sits at position seq.num_tokens."""
        bs = self.block_size
        ahead = input_ids_dev is not None
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        qsl = [0]
        lora_idx: list[int] = []
        for seq, n in zip(seqs, num_new):
            start = seq.num_tokens if ahead else seq.num_computed_tokens
            end = start + n
            if not ahead:
                input_ids.extend([seq.last_token_id] if end == seq.num_tokens and n == 1
                                 else seq.token_slice(start, end))
            table = seq.block_table
            for p in range(start, end):
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            seq_lens.append(end)
            qsl.append(qsl[-1] + n)
            if self.lora_manager is not None:
                lora_idx.extend([seq.lm_lora_entry] * n)
        tables = torch.zeros(len(seqs), max(len(s.block_table) for s in seqs), dtype=torch.int32)
        for i, seq in enumerate(seqs):
            tables[i, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            block_tables=tables.to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(dev, non_blocking=True),
            max_query_len=max(num_new),
            max_seq_len=max(seq_lens),
        )
        ids = input_ids_dev if ahead else torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        return ids, pos, meta, qsl, lora_idx

    def _set_lora(self, lora_idx: list[int]) -> None:
        if self.lora_manager is not None:
            self.lora_manager.state.set_batch(lora_idx)

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], num_new: list[int], input_ids: torch.Tensor | None = None) -> PendingStep:
        """Queue the step on the device and return at once; input_ids: see _prepare."""
        ahead = input_ids is not None
        # A row samples once its chunk reaches the newest token; an earlier prefill chunk's row samples nothing.
        rows = None if ahead else [i for i, (s, n) in enumerate(zip(seqs, num_new))
                                   if s.num_computed_tokens + n >= s.num_tokens]
        if rows is not None and len(rows) == len(seqs):
            rows = None
        # Graphs take true decodes only: not a 1-token chunk, nor a multi-modal prompt's last token.
        is_decode = max(num_new) == 1 and rows is None and (ahead or all(
            s.mm_inputs is None or s.num_computed_tokens >= s.num_prompt_tokens for s in seqs))
        expert_runs = self._expert_lora_runs(seqs, num_new) if self.has_expert_lora else []
        if is_decode and not expert_runs and self.graph_runner is not None and self.graph_runner.can_run(len(seqs)):
            logits = self.graph_runner.run(seqs, input_ids)
        else:
            ids, pos, meta, qsl, lora_idx = self._prepare(seqs, num_new, input_ids)
            self._set_lora(lora_idx)
            embeds = self._multimodal_embeds(ids, seqs, num_new, qsl) if self.cfg.is_multimodal else None
            if expert_runs:
                self.model.expert_lora.runs = expert_runs
            try:
                hidden = self.model(ids, pos, meta, inputs_embeds=embeds)  # [num_tokens, hidden]
            finally:
                if expert_runs:
                    self.model.expert_lora.runs = []
            prompt = None if ahead else self._prompt_logprobs(hidden, seqs, num_new, qsl, ahead)
            if meta.max_query_len > 1 or rows is not None:
                last = [qsl[i + 1] - 1 for i in (range(len(seqs)) if rows is None else rows)]
                hidden = hidden[torch.tensor(last, dtype=torch.int64).to(self.device, non_blocking=True)]
            logits = self.model.compute_logits(hidden)  # [num sampled rows, vocab]
            return self.sample(logits, seqs, num_new, prompt, rows)
        return self.sample(logits, seqs, num_new)

    def _multimodal_embeds(self, ids: torch.Tensor, seqs: list[Sequence], num_new: list[int],
                           qsl: list[int]) -> torch.Tensor | None:
        """The prefill's token embeddings with media features scattered in at the placeholder positions, or None
        when no sequence of this step prefills placeholders. The tower runs once per request (its n sequences
        share the features; a prefill after preemption reuses them)."""
        # Rows prefilling part of their prompt (a chunk of it may be a single token).
        rows = [i for i, s in enumerate(seqs) if s.mm_inputs is not None and s.num_computed_tokens < s.num_prompt_tokens]
        if not rows:
            return None
        embeds = self.model.embed_tokens(ids)  # [num_tokens, hidden]
        mm_token = self.model.mm_token_id
        self._encode([seqs[i] for i in rows if "embeds" not in seqs[i].mm_inputs])
        for i in rows:
            seq = seqs[i]
            mm = seq.mm_inputs
            start = seq.num_computed_tokens
            # Features of placeholders before this chunk were used by an earlier one.
            offset = sum(1 for t in seq.prompt_token_ids[:start] if t == mm_token)
            mask = ids[qsl[i]:qsl[i + 1]] == mm_token
            count = int(mask.sum())
            if count:
                part = embeds[qsl[i]:qsl[i + 1]]
                part[mask] = mm["embeds"][offset:offset + count].to(part.dtype)
        return embeds

    def _encode(self, seqs: list[Sequence]) -> None:
        """Run the tower over the media of these requests, each request's tower and connector under its own
        adapter (none for base requests); store each request's features in its mm_inputs. The model batches:
        requests of one adapter are passed side by side."""
        groups: dict[int, list[Sequence]] = {}
        seen: set[int] = set()  # a request's n sequences share one mm_inputs: encode it once
        for seq in seqs:
            if id(seq.mm_inputs) not in seen:
                seen.add(id(seq.mm_inputs))
                groups.setdefault(id(seq.lora_model), []).append(seq)
        owners = [seq for group in groups.values() for seq in group]
        items = [(seq.mm_inputs, self._tower_lora(seq.lora_model)) for seq in owners]
        for seq, feats in zip(owners, self.model.encode_mm(items)):
            seq.mm_inputs["embeds"] = feats  # [num placeholders, hidden]

    def _expert_lora_runs(self, seqs: list[Sequence], num_new: list[int]) -> list[tuple[int, int, dict]]:
        """(first token, end token, expert weights on the device) of each sequence whose adapter targets MoE
        experts, in flat-batch token order; empty when none does (then CUDA graphs may run)."""
        runs, start = [], 0
        for seq, n in zip(seqs, num_new):
            m = seq.lora_model
            if m is not None and m.has_experts:
                runs.append((start, start + n, self._tower_lora(m)))
            start += n
        return runs

    def _tower_lora(self, version) -> dict | None:
        """An adapter version's LoRA outside the page pool (tower / connector, MoE experts) on this device,
        uploaded on first use."""
        if version is None or not version.tower:
            return None
        if version.tower_device is None:
            dtype = self.model.embed_tokens.weight.dtype
            version.tower_device = {path: (a.to(self.device, dtype), b.to(self.device, dtype))
                                    for path, (a, b) in version.tower.items()}
        return version.tower_device

    def _prompt_logprobs(self, hidden: torch.Tensor, seqs: list[Sequence], num_new: list[int], qsl: list[int],
                         ahead: bool):
        """Raw logprobs of every prompt token after the first (vLLM's prompt_logprobs), for the sequences of
        this step whose request asked for them and has none yet; only their prompt positions get logits.
        Returns None, or ([(seq row, num positions)], (chosen, ranks, top_ids, top_lps)) as device tensors.
        A prefill is launched only once the step before it is read back, so a request's slot, still empty
        here, is filled by this step (by one of its rows, when its n sequences are prefilled together). A chunked
        prefill adds the positions of its chunk from where the slot's computed ones end (a sequence prefilled
        anew after preemption may cut its chunks elsewhere)."""
        rows, k, claimed, targets, index = [], 0, set(), [], []
        for i, seq in enumerate(seqs):
            slot = seq.prompt_logprobs
            if slot is None or slot.value is not None or id(slot) in claimed or ahead:
                continue
            start, done = seq.num_computed_tokens, slot.num_computed
            end = min(start + num_new[i], seq.num_prompt_tokens - 1)
            if not start <= done < end:
                continue
            claimed.add(id(slot))
            rows.append((i, end - done))
            targets.extend(seq.prompt_token_ids[done + 1:end + 1])
            # Hidden state at prompt position p predicts prompt token p + 1.
            index.append(torch.arange(qsl[i] + done - start, qsl[i] + end - start, dtype=torch.int64))
            k = max(k, slot.num_logprobs)
        if not rows:
            return None
        dev = self.device
        index = torch.cat(index)
        targets = torch.tensor(targets, dtype=torch.int64)
        index, targets = index.to(dev, non_blocking=True), targets.to(dev, non_blocking=True)
        parts = []
        for start in range(0, index.numel(), PROMPT_LOGPROBS_CHUNK):
            sl = slice(start, start + PROMPT_LOGPROBS_CHUNK)
            raw = self.model.compute_logits(hidden[index[sl]]).log_softmax(dim=-1)
            parts.append(gather_logprobs(raw, targets[sl], k))
        return rows, tuple(torch.cat(ts) for ts in zip(*parts))

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], num_new: list[int],
               prompt_logprobs: tuple | None = None, rows: list[int] | None = None) -> PendingStep:
        """Sample the rows ``rows`` of seqs (None: all), whose logits are ``logits`` in that order."""
        sampled = seqs if rows is None else [seqs[i] for i in rows]
        if not sampled:  # only prefill chunks before their prompts' last: nothing to draw
            tokens = torch.empty(0, dtype=torch.int64, device=self.device)
            return PendingStep(seqs, num_new, tokens, (), prompt_logprobs, rows)
        batch = build_sampling_batch(sampled, logits.shape[1], self.device)
        min_tokens_mask(logits, sampled, self.eos_token_ids)
        tokens, raw_logprobs = sample(logits, batch, self.generator)
        logprobs = ()
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, tokens, max(batch.max_num_logprobs, 0))
        return PendingStep(seqs, num_new, tokens, logprobs, prompt_logprobs, rows)
