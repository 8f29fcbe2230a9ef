"""A node's own rows, turned into tensors: tables from files or named datasets, label ids,
train/validation splits, tokenisation, and the instruct (prompt/response) encoding with
its response-only labels. Nothing here leaves the node.

May import: `fedtune.system`, `fedtune.config`, `fedtune.errors`.

    tables    CSV/JSONL/Parquet or a named dataset -> a `Table`; label map; split; tokenize
    named     the datasets that ship inside registry packages (one entry each in `DATASETS`)
    instruct  conversations -> token ids with the prompt masked out; scoring by generation
"""
