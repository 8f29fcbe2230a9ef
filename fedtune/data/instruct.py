"""Instruction tuning: prompt/response examples, response-only loss, scoring by generation.

An example is a conversation (one user prompt, or a list of chat messages) and the
assistant's response. It is rendered with the tokenizer's own chat template when it has
one (SmolLM2, Llama-3, Qwen2 do), else with the plain template below, and tokenized as
prompt tokens followed by response tokens. The labels mask every prompt token (and the
padding) with -100, so the loss, and hence every gradient DP-SGD clips, comes from the
response tokens only. One example, prompt and response together, is one DP record: its
loss is the mean over its own response tokens (`fedtune.training.losses`), clipped as a whole.

Nothing is ever cut silently. A prompt too long for `model.max_seq_len` is shortened
(its user content, from the end, so the template's markers stay intact) and counted; an
example whose response cannot fit beside the template is skipped and counted. Both
counts go into the run's data summary.

Scoring by generation follows FlowerTune's finance track: greedy decoding of the answer,
then exact match of the normalised text against the expected answer.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field

import torch

from fedtune.data.tables import IGNORE_INDEX
from fedtune.errors import DataError

PLAIN_MARKERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
PLAIN_TEMPLATE_DOC = "### Instruction:\\n{prompt}\\n\\n### Response:\\n{response}<eos>"
MIN_PROMPT_CONTENT = 8  # tokens of user content a shortened prompt keeps at least


# -- conversations ------------------------------------------------------------------
def conversation(prompt: str, messages_mode: bool) -> list[dict]:
    """The turns before the response: a JSON list of messages, or one user prompt."""
    return json.loads(prompt) if messages_mode else [{"role": "user", "content": prompt}]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _apply_template(tokenizer, turns: list[dict], **kwargs) -> str:
    """The tokenizer's chat template, with a refusal (some templates reject a system turn or
    two user turns in a row) turned into a one-line data error."""
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, **kwargs)
    except Exception as exc:  # jinja2 raises TemplateError subclasses, and templates raise their own
        roles = ", ".join(turn["role"] for turn in turns)
        raise DataError(f"the model's chat template refused a conversation with roles [{roles}] ({exc})") from None


def render(tokenizer, turns: list[dict], response: str | None) -> tuple[str, str]:
    """(prompt text up to where the assistant starts, response text with its end marker)."""
    if has_chat_template(tokenizer):
        prompt = _apply_template(tokenizer, turns, add_generation_prompt=True)
        if response is None:
            return prompt, ""
        full = _apply_template(tokenizer, turns + [{"role": "assistant", "content": response}])
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
        return prompt, response + (tokenizer.eos_token or "")  # a template that rewrites earlier turns
    prompt = "".join(PLAIN_MARKERS[t["role"]] + t["content"] + "\n\n" for t in turns) + PLAIN_MARKERS["assistant"]
    return prompt, ("" if response is None else response + (tokenizer.eos_token or ""))


def _ids(tokenizer, text: str, prompt: bool) -> list[int]:
    # a chat template writes its own special tokens; the plain template starts with BOS
    special = prompt and not has_chat_template(tokenizer)
    return tokenizer(text, add_special_tokens=special)["input_ids"]


# -- encoding -----------------------------------------------------------------------
@dataclass
class InstructEncoding:
    """Tokenized examples: response-only labels, the rows kept, and what did not fit."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompt_ids: list[list[int]]  # per kept row: the (possibly shortened) prompt, for generation
    kept: list[int]
    skipped: list[int] = field(default_factory=list)  # rows whose response does not fit
    truncated: int = 0  # kept rows whose prompt was shortened
    silenced: list[int] = field(default_factory=list)  # with keep_all: rows kept that teach nothing (see below)

    def summary(self) -> dict:
        return {"examples": len(self.kept) + len(self.skipped), "kept": len(self.kept) - len(self.silenced),
                "skipped_response_too_long": len(self.skipped) + len(self.silenced), "prompts_shortened": self.truncated}


def _fit_prompt(tokenizer, turns: list[dict], prompt_text: str, response_len: int, max_len: int,
                messages_mode: bool):
    """The prompt's token ids, shortened to leave room for the response; None if it cannot."""
    ids = _ids(tokenizer, prompt_text, prompt=True)
    room = max_len - response_len
    if len(ids) <= room:
        return ids, False
    if messages_mode:  # whose words to cut is not ours to choose in a conversation
        return None, False
    content = turns[-1]["content"]
    content_ids = tokenizer(content, add_special_tokens=False)["input_ids"]
    keep = len(content_ids) - (len(ids) - room)
    for _ in range(4):  # re-tokenizing the cut text can merge differently: shave until it fits
        if keep < MIN_PROMPT_CONTENT:
            return None, False
        shortened = tokenizer.decode(content_ids[:keep], skip_special_tokens=True)
        text, _ = render(tokenizer, turns[:-1] + [{"role": "user", "content": shortened}], None)
        ids = _ids(tokenizer, text, prompt=True)
        if len(ids) <= room:
            return ids, True
        keep -= len(ids) - room
    return None, False


