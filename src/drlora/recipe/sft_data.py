"""Rows -> supervised fine-tuning examples: the loss is on the answer only, the prompt is context.

* multiple choice: prompt + the correct choice, split into tokens exactly as evaluation splits them
  (`drlora.evaluate._encode_pair`), so training raises the very log-likelihood that scoring reads;
* generation: prompt + completion + EOS (the model learns to stop);
* chat: the tokenizer's chat template; every assistant turn is supervised, everything else is context.

Batches are **left-padded** so every row's answer ends at the last position. The LM head then only has to run on the
last `logits_to_keep` positions (from the earliest supervised token of the batch), which on a model with a large
vocabulary and short answers saves a large share of the step. Position ids count real tokens only, so a padded row
computes exactly what it would alone.
"""

from __future__ import annotations

import torch

from ..data import DataError, row_kind
from ..evaluate import _encode_pair

IGNORE = -100


def _chat_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a chat, supervising the assistant turns (found by rendering prefixes)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat rows need a tokenizer with a chat template, and this model's tokenizer has none; "
                        "convert the rows to {\"prompt\", \"completion\"}.")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)) \
                if i else 0
            end = len(tokenizer.apply_chat_template(messages[:i + 1], tokenize=False))
            if text[:end] != tokenizer.apply_chat_template(messages[:i + 1], tokenize=False):
                raise DataError("the tokenizer's chat template renders a conversation differently from its "
                                "beginning, so assistant turns cannot be located; use prompt/completion rows.")
            spans.append((start, end))
    if not spans:
        raise DataError("a chat row has no assistant message to learn from.")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [token if any(s <= start < e for s, e in spans) else IGNORE
              for token, (start, _) in zip(encoded.input_ids, encoded.offset_mapping)]
    return list(encoded.input_ids), labels


def encode_row(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row, labels = IGNORE on the context."""
    kind = row_kind(row)
    if kind == "chat":
        return _chat_example(tokenizer, row["messages"])
    answer = row["choices"][row["label"]] if kind == "mc" else row["completion"]
    context, target = _encode_pair(tokenizer, row["prompt"], answer)
    if kind == "generation" and tokenizer.eos_token_id is not None:
        target = target + [tokenizer.eos_token_id]
    return context + target, [IGNORE] * len(context) + target


def truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Cut a too-long example from the left (the answer sits at the end and must survive)."""
    if len(ids) <= max_length:
        return ids, labels, False
    return ids[-max_length:], labels[-max_length:], True


def build_examples(tokenizer, rows: list[dict], max_length: int) -> tuple[list[dict], dict]:
    """Examples {"input_ids", "labels"} and stats {"rows", "truncated", "tokens", "supervised_tokens"}."""
    examples, truncated = [], 0
    for index, row in enumerate(rows):
        ids, labels = encode_row(tokenizer, row)
        ids, labels, cut = truncate(ids, labels, max_length)
        truncated += cut
        if all(label == IGNORE for label in labels[1:]):
            raise DataError(f"training row {index + 1} has no answer tokens left within data.max_length="
                            f"{max_length}; raise data.max_length.")
        examples.append({"input_ids": ids, "labels": labels})
    stats = {"rows": len(examples), "truncated": truncated, "tokens": sum(len(e["input_ids"]) for e in examples),
             "supervised_tokens": sum(sum(label != IGNORE for label in e["labels"]) for e in examples)}
    return examples, stats


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


class LeftPadCollator:
    """Left-pads a batch and keeps only the positions the loss needs (see the module docstring).

    Returns input_ids, attention_mask, position_ids, labels (for the kept positions) and logits_to_keep (the kept
    positions), all of which transformers' causal LMs take in forward."""

    def __init__(self, pad_token_id: int, keep_all_logits: bool = False):
        self.pad_token_id = pad_token_id
        self.keep_all_logits = keep_all_logits

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, width - n:] = torch.tensor(f["input_ids"])
            labels[row, width - n:] = torch.tensor(f["labels"])
            mask[row, width - n:] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
        if self.keep_all_logits:
            batch["labels"] = labels
            return batch
        supervised = (labels != IGNORE).any(0).nonzero()
        first = int(supervised[0]) if len(supervised) else width - 1
        keep = width - first + 1  # one more: the position before the first answer token predicts it
        keep = min(keep, width)
        batch["labels"] = labels[:, -keep:]
        # as positions rather than an int: transformers slices hidden states with it, and an index tensor gives a
        # contiguous copy that the LM head multiplies with one matmul (a strided slice takes a slow batched path)
        batch["logits_to_keep"] = torch.arange(width - keep, width)
        return batch
