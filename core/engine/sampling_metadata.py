"""Turn a batch of sequences' SamplingParams into device tensors, and sampled results back into Python."""
from __future__ import annotations

import torch

from loraplex.layers.sampler import SamplingBatch
from loraplex.sequence import Sequence


def build_sampling_batch(seqs: list[Sequence], vocab_size: int, device: torch.device) -> SamplingBatch:
    params = [s.params for s in seqs]
    if all(p.is_greedy and not p.has_penalties and p.logprobs is None for p in params):
        return _GREEDY  # the common serving case: no per-row tensors to build or copy
    has_pen = any(p.has_penalties for p in params)
    output_counts = prompt_mask = None
    pres = freq = rep = None
    if has_pen:
        output_counts = torch.zeros(len(seqs), vocab_size, dtype=torch.float32, device=device)
        prompt_mask = torch.zeros(len(seqs), vocab_size, dtype=torch.bool, device=device)
        for i, s in enumerate(seqs):
            if s.output_token_ids:
                ids = torch.tensor(s.output_token_ids, device=device)
                output_counts[i].scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
            prompt_mask[i, torch.tensor(s.prompt_token_ids, device=device)] = True
        pres = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=device)
        freq = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=device)
        rep = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device)
    generators = []
    for s in seqs:
        if s.params.seed is not None and s.generator is None:
            # Distinct seeds for a request's n samples, so they differ but stay reproducible.
            s.generator = torch.Generator(device=device).manual_seed((s.params.seed + 7919 * s.index) % 2**64)
        generators.append(s.generator)
    num_logprobs = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingBatch(
        temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
        top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
        top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
        min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
        presence_penalty=pres, frequency_penalty=freq, repetition_penalty=rep,
        output_counts=output_counts, prompt_mask=prompt_mask,
        generators=generators,
        all_greedy=all(p.is_greedy for p in params),
        any_top_k=any(p.top_k > 0 for p in params),
        any_top_p=any(p.top_p < 1.0 for p in params),
        any_min_p=any(p.min_p > 0.0 for p in params),
        max_num_logprobs=max(num_logprobs) if num_logprobs else -1,
    )


_GREEDY = SamplingBatch(
    temperature=None, top_p=None, top_k=None, min_p=None, presence_penalty=None, frequency_penalty=None,
    repetition_penalty=None, output_counts=None, prompt_mask=None, generators=[], all_greedy=True, any_top_k=False,
    any_top_p=False, any_min_p=False, max_num_logprobs=-1)


def min_tokens_mask(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> None:
    """Forbid EOS and stop tokens for sequences still below min_tokens."""
    rows, cols = [], []
    for i, s in enumerate(seqs):
        if len(s.output_token_ids) < s.params.min_tokens:
            banned = set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else set(eos_ids))
            for t in banned:
                if t < logits.shape[1]:
                    rows.append(i)
                    cols.append(t)
    if rows:
        logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")


def gather_logprobs(raw_logprobs: torch.Tensor, tokens: torch.Tensor, k: int):
    """Per row: (logprob of sampled token, its rank, top-k ids, top-k logprobs), as device tensors."""
    chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    ranks = (raw_logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
    if k > 0:
        top_lp, top_ids = raw_logprobs.topk(k, dim=-1)
    else:
        top_lp = top_ids = torch.empty(raw_logprobs.shape[0], 0, device=raw_logprobs.device)
    return chosen, ranks, top_ids, top_lp
