"""Evaluation on drlora's JSONL rows: multiple choice by log-likelihood, generation by exact match.

Multiple choice follows lm-evaluation-harness: each choice is scored by the summed log-probability of its tokens
after the prompt, where the choice's tokens are what the tokenizer gives for prompt + choice minus the prompt's own
tokens; `acc` takes the best summed score, `acc_norm` the best score divided by the choice's length in characters.

Generation is greedy: the prediction is the generated text up to the first newline (generation stops there, at an
EOS token or after `max_new_tokens`), and a row counts as an exact match when
``prediction.strip() == row["completion"].strip()``. `drlora.lm_eval_backend` configures lm-evaluation-harness to
the same definitions, so both backends give the same numbers on the same rows.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .data import row_kind
from .sharding import any_sharded


@contextmanager
def eval_mode(model):
    """Eval mode for the duration (no dropout, no training-only bookkeeping), then every module's own previous mode
    back, so evaluating in the middle of training leaves the training loop's model exactly as it was."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _prefix_token_id(tokenizer) -> int:
    """The token that stands in for an empty prompt (lm-eval's choice: BOS, else EOS), so that the first token of the
    continuation still has a prediction to be scored by."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("a row has an empty prompt and the tokenizer has neither a BOS nor an EOS token to start "
                         "from; give the row a prompt.")
    return token


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation; tokenise the whole string.

    An empty context becomes the prefix token (as in lm-eval), because the first scored token needs a position
    before it."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    if not ctx:
        return [_prefix_token_id(tokenizer)], whole
    return ctx, whole[len(ctx):]


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8, max_length: int = 1024,
                   progress: bool = True) -> list[float]:
    """Summed log p(continuation | context) for each (context, continuation), in batches.

    Pairs whose model input is the same token sequence share one forward pass — in particular the choices of a
    question whose answers are single tokens, all read off the one next-token distribution after the prompt
    (lm-eval does the same), and a choice whose input is a prefix of another choice's is read off that longer
    forward (`_share_inputs`). The LM head runs only at the positions that predict a continuation token
    (`logits_to_keep` with the union of a batch's positions): with a large vocabulary and short answers,
    full-sequence logits would cost about as much as the rest of the forward pass and change nothing."""
    device = next(model.parameters()).device
    sequences = []
    for context, continuation in pairs:
        ctx, cont = _encode_pair(tokenizer, context, continuation)
        seq = (ctx + cont)[-(max_length + 1):]
        sequences.append((seq, min(len(cont), len(seq) - 1)))
    shared = _share_inputs(pairs, sequences)
    inputs = sorted(shared, key=len, reverse=True)  # similar lengths together: little padding
    results = [0.0] * len(pairs)
    selective = _accepts_logits_to_keep(model)
    bar = tqdm(total=len(pairs), desc="scoring", disable=not progress, leave=False)
    with eval_mode(model):
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            width = max(len(tokens) for tokens in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, tokens in enumerate(chunk):
                ids[row, :len(tokens)] = torch.tensor(tokens)
                mask[row, :len(tokens)] = 1
            # per pair: its row and the positions whose next-token prediction is scored
            scored = [(row, index, range(own - sequences[index][1], own))
                      for row, tokens in enumerate(chunk) for index, own in shared[tokens]]
            kept = sorted({p for _, _, span in scored for p in span}) if selective else list(range(width))
            column = {p: c for c, p in enumerate(kept)}
            extra = {"logits_to_keep": torch.tensor(kept, device=device)} if selective else {}
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                           **extra).logits
            logprobs = torch.log_softmax(logits.float(), -1)
            for row, index, span in scored:
                seq, n = sequences[index]
                targets = torch.tensor(seq[-n:], device=device)
                columns = torch.tensor([column[p] for p in span], device=device)
                results[index] = float(logprobs[row, columns, targets].sum())
            bar.update(len(scored))
    bar.close()
    return results


def _share_inputs(pairs, sequences) -> dict[tuple, list[tuple[int, int]]]:
    """Model input -> the pairs it scores, as (pair index, length of the pair's own input).

    A pair's input is its sequence minus the last token. Pairs with the same input share it; and since attention is
    causal, an input that is a prefix of another input of the same context is scored inside the longer one's forward
    (e.g. the single-token answer ' positive' is read off the forward of the prompt + ' amb' of ' ambivalent'). Only
    inputs of one context are compared, which is where such prefixes occur, so the cost stays linear."""
    by_context: dict[str, dict[tuple, list[int]]] = {}
    for index, ((context, _), (seq, _)) in enumerate(zip(pairs, sequences)):
        by_context.setdefault(context, {}).setdefault(tuple(seq[:-1]), []).append(index)
    shared: dict[tuple, list[tuple[int, int]]] = {}
    for inputs in by_context.values():
        longest_first = sorted(inputs, key=len, reverse=True)
        for position, tokens in enumerate(longest_first):
            host = next((h for h in longest_first[:position] if h[:len(tokens)] == tokens), tokens)
            shared.setdefault(host, []).extend((index, len(tokens)) for index in inputs[tokens])
    return shared


def item_key(row: dict) -> str:
    """A short fingerprint of an eval row (prompt and choices or completion): per-item results of two runs are
    paired only where their keys agree, so a changed eval set can never be compared item by item by mistake."""
    text = json.dumps([row.get("prompt"), row.get("choices"), row.get("completion")], ensure_ascii=False)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def evaluate_multiple_choice(model, tokenizer, rows: list[dict], batch_size: int = 8, progress: bool = True,
                             items: bool = False) -> dict:
    """acc and acc_norm (lm-evaluation-harness definitions) over multiple-choice rows.

    With `items`, the result also holds "items": per row its key, the choice taken, whether it and the
    length-normalised choice are correct, and the log-likelihood margin (the label's summed log-probability minus
    the best other choice's; > 0 when the label wins). Paired comparisons of two runs need these:
    two methods' scores differ by a few items, and which items is what a paired test looks at."""
    pairs = [(row["prompt"], choice) for row in rows for choice in row["choices"]]
    scores = iter(loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, progress=progress))
    records = []
    for index, row in enumerate(rows):
        lls = [next(scores) for _ in row["choices"]]
        normed = [ll / len(choice) for ll, choice in zip(lls, row["choices"])]
        choice = max(range(len(lls)), key=lls.__getitem__)
        others = [ll for k, ll in enumerate(lls) if k != row["label"]]
        records.append({"index": index, "key": item_key(row), "choice": choice, "correct": int(choice == row["label"]),
                        "correct_norm": int(max(range(len(normed)), key=normed.__getitem__) == row["label"]),
                        "margin": round(lls[row["label"]] - max(others), 6) if others else None})
    n = len(rows)
    result = {"acc": sum(r["correct"] for r in records) / n, "acc_norm": sum(r["correct_norm"] for r in records) / n,
              "n": n}
    return {**result, "items": records} if items else result


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a generation: the tokenizer's EOS and the model's generation_config EOS ids (chat models
    often list several), since either may lack the other (a converted or random model's config may not name the
    tokenizer's EOS). Ids outside the model's vocabulary can never be generated and are left out."""
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates = config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    ids: list[int] = []
    for token in [tokenizer.eos_token_id, *candidates]:
        if token is not None and int(token) not in ids and (vocab is None or 0 <= int(token) < vocab):
            ids.append(int(token))
    return ids


class _StopAtNewline(StoppingCriteria):
    """Finishes each row (not the whole batch) once its generated text holds a newline: the prediction ends there,
    so generating further would only cost time."""

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer, self.prompt_width = tokenizer, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor(["\n" in text for text in texts], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_predictions(model, tokenizer, prompts: list[str], batch_size: int = 8, max_new_tokens: int = 32,
                         progress: bool = True) -> list[str]:
    """Greedy continuation of each prompt, up to its first newline (see the module docstring), in batches.

    Prompts are left-padded by hand with an attention mask, so the tokenizer needs no pad token and is not changed;
    prompts are sorted by length so that a batch holds little padding."""
    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    encoded = [tokenizer(p, add_special_tokens=False).input_ids or [_prefix_token_id(tokenizer)] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    predictions = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generating", disable=not progress, leave=False)
    # a model sharded by FSDP2 needs every process in every forward: each keeps generating until all are done
    synced = any_sharded(model.parameters()) and torch.distributed.get_world_size() > 1
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                    num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos or None,
                                    pad_token_id=pad, synced_gpus=synced, stopping_criteria=StoppingCriteriaList(
                                        [_StopAtNewline(tokenizer, width)]))
            for row, i in enumerate(chunk):
                tokens = output[row, width:].tolist()
                end = next((k for k, token in enumerate(tokens) if token in eos), len(tokens))  # padding follows
                predictions[i] = tokenizer.decode(tokens[:end], skip_special_tokens=True).split("\n")[0]
            bar.update(len(chunk))
    bar.close()
    return predictions


def evaluate_generation(model, tokenizer, rows: list[dict], batch_size: int = 8, max_new_tokens: int = 32,
                        progress: bool = True, items: bool = False) -> dict:
    """Exact match over generation rows: the greedy prediction (generated text up to the first newline; generation
    stops at a newline, an EOS token or `max_new_tokens`) matches when ``prediction.strip() ==
    row["completion"].strip()``. Stripping forgives the leading space a completion usually carries after its prompt
    and trailing whitespace; everything else (case, punctuation) must match, as lm-eval's exact_match does by
    default — `drlora.lm_eval_backend` uses this same definition. With `items`, the result also holds "items": per
    row its key, the prediction and whether it matched."""
    predictions = generate_predictions(model, tokenizer, [row["prompt"] for row in rows], batch_size=batch_size,
                                       max_new_tokens=max_new_tokens, progress=progress)
    records = [{"index": index, "key": item_key(row), "prediction": p,
                "correct": int(p.strip() == row["completion"].strip())}
               for index, (p, row) in enumerate(zip(predictions, rows))]
    result = {"exact_match": sum(r["correct"] for r in records) / len(rows), "n": len(rows)}
    return {**result, "items": records} if items else result


def rows_kind(rows: list[dict]) -> str:
    """'mc' or 'generation' for a non-empty list of rows of one kind; evaluation has no definition for chat rows."""
    if not rows:
        raise ValueError("there are no rows to evaluate; give at least one multiple-choice or generation row.")
    kinds = {row_kind(row) for row in rows}
    if "chat" in kinds:
        raise ValueError("chat rows are for training only; evaluation needs multiple-choice rows (prompt, choices, "
                         "label) or generation rows (prompt, completion).")
    if len(kinds) > 1:
        raise ValueError("the rows mix multiple-choice and generation rows; evaluate one kind at a time.")
    return kinds.pop()


def evaluate_rows(model, tokenizer, rows: list[dict], batch_size: int = 8, progress: bool = True, items: bool = False,
                  **kw) -> dict:
    """Score rows by their kind: {"acc", "acc_norm", "n"} for multiple choice, {"exact_match", "n"} for generation;
    with `items`, also the per-row records ("items", see the two scorers).

    `kw` holds generation options (`max_new_tokens`); multiple choice has none and ignores them, so one call serves
    every task of a run."""
    if rows_kind(rows) == "mc":
        return evaluate_multiple_choice(model, tokenizer, rows, batch_size=batch_size, progress=progress, items=items)
    return evaluate_generation(model, tokenizer, rows, batch_size=batch_size, progress=progress, items=items, **kw)
