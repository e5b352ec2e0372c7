"""Evaluation on drlora's JSONL rows: multiple choice by log-likelihood, generation by exact match.

Multiple choice follows lm-evaluation-harness: each choice is scored by the summed log-probability of its tokens
after the prompt, where the choice's tokens are what the tokenizer gives for prompt + choice minus the prompt's own
tokens; `acc` takes the best summed score, `acc_norm` the best score divided by the choice's length in characters.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation; tokenise the whole string."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8, max_length: int = 1024,
                   progress: bool = True) -> list[float]:
    """Summed log p(continuation | context) for each (context, continuation), in batches."""
    device = next(model.parameters()).device
    encoded = [_encode_pair(tokenizer, c, x) for c, x in pairs]
    results = [0.0] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))  # less padding
    bar = tqdm(total=len(pairs), desc="scoring", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seqs = [(encoded[i][0] + encoded[i][1])[-(max_length + 1):] for i in chunk]
        width = max(len(s) for s in seqs) - 1
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq) - 1] = torch.tensor(seq[:-1])
            mask[row, :len(seq) - 1] = 1
        logprobs = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        for row, i in enumerate(chunk):
            seq, n = seqs[row], len(encoded[i][1])
            targets = torch.tensor(seq[-n:], device=device)
            positions = torch.arange(len(seq) - 1 - n, len(seq) - 1, device=device)
            results[i] = float(logprobs[row, positions, targets].sum())
        bar.update(len(chunk))
    bar.close()
    return results


def evaluate_multiple_choice(model, tokenizer, rows: list[dict], batch_size: int = 8, progress: bool = True) -> dict:
    """acc and acc_norm (lm-evaluation-harness definitions) over multiple-choice rows."""
    pairs = [(row["prompt"], choice) for row in rows for choice in row["choices"]]
    scores = iter(loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, progress=progress))
    correct = correct_norm = 0
    for row in rows:
        lls = [next(scores) for _ in row["choices"]]
        normed = [ll / len(choice) for ll, choice in zip(lls, row["choices"])]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == row["label"])
        correct_norm += int(max(range(len(normed)), key=normed.__getitem__) == row["label"])
    n = len(rows)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}
