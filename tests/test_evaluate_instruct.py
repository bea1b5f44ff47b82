"""recipes/evaluate_instruct.py end to end through the real lm-eval (HFLM on the live model, simple_evaluate, the
tiny local tasks in recipes/tasks), checked against log-likelihoods and greedy generations computed here."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import transformers as tf

pytest.importorskip("lm_eval")

import lor2c_hf  # noqa: E402
from lor2c_hf.extras import instruct_eval as ev  # noqa: E402
from tiny_pretrained import save_tiny_pretrained  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

sys.path.insert(0, os.path.join(REPO, "recipes"))
import evaluate_instruct  # noqa: E402

TASKS = os.path.join(REPO, "recipes", "tasks")
DATA = os.path.join(TASKS, "data")
TEMPLATE_WORDS = "question answer q a the following are multiple choice questions with answers about . : \n"


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def task_docs(name):
    return read_jsonl(os.path.join(DATA, name, "dev.jsonl")), read_jsonl(os.path.join(DATA, name, "test.jsonl"))


def example_text(doc):
    choice = doc["choices"][doc["answer"]] if "choices" in doc else doc["answer"]
    return f"Question: {doc['question']}\nAnswer: {choice}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama folder (tokenizer trained on the task texts) and a MergeLoR2C adapter trained a few steps,
    one merge included; the trained model stays in memory as the reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluate_instruct")
    docs = [d for name in ("tiny_mc", "tiny_gen") for split in task_docs(name) for d in split]
    texts = [json.dumps(d) for d in docs] + [TEMPLATE_WORDS]
    base_dir = save_tiny_pretrained(str(root / "base"), texts, num_layers=4, seed=0)
    tokenizer = tf.AutoTokenizer.from_pretrained(base_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(base_dir)
    wrapped = lor2c_hf.get_lor2c_model(model, lor2c_hf.LoR2CConfig.for_method("mergelor2c", r=4, num_merges=1, lora_dropout=0.0))
    wrapped.train()
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=3e-2)
    padding = tf.AutoTokenizer.from_pretrained(base_dir, pad_token="<pad>")
    batch = padding([example_text(d) for d in task_docs("tiny_mc")[1]], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for step in range(6):
        loss = wrapped(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 2:
            wrapped.apply_merge(step=step + 1)
    wrapped.eval()
    assert wrapped.structure["events"], "the adapter should carry a merge event"
    adapter_dir = str(root / "adapter")
    wrapped.save_pretrained(adapter_dir)
    base = tf.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    yield {"root": root, "base_dir": base_dir, "adapter_dir": adapter_dir, "tokenizer": tokenizer,
           "adapted": wrapped, "base": base}
    torch.set_num_threads(threads)


# --- independent reference computations ------------------------------------------------------------------


def continuation_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log-probabilities of the continuation's tokens given the context (tokens of context+continuation
    past those of the context, as a causal LM scores a choice)."""
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def mc_reference(model, tokenizer, shots: int = 2, limit: int = None):
    """Per-document (context, per-choice log-likelihoods) and acc / acc_norm for tiny_mc, formatted here."""
    dev, test = task_docs("tiny_mc")
    test = test[:limit]
    fewshot = "".join(example_text(d) + "\n\n" for d in dev[:shots])
    rows, acc, acc_norm = [], 0.0, 0.0
    for doc in test:
        context = fewshot + f"Question: {doc['question']}\nAnswer:"
        lls = [continuation_loglik(model, tokenizer, context, " " + c) for c in doc["choices"]]
        rows.append((context, lls))
        acc += float(max(range(len(lls)), key=lls.__getitem__) == doc["answer"])
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        acc_norm += float(max(range(len(normed)), key=normed.__getitem__) == doc["answer"])
    return rows, acc / len(test), acc_norm / len(test)


