"""The adapter-method seam: a new PEFT method registered in a test (rank-stabilised LoRA on
every attention projection, through peft) trains under DP at a node, is aggregated by the
server and reported, without a line of federation, node or report code changed."""

import time

import numpy as np
from peft import LoraConfig, TaskType, get_peft_model

from clients.node import NodeSetup, train_round
from fedtune.models import adapter_methods as adapters
from fedtune.models.adapter_io import adapter_state, trainable_keys
from fedtune.federation.server import ClientReply, FederationServer
from fedtune.privacy.policy import NodePolicy, server_request
from fedtune.reporting.run_report import write_report
from fedtune.training.model_cache import MODELS
from tests.conftest import make_texts, tiny_config, write_csv


def _attach_rslora(base, config):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.training.seed)  # the same initial adapter on every node
        return get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, use_rslora=True,
                                               target_modules=["query", "key", "value"], modules_to_save=["classifier"]))


def test_a_new_adapter_method_is_one_registry_entry(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setitem(adapters.ADAPTER_METHODS, "rslora-qkv",
                        adapters.AdapterMethod(_attach_rslora, lambda config: "rank-stabilised LoRA r4 on q, k, v"))
    replies = []
    for node in (1, 2):
        data = write_csv(tmp_path / f"node-{node}.csv", make_texts(60, seed=node))
        config = tiny_config(tiny_bert, data, adapter={"method": "rslora-qkv"}, data={"labels": ["neg", "pos"]},
                             training={"rounds": 1, "batch_size": 8})
        config = config.replace(node=config.node.__class__(budget_dir=str(tmp_path / f"budget-{node}")))
        model, _ = MODELS.get(config, 2)
        initial = adapter_state(model)
        assert any(".lora_A." in k and "key" in k for k in initial)  # the new method's shape, not the default LoRA
        outcome = train_round(NodeSetup(NodePolicy.from_config(config), tmp_path / f"state-{node}"),
                              server_request(config), initial, 1)
        assert outcome.status == "ok", outcome.message
        replies.append(ClientReply(node, "ok", outcome.arrays, outcome.num_examples, outcome.epsilon))
    server = FederationServer(config, tmp_path / "run", initial, trainable_keys(model))
    server.finish_round(1, replies, time.perf_counter(), 0)
    assert not all(np.array_equal(server.adapter[k], initial[k]) for k in initial)
    (tmp_path / "run" / "config.toml").write_text(config.to_toml())
    write_report(tmp_path / "run")
    assert "rank-stabilised LoRA r4 on q, k, v" in (tmp_path / "run" / "summary.md").read_text()
