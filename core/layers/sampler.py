"""Sampling on the device: penalties, temperature, top-k/top-p/min-p, per-request seeded generators.

Random rows use the exponential-race trick (argmax of p / Exp(1)), which needs no sort and no host sync;
a seeded request draws its noise from its own generator, so its text does not depend on the batch around it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [num_seqs] fp32 (0 = greedy)
    top_p: torch.Tensor  # [num_seqs]
    top_k: torch.Tensor  # [num_seqs] int64 (0 = off)
    min_p: torch.Tensor  # [num_seqs]
    presence_penalty: torch.Tensor | None  # [num_seqs], None when no row has penalties
    frequency_penalty: torch.Tensor | None
    repetition_penalty: torch.Tensor | None
    output_counts: torch.Tensor | None  # [num_seqs, vocab] counts of generated tokens
    prompt_mask: torch.Tensor | None  # [num_seqs, vocab] bool, token seen in the prompt
    generators: list  # per row: torch.Generator or None
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    max_num_logprobs: int  # 0 = none requested (-1 also none)


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    if b.repetition_penalty is not None:
        seen = b.prompt_mask | (b.output_counts > 0)
        rep = b.repetition_penalty.unsqueeze(1)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
    if b.frequency_penalty is not None:
        logits = logits - b.frequency_penalty.unsqueeze(1) * b.output_counts
        logits = logits - b.presence_penalty.unsqueeze(1) * (b.output_counts > 0).to(logits.dtype)
    return logits


def _filter(probs_logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    logits = probs_logits
    if b.any_top_k or b.any_top_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if b.any_top_k:
            k = torch.where(b.top_k > 0, b.top_k, torch.full_like(b.top_k, vocab)).unsqueeze(1)
            mask |= ranks >= k
        if b.any_top_p:
            probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
            cum = probs.cumsum(dim=-1) - probs  # mass strictly before each token; the top token always stays
            mask |= cum > b.top_p.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    if b.any_min_p:
        probs = logits.softmax(dim=-1)
        top = probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < b.min_p.unsqueeze(1) * top, float("-inf"))
    return logits


def sample(logits: torch.Tensor, b: SamplingBatch, default_generator: torch.Generator | None = None):
    """logits: [num_seqs, vocab] fp32. Returns (token ids [num_seqs], raw logprobs [num_seqs, vocab] or None)."""
    raw_logprobs = logits.log_softmax(dim=-1) if b.max_num_logprobs >= 0 else None
    logits = apply_penalties(logits, b)
    greedy = logits.argmax(dim=-1)
    if b.all_greedy:
        return greedy, raw_logprobs
    temp = b.temperature.clamp(min=1e-5).unsqueeze(1)
    probs = _filter(logits / temp, b).softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=default_generator)
    for i, gen in enumerate(b.generators):
        if gen is not None:
            noise[i].exponential_(generator=gen)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(b.temperature < 1e-5, greedy, sampled), raw_logprobs
