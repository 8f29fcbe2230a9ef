"""The distributed discrete Gaussian mechanism: what each node sends, what the server decodes,
and the epsilon it is charged, attacked and checked against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedtune.federation.aggregate import unflatten
from fedtune.training.distributed_step import distributed_contribution, per_example_gradients
from fedtune.errors import ConfigError
from fedtune.training.local import prepare_node
from fedtune.privacy import ddgauss, ddgauss_accounting as acc
from fedtune.privacy.ddgauss import DDGaussSpec
from tests.conftest import make_texts, tiny_config, write_csv

DIM = 1000


def spec(**overrides) -> DDGaussSpec:
    values = dict(clip=1.0, granularity=ddgauss.granularity_for(1.0, 20, DIM, 60, 1.0), bits=20, contributors=5,
                  noise_multiplier=1.0, dim=DIM)
    values.update(overrides)
    return DDGaussSpec(**values)


def test_rotation_is_orthonormal_and_inverts():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, DIM))
    y = ddgauss.rotate(x, seed=7)
    assert y.shape == (3, 1024)
    assert np.allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1))
    assert np.allclose(ddgauss.unrotate(y[1], 7, DIM), x[1])
    assert not np.allclose(ddgauss.unrotate(y[1], 8, DIM), x[1])  # another seed is another rotation


def test_encode_and_decode_round_trip_within_the_rounding_error():
    """Without noise: quantize, rotate, round, sum, dequantize gives the clipped sum back to
    within sqrt(d) rounding steps per example in L2 (each coordinate moves less than 1)."""
    s = spec()
    rng = np.random.default_rng(1)
    nodes = [rng.normal(size=(8, DIM)) * rng.uniform(0.001, 0.1) for _ in range(4)]
    encoded = sum(ddgauss.encode_examples(x, s, rotation_seed=3, rng=rng) for x in nodes)
    decoded = ddgauss.decode(ddgauss.to_modular(encoded, s.bits), s, rotation_seed=3)
    truth = sum(ddgauss.clip_rows(x, s.clip).sum(axis=0) for x in nodes)
    rows = sum(len(x) for x in nodes)
    assert np.linalg.norm(decoded - truth) <= rows * math.sqrt(s.padded_dim) * s.granularity
    assert np.linalg.norm(decoded - truth) < 1e-3 * np.linalg.norm(truth) + 1e-2


def test_every_rounded_example_respects_the_norm_bound():
    """Conditional rounding: one example moves the node's integer sum by at most Delta2,
    whatever the rounding draws (the sensitivity the accountant charges)."""
    s = spec(granularity=1.0 / 30)  # coarse: the rounding term matters
    rng = np.random.default_rng(2)
    rows = ddgauss.rotate(ddgauss.clip_rows(rng.normal(size=(200, DIM)), s.clip), 5) / s.granularity
    rounded = ddgauss.conditional_round(rows, s.norm_bound, rng)
    assert np.all(np.linalg.norm(rounded, axis=1) <= s.norm_bound)
    assert np.all(np.abs(rounded - rows) < 1)


def test_the_sum_of_t_noise_shares_has_the_planned_variance():
    """t shares of N_Z(0, sigma_local^2): the sum's per-coordinate variance is z^2 Delta2^2.
    Chi-square test of the variance at a 1e-4 false-alarm rate (two-sided)."""
    s = spec(contributors=4, noise_multiplier=0.7)
    total = sum(ddgauss.noise_share(s) for _ in range(s.contributors)).astype(np.float64)
    planned = (s.noise_multiplier * s.norm_bound) ** 2
    n = total.size
    statistic = float(np.sum(total ** 2) / planned)  # chi-square with n degrees of freedom (mean 0)
    low, high = stats.chi2.ppf([0.5e-4, 1 - 0.5e-4], n)
    assert low < statistic < high, (statistic, low, high)
    # and a share alone is far too small: the node never sends the whole noise
    assert np.var(ddgauss.noise_share(s)) < planned / 2


def test_noise_shares_are_secret_fresh_draws():
    s = spec(contributors=2)
    assert not np.array_equal(ddgauss.noise_share(s), ddgauss.noise_share(s))


def test_a_nodes_masked_message_alone_does_not_decode_to_its_gradient():
    """What one node sends is its encoded sum plus its noise share: decoded alone it is the
    gradient buried in noise of standard deviation z Delta2 / sqrt(t) per coordinate."""
    s = spec(contributors=5, noise_multiplier=1.0)
    rng = np.random.default_rng(4)
    grads = rng.normal(size=(10, DIM)) * 0.05
    truth = ddgauss.clip_rows(grads, s.clip).sum(axis=0)
    alone = ddgauss.decode(ddgauss.contribution(grads, s, rotation_seed=9), s, rotation_seed=9)
    error = alone - truth
    expected = s.local_stddev * s.granularity  # per coordinate, float domain
    assert abs(error.std() / expected - 1) < 0.1
    assert np.linalg.norm(error) > 3 * np.linalg.norm(truth)


def test_the_modular_sum_decodes_the_noisy_sum_of_every_node():
    s = spec(contributors=3)
    rng = np.random.default_rng(5)
    nodes = [rng.normal(size=(6, DIM)) * 0.02 for _ in range(3)]
    modular = ddgauss.to_modular(sum(ddgauss.contribution(x, s, 11) for x in nodes), s.bits)
    decoded = ddgauss.decode(modular, s, 11)
    truth = sum(ddgauss.clip_rows(x, s.clip).sum(axis=0) for x in nodes)
    noise = decoded - truth
    assert abs(noise.std() / (s.noise_multiplier * s.norm_bound * s.granularity) - 1) < 0.1
    assert ddgauss.wrapped_share(modular, s.bits) == 0.0


@pytest.mark.parametrize("field,value", [("clip", 0.0), ("granularity", -1.0), ("bits", 40), ("contributors", 0),
                                         ("noise_multiplier", math.inf), ("dim", 0)])
def test_bad_parameters_are_refused_with_their_name(field, value):
    with pytest.raises(ConfigError, match=field):
        spec(**{field: value})


# -- accounting -------------------------------------------------------------------------------
def _independent_zhu_wang(z: float, q: float, steps: int, delta: float, orders=range(2, 257)) -> float:
    """Zhu and Wang 2019 Theorem 6 with a Gaussian-like base RDP alpha / (2 z^2) (tau = 0),
    summed term by term in 60-digit arithmetic (mpmath, no log-space tricks), then
    Canonne-Kamath-Steinke's RDP-to-(epsilon, delta) conversion written out here."""
    import mpmath

    mpmath.mp.dps = 60
    q, z = mpmath.mpf(q), mpmath.mpf(z)
    best = mpmath.inf
    for a in orders:
        total = (1 - q) ** (a - 1) * (a * q - q + 1) + mpmath.binomial(a, 2) * q ** 2 * (1 - q) ** (a - 2) * mpmath.e ** (
            2 / (2 * z * z))
        for l in range(3, a + 1):
            total += 3 * mpmath.binomial(a, l) * q ** l * (1 - q) ** (a - l) * mpmath.e ** ((l - 1) * l / (2 * z * z))
        rdp = steps * mpmath.log(total) / (a - 1)
        best = min(best, rdp + mpmath.log(1 - mpmath.mpf(1) / a) - (mpmath.log(delta) + mpmath.log(a)) / (a - 1))
    return float(best)


