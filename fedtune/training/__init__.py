"""A node's training: the one DP-SGD training call the ledger charges, the per-example
losses it clips, evaluation, the distributed-DP step, the whole `train-local` run with its
model card, the per-process model cache nodes reuse, and the gradient-coherence probe.

May import: `fedtune.privacy`, `fedtune.models`, `fedtune.data`, `fedtune.system`,
`fedtune.config`, `fedtune.errors`.

    dp_train            one local training call under DP-SGD (Opacus), or explicitly without DP
    losses              per-example losses, the unit of record-level DP
    evaluate            loss, accuracy, macro-F1 / perplexity, without gradients
    metric_release      validation metrics as a charged Gaussian release
    distributed_step    one distributed DP-SGD step: clipped gradients plus a noise share, encoded
    local               `fedtune train-local`: prepare, charge, train, save, report
    model_card          the README of a trained adapter, with its privacy statement
    model_cache         per-process reuse of the base model and tokenizer
    gradient_coherence  the probe `fedtune privacy advise --data` reports
"""
