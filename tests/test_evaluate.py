"""The scorers: batching and padding do not change scores or generations; acc / acc_norm / exact_match follow their
definitions; evaluate_rows dispatches on the rows' kind; evaluation leaves the model's modes and the tokenizer as
they were."""

import pytest
import torch
from drlora import get_dr_lora_model
from drlora.evaluate import (_encode_pair, evaluate_generation, evaluate_multiple_choice, evaluate_rows,
                             generate_predictions, loglikelihoods)
from tiny_models import EOS, NEWLINE, small_config, tiny_moe, train
from tiny_models import tiny_tokenizer as tokenizer
PROMPTS = ["the cat sat", "a big dog ran on the mat", "yes", "no no", "red blue", "the small red cat sat on a mat",
           "dog", "big", "on", "the mat", "small dog ran", "a cat", "blue yes no", "sat sat", "ran"]


def generation_model(seed: int = 0):
    """A tiny MoE whose newline and EOS logits are scaled up, so greedy generations end by newline, by EOS and by
    running out of tokens, all three."""
    model = tiny_moe("olmoe", seed=seed)
    with torch.no_grad():
        model.lm_head.weight[NEWLINE] *= 4
        model.lm_head.weight[EOS] *= 3
    return model


def reference_loglikelihood(model, tok, context, continuation):
    ctx, cont = _encode_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1], -1)
    return sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


@torch.no_grad()
def reference_generation(model, tok, prompt, max_new_tokens, eos=(EOS,)):
    """Greedy decoding one token at a time without a cache: (prediction, how it ended)."""
    ids = tok(prompt, add_special_tokens=False).input_ids
    generated = []
    while len(generated) < max_new_tokens:
        token = int(model(torch.tensor([ids + generated])).logits[0, -1].argmax())
        if token in eos:
            return tok.decode(generated, skip_special_tokens=True), "eos"
        generated.append(token)
        text = tok.decode(generated, skip_special_tokens=True)
        if "\n" in text:
            return text.split("\n")[0], "newline"
    return tok.decode(generated, skip_special_tokens=True), "max"


def test_batched_scores_equal_one_at_a_time_scores():
    model, tok = tiny_moe("olmoe"), tokenizer()
    pairs = [("the cat sat on the", " mat"), ("a big dog", " ran"), ("the", " small red cat sat"), ("yes", " no"),
             ("", " cat sat")]
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


def test_per_item_records_add_up_to_the_scores():
    model, tok = tiny_moe("olmoe"), tokenizer()
    rows = [{"prompt": p, "choices": [" cat", " dog", " mat"], "label": i % 3} for i, p in enumerate(PROMPTS)]
    plain = evaluate_multiple_choice(model, tok, rows, progress=False)
    found = evaluate_multiple_choice(model, tok, rows, progress=False, items=True)
    records = found.pop("items")
    assert found == plain and [r["index"] for r in records] == list(range(len(rows)))
    assert sum(r["correct"] for r in records) / len(rows) == plain["acc"]
    assert sum(r["correct_norm"] for r in records) / len(rows) == plain["acc_norm"]
    for row, record in zip(rows, records):
        lls = [reference_loglikelihood(model, tok, row["prompt"], c) for c in row["choices"]]
        best_other = max(ll for k, ll in enumerate(lls) if k != row["label"])
        assert record["margin"] == pytest.approx(lls[row["label"]] - best_other, abs=1e-4)
        assert record["choice"] == max(range(3), key=lls.__getitem__)
        assert record["correct"] == int(record["margin"] > 0)
    assert len({r["key"] for r in records}) == len(rows)  # the fingerprint tells rows apart
    gen = [{"prompt": p, "completion": " cat"} for p in PROMPTS[:4]]
    scored = evaluate_generation(generation_model(), tok, gen, max_new_tokens=4, progress=False, items=True)
    assert sum(r["correct"] for r in scored["items"]) / 4 == scored["exact_match"]
    assert [r["key"] for r in scored["items"]] != [r["key"] for r in records[:4]]


def test_trailing_space_of_the_prompt_moves_to_the_choice():
    assert _encode_pair(tokenizer(), "the cat ", "sat") == _encode_pair(tokenizer(), "the cat", " sat")


def test_an_empty_prompt_starts_from_the_eos_token():
    tok = tokenizer()
    assert _encode_pair(tok, "", " cat sat") == ([EOS], tok("cat sat", add_special_tokens=False).input_ids)
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        _encode_pair(tokenizer(eos=False), "", " cat")


def test_batched_generation_equals_one_at_a_time_generation():
    model, tok = generation_model(), tokenizer()
    batched = generate_predictions(model, tok, PROMPTS, batch_size=4, max_new_tokens=6, progress=False)
    reference = [reference_generation(model, tok, p, 6) for p in PROMPTS]
    assert batched == [prediction for prediction, _ in reference]
    assert {ending for _, ending in reference} == {"eos", "newline", "max"}  # every way to end is exercised
    assert tok.pad_token is None and tok.padding_side == "right"  # the caller's tokenizer is unchanged