@pytest.mark.parametrize("z,q,steps", [(1.0, 0.12, 100), (0.8, 0.05, 200), (2.0, 0.3, 20)])
def test_the_accountant_matches_an_independent_computation(z, q, steps):
    mine = acc.epsilon([acc.DistributedSteps(z, 0.0, 1024, q, steps).as_tuple()], 1e-3)
    theirs = _independent_zhu_wang(z, q, steps, 1e-3, orders=range(2, 90))
    assert mine <= theirs * (1 + 1e-9)  # more orders can only help
    assert mine == pytest.approx(theirs, rel=2e-2)


def test_the_bound_is_never_below_the_sampled_gaussians_exact_epsilon():
    """A sum of discrete Gaussians is never charged less than central DP-SGD with the same
    noise would be (dp-accounting's PLD of the Poisson-subsampled Gaussian)."""
    from fedtune.privacy.accountants import pld_epsilon

    for z, q, steps in [(1.0, 0.12, 100), (0.7, 0.01, 1000)]:
        assert acc.epsilon([acc.DistributedSteps(z, 0.0, 1024, q, steps).as_tuple()], 1e-4) >= \
            pld_epsilon([(z, q, steps)], 1e-4)


def test_tau_counts_when_the_shares_are_tiny():
    """Shares of standard deviation near 1/2 are far from a discrete Gaussian together:
    Proposition 14's tau grows and so does the charge."""
    assert acc.tau(1000.0, 10) == 0.0
    assert acc.tau(0.5, 10) > 1
    coarse = acc.DistributedSteps(1.0, acc.tau(0.5, 10), 1024, 0.1, 10)
    fine = acc.DistributedSteps(1.0, 0.0, 1024, 0.1, 10)
    assert acc.epsilon([coarse.as_tuple()], 1e-5) > acc.epsilon([fine.as_tuple()], 1e-5)