def gen_reference(model, tokenizer, max_new_tokens: int = 5, stops=("\n", ".")):
    """Greedy answers to tiny_gen (1-shot), cut at the stop strings and stripped, and their exact match."""
    dev, test = task_docs("tiny_gen")
    fewshot = f"Q: {dev[0]['question']}\nA: {dev[0]['answer']}\n\n"
    answers = []
    for doc in test:
        ids = tokenizer(fewshot + f"Q: {doc['question']}\nA:", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.unk_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        for stop in stops:
            text = text.split(stop)[0]
        answers.append(text.strip())
    em = sum(a.lower() == d["answer"].lower() for a, d in zip(answers, test)) / len(test)
    return answers, em


# --- tests ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tiny):
    """One run of the entry point: adapter and base rows on tiny_mc and tiny_gen, samples logged."""
    out = str(tiny["root"] / "report")
    code = evaluate_instruct.main([
        "--base", tiny["base_dir"], "--adapter", tiny["adapter_dir"], "--tasks", "tiny_mc,tiny_gen",
        "--include_path", TASKS, "--with_base", "--output_dir", out, "--log_samples", "--bootstrap_iters", "0",
        "--device", "cpu", "--batch_size", "2"])
    assert code == 0
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        report = json.load(f)
    return out, report


def samples(out, row, task):
    return read_jsonl(os.path.join(out, "samples", row, f"{task}.jsonl"))


@pytest.mark.parametrize("row", ["adapter", "base"])
def test_multiple_choice_scores_match_direct_log_likelihoods(tiny, tiny_run, row):
    out, report = tiny_run
    model = tiny["adapted"] if row == "adapter" else tiny["base"]
    reference, acc, acc_norm = mc_reference(model, tiny["tokenizer"])
    records = sorted(samples(out, row, "tiny_mc"), key=lambda r: r["doc_id"])
    assert len(records) == len(reference) == 12
    for record, (context, lls) in zip(records, reference):
        assert [a[0] for a in record["arguments"]] == [context] * len(lls)  # same few-shot formatting
        reported = [r[0] for r in record["filtered_resps"]]
        assert reported == pytest.approx(lls, abs=2e-4)
    scores = report["scores"][row]["tiny_mc"]
    assert scores["acc"] == pytest.approx(acc, abs=1e-9)
    assert scores["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)


def test_adapter_changes_the_scores_it_reports(tiny, tiny_run):
    out, _ = tiny_run
    adapter = [r[0] for rec in samples(out, "adapter", "tiny_mc") for r in rec["filtered_resps"]]
    base = [r[0] for rec in samples(out, "base", "tiny_mc") for r in rec["filtered_resps"]]
    assert max(abs(a - b) for a, b in zip(adapter, base)) > 1e-2  # the adapter was applied, and removed for base


def test_generation_task_matches_direct_greedy_decoding(tiny, tiny_run):
    out, report = tiny_run
    for row, model in (("adapter", tiny["adapted"]), ("base", tiny["base"])):
        answers, em = gen_reference(model, tiny["tokenizer"])
        records = sorted(samples(out, row, "tiny_gen"), key=lambda r: r["doc_id"])
        assert [r["filtered_resps"][0] for r in records] == answers
        assert report["scores"][row]["tiny_gen"]["exact_match,strip"] == pytest.approx(em)


def test_report_files_have_both_rows_and_the_table(tiny, tiny_run):
    out, report = tiny_run
    assert list(report["scores"]) == ["base", "adapter"]
    assert report["meta"]["adapter_kind"] == "mergelor2c"
    assert report["meta"]["num_fewshot"] == {"tiny_mc": 2, "tiny_gen": 1}
    assert report["headline"] == {"tiny_mc": "acc", "tiny_gen": "exact_match,strip"}
    assert report["lm_eval"]["adapter"]["n-shot"]["tiny_mc"] == 2
    with open(os.path.join(out, "results.md"), encoding="utf-8") as f:
        markdown = f.read()
    rows = [line for line in markdown.splitlines() if line.startswith("| base:") or line.startswith("| mergelor2c:")]
    assert len(rows) == 2
    acc = report["scores"]["adapter"]["tiny_mc"]["acc"]
    assert f"{100 * acc:.2f}" in rows[1]
    assert "tiny_mc acc (2-shot)" in markdown


def test_without_base_there_is_one_row_and_shots_can_be_overridden(tiny, tmp_path):
    out = str(tmp_path / "report")
    code = evaluate_instruct.main([
        "--base", tiny["base_dir"], "--adapter", tiny["adapter_dir"], "--tasks", "tiny_mc", "--limit", "3",
        "--num_fewshot", "tiny_mc=1", "--include_path", TASKS, "--output_dir", out, "--bootstrap_iters", "0",
        "--device", "cpu"])
    assert code == 0
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert list(report["scores"]) == ["adapter"]
    assert report["meta"]["num_fewshot"] == {"tiny_mc": 1}
    assert report["lm_eval"]["adapter"]["n-samples"]["tiny_mc"]["effective"] == 3
    _, acc, acc_norm = mc_reference(tiny["adapted"], tiny["tokenizer"], shots=1, limit=3)
    assert report["scores"]["adapter"]["tiny_mc"]["acc"] == pytest.approx(acc)
    assert report["scores"]["adapter"]["tiny_mc"]["acc_norm"] == pytest.approx(acc_norm)


def test_peft_lora_adapter_is_scored_like_the_in_memory_model(tiny, tmp_path):
    """A PEFT LoRA adapter (the baseline) goes through the same entry point; its scores match the PeftModel. Its
    saved lm_head replaces the base's, so the base row must come from the untouched base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    base = tf.AutoModelForCausalLM.from_pretrained(tiny["base_dir"])
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, modules_to_save=["lm_head"])
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    peft_model.eval().save_pretrained(str(tmp_path / "peft"))
    out = str(tmp_path / "report")
    code = evaluate_instruct.main([
        "--base", tiny["base_dir"], "--adapter", str(tmp_path / "peft"), "--tasks", "tiny_mc", "--limit", "4",
        "--include_path", TASKS, "--output_dir", out, "--bootstrap_iters", "0", "--device", "cpu", "--log_samples",
        "--with_base"])
    assert code == 0
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["meta"]["adapter_kind"] == "peft:lora"
    for row, model in (("adapter", peft_model), ("base", tiny["base"])):
        reference, acc, acc_norm = mc_reference(model, tiny["tokenizer"], limit=4)
        records = sorted(samples(out, row, "tiny_mc"), key=lambda r: r["doc_id"])
        for record, (_, lls) in zip(records, reference, strict=True):
            assert [r[0] for r in record["filtered_resps"]] == pytest.approx(lls, abs=2e-4)
        assert report["scores"][row]["tiny_mc"]["acc"] == pytest.approx(acc)
        assert report["scores"][row]["tiny_mc"]["acc_norm"] == pytest.approx(acc_norm)


def test_humaneval_without_confirmation_is_refused_before_loading(tiny, tmp_path, capsys):
    humaneval_dir = os.path.join(os.path.dirname(__import__("lm_eval").__file__), "tasks", "humaneval")
    for tasks, include in (("humaneval", humaneval_dir), ("local_humaneval", TASKS)):
        code = evaluate_instruct.run_recipe(evaluate_instruct.main, [
            "--base", tiny["base_dir"], "--adapter", tiny["adapter_dir"], "--tasks", tasks, "--include_path", include,
            "--output_dir", str(tmp_path / tasks)])
        err = capsys.readouterr().err
        assert code == 2
        assert "--confirm_run_unsafe_code" in err and "execute" in err and tasks in err
        assert len(err.strip().splitlines()) == 1
        assert not os.path.exists(tmp_path / tasks)


def test_help_says_humaneval_runs_generated_code(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_instruct.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--confirm_run_unsafe_code" in text and "--base" in text and "--with_base" in text
    assert "EXECUTE the code the model generates" in text


@pytest.mark.parametrize("argv, expected", [
    (["--adapter", "/no/such/adapter"], "/no/such/adapter"),
    (["--num_fewshot", "tiny_mc=x"], "--num_fewshot tiny_mc='x'"),
    (["--num_fewshot", "mmlu=5"], "'mmlu', which is not among --tasks"),
    (["--batch_size", "0"], "--batch_size '0'"),
    (["--include_path", "/no/such/tasks"], "--include_path"),
])
def test_bad_input_is_one_line_naming_the_argument(tiny, tmp_path, capsys, argv, expected):
    defaults = {"--adapter": tiny["adapter_dir"], "--tasks": "tiny_mc", "--include_path": TASKS}
    given = dict(zip(argv[::2], argv[1::2]))
    args = ["--base", tiny["base_dir"], "--output_dir", str(tmp_path / "out")]
    for flag, value in {**defaults, **given}.items():
        args += [flag, value]
    code = evaluate_instruct.run_recipe(evaluate_instruct.main, args)
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


# --- library: adapters of every kind, local task data ---------------------------------------------------------


def test_adapter_kinds_are_detected_and_loaded_for_evaluation(tiny, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    ids = torch.tensor([[2, 5, 7, 9, 11]])
    fresh = lambda: tf.AutoModelForCausalLM.from_pretrained(tiny["base_dir"])  # noqa: E731
    model, kind = ev.load_adapter_for_evaluation(fresh(), tiny["adapter_dir"])
    assert kind == "mergelor2c" and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny["adapted"](ids).logits)

    peft_model = get_peft_model(fresh(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    loaded, kind = ev.load_adapter_for_evaluation(fresh(), str(tmp_path / "peft"))
    assert kind == "peft:lora" and isinstance(loaded, PeftModel)
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, peft_model.eval()(ids).logits)

    reslora = lor2c_hf.get_reslora_model(fresh(), lor2c_hf.ResLoRAConfig(r=2, res_flag="bs", pre_num=2))
    reslora.save_pretrained(str(tmp_path / "reslora"))
    assert ev.load_adapter_for_evaluation(fresh(), str(tmp_path / "reslora"))[1] == "reslora"

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text('{"method": "prefix"}')
    with pytest.raises(lor2c_hf.AdapterLoadError, match="neither a lor2c_hf adapter"):
        ev.load_adapter_for_evaluation(fresh(), str(tmp_path / "other"))


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_paper_shaped_local_task_yamls_run_on_local_files(tiny, tmp_path, monkeypatch):
    """local_mmlu / local_bbh / local_drop read files under LOR2C_TASK_DATA in the Hub data sets' schemas."""
    data = tmp_path / "data"
    mmlu = [{"question": f"Which animal says moo {i}?", "subject": "animal_sounds", "choices": ["cow", "cat", "dog", "duck"],
             "answer": i % 4} for i in range(7)]
    write_jsonl(data / "mmlu" / "dev.jsonl", mmlu[:5])
    write_jsonl(data / "mmlu" / "test.jsonl", mmlu[5:])
    bbh = [{"input": f"not ( True ) and {v} is", "target": str(not v)} for v in (True, False, True, False, True)]
    write_jsonl(data / "bbh" / "fewshot.jsonl", bbh[:3])
    write_jsonl(data / "bbh" / "test.jsonl", bbh[3:])
    empty_date = {"day": "", "month": "", "year": ""}
    drop = [{"query_id": str(i), "passage": f"The cow had {i} calves.", "question": "How many calves?",
             "answer": {"number": str(i), "date": empty_date, "spans": []},
             "validated_answers": {"number": [str(i)], "date": [empty_date], "spans": [[]]}} for i in range(6)]
    write_jsonl(data / "drop" / "train.jsonl", drop[:4])
    write_jsonl(data / "drop" / "validation.jsonl", drop[4:])
    monkeypatch.setenv("LOR2C_TASK_DATA", str(data))
    out = str(tmp_path / "report")
    code = evaluate_instruct.main([
        "--base", tiny["base_dir"], "--adapter", tiny["adapter_dir"], "--tasks", "local_mmlu,local_bbh,local_drop",
        "--include_path", TASKS, "--limit", "2", "--output_dir", out, "--bootstrap_iters", "0", "--device", "cpu"])
    assert code == 0
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["meta"]["num_fewshot"] == {"local_mmlu": 5, "local_bbh": 3, "local_drop": 3}
    scores = report["scores"]["adapter"]
    assert set(scores["local_mmlu"]) >= {"acc"} and set(scores["local_drop"]) >= {"em", "f1"}
    assert "exact_match" in scores["local_bbh"]
    assert report["headline"] == {"local_mmlu": "acc", "local_bbh": "exact_match", "local_drop": "f1"}
    assert all(0.0 <= v <= 1.0 for task in scores.values() for k, v in task.items() if "stderr" not in k)


def test_missing_local_task_data_names_the_file_and_the_variable(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOR2C_TASK_DATA", str(tmp_path / "empty"))
    code = evaluate_instruct.run_recipe(evaluate_instruct.main, [
        "--base", tiny["base_dir"], "--adapter", tiny["adapter_dir"], "--tasks", "local_mmlu",
        "--include_path", TASKS, "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "mmlu/dev.jsonl" in err and "LOR2C_TASK_DATA" in err


def test_num_fewshot_defaults_are_the_papers():
    assert ev.parse_num_fewshot(None, ["mmlu", "bbh", "drop", "humaneval", "tiny_mc"]) == {
        "mmlu": 5, "bbh": 3, "drop": 3, "humaneval": 0, "tiny_mc": None}
    assert ev.parse_num_fewshot("0", ["mmlu", "bbh"]) == {"mmlu": 0, "bbh": 0}
    assert ev.lm_eval_task_name("bbh") == "bbh_fewshot" and ev.lm_eval_task_name("tiny_mc") == "tiny_mc"
