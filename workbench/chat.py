"""Chat formatting, left-padded batches and token positions.

Prompts go through the model's own chat template (optional system prompt) or, in raw mode, are
tokenised as given. Batches are left-padded and carry ``position_ids`` computed from the attention
mask, so a batched forward equals one-by-one forwards.

>>> from workbench.tiny import build_tiny
>>> model, tok = build_tiny("llama")
>>> fmt = ChatFormat()
>>> batch = encode(tok, ["Hi", "Explain how to bake bread"], fmt)
>>> batch.input_ids.shape[0], int(batch.lengths[0]) < int(batch.lengths[1])
(2, True)
>>> batch.n_post >= 1
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.io import sha256_text

_SENTINEL = "\u2063WBSENTINEL\u2063"


@dataclass(frozen=True)
class ChatFormat:
    """How instructions become model input: the model's chat template (default) or raw text."""

    system_prompt: str | None = None
    raw: bool = False

    def messages(self, instruction: str) -> list[dict[str, str]]:
        msgs = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": instruction})
        return msgs

    def render(self, tokenizer: Any, instruction: str) -> str:
        """The full prompt text (template applied, generation prompt appended)."""
        if self.raw:
            return instruction
        if not getattr(tokenizer, "chat_template", None):
            raise WorkbenchError(
                "this tokenizer has no chat template; use raw mode (--raw / ChatFormat(raw=True))"
            )
        try:
            return tokenizer.apply_chat_template(
                self.messages(instruction), tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # templates that reject system messages, etc.
            raise WorkbenchError(f"the model's chat template failed on this prompt: {e}") from e

    def template_hash(self, tokenizer: Any) -> str:
        """Hash of everything that decides the prompt text: template, system prompt, raw flag."""
        tpl = "" if self.raw else str(getattr(tokenizer, "chat_template", "") or "")
        return sha256_text(f"{tpl}\x00{self.system_prompt or ''}\x00{int(self.raw)}")[:16]

    def post_instruction_suffix(self, tokenizer: Any) -> str:
        """The text the template appends after the user's instruction (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``)."""
        if self.raw:
            return ""
        text = self.render(tokenizer, _SENTINEL)
        i = text.rfind(_SENTINEL)
        return text[i + len(_SENTINEL):]


@dataclass
class Batch:
    """A left-padded batch of prompts. Column ``T-1`` is every row's last prompt token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor  # real tokens per row
    n_post: int  # number of post-instruction tokens (identical for every row)
    texts: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def pads(self) -> torch.Tensor:
        return self.width - self.lengths

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                     self.lengths, self.n_post, self.texts)

    def slice(self, start: int, stop: int) -> "Batch":
        """Rows start:stop, re-trimmed so the result has no all-pad columns."""
        lengths = self.lengths[start:stop]
        w = int(lengths.max())
        return Batch(self.input_ids[start:stop, -w:], self.attention_mask[start:stop, -w:],
                     self.position_ids[start:stop, -w:], lengths, self.n_post, self.texts[start:stop])


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], fmt: ChatFormat) -> tuple[list[list[int]], list[str]]:
    texts = [fmt.render(tokenizer, p) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=fmt.raw)["input_ids"] for t in texts]
    return ids, texts


def _n_post(tokenizer: Any, fmt: ChatFormat, ids: list[list[int]]) -> int:
    suffix = fmt.post_instruction_suffix(tokenizer)
    if not suffix:
        return 1
    suf_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    n = len(suf_ids)
    # The suffix must tokenise identically at the end of every prompt; otherwise use the common tail.
    common = n
    for row in ids:
        k = 0
        while k < min(n, len(row)) and row[-1 - k] == suf_ids[-1 - k]:
            k += 1
        common = min(common, k)
    return max(1, common)


def encode(
    tokenizer: Any,
    prompts: Sequence[str],
    fmt: ChatFormat | None = None,
    *,
    max_positions: int | None = None,
) -> Batch:
    """Template, tokenise and left-pad prompts; refuse empty sets and over-long prompts."""
    fmt = fmt or ChatFormat()
    prompts = list(prompts)
    if not prompts:
        raise WorkbenchError("the prompt set is empty: give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise WorkbenchError(f"prompt {i} is empty or not a string: {p!r}")
    ids, texts = tokenize_prompts(tokenizer, prompts, fmt)
    if max_positions:
        for i, row in enumerate(ids):
            if len(row) > max_positions:
                raise WorkbenchError(
                    f"prompt {i} is {len(row)} tokens long, more than the model's context of {max_positions} "
                    f"tokens; shorten it (nothing is truncated silently)"
                )
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    w = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), w), int(pad), dtype=torch.long)
    mask = torch.zeros((len(ids), w), dtype=torch.long)
    for i, row in enumerate(ids):
        if row:
            input_ids[i, w - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, w - len(row):] = 1
    lengths = mask.sum(-1)
    return Batch(input_ids, mask, position_ids_from_mask(mask), lengths, _n_post(tokenizer, fmt, ids), texts)
