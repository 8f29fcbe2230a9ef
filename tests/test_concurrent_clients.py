"""Several virtual clients training at once in one process (the in-process engine's slots:
on a GPU one CUDA stream each; here on the CPU, one thread each), checked for what matters
on any device: they really overlap, each trains its own model, and the federation's result
and every ledger are those of the same run one client at a time."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from fedtune.privacy import PrivacyLedger
from fedtune.training.model_cache import MODELS, model_slot
from simulations.in_process import ComputeSlots
from tests.conftest import make_texts, tiny_config, write_csv


def test_two_slots_run_two_calls_at_once_each_in_its_own_model_slot():
    from fedtune.training import model_cache

    slots = ComputeSlots(2)
    both_inside = threading.Barrier(2, timeout=20)  # one slot alone would wait here forever

    def work():
        both_inside.wait()
        return model_cache._SLOT.slot, threading.get_ident()

    try:
        results: list = []
        callers = [threading.Thread(target=lambda: results.append(slots(work))) for _ in range(2)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(30)
        assert sorted(slot for slot, _ in results) == [0, 1]
        assert len({thread for _, thread in results}) == 2
    finally:
        slots.close()


def test_each_slot_holds_its_own_model(tiny_bert, sentiment_csv):
    config = tiny_config(tiny_bert, sentiment_csv)
    MODELS.clear()
    with model_slot(0):
        first, _ = MODELS.get(config, 2)
        again, _ = MODELS.get(config, 2)
    with model_slot(1):
        second, _ = MODELS.get(config, 2)
    assert first is again and first is not second
    assert not set(map(id, first.parameters())) & set(map(id, second.parameters()))
    MODELS.clear()


def _run(tiny_bert, data, out, cpus_per_client):
    from simulations.run import simulate

    config = tiny_config(tiny_bert, data, training={"rounds": 2, "batch_size": 8},
                         lora={"dropout": 0.0},  # (see tiny_bert_without_dropout)
                         dp={"noise_seed": 0, "target_epsilon": 8.0},
                         federation={"clients_per_round": 4, "min_clients": 4},
                         simulation={"num_clients": 4})
    MODELS.clear()
    lines: list[str] = []
    run = simulate(config, out, num_cpus_per_client=cpus_per_client, engine="in-process", log=lines.append)
    slots_used = len(MODELS._entries)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ledgers = {p.parent.name: PrivacyLedger.load(p) for p in sorted((run / "clients").glob("client-*/ledger-*.json"))}
    from safetensors.numpy import load_file

    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    return lines, slots_used, records, ledgers, adapter


def test_clients_trained_at_once_give_the_federation_and_the_ledgers_of_one_at_a_time(tiny_bert_without_dropout,
                                                                                     tmp_path):
    cores = os.cpu_count() or 1
    if cores < 2:
        pytest.skip("one core: one slot")
    import torch

    data = write_csv(tmp_path / "rows.csv", make_texts(160, seed=8))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))  # what each of the two slots gets: the same float arithmetic
    try:
        one = _run(tiny_bert_without_dropout, data, tmp_path / "one", float(cores))
    finally:
        torch.set_num_threads(threads)
    two = _run(tiny_bert_without_dropout, data, tmp_path / "two", cores / 2)

    assert "simulation engine: in-process (one client at a time, in this process)" in one[0]
    assert "simulation engine: in-process (2 clients at a time in this process, one thread each)" in two[0]
    assert (one[1], two[1]) == (1, 2)  # a model per slot
    for a, b in zip(one[2], two[2]):
        assert len(a["clients_accepted"]) == len(b["clients_accepted"]) == 4
        assert a["epsilon_max"] == pytest.approx(b["epsilon_max"], rel=1e-12)
    assert one[3].keys() == two[3].keys() and len(one[3]) == 4
    for name, ledger in one[3].items():
        other = two[3][name]
        assert [c.get("steps") for c in ledger.calls] == [c.get("steps") for c in other.calls]
        assert ledger.epsilon() == pytest.approx(other.epsilon(), rel=1e-12)
    assert one[4].keys() == two[4].keys()
    for key in one[4]:  # the same Poisson batches and noise, the same arithmetic, replies summed in node order
        np.testing.assert_array_equal(one[4][key], two[4][key])