def encode_instruct(tokenizer, prompts: list[str], responses: list[str], max_len: int,
                    messages_mode: bool = False, keep_all: bool = False) -> InstructEncoding:
    """Tokenize (prompt, response) rows into right-padded tensors of `max_len` with the
    prompt masked out of the labels.

    A response is never cut (half an answer teaches a wrong one). A row whose response does
    not fit is skipped, or, with `keep_all` (a node's own rows), kept as a *silent* row: its
    prompt's first tokens with every label masked, so it adds nothing to any gradient. A node
    keeps every row so that how many rows it trains on, and so everything it answers, never
    depends on how long one private answer is (a server could otherwise probe lengths and read
    the count)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows_ids, rows_labels, prompt_ids, kept, skipped, silenced, truncated = [], [], [], [], [], [], 0
    for index, (prompt, response) in enumerate(zip(prompts, responses)):
        turns = conversation(prompt, messages_mode)
        prompt_text, response_text = render(tokenizer, turns, str(response))
        response_ids = _ids(tokenizer, response_text, prompt=False)
        ids, shortened = _fit_prompt(tokenizer, turns, prompt_text, len(response_ids), max_len, messages_mode)
        if ids is None and keep_all:
            ids = _ids(tokenizer, prompt_text, prompt=True)[:max_len]
            rows_ids.append(ids)
            rows_labels.append([IGNORE_INDEX] * len(ids))
            prompt_ids.append(ids)
            kept.append(index)
            silenced.append(index)
            continue
        if ids is None:
            skipped.append(index)
            continue
        truncated += shortened
        rows_ids.append(ids + response_ids)
        rows_labels.append([IGNORE_INDEX] * len(ids) + response_ids)
        prompt_ids.append(ids)
        kept.append(index)
    n = len(rows_ids)
    input_ids = torch.full((n, max_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((n, max_len), dtype=torch.long)
    labels = torch.full((n, max_len), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, target) in enumerate(zip(rows_ids, rows_labels)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(target)] = torch.tensor(target)
    return InstructEncoding(input_ids, attention_mask, labels, prompt_ids, kept, skipped, truncated, silenced)


def encode_rows(tokenizer, table, max_len: int, messages_mode: bool = False, keep_all: bool = False):
    """A table of (prompt, response) rows -> (its encoding, the response-masked dataset, and
    (prompt ids, expected answers) of the rows kept, for scoring by generation)."""
    from fedtune.data.tables import to_dataset

    encoding = encode_instruct(tokenizer, table.texts, table.labels, max_len, messages_mode, keep_all)
    dataset = to_dataset(vars(encoding), None, labels=encoding.labels)
    return encoding, dataset, (encoding.prompt_ids, [table.labels[i] for i in encoding.kept])


def describe_skips(encoding: InstructEncoding, source: str, max_len: int) -> str | None:
    """One line for the log when rows were skipped or prompts shortened; None when none."""
    if not encoding.skipped and not encoding.truncated and not encoding.silenced:
        return None
    parts = []
    if encoding.skipped:
        parts.append(f"{len(encoding.skipped)} example(s) skipped: the response does not fit in model.max_seq_len = "
                     f"{max_len} beside the template (first: row {encoding.skipped[0] + 1})")
    if encoding.silenced:
        parts.append(f"{len(encoding.silenced)} example(s) kept but teaching nothing: the response does not fit in "
                     f"model.max_seq_len = {max_len} beside the template (first: row {encoding.silenced[0] + 1})")
    if encoding.truncated:
        parts.append(f"{encoding.truncated} prompt(s) shortened to fit")
    return f"{source}: " + "; ".join(parts)


# -- scoring by generation ----------------------------------------------------------
_PUNCTUATION = string.punctuation + "“”‘’«»…"


def normalise_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes or punctuation: "Positive." ==
    "positive". Only the first line counts (a model that rambles on after the answer)."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    first = re.sub(r"\s+", " ", first.lower()).strip()
    return first.strip(_PUNCTUATION + " ")


@torch.no_grad()
def generate_from_ids(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                      batch_size: int = 16) -> list[str]:
    """Greedy answers to tokenized prompts (left-padded in batches), decoded without the
    special tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answers = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                eos_token_id=tokenizer.eos_token_id)
        for row in output[:, width:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, messages_mode: bool = False) -> list[str]:
    """Greedy answers to raw prompts (rendered with the same template as in training)."""
    ids = [_ids(tokenizer, render(tokenizer, conversation(p, messages_mode), None)[0], prompt=True) for p in prompts]
    return generate_from_ids(model, tokenizer, ids, max_new_tokens)


def answer_budget(tokenizer, responses: list[str], configured: int) -> int:
    """Tokens to generate: the configured number, or the longest expected answer plus 4."""
    if configured:
        return configured
    longest = max((len(tokenizer(str(r), add_special_tokens=False)["input_ids"]) for r in responses), default=1)
    return longest + 4


def exact_match(generated: list[str], expected: list[str]) -> float:
    if not expected:
        return 0.0
    return sum(normalise_answer(g) == normalise_answer(str(e)) for g, e in zip(generated, expected)) / len(expected)
