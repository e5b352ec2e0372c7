"""lm-evaluation-harness on drlora's rows agrees with drlora's own scorer: the same acc / acc_norm, per-choice
log-likelihoods and greedy generations, on a tiny MoE and a word-level tokenizer, offline."""

import random
import sys

import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

from drlora import get_dr_lora_model, lm_eval_backend  # noqa: E402
from drlora.evaluate import (evaluate_generation, evaluate_multiple_choice, generate_predictions,  # noqa: E402
                             loglikelihoods)
from drlora.lm_eval_backend import _lm_eval, evaluate_with_lm_eval, run_lm_eval, write_task  # noqa: E402
from test_evaluate import PROMPTS, generation_model, tokenizer  # noqa: E402
from tiny_models import WORDS, small_config, tiny_moe, train  # noqa: E402


def mc_rows(n: int = 16, seed: int = 0):
    """Rows with 2-4 choices of different lengths; one prompt ends in a space (which moves to the choices, as in
    lm-eval) and one is empty (scored after the EOS token, as in lm-eval)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(2, 4)
        choices = [" " + " ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(k)]
        rows.append({"prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 6))), "choices": choices,
                     "label": rng.randrange(k)})
    rows[1] = {**rows[1], "prompt": rows[1]["prompt"] + " ", "choices": [c.lstrip() for c in rows[1]["choices"]]}
    rows[2] = {**rows[2], "prompt": ""}
    return rows


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)


def test_multiple_choice_scores_equal_lm_eval():
    model, tok, rows = tiny_moe("olmoe"), tokenizer(), mc_rows()
    ours = evaluate_multiple_choice(model, tok, rows, batch_size=5, progress=False)
    results, samples = run_lm_eval(model, tok, rows, batch_size=4, log_samples=True)
    assert (results["acc,none"], results["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])
    lls = loglikelihoods(model, tok, [(r["prompt"], c) for r in rows for c in r["choices"]], progress=False)
    theirs = [ll for sample in sorted(samples, key=lambda s: s["doc_id"]) for ll, _ in sample["filtered_resps"]]
    assert len(theirs) == len(lls) and max(abs(a - b) for a, b in zip(lls, theirs)) < 1e-4
    # the rows tell acc from acc_norm: on some row the best summed and the best per-character score differ
    scores = iter(lls)
    per_row = [[next(scores) for _ in r["choices"]] for r in rows]
    assert any(argmax(s) != argmax([x / len(c) for x, c in zip(s, r["choices"])])
               for s, r in zip(per_row, rows))


def test_generation_exact_match_equals_lm_eval():
    model, tok = generation_model(), tokenizer()
    predictions = generate_predictions(model, tok, PROMPTS, max_new_tokens=6, progress=False)
    rows = [{"prompt": p, "completion": (" " + pred + " ") if i % 3 else pred + " cat"}
            for i, (p, pred) in enumerate(zip(PROMPTS, predictions))]
    ours = evaluate_generation(model, tok, rows, batch_size=4, max_new_tokens=6, progress=False)
    results, samples = run_lm_eval(model, tok, rows, batch_size=3, max_new_tokens=6, log_samples=True)
    assert [s["filtered_resps"][0] for s in sorted(samples, key=lambda s: s["doc_id"])] == predictions
    assert results["exact_match,none"] == ours["exact_match"] == 10 / 15


def test_a_drlora_wrapper_is_scored_with_its_adapter_and_left_as_it_was(monkeypatch):
    tok, rows = tokenizer(), mc_rows(6, seed=1)
    drlora = get_dr_lora_model(tiny_moe("olmoe"), small_config())
    train(drlora, steps=3, lr=0.05)
    pairs = [(r["prompt"], c) for r in rows for c in r["choices"]]
    ours = loglikelihoods(drlora, tok, pairs, progress=False)
    expected = evaluate_multiple_choice(drlora, tok, rows, progress=False)
    seen = {}

    def keep_samples(*args, **kwargs):  # the public function's own run, with lm-eval's per-row samples kept
        seen["results"], seen["samples"] = run_lm_eval(*args, **{**kwargs, "log_samples": True})
        return seen["results"], seen["samples"]

    monkeypatch.setattr(lm_eval_backend, "run_lm_eval", keep_samples)
    drlora.train()
    assert evaluate_with_lm_eval(drlora, tok, rows, batch_size=4) == expected
    theirs = [ll for sample in sorted(seen["samples"], key=lambda s: s["doc_id"]) for ll, _ in sample["filtered_resps"]]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4
    without_adapter = loglikelihoods(tiny_moe("olmoe"), tok, pairs, progress=False)
    assert max(abs(a - b) for a, b in zip(without_adapter, theirs)) > 1e-3  # so lm-eval computed with the adapter
    assert drlora.training and drlora.get_base_model().training  # HFLM's model.eval() is undone
    assert tok.pad_token is None  # HFLM pads a copy of the tokenizer, not the caller's


def test_the_task_hands_awkward_rows_to_lm_eval_unchanged(tmp_path):
    """Quotes, braces, colons, digit-only and list-like text survive YAML and lm-eval's templating."""
    gen = [{"prompt": '42', "completion": " [1, 2]", "extra": 1}, {"prompt": "a: {{b}} 'c' \"d\"", "completion": "7"},
           {"prompt": "ünï — #x", "completion": " - yes: no"}]
    mc = [{"prompt": "12", "choices": ["34", " [5]"], "label": 1},
          {"prompt": "{% x %}", "choices": [" a", " b"], "label": 0}]
    for name, rows in (("gen_rows", gen), ("mc_rows", mc)):
        path = write_task(rows, tmp_path, name, max_new_tokens=9)
        config = yaml.safe_load(path.read_text())
        assert config["dataset_path"] == "json" and config["test_split"] == "test" and config["target_delimiter"] == ""
        assert config["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / f"{name}.jsonl").resolve())
        _, _, TaskManager = _lm_eval()
        task = TaskManager(include_path=str(tmp_path), include_defaults=False).load([name])["tasks"][name]
        docs = list(task.test_docs())
        assert [task.doc_to_text(d) for d in docs] == [r["prompt"] for r in rows]
        if name == "gen_rows":
            assert config["generation_kwargs"] == {"until": ["\n"], "do_sample": False, "max_gen_toks": 9}
            assert [task.doc_to_target(d) for d in docs] == [r["completion"] for r in rows]
        else:
            assert [task.doc_to_choice(d) for d in docs] == [r["choices"] for r in rows]
            assert [task.doc_to_target(d) for d in docs] == [r["label"] for r in rows]


def test_without_lm_eval_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install 'drlora\[eval\]'"):
        evaluate_with_lm_eval(torch.nn.Linear(1, 1), tokenizer(), [{"prompt": "a", "completion": "b"}])
