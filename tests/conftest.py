"""Shared fixtures: tiny random-init transformers models saved to local folders (with the
bundled MiniLM tokenizer, so nothing is downloaded) and small labelled data files."""

from __future__ import annotations

import json
import csv
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

POSITIVE = "great wonderful superb lovely excellent happy".split()
NEGATIVE = "terrible awful dreadful poor horrible sad".split()
FILLER = "the a film story plot actor scene music we it was and".split()


def make_texts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.choices(FILLER, k=6) + rng.choices(POSITIVE if label == "pos" else NEGATIVE, k=3)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fedtune-cache"))
    # each test its own budget folder: a budget belongs to the data, and the tests reuse data files
    monkeypatch.setenv("FEDTUNE_HOME", str(tmp_path_factory.mktemp("fedtune-home")))


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    from fedtune.models.base import bundled_model_path

    return bundled_model_path()


def _save_tiny(kind: str, directory: Path, tokenizer_dir: Path) -> Path:
    from transformers import (AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                             pad_token_id=tokenizer.pad_token_id))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                             pad_token_id=tokenizer.pad_token_id))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                           pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tokenizer_dir) -> Path:
    return _save_tiny("bert", tmp_path_factory.mktemp("tiny-bert"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_bert_without_dropout(tiny_bert, tmp_path_factory):
    """The tiny model with its dropout at 0 (attention dropout too): for tests that need every
    row's gradient, or every client's training, free of torch's process-wide generator."""
    import shutil

    copy = tmp_path_factory.mktemp("tiny-bert-no-dropout") / "model"
    shutil.copytree(tiny_bert, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    return _save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer_dir) -> Path:
    return _save_tiny("gpt2", tmp_path_factory.mktemp("tiny-gpt2"), tokenizer_dir)


TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                      "{% if add_generation_prompt %}assistant : {% endif %}")


def _with_chat_template(source: Path, directory: Path) -> Path:
    """A copy of a tiny model whose tokenizer has a (tiny) chat template and [SEP] as EOS."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(source, directory, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory, tiny_llama) -> Path:
    return _with_chat_template(tiny_llama, tmp_path_factory.mktemp("tiny-chat-llama"))


@pytest.fixture(scope="session")
def tiny_chat_qwen2(tmp_path_factory, tokenizer_dir) -> Path:
    tiny = _save_tiny("qwen2", tmp_path_factory.mktemp("tiny-qwen2"), tokenizer_dir)
    return _with_chat_template(tiny, tmp_path_factory.mktemp("tiny-chat-qwen2"))


@pytest.fixture(scope="session")
def tiny_chat_gpt2(tmp_path_factory, tiny_gpt2) -> Path:
    return _with_chat_template(tiny_gpt2, tmp_path_factory.mktemp("tiny-chat-gpt2"))


def make_instruct_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, response) rows: the answer is a word of the prompt, so a model can learn it."""
    rows = []
    for prompt, label in make_texts(n, seed):
        rows.append((f"classify: {prompt}", label))
    return rows


@pytest.fixture(scope="session")
def instruct_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "instruct.csv", make_instruct_rows(120), ("prompt", "response"))


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", make_texts(120))


def tiny_config(model_dir: Path, data_path: Path, **sections):
    """A fast config on a tiny model: sections override defaults, e.g. dp={"enabled": False}."""
    from fedtune.config import build_config

    raw = {
        "model": {"path": str(model_dir), "max_seq_len": 16},
        "training": {"epochs": 1, "batch_size": 16, "learning_rate": 0.01},
        "data": {"path": str(data_path)},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return build_config(raw)


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(header))
        writer.writerows(rows)
    return path


def delivered(message_type: str, server_round: int, request_toml: str, arrays: dict, evaluation: str = "federated",
              node_id: int = 5):
    """A server message as a SuperNode receives it (metadata set by the SuperLink)."""
    import time

    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict

    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "config": ConfigRecord({"server-round": server_round, "fedtune-request": request_toml,
                                                  "evaluation": evaluation})})
    metadata = Metadata(run_id=1, message_id=f"m{server_round}", src_node_id=0, dst_node_id=node_id,
                        reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=3600,
                        message_type=message_type)
    return Message(content=content, metadata=metadata)


def node_context(node_config: dict, node_id: int = 5):
    """The Context a deployed SuperNode gives its ClientApp: only the node sets node_config."""
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (the end-to-end tests' SuperLinks and SuperNodes)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_group(process, timeout: float = 20) -> None:
    """Stop a process started with start_new_session=True, and everything it started, by its
    PID: SIGTERM to its group, SIGKILL if it has not ended within `timeout`."""
    import signal
    import subprocess

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