def test_collusion_costs_what_the_subtracted_shares_were_worth():
    s = spec(contributors=10, noise_multiplier=1.0)
    eps = acc.collusion_epsilons(s, 0.1, 50, 1e-3)
    assert sorted(eps) == [0, 1, 5]
    assert eps[0] < eps[1] < eps[5]
    honest_half = acc.epsilon([acc.DistributedSteps(math.sqrt(0.5), 0.0, s.padded_dim, 0.1, 50).as_tuple()], 1e-3)
    assert eps[5] == pytest.approx(honest_half, rel=1e-9)


def test_noise_for_budget_meets_the_target_and_no_less():
    z = acc.noise_for_budget(8.0, 1e-3, 0.12, 100, 8192)
    at = acc.epsilon([acc.DistributedSteps(z, 0.0, 8192, 0.12, 100).as_tuple()], 1e-3)
    assert at <= 8.0 and at > 7.9
    assert acc.epsilon([acc.DistributedSteps(z * 0.97, 0.0, 8192, 0.12, 100).as_tuple()], 1e-3) > 8.0


# -- a node's step on a real tiny model -------------------------------------------------------
@pytest.fixture
def tiny_node(tiny_bert, tmp_path):
    data = write_csv(tmp_path / "rows.csv", make_texts(40, seed=3))
    config = tiny_config(tiny_bert, data, data={"labels": ["neg", "pos"]}, model={"max_seq_len": 12},
                         training={"batch_size": 8})
    return prepare_node(config)


def test_per_example_gradients_are_opacus_exact(tiny_node):
    """Opacus's hooks give each row the gradient a one-row backward gives."""
    model, dataset, config = tiny_node.model, tiny_node.data.train, tiny_node.config
    from fedtune.training.distributed_step import trainable_by_key

    keys = list(trainable_by_key(model))
    batch = [t[:3] for t in dataset.tensors]
    from fedtune.training.dp_train import _forward_loss
    from fedtune.training.losses import PerExampleLoss

    model.train()
    torch.manual_seed(0)
    for dropout in (m for m in model.modules() if isinstance(m, torch.nn.Dropout)):
        dropout.p = 0.0
    rows = per_example_gradients(model, batch, config, keys)
    params = trainable_by_key(model)
    for i in range(3):
        logits, labels = _forward_loss(model, [t[i:i + 1] for t in batch], PerExampleLoss("classification"),
                                       "classification", torch.device("cpu"))
        grads = torch.autograd.grad(PerExampleLoss("classification")(logits, labels), [params[k] for k in keys])
        flat = torch.cat([g.reshape(-1) for g in grads]).double().numpy()
        assert np.allclose(rows[i], flat, atol=1e-6)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in params.values())


def test_a_nodes_contribution_sums_and_decodes_to_its_clipped_gradients(tiny_node):
    model, config = tiny_node.model, tiny_node.config
    from fedtune.training.distributed_step import trainable_by_key

    keys = list(trainable_by_key(model))
    dim = sum(p.numel() for p in trainable_by_key(model).values())
    s = DDGaussSpec(clip=1.0, granularity=ddgauss.granularity_for(1.0, 22, dim, 16, 0.05), bits=22, contributors=1,
                    noise_multiplier=0.05, dim=dim)
    for dropout in (m for m in model.modules() if isinstance(m, torch.nn.Dropout)):
        dropout.p = 0.0
    generator = torch.Generator().manual_seed(1)
    vector, rows = distributed_contribution(model, tiny_node.data.train, config, s, keys, 1.0, 3, generator)
    assert rows == len(tiny_node.data.train)  # q = 1 takes every row
    full = [t for t in tiny_node.data.train.tensors]
    truth = ddgauss.clip_rows(per_example_gradients(model, full, config, keys), 1.0).sum(axis=0)
    decoded = ddgauss.decode(vector, s, 3)
    noise = s.noise_multiplier * s.norm_bound * s.granularity
    assert np.abs(decoded - truth).max() < 6 * noise + 1e-3
    shapes = {k: tuple(p.shape) for k, p in trainable_by_key(model).items()}
    assert list(unflatten(decoded, shapes)) == keys
