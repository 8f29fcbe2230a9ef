"""Adapter methods, one seam: how a base model gets its trainable adapter.

`[adapter] method` names an entry of `ADAPTER_METHODS`. A method attaches its adapter to
a base model (seeded: every node must build the same initial adapter) and says in one
line what it is. Everything else is generic and never asks which method runs:
federation and node code move whatever tensors train (`fedtune.models.adapter_io.trainable_state`);
tensors a method freezes at their seeded init (FFA-LoRA's A) travel once, in round 1,
and nodes rebuild them; reports and model cards print `describe`.

A method also says how DP-SGD gets its per-example gradients (`grad_sample_modes`):
Opacus's per-layer rules ("hooks", "ghost") cover LoRA (plain Linear layers) and prefix
tuning (an Embedding called with a batch dimension). peft's IA3 keeps its vectors in
ParameterDicts that are never called as modules, so Opacus's hooks (and its functorch
fallback, which works per called module) never see them; IA3 trains with "loop": exact
per-example gradients, one example at a time, handed to Opacus's DP optimizer.

Which methods average exactly (FedAvg of the adapters = the adapter of the averaged
weight updates): IA3 (the update W diag(l) - W is linear in l), FFA-LoRA (B A0 is
linear in B) and prefix tuning (the prefix keys and values are themselves the trained
tensors, no product of factors); plain LoRA is not (the mean of B_i A_i is not the
product of the means).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

if TYPE_CHECKING:  # annotations only: config validation reads this registry
    from fedtune.config import Config

ALL_TASKS = ("classification", "causal-lm", "instruct")
GENERATIVE_TASKS = ("causal-lm", "instruct")


class AdapterMethod(NamedTuple):
    attach: Callable[[object, "Config"], object]  # (base model, config) -> peft model with the adapter
    describe: Callable[["Config"], str]            # one line for reports and model cards
    title: str = "PEFT"                          # the model card's "LoRA adapter for ..."
    grad_sample_modes: tuple[str, ...] = ("hooks", "ghost", "loop")
    why_modes: str = ""
    tasks: tuple[str, ...] = ALL_TASKS
    exact_average: bool = False


def _attach_lora(base, config: Config):
    from fedtune.models.base import attach_lora

    return attach_lora(base, config.lora, config.model.task, config.training.seed)


def _describe_lora(config: Config) -> str:
    lora = config.lora
    return (f"LoRA rank {lora.rank}, alpha {lora.alpha:g}" + (", FFA-LoRA (A frozen)" if lora.ffa else "")
            + ("" if lora.train_head else ", head frozen"))


def _task_type(config: Config):
    from peft import TaskType

    return TaskType.SEQ_CLS if config.model.task == "classification" else TaskType.CAUSAL_LM


def _seeded(config: Config, build):
    """Build under the config's seed: every node's initial adapter must be the same."""
    import torch  # here, not at the top: config validation reads this registry before torch may load

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.training.seed)
        return build()


def _attach_ia3(base, config: Config):
    from peft import IA3Config, get_peft_model

    from fedtune.models.base import HEAD_MODULES, ia3_targets

    targets, feedforward = ia3_targets(base)
    heads = [h for h in HEAD_MODULES if h in {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}]
    ia3 = IA3Config(task_type=_task_type(config), target_modules=targets, feedforward_modules=feedforward,
                    modules_to_save=(heads or None) if config.model.task == "classification" else None)
    model = _seeded(config, lambda: get_peft_model(base, ia3))
    if config.model.task == "classification":
        from fedtune.models.base import seed_head_copies

        seed_head_copies(model, config.training.seed)
    return model


def _attach_prefix(base, config: Config):
    from peft import PrefixTuningConfig, get_peft_model

    prefix = PrefixTuningConfig(task_type=_task_type(config), num_virtual_tokens=config.adapter.num_virtual_tokens)
    return _seeded(config, lambda: get_peft_model(base, prefix))


ADAPTER_METHODS: dict[str, AdapterMethod] = {
    "lora": AdapterMethod(_attach_lora, _describe_lora, "LoRA"),
    "ia3": AdapterMethod(_attach_ia3, lambda config: "IA3 (learned scaling of keys, values and feed-forward inputs)",
                         "IA3", grad_sample_modes=("loop",),
                         why_modes="Opacus has no per-sample rule for peft's IA3 vectors: set dp.grad_sample_mode = "
                                   "'loop' (exact per-example gradients)", exact_average=True),
    "prefix": AdapterMethod(_attach_prefix,
                            lambda config: f"prefix tuning, {config.adapter.num_virtual_tokens} virtual tokens",
                            "Prefix-tuning", grad_sample_modes=("hooks", "loop"),
                            why_modes="ghost clipping has no rule for the prompt encoder's embedding",
                            tasks=GENERATIVE_TASKS, exact_average=True),
}


def adapter_method(config: Config) -> AdapterMethod:
    return ADAPTER_METHODS[config.adapter.method]


def attach_adapter(base, config: Config):
    return adapter_method(config).attach(base, config)


def describe_adapter(config: Config) -> str:
    return adapter_method(config).describe(config)
