"""Supervised examples: the loss is on the answer only, split as evaluation splits it; left padding with position
ids and a kept-logits window computes exactly the loss of each row alone."""

import pytest
import torch

from drlora.data import DataError
from drlora.evaluate import _encode_pair
from drlora.recipe.sft_data import IGNORE, LeftPadCollator, build_examples, encode_row
from tiny_models import EOS, tiny_moe, tiny_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def test_multiple_choice_row_trains_on_the_correct_choice_split_like_evaluation():
    tok = tiny_tokenizer()
    row = {"prompt": "the cat sat on", "choices": [" a mat", " the dog"], "label": 1}
    ids, labels = encode_row(tok, row)
    context, target = _encode_pair(tok, "the cat sat on", " the dog")
    assert ids == context + target
    assert labels == [IGNORE] * len(context) + target


def test_generation_row_learns_to_stop():
    tok = tiny_tokenizer()
    ids, labels = encode_row(tok, {"prompt": "yes or", "completion": " no"})
    assert ids[-1] == EOS and labels[-1] == EOS and labels[-2] == ids[-2] and labels[0] == IGNORE


def test_chat_row_supervises_assistant_turns_only():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    row = {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on a mat"},
                        {"role": "user", "content": "the dog"}, {"role": "assistant", "content": "ran"}]}
    ids, labels = encode_row(tok, row)
    supervised = tok.decode([t for t, label in zip(ids, labels) if label != IGNORE])
    assert supervised.split() == ["sat", "on", "a", "mat", "ran"]
    tok.chat_template = None
    with pytest.raises(DataError, match="chat rows need a tokenizer with a chat template"):
        encode_row(tok, row)


def test_long_examples_lose_their_beginning_and_rows_left_without_an_answer_are_refused():
    tok = tiny_tokenizer()
    rows = [{"prompt": "the big red cat sat on the small blue mat", "choices": [" yes", " no"], "label": 0}]
    examples, stats = build_examples(tok, rows, max_length=4)
    assert len(examples[0]["input_ids"]) == 4 and examples[0]["labels"][-1] != IGNORE and stats["truncated"] == 1
    tok.chat_template = CHAT_TEMPLATE
    answer_cut_off = [{"messages": [{"role": "assistant", "content": "yes"},
                                    {"role": "user", "content": "the big red cat sat on the small blue mat"}]}]
    with pytest.raises(DataError, match="training row 1 has no answer tokens left.*raise data.max_length"):
        build_examples(tok, answer_cut_off, max_length=6)


def test_left_padded_batch_has_exactly_the_loss_of_its_rows_alone():
    tok, model = tiny_tokenizer(), tiny_moe("olmoe")
    rows = [{"prompt": "the cat sat on the", "choices": [" mat", " dog"], "label": 0},
            {"prompt": "a", "choices": [" big red dog", " cat"], "label": 0},
            {"prompt": "yes no yes no yes", "completion": " no yes"}]
    examples, _ = build_examples(tok, rows, max_length=64)
    batch = LeftPadCollator(pad_token_id=0)(examples)
    width = batch["input_ids"].shape[1]
    assert (batch["attention_mask"].sum(-1) == torch.tensor([len(e["input_ids"]) for e in examples])).all()
    assert batch["position_ids"][1, -1] == len(examples[1]["input_ids"]) - 1
    keep = batch["logits_to_keep"]
    assert keep.tolist() == list(range(width - len(keep), width)) and len(keep) < width
    with torch.no_grad():
        batched = model(**batch).loss
        total = count = 0
        for e in examples:
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            n = int((labels[0, 1:] != IGNORE).sum())
            total += model(input_ids=ids, labels=labels).loss * n
            count += n
    torch.testing.assert_close(batched, total / count, atol=1e-5, rtol=1e-5)