def test_an_eos_named_only_by_the_generation_config_also_ends_a_prediction():
    model, tok = generation_model(), tokenizer()
    word = tok.convert_tokens_to_ids(generate_predictions(model, tok, PROMPTS, max_new_tokens=6,
                                                          progress=False)[0].split()[0])
    model.generation_config.eos_token_id = word  # an ordinary word, so only the EOS cut keeps it out of the text
    predictions = generate_predictions(model, tok, PROMPTS, batch_size=4, max_new_tokens=6, progress=False)
    assert predictions == [reference_generation(model, tok, p, 6, eos=(EOS, word))[0] for p in PROMPTS]
    assert not any(tok.convert_ids_to_tokens(word) in p.split() for p in predictions)


def test_exact_match_strips_both_sides_and_nothing_else():
    model, tok = generation_model(), tokenizer()
    predictions = generate_predictions(model, tok, PROMPTS, max_new_tokens=6, progress=False)
    assert all(p == p.rstrip("\n") for p in predictions) and sum(bool(p.strip()) for p in predictions) >= 8
    variants = [lambda p: p, lambda p: " " + p.strip(), lambda p: "\t" + p.strip() + " \n",  # match
                lambda p: p.strip() + " cat", lambda p: p.strip().upper() or "x", lambda p: p.strip() + "."]  # miss
    rows = [{"prompt": prompt, "completion": variants[i % 6](p)} for i, (prompt, p) in enumerate(zip(PROMPTS,
                                                                                                       predictions))]
    expected = sum(i % 6 < 3 or (i % 6 == 4 and predictions[i].strip() == predictions[i].strip().upper() != "")
                   for i in range(len(rows)))
    result = evaluate_generation(model, tok, rows, batch_size=5, max_new_tokens=6, progress=False)
    assert result == {"exact_match": expected / len(rows), "n": len(rows)}
    assert 0 < result["exact_match"] < 1


def test_evaluate_rows_dispatches_on_the_kind_of_rows():
    model, tok = generation_model(), tokenizer()
    mc = [{"prompt": "the cat", "choices": [" sat", " ran on"], "label": 1},
          {"prompt": "a", "choices": [" dog", " mat"], "label": 0}]
    gen = [{"prompt": "the cat", "completion": " sat"}, {"prompt": "a dog", "completion": ""}]
    assert evaluate_rows(model, tok, mc, progress=False, max_new_tokens=4) == evaluate_multiple_choice(
        model, tok, mc, progress=False)
    assert evaluate_rows(model, tok, gen, progress=False, max_new_tokens=4) == evaluate_generation(
        model, tok, gen, max_new_tokens=4, progress=False)
    with pytest.raises(ValueError, match="^chat rows are for training only"):
        evaluate_rows(model, tok, [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match="mix"):
        evaluate_rows(model, tok, mc + gen)
    with pytest.raises(ValueError, match="no rows"):
        evaluate_rows(model, tok, [])


def test_a_drlora_wrapper_generates_through_its_base_model_and_keeps_its_modes():
    tok = tokenizer()
    drlora = get_dr_lora_model(generation_model(), small_config())
    train(drlora, steps=2, lr=0.05)
    drlora.train()
    drlora.get_base_model().lm_head.eval()  # a mixed state, which must come back module by module
    modes = {name: module.training for name, module in drlora.named_modules()}
    rows = [{"prompt": p, "completion": ""} for p in PROMPTS[:6]]
    predictions = generate_predictions(drlora, tok, [r["prompt"] for r in rows], batch_size=3, max_new_tokens=5,
                                       progress=False)
    assert {name: module.training for name, module in drlora.named_modules()} == modes
    drlora.eval()
    assert predictions == [reference_generation(drlora, tok, r["prompt"], 5)[0] for r in rows]
    drlora.train()
    drlora.get_base_model().lm_head.eval()
    evaluate_generation(drlora, tok, rows, max_new_tokens=5, progress=False)
    evaluate_multiple_choice(drlora, tok, [{"prompt": "a", "choices": [" b", " c"], "label": 0}], progress=False)
    assert {name: module.training for name, module in drlora.named_modules()} == modes


def test_pairs_with_the_same_input_share_one_forward_pass():
    model, tok = tiny_moe("olmoe"), tokenizer()
    pairs = [("the cat sat on the", c) for c in (" mat", " dog", " red")] + [("a big", " dog"), ("a big", " red cat")]
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    scores = loglikelihoods(model, tok, pairs, batch_size=1, progress=False)
    handle.remove()
    # one input for the three one-token answers; " dog" after "a big" is read off the forward of "a big red"
    assert len(calls) == 2
    for (context, continuation), score in zip(pairs, scores):
        assert abs(score - reference_loglikelihood(model, tok, context, continuation)) < 1e-4
