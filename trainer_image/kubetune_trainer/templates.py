"""How a record becomes (prompt, response) text, per template. Pure functions: no
tokenizer except for chat, which uses the tokenizer's own chat template."""

from __future__ import annotations

import string
from typing import Any

ALPACA_HEADER = (
    "Below is an instruction that describes a task{inp}. "
    "Write a response that appropriately completes the request.\n\n"
)

# role -> record field, per template (spec.dataset.fields overrides any of them)
DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "text-to-sql": {"input": "question", "context": "context", "output": "answer"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "chat": {"messages": "messages"},
    "completion": {"text": "text", "prompt": "prompt", "output": "completion"},
    "classification": {"input": "text", "output": "label"},
    "custom": {"output": "output"},
}


class RecordError(ValueError):
    """A record that does not fit the template (counted as malformed)."""


def _get(record: dict[str, Any], fields: dict[str, str], role: str, required: bool = True) -> str:
    name = fields[role]
    value = record.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RecordError(f"missing field {name!r}")
        return ""
    if isinstance(value, list):
        value = ", ".join(map(str, value))  # e.g. several class labels
    return str(value)


def text_to_sql(record: dict, fields: dict[str, str]) -> tuple[str, str]:
    prompt = (
        f"### Input:\n{_get(record, fields, 'input')}\n\n"
        f"### Context:\n{_get(record, fields, 'context')}\n\n"
        "### Response:\n"
    )
    return prompt, _get(record, fields, "output")


def alpaca(record: dict, fields: dict[str, str]) -> tuple[str, str]:
    inp = _get(record, fields, "input", required=False)
    prompt = ALPACA_HEADER.format(inp=", paired with an input that provides further context" if inp else "")
    prompt += f"### Instruction:\n{_get(record, fields, 'instruction')}\n\n"
    if inp:
        prompt += f"### Input:\n{inp}\n\n"
    return prompt + "### Response:\n", _get(record, fields, "output")


def completion(record: dict, fields: dict[str, str]) -> tuple[str, str]:
    """Either prompt + completion fields, or one text field trained on whole."""
    if fields["prompt"] in record and fields["output"] in record:
        return _get(record, fields, "prompt"), _get(record, fields, "output")
    return "", _get(record, fields, "text")


def classification(record: dict, fields: dict[str, str]) -> tuple[str, str]:
    return f"### Text:\n{_get(record, fields, 'input')}\n\n### Label:\n", _get(record, fields, "output")


def custom(record: dict, fields: dict[str, str], fmt: str) -> tuple[str, str]:
    """`fmt` is a format string over record fields; everything from the output field's
    placeholder on is the response, everything before it the prompt."""
    out = fields["output"]
    marker = "{" + out + "}"
    if marker not in fmt:
        raise ValueError(f"dataset.format must contain {marker}")
    head, _, tail = fmt.partition(marker)
    values = {name: record.get(name) for _, name, _, _ in string.Formatter().parse(fmt) if name}
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise RecordError(f"missing field {missing[0]!r}")
    return head.format(**values), (marker + tail).format(**values)


def chat(record: dict, fields: dict[str, str], tokenizer) -> tuple[str, str]:
    """Messages through the tokenizer's chat template; the loss is on the last assistant turn."""
    messages = record.get(fields["messages"])
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"field {fields['messages']!r} must be a non-empty list of messages")
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise RecordError("every message needs a role and a content")
    if messages[-1]["role"] != "assistant":
        raise RecordError("the last message must be the assistant's")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("template chat needs a tokenizer with a chat template")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise RecordError("the chat template does not extend the prompt with the answer")
    return prompt, full[len(prompt) :]


def render(record: dict, template: str, fields: dict[str, str], fmt: str | None, tokenizer=None):
    merged = {**DEFAULT_FIELDS[template], **fields}
    if template == "text-to-sql":
        return text_to_sql(record, merged)
    if template == "alpaca":
        return alpaca(record, merged)
    if template == "completion":
        return completion(record, merged)
    if template == "classification":
        return classification(record, merged)
    if template == "custom":
        return custom(record, merged, fmt or "")
    if template == "chat":
        return chat(record, merged, tokenizer)
    raise ValueError(f"unknown template {template!r}")
