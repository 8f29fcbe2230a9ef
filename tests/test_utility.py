"""A short DP run on real data with the real bundled encoder learns something real."""

from fedtune.config import build_config
from fedtune.training.dp_train import train_call
from fedtune.privacy.planning import new_ledger
from fedtune.training.evaluate import evaluate
from fedtune.training.local import prepare_node


def test_short_dp_run_on_bbc_news_beats_majority_class():
    config = build_config({
        "data": {"dataset": "bbc-news", "max_examples": 500},
        "model": {"max_seq_len": 48},
        "training": {"epochs": 3, "learning_rate": 0.01, "batch_size": 32},
        "dp": {"target_epsilon": 8.0},
    })
    node = prepare_node(config)
    ledger = new_ledger(config, node.plan)
    result = train_call(node.model, node.data.train, config, node.plan, ledger)
    metrics = evaluate(node.model, node.data.val, "classification", num_classes=5)
    assert result.epsilon <= 8.0
    assert metrics["accuracy"] > node.data.majority_accuracy + 0.2, (metrics, node.data.majority_accuracy)
