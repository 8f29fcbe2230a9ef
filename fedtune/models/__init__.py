"""Base models and their adapters: loading a local transformers model (or a named one that
ships in a registry package), attaching a PEFT adapter by method, the adapter tensors that
travel, and generating text with a trained adapter.

May import: `fedtune.data`, `fedtune.system`, `fedtune.config`, `fedtune.errors`.
`adapter_methods` is read by config validation, so it (and what it imports at run time)
never imports `fedtune.config` itself.

    base             base model + tokenizer from a local folder; LoRA targets; seeded heads
    named            the base models that ship inside registry packages
    adapter_methods  the registry of adapter methods (LoRA/FFA-LoRA, IA3, prefix tuning)
    adapter_io       the one boundary through which model state leaves a node; the flat layout
    generation       `fedtune generate`: an instruct adapter on prompts of your own
"""
