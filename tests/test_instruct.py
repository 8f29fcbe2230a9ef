"""Instruction tuning on tiny random-init Llama and GPT-2 with a tiny chat template: the
loss sees the response only, nothing is cut silently, scoring is by generated text."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config, write_csv
from fedtune.data.tables import IGNORE_INDEX
from fedtune.errors import ConfigError, DataError
from fedtune.data.instruct import encode_instruct, exact_match, normalise_answer, render
from fedtune.models.base import load_tokenizer


@pytest.fixture(params=["tiny_chat_llama", "tiny_chat_gpt2", "tiny_llama"])
def instruct_model(request):
    """Both architectures with a chat template, and one tokenizer without (plain template)."""
    return request.getfixturevalue(request.param)


def _response_tokens(encoding, row: int) -> list[int]:
    return [int(t) for t in encoding.labels[row] if t != IGNORE_INDEX]


def test_loss_mask_covers_only_the_response(instruct_model):
    tokenizer = load_tokenizer(instruct_model)
    prompts, responses = ["classify: great superb film", "classify: awful dreadful plot"], ["pos", "neg"]
    encoding = encode_instruct(tokenizer, prompts, responses, 48)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        prompt_text, response_text = render(tokenizer, [{"role": "user", "content": prompt}], response)
        expected = tokenizer(response_text, add_special_tokens=False)["input_ids"]
        labelled = _response_tokens(encoding, row)
        assert labelled == expected  # exactly the response (with its end marker), nothing of the prompt
        length = int(encoding.attention_mask[row].sum())
        prompt_len = len(encoding.prompt_ids[row])
        assert (encoding.labels[row, :prompt_len] == IGNORE_INDEX).all()  # every prompt token masked
        assert encoding.input_ids[row, prompt_len:length].tolist() == expected  # the labels sit on the response
        assert (encoding.labels[row, length:] == IGNORE_INDEX).all()  # and padding
        assert response in tokenizer.decode(labelled)


def test_a_too_long_response_is_skipped_and_counted_never_cut(tiny_chat_llama):
    tokenizer = load_tokenizer(tiny_chat_llama)
    long_answer = " ".join(["superb"] * 40)
    encoding = encode_instruct(tokenizer, ["classify: fine", "classify: good", "classify: ok"],
                               ["pos", long_answer, "neg"], max_len=24)
    assert encoding.skipped == [1] and encoding.kept == [0, 2]
    assert encoding.summary() == {"examples": 3, "kept": 2, "skipped_response_too_long": 1, "prompts_shortened": 0}
    for row in range(2):  # what is kept holds its whole response
        assert tokenizer.decode(_response_tokens(encoding, row)).split()[0] in ("pos", "neg")


def test_a_too_long_prompt_is_shortened_and_counted_the_response_kept_whole(tiny_chat_llama):
    tokenizer = load_tokenizer(tiny_chat_llama)
    prompt = "classify: " + " ".join(["wonderful film"] * 30)
    encoding = encode_instruct(tokenizer, [prompt], ["positive answer"], max_len=32)
    assert encoding.kept == [0] and encoding.truncated == 1
    assert int(encoding.attention_mask[0].sum()) <= 32
    _, response_text = render(tokenizer, [{"role": "user", "content": prompt}], "positive answer")
    assert _response_tokens(encoding, 0) == tokenizer(response_text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(encoding.prompt_ids[0]).rstrip().endswith("assistant :")  # the template survives


def test_messages_column_is_read_and_bad_messages_are_one_line_errors(tmp_path, tiny_chat_llama):
    from fedtune.config import build_config
    from fedtune.data.tables import read_instruct_table

    good = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "classify: great"},
            {"role": "assistant", "content": "pos"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": good}) + "\n", encoding="utf-8")
    config = build_config({"model": {"task": "instruct"}, "data": {"path": str(path), "messages_column": "messages"}})
    table = read_instruct_table(path, config.data)
    assert table.labels == ["pos"] and json.loads(table.texts[0]) == good[:-1]
    encoding = encode_instruct(load_tokenizer(tiny_chat_llama), table.texts, table.labels, 48, messages_mode=True)
    assert "be brief" in load_tokenizer(tiny_chat_llama).decode(encoding.prompt_ids[0])
    path.write_text(json.dumps({"messages": good[:-1]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"chat.jsonl: row 1: the last message must be the assistant"):
        read_instruct_table(path, config.data)


def test_a_conversation_the_chat_template_refuses_is_a_one_line_error(tiny_chat_llama, tmp_path):
    from transformers import AutoTokenizer

    strict = tmp_path / "strict"
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('no system turns') }}{% endif %}{{ m['content'] }}{% endfor %}")
    tokenizer.save_pretrained(strict)
    turns = json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    with pytest.raises(DataError, match=r"chat template refused a conversation with roles \[system, user\]"):
        encode_instruct(load_tokenizer(strict), [turns], ["ok"], 32, messages_mode=True)


def test_normalised_exact_match():
    assert normalise_answer("  Positive.\nBecause the tweet...") == "positive"
    assert normalise_answer('"Neutral"') == "neutral"
    assert exact_match(["Positive.", "negative", "neutral!"], ["positive", "positive", "Neutral"]) == pytest.approx(2 / 3)


def test_generation_accuracy_comes_from_the_generated_text(tiny_chat_llama, instruct_csv):
    """The score is the share of greedy generations equal to the expected answer: with the
    expected answers set to what the model itself generates it is 1, with any other 0."""
    from fedtune.training.evaluate import evaluate_instruct
    from fedtune.training.local import prepare_node

    node = prepare_node(tiny_config(tiny_chat_llama, instruct_csv, model={"task": "instruct", "max_seq_len": 32}))
    prompt_ids, answers = node.data.val_prompts
    tokenizer = node.tokenizer
    own = []
    for ids in prompt_ids:  # greedy decoding, one prompt at a time, without fedtune's batching
        out = node.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=3, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        own.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    assert len({normalise_answer(a) for a in own}) >= 1
    metrics = evaluate_instruct(node.model, tokenizer, node.data.val, prompt_ids, own, max_new_tokens=3)
    assert metrics["accuracy"] == 1.0 and metrics["examples"] == len(own)
    assert metrics["samples"][0]["generated"] == own[0].strip()
    wrong = [a + " not" for a in own]
    assert evaluate_instruct(node.model, tokenizer, node.data.val, prompt_ids, wrong, max_new_tokens=3)["accuracy"] == 0
    assert metrics["loss"] > 0 and metrics["perplexity"] > 1  # the response-only teacher-forced loss


@pytest.mark.parametrize("family", ["tiny_chat_gpt2", "tiny_chat_qwen2"])
def test_train_local_instruct_writes_generation_metrics(family, instruct_csv, tmp_path, request):
    """Other causal-LM families work the same way (LoRA targets from peft's table)."""
    from fedtune.training.local import prepare_node, train_local

    node = prepare_node(tiny_config(request.getfixturevalue(family), instruct_csv,
                                    model={"task": "instruct", "max_seq_len": 32}, dp={"noise_seed": 0}))
    assert node.data.summary["train"]["kept"] == len(node.data.train)
    record = train_local(node, tmp_path / "run", echo=lambda _: None, progress=False)
    assert 0 <= record["val_accuracy"] <= 1 and record["val_perplexity"] > 1 and record["epsilon"] <= 8
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_generate_command_answers_with_a_trained_adapter(tiny_chat_llama, instruct_csv, tmp_path, capsys):
    from fedtune.cli import main
    from fedtune.training.local import prepare_node, train_local

    node = prepare_node(tiny_config(tiny_chat_llama, instruct_csv, model={"task": "instruct", "max_seq_len": 32}))
    train_local(node, tmp_path / "run", echo=lambda _: None, progress=False)
    adapter = tmp_path / "run" / "adapter"
    assert main(["generate", str(adapter), "classify: great film", "--model", str(tiny_chat_llama),
                 "--max-new-tokens", "3"]) == 0
    single = capsys.readouterr().out.strip()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("classify: great film\nclassify: awful plot\n", encoding="utf-8")
    assert main(["generate", str(adapter), "--file", str(prompts), "--model", str(tiny_chat_llama),
                 "--max-new-tokens", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["classify: great film", "classify: awful plot"]
    assert lines[0]["answer"] == single  # greedy: the same prompt, the same answer
    assert main(["generate", str(adapter), "x"]) == 2  # the adapter names a folder this machine lacks
    assert "pass --model PATH" in capsys.readouterr().err


def test_impossible_adapter_settings_are_config_errors():
    from fedtune.config import build_config

    with pytest.raises(ConfigError, match=r"dp.grad_sample_mode = 'hooks': expected one of loop with adapter.method"):
        build_config({"adapter": {"method": "ia3"}})
    with pytest.raises(ConfigError, match=r"adapter.method = 'prefix': expected one for task 'classification'"):
        build_config({"adapter": {"method": "prefix"}})
    build_config({"adapter": {"method": "ia3"}, "dp": {"grad_sample_mode": "loop"}})
    build_config({"adapter": {"method": "prefix"}, "model": {"task": "instruct"}})


def test_instruct_rows_without_their_columns_are_one_line_errors(tmp_path):
    from fedtune.config import build_config
    from fedtune.data.tables import load_table

    path = write_csv(tmp_path / "plain.csv", [("great", "pos")])
    config = build_config({"model": {"task": "instruct"}, "data": {"path": str(path)}})
    with pytest.raises(DataError, match=r"plain.csv: missing column 'prompt'"):
        load_table(config.data, "instruct")


def test_simulate_task_instruct_defaults_to_the_smollm2_federation():
    from fedtune.config import load_config
    from fedtune.training.model_card import base_model_reference
    from simulations.defaults import default_config_path

    config = load_config(default_config_path("instruct"))
    assert config.model.task == "instruct" and config.data.dataset == "tweets-instruct"
    assert base_model_reference(config) == "smollm2-135m-instruct" and config.dp.enabled
    assert default_config_path(None).endswith("default.toml")


def test_builtin_instruct_tasks_have_fixed_held_out_rows():
    from fedtune.data.named import fixed_split, load_builtin

    first, second = fixed_split(load_builtin("tweets-instruct")), fixed_split(load_builtin("tweets-instruct"))
    assert len(first[1]) == 300 and first[1].texts == second[1].texts  # the same rows on every load
    assert len(first[0]) + len(first[1]) == 38158
    assert set(first[1].labels) <= {"negative", "neutral", "positive"}
    assert first[1].texts[0].startswith("Classify the sentiment of this tweet")
