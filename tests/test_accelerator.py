"""The accelerator path: bf16 autocast under Opacus (runs on CPU too), CUDA placement and
several virtual clients sharing one GPU (those skip cleanly where no GPU is present)."""

import pytest
import torch

from fedtune.models.adapter_io import trainable_state
from fedtune.config import build_config
from fedtune.training.dp_train import autocast, train_call
from fedtune.privacy.planning import new_ledger
from fedtune.errors import ConfigError
from fedtune.training.local import prepare_node
from tests.conftest import tiny_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_autocast_runs_the_forward_pass_in_bf16():
    linear = torch.nn.Linear(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert linear(torch.ones(2, 4)).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert linear(torch.ones(2, 4)).dtype == torch.float32


def test_bf16_dp_training_updates_the_adapter_and_charges_exactly_what_ran(tiny_bert, sentiment_csv):
    node = prepare_node(tiny_config(tiny_bert, sentiment_csv, training={"precision": "bf16"}))
    before = trainable_state(node.model)
    ledger = new_ledger(node.config, node.plan)
    result = train_call(node.model, node.data.train, node.config, node.plan, ledger, None)
    after = trainable_state(node.model)
    assert result.private and result.steps == node.plan.steps_per_call
    assert all(value.dtype == before[key].dtype for key, value in after.items())  # weights stay fp32
    assert all((after[k] != before[k]).any() for k in after if ".lora_B." in k)
    assert ledger.steps == result.steps  # train_call itself checks Opacus's history against the ledger


def test_fp16_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="training.precision.*per-sample clipping"):
        build_config({"training": {"precision": "fp16"}})


@needs_cuda
def test_training_runs_on_cuda_with_bf16(tiny_bert, sentiment_csv):
    node = prepare_node(tiny_config(tiny_bert, sentiment_csv, model={"device": "cuda"}, training={"precision": "bf16"}))
    assert next(node.model.parameters()).is_cuda
    result = train_call(node.model, node.data.train, node.config, node.plan, new_ledger(node.config, node.plan), None)
    assert result.private and result.steps == node.plan.steps_per_call


@needs_cuda
def test_several_virtual_clients_share_one_gpu(tiny_bert, sentiment_csv, tmp_path):
    from fedtune.reporting.run_report import read_metrics
    from simulations.run import simulate

    config = tiny_config(tiny_bert, sentiment_csv, model={"device": "cuda"}, training={"rounds": 1, "epochs": 1},
                         federation={"clients_per_round": 4, "min_clients": 4}, simulation={"num_clients": 4})
    run_dir = simulate(config, tmp_path / "run", num_cpus_per_client=0.5, num_gpus_per_client=0.25)
    assert len(read_metrics(run_dir)) == 1


def test_gpu_share_per_client_defaults_to_none_without_cuda_and_rejects_nonsense(tmp_path, capsys):
    from fedtune.cli import main
    from simulations.run import GPU_SHARE, default_gpus_per_client

    assert default_gpus_per_client() == (GPU_SHARE if torch.cuda.is_available() else 0.0)
    assert main(["simulate", "--gpus-per-client", "1.5", "--out", str(tmp_path / "run")]) == 2
    assert "--gpus-per-client = 1.5" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
