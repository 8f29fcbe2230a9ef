"""fedtune: private federated fine-tuning of LoRA adapters.

The core library: configuration, data, model + LoRA, DP-SGD training, the privacy
ledger, adapter I/O and evaluation. It never imports Flower: everything that decides a
privacy guarantee or an aggregate is plain torch / numpy, testable without a federation.
"""

__version__ = "0.1.0"
