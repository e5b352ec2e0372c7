"""The multiple-choice scorer: batching and padding do not change scores; acc / acc_norm follow their definitions."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from drlora.evaluate import _encode_pair, evaluate_multiple_choice, loglikelihoods
from tiny_models import tiny_moe

WORDS = "the cat dog sat ran on mat a big small red blue yes no".split()


def tokenizer():
    vocab = {w: i for i, w in enumerate(["[UNK]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def reference_loglikelihood(model, tok, context, continuation):
    ctx, cont = _encode_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1], -1)
    return sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_batched_scores_equal_one_at_a_time_scores():
    model, tok = tiny_moe("olmoe"), tokenizer()
    pairs = [("the cat sat on the", " mat"), ("a big dog", " ran"), ("the", " small red cat sat"), ("yes", " no")]
    batched = loglikelihoods(model, tok, pairs, batch_size=3, progress=False)
    for (context, continuation), score in zip(pairs, batched):
        assert abs(score - reference_loglikelihood(model, tok, context, continuation)) < 1e-4


def test_acc_and_acc_norm():
    model, tok = tiny_moe("olmoe"), tokenizer()
    rows = [{"prompt": "the cat sat on the", "choices": [" mat", " big red mat"], "label": 0},
            {"prompt": "a dog", "choices": [" ran", " sat", " yes"], "label": 2}]
    result = evaluate_multiple_choice(model, tok, rows, progress=False)
    expected_acc = expected_norm = 0
    for row in rows:
        lls = [reference_loglikelihood(model, tok, row["prompt"], c) for c in row["choices"]]
        normed = [ll / len(c) for ll, c in zip(lls, row["choices"])]
        expected_acc += int(max(range(len(lls)), key=lls.__getitem__) == row["label"])
        expected_norm += int(max(range(len(normed)), key=normed.__getitem__) == row["label"])
    assert result == {"acc": expected_acc / 2, "acc_norm": expected_norm / 2, "n": 2}


def test_trailing_space_of_the_prompt_moves_to_the_choice():
    assert _encode_pair(tokenizer(), "the cat ", "sat") == _encode_pair(tokenizer(), "the cat", " sat")
