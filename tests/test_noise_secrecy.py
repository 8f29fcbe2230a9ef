"""Noise nobody else can reproduce: the replay attack a curious server would run.

The server knows the request (training.seed included), the global adapter, the round,
the node's step count (released) and, in the worst case, the node's very rows. With the
noise seeded from any of that, it replays the round on a candidate dataset and matches
the release bit for bit (a perfect membership test). fedtune's noise is secret: no seed
the server knows reproduces a release. A reproducible seed exists only when a
simulation's config asks for one, and then the replay works, which is exactly why it is
labelled not for production."""

import dataclasses

import numpy as np
import torch

from clients.node import NodeSetup, train_round
from fedtune.models.adapter_io import adapter_state
from fedtune.privacy.policy import NodePolicy, server_request
from fedtune.privacy.randomness import REPRODUCIBLE_LABEL, Randomness
from fedtune.training.model_cache import MODELS
from tests.conftest import make_texts, tiny_config, write_csv


def _config(tiny_bert, data, noise_seed=-1, **dp):
    return tiny_config(tiny_bert, data, dp={"noise_seed": noise_seed, **dp}, data={"labels": ["neg", "pos"]},
                       training={"epochs": 1, "batch_size": 8, "rounds": 2, "seed": 0})


def _release(config, state_dir, arrays, server_round=1):
    """One round on a fresh state dir and budget: what the node sends back."""
    own = config.replace(node=dataclasses.replace(config.node, budget_dir=str(state_dir / "budget")))
    outcome = train_round(NodeSetup(NodePolicy.from_config(own), state_dir), server_request(config), arrays, server_round)
    assert outcome.status == "ok", outcome.message
    return outcome


def _same(a, b) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_no_seed_the_server_knows_replays_a_release(tiny_bert, tmp_path):
    data = write_csv(tmp_path / "rows.csv", make_texts(60, seed=9))
    node = _config(tiny_bert, data)
    arrays = adapter_state(MODELS.get(node, 2)[0])
    released = _release(node, tmp_path / "node", arrays)
    steps = int(released.metrics["steps"])
    known = {0, 1, steps, 5, 0 * 1_000_003 + 0, node.training.seed}  # training.seed, round, steps, node id, old formula
    for seed in sorted(known):
        replay = _release(_config(tiny_bert, data, noise_seed=seed), tmp_path / f"replay-{seed}", arrays)
        assert not _same(replay.arrays, released.arrays), f"seed {seed} replayed the release"
        torch.manual_seed(seed)  # the old scheme: the global generator seeded from public values
        again = _release(node, tmp_path / f"global-{seed}", arrays)
        assert not _same(again.arrays, released.arrays)
    assert released.noise == "noise seeded from OS entropy per call"


def test_an_explicit_simulation_seed_replays_and_says_so(tiny_bert, tmp_path):
    """With a seed in the config, the replay matches on the true rows and not on the rows
    with one record removed: the membership attack the secret noise prevents."""
    rows = make_texts(60, seed=9)
    data = write_csv(tmp_path / "rows.csv", rows)
    without_one = write_csv(tmp_path / "minus-one.csv", rows[1:])
    node = _config(tiny_bert, data, noise_seed=7)
    arrays = adapter_state(MODELS.get(node, 2)[0])
    released = _release(node, tmp_path / "node", arrays)
    assert released.noise == REPRODUCIBLE_LABEL
    assert _same(_release(node, tmp_path / "replay", arrays).arrays, released.arrays)
    assert not _same(_release(_config(tiny_bert, without_one, noise_seed=7), tmp_path / "minus", arrays).arrays,
                     released.arrays)


def test_secret_generators_differ_and_seeded_streams_repeat():
    secret = Randomness()
    assert not secret.reproducible and secret.seed_for("x") != secret.seed_for("x")
    a, b = Randomness(3), Randomness(3)
    assert a.seed_for("noise", "fp", 10) == b.seed_for("noise", "fp", 10) != a.seed_for("noise", "fp", 11)
    assert torch.equal(torch.rand(4, generator=a.torch_generator("s")), torch.rand(4, generator=b.torch_generator("s")))


def test_every_output_of_a_seeded_run_says_it_is_not_for_production(tiny_bert, sentiment_csv, tmp_path, capsys):
    import json

    from fedtune.cli import main

    out = tmp_path / "run"
    assert main(["train-local", "--model", str(tiny_bert), "--data", str(sentiment_csv), "--max-seq-len", "16",
                 "--epochs", "1", "--batch-size", "16", "--noise-seed", "3", "--no-progress", "--out", str(out)]) == 0
    assert REPRODUCIBLE_LABEL in capsys.readouterr().out
    assert json.loads((out / "plan.json").read_text())["noise"] == REPRODUCIBLE_LABEL
    assert all(json.loads(line)["noise"] == REPRODUCIBLE_LABEL for line in (out / "metrics.jsonl").read_text().splitlines())
    assert json.loads((out / "adapter" / "fedtune_privacy.json").read_text())["noise"] == REPRODUCIBLE_LABEL
