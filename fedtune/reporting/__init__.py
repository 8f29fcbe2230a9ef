"""What a run directory tells its reader, regenerated from its raw records: the run report
and its figures, record- and user-level privacy side by side, pandas frames for notebooks,
experiment trackers, and export of a server checkpoint to a stock PEFT adapter.

May import: every core package below it (`federation`, `training`, `privacy`, `models`,
`data`, `system`), `fedtune.config`, `fedtune.errors`.

    run_report       `fedtune report`: summary.md and figures from metrics.jsonl and ledgers
    privacy_summary  record- and user-level epsilon, by two accountants
    frames           a run directory as DataFrames (`fedtune.load_run`)
    tracking         the tracker registry (TensorBoard, MLflow, W&B), fed from metrics.jsonl
    progress         a federation's rounds on the console: a bar, one logged line a round
    export           a server checkpoint -> a PEFT adapter directory or a merged model
"""
