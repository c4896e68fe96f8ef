"""Supervised fine-tuning: full fine-tuning or LoRA merged back, loss on the response tokens only.

Training runs where the model lives (``lm.device``: the CPU by default; ``--device cuda`` loads it on a GPU):
every batch is built on the CPU and moved to the device of the model's input embeddings at the point of use
(:func:`input_device`); the loss sums and the token counts come back as Python numbers, and the checkpoint is
written through ``save_pretrained`` (safetensors copies device tensors to the host). The report records
the device (``report["device"]``).

Each example's prompt is formatted with the model's chat template through
:class:`workbench.chat.ChatFormat` and tokenised exactly as :func:`workbench.chat.encode` does for
evaluation; the response is appended followed by the template's end-of-turn token (e.g.
``<|im_end|>``, read off the template by rendering an assistant turn). Prompt tokens get label -100.

Training: AdamW, linear warm-up over ``ceil(warmup * steps)`` steps then cosine decay (no step has
learning rate 0), gradient clipping, gradient accumulation with the loss normalised by the number
of response tokens of the whole accumulated batch (so accumulation equals a larger batch), seeded
shuffling, float32 training, the checkpoint saved in the model's original dtype. Over-long examples
are dropped and counted (or refused); nothing is truncated.

The run folder is written into a temporary sibling folder and renamed into place at the end. It is
itself a plain Hugging Face model folder (``model.safetensors``, ``config.json``, tokenizer files)
plus ``report.json``, ``run_config.json``, ``environment.json``, ``examples.jsonl``, ``loss.csv``,
``loss.png`` and ``recipe/`` (harmful generations, refusal direction). The run configuration is in
``run_config.json`` because ``config.json`` is the model's.

>>> from workbench.tiny import build_tiny
>>> from workbench.loading import from_memory
>>> from weightspace.recipes import build_recipe
>>> import tempfile
>>> lm = from_memory(*build_tiny("llama"))
>>> rd = build_recipe("useful", lm, n=8)
>>> res = finetune(lm, rd, FinetuneConfig(epochs=1, batch_size=4, progress=False), tempfile.mkdtemp() + "/ft")
>>> res.report["steps"], res.report["recipe"]
(2, 'useful')
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from workbench.chat import ChatFormat, position_ids_from_mask, tokenize_prompts
from workbench.errors import WorkbenchError
from workbench.io import sha256_file, write_csv, write_json, write_text
from workbench.loading import LoadedModel
from workbench.runs import environment, seed_everything

from weightspace.recipes import Example, RecipeData, examples_hash

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "TokenizedExample",
    "end_of_turn",
    "tokenize_example",
    "prepare_examples",
    "collate",
    "lr_factor",
    "input_device",
    "mean_loss",
    "check_output_folder",
    "finetune",
]

METHODS = ("full", "lora")
DEFAULT_LR = {"full": 5e-5, "lora": 2e-4}
_SENT = "\u2063WBRESPONSE\u2063"


@dataclass
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (``lr=None`` picks 5e-5 for full, 2e-4 for LoRA)."""

    method: str = "full"
    lr: float | None = None
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    on_too_long: str = "drop"  # "drop" (and count) | "error"
    warmup: float = 0.02
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "all-linear"  # comma list of module names, or "all-linear"
    lora_dropout: float = 0.0
    attn_implementation: str | None = "sdpa"  # attention kernel while training; None keeps the model's
    overwrite: bool = False
    progress: bool = True

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.method]

    def validate(self) -> None:
        if self.method not in METHODS:
            raise WorkbenchError(f"unknown method '{self.method}'. Valid: {', '.join(METHODS)}")
        if not self.learning_rate > 0:
            raise WorkbenchError(f"lr must be > 0, got {self.lr}")
        for name in ("epochs", "batch_size", "grad_accum", "lora_rank"):
            if int(getattr(self, name)) < 1:
                raise WorkbenchError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise WorkbenchError(f"max_length must be >= 2, got {self.max_length}")
        if self.on_too_long not in ("drop", "error"):
            raise WorkbenchError(f"on_too_long must be 'drop' or 'error', got '{self.on_too_long}'")
        if not 0.0 <= self.warmup < 1.0:
            raise WorkbenchError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise WorkbenchError("weight_decay and max_grad_norm must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr"] = self.learning_rate
        return d


@dataclass
class FinetuneResult:
    """Where the run went, its report, the loss curve and the fine-tuned model (eval mode, saved dtype)."""

    path: Path
    report: dict[str, Any]
    losses: list[dict[str, Any]]
    model: Any = field(default=None, repr=False)


# -- formatting -----------------------------------------------------------------------------------

def end_of_turn(tokenizer: Any, fmt: ChatFormat) -> tuple[str, str]:
    """The text that closes an assistant turn, and where it came from.

    Read off the chat template by rendering a conversation with an assistant reply: what follows the
    reply, stripped of whitespace (``<|im_end|>`` for ChatML). Falls back to the tokenizer's EOS token in
    raw mode or when the template cannot render an assistant turn after its generation prompt.
    """
    eos = tokenizer.eos_token
    if fmt.raw:
        if not eos:
            raise WorkbenchError("raw mode needs a tokenizer with an EOS token to end the responses")
        return eos, "eos_token (raw mode)"
    prompt = fmt.render(tokenizer, "Hi")
    try:
        full = tokenizer.apply_chat_template(
            fmt.messages("Hi") + [{"role": "assistant", "content": _SENT}], tokenize=False)
    except Exception:  # templates that cannot render assistant turns
        full = ""
    if full.startswith(prompt + _SENT):
        tail = full[len(prompt) + len(_SENT):].strip()
        if tail:
            return tail, "chat template"
    if not eos:
        raise WorkbenchError("cannot find the end-of-turn token: the chat template renders no text after an "
                             "assistant reply and the tokenizer has no EOS token")
    return eos, "eos_token (template gave no end-of-turn text)"


@dataclass
class TokenizedExample:
    example: Example
    input_ids: list[int]
    labels: list[int]
    n_prompt: int

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt


def response_prefix(fmt: ChatFormat) -> str:
    """Text put between prompt and response: nothing with a chat template, one space in raw mode."""
    return " " if fmt.raw else ""


def tokenize_example(tokenizer: Any, fmt: ChatFormat, example: Example, eot: str) -> TokenizedExample:
    """Prompt tokens exactly as evaluation encodes them, then response + end-of-turn; prompt labels -100."""
    ids, _ = tokenize_prompts(tokenizer, [example.prompt], fmt)
    p = list(ids[0])
    r = list(tokenizer(response_prefix(fmt) + example.response + eot, add_special_tokens=False)["input_ids"])
    return TokenizedExample(example, p + r, [-100] * len(p) + r, len(p))


def prepare_examples(tokenizer: Any, fmt: ChatFormat, examples: Sequence[Example], eot: str, max_length: int,
                     on_too_long: str = "drop") -> tuple[list[TokenizedExample], list[dict[str, Any]]]:
    """Tokenise; examples longer than ``max_length`` are dropped and returned (or refused)."""
    kept, dropped = [], []
    for ex in examples:
        t = tokenize_example(tokenizer, fmt, ex, eot)
        if t.length > max_length:
            dropped.append({"id": ex.id, "kind": ex.kind, "n_tokens": t.length, "n_prompt_tokens": t.n_prompt})
        else:
            kept.append(t)
    if dropped and on_too_long == "error":
        longest = max(d["n_tokens"] for d in dropped)
        raise WorkbenchError(
            f"{len(dropped)} of {len(examples)} examples are longer than max_length={max_length} tokens (longest "
            f"{longest}); raise --max-length or use --on-too-long drop (nothing is truncated)")
    if not kept:
        raise WorkbenchError(f"all {len(examples)} examples are longer than max_length={max_length} tokens")
    return kept, dropped


def collate(rows: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded batch (as evaluation pads) with position ids from the mask and -100 labels on pads."""
    w = max(r.length for r in rows)
    ids = torch.full((len(rows), w), int(pad_id), dtype=torch.long)
    labels = torch.full((len(rows), w), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), w), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, w - r.length:] = torch.tensor(r.input_ids)
        labels[i, w - r.length:] = torch.tensor(r.labels)
        mask[i, w - r.length:] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask), "labels": labels}


def lr_factor(step: int, total: int, warmup_steps: int) -> float:
    """Multiplier for optimizer step ``step`` (0-based): linear warm-up to 1, then cosine to (not reaching) 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))


def input_device(model: Any) -> torch.device:
    """The device a model's inputs go to: that of its input embeddings (the first layer; with a
    ``device_map`` the model's first device), else that of its first parameter. Works for PEFT-wrapped
    models too."""
    get = getattr(model, "get_input_embeddings", None)
    if get is not None:
        try:
            emb = get()
        except (AttributeError, NotImplementedError):
            emb = None
        w = getattr(emb, "weight", None)
        if isinstance(w, torch.Tensor):
            return w.device
    return next(model.parameters()).device


def _loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the response tokens; logits computed only for the batch's last K positions.

    ``batch`` (from :func:`collate`) lives on the CPU: its tensors are moved to the model's input device here
    (a no-op on the CPU) and the targets to the device of the logits; the index arithmetic and the token count
    stay on the host. The loss tensor is on the logits' device.
    """
    labels = batch["labels"]
    keep = int((labels != -100).any(0).nonzero().min()) if bool((labels != -100).any()) else labels.shape[1] - 1
    k = labels.shape[1] - max(0, keep - 1)  # positions keep-1 .. T-1 predict tokens keep .. T-1
    dev = input_device(model)
    out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                position_ids=batch["position_ids"].to(dev), use_cache=False, logits_to_keep=k)
    logits = out.logits[:, -k:].float()
    tgt = labels[:, -k:]
    n_tok = int((tgt[:, 1:] != -100).sum())  # on the host: no device sync for the count
    lg = logits[:, :-1].reshape(-1, logits.shape[-1])
    tg = tgt[:, 1:].reshape(-1).to(logits.device)
    loss = torch.nn.functional.cross_entropy(lg, tg, ignore_index=-100, reduction="sum")
    return loss, n_tok


@torch.no_grad()
def mean_loss(model: Any, tokenizer: Any, fmt: ChatFormat, examples: Sequence[Example], *, batch_size: int = 8,
              max_length: int = 1 << 30, eot: str | None = None) -> float:
    """Mean per-token loss over the response tokens of ``examples`` (no training; the model's mode is kept),
    computed on the model's device (:func:`_loss_sum` moves each batch there)."""
    eot = eot if eot is not None else end_of_turn(tokenizer, fmt)[0]
    rows, _ = prepare_examples(tokenizer, fmt, examples, eot, max_length, "drop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    tot, n = 0.0, 0
    for s in range(0, len(rows), batch_size):
        ls, k = _loss_sum(model, collate(rows[s:s + batch_size], pad))
        tot += float(ls)
        n += k
    return tot / max(1, n)


# -- output folder --------------------------------------------------------------------------------

def check_output_folder(out: str | Path, overwrite: bool, inputs: Sequence[str | Path | None] = ()) -> Path:
    """Refuse an unusable output folder before any work (see :func:`workbench.runs.check_out`): an existing
    non-empty folder needs ``overwrite`` and must be one the workbench made."""
    from workbench.runs import check_out

    check_out(out, overwrite=overwrite, inputs=inputs)
    return Path(out)


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temporary folder into place (the old folder is removed only afterwards)."""
    from workbench.runs import replace_folder, write_marker

    check_output_folder(out, overwrite)
    write_marker(tmp, kind="finetune", complete=True)
    replace_folder(tmp, out)


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _loss_plot(rows: list[dict[str, Any]], title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o" if len(rows) < 40 else None, ms=3)
    ax.set(xlabel="optimizer step", ylabel="training loss (response tokens)", title=title)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="grey", alpha=0.4, lw=1)
    ax2.set_ylabel("learning rate", color="grey")
    return fig


# -- training -------------------------------------------------------------------------------------

def _lora_wrap(model: Any, cfg: FinetuneConfig) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is an optional extra
        raise WorkbenchError("LoRA needs the 'peft' package: pip install 'safety-subspace-workbench[finetune]'") from e
    targets: Any = cfg.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in str(targets).split(",") if t.strip()]
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            raise WorkbenchError(f"LoRA targets {missing} are not modules of this model; e.g. "
                                 f"{', '.join(sorted(n for n in names if 'proj' in n or 'c_' in n)[:12])}")
    lc = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets, lora_dropout=cfg.lora_dropout,
                    bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lc)


def finetune(lm: LoadedModel, recipe_data: RecipeData, cfg: FinetuneConfig | None = None,
             out: str | Path = "runs/finetune") -> FinetuneResult:
    """Fine-tune a copy of ``lm`` on ``recipe_data`` and save the run folder ``out`` atomically.

    ``lm`` itself is left untouched. The prompts are formatted with ``recipe_data.fmt``. The copy trains on
    ``lm``'s device (a CUDA model trains on the GPU); the returned model stays there.
    """
    cfg = cfg or FinetuneConfig()
    cfg.validate()
    out = check_output_folder(out, cfg.overwrite)
    t_start = time.perf_counter()
    tok = lm.tokenizer
    fmt = recipe_data.fmt
    if lm.max_positions and cfg.max_length > lm.max_positions:
        raise WorkbenchError(f"max_length={cfg.max_length} exceeds the model's context of {lm.max_positions} tokens")
    eot, eot_src = end_of_turn(tok, fmt)
    eot_ids = tok(eot, add_special_tokens=False)["input_ids"]
    gen_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [tok.eos_token_id])
    rows, too_long = prepare_examples(tok, fmt, recipe_data.examples, eot, cfg.max_length, cfg.on_too_long)
    used = [r.example for r in rows]
    n_h = sum(e.kind == "harmful" for e in used)
    resp_tokens = {k: sum(r.n_response for r in rows if r.example.kind == k) for k in ("useful", "safety", "harmful")}
    n_resp = sum(resp_tokens.values())

    # model copy in float32, trainable
    orig_dtype = lm.dtype
    seed_everything(cfg.seed)
    model = copy.deepcopy(lm.model).to(torch.float32)  # a copy on lm's device(s); only the dtype changes
    train_device = input_device(model)
    orig_attn = getattr(lm.model.config, "_attn_implementation", None)
    train_attn = orig_attn
    if cfg.attn_implementation and cfg.attn_implementation != orig_attn:
        try:
            model.set_attn_implementation(cfg.attn_implementation)
            train_attn = cfg.attn_implementation
        except (ValueError, ImportError, AttributeError):  # arch without that kernel: keep the model's
            pass
    if cfg.method == "lora":
        model.requires_grad_(False)
        model = _lora_wrap(model, cfg)
    else:
        model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    lr = cfg.learning_rate
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    n_batches = math.ceil(len(rows) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs
    warm = math.ceil(cfg.warmup * total) if cfg.warmup > 0 else 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"finetune {recipe_data.name} ({cfg.method})", unit="step")
    losses: list[dict[str, Any]] = []
    model.train()
    t_train = time.perf_counter()
    step = 0
    try:
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(rows), generator=gen).tolist()
            batches = [order[s:s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
            for g in range(0, len(batches), cfg.grad_accum):
                group = [collate([rows[i] for i in b], pad) for b in batches[g:g + cfg.grad_accum]]
                n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
                step_loss = 0.0
                for b in group:
                    ls, _ = _loss_sum(model, b)
                    (ls / n_tok).backward()
                    step_loss += float(ls.detach())
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
                cur = lr * lr_factor(step, total, warm)
                for pg in opt.param_groups:
                    pg["lr"] = cur
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                row = {"step": step, "epoch": epoch + 1, "lr": cur, "loss": step_loss / n_tok, "n_tokens": n_tok,
                       "n_examples": sum(b["input_ids"].shape[0] for b in group), "grad_norm": float(gn),
                       "seconds": round(time.perf_counter() - t_train, 3)}
                if not math.isfinite(row["loss"]):
                    raise WorkbenchError(f"training loss became {row['loss']} at step {step}; lower --lr")
                losses.append(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    train_s = time.perf_counter() - t_train
    if cfg.method == "lora":
        model = model.merge_and_unload()
    model.eval()
    model.requires_grad_(False)
    if train_attn != orig_attn and orig_attn is not None:
        model.set_attn_implementation(orig_attn)
    model = model.to(orig_dtype)

    # -- write everything into a temporary sibling folder, then rename -----------------------------
    t_save = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        st = tmp / "model.safetensors"
        if not st.exists():
            raise WorkbenchError(f"save_pretrained wrote no single model.safetensors in {tmp} "
                                 f"(files: {', '.join(p.name for p in tmp.iterdir())})")
        _write_jsonl(tmp / "examples.jsonl", [e.to_dict() for e in recipe_data.examples])
        if too_long:
            _write_jsonl(tmp / "too_long.jsonl", too_long)
        write_csv(tmp / "loss.csv", losses)
        from workbench.io import save_figure

        save_figure(_loss_plot(losses, f"{recipe_data.name} ({cfg.method}) on {lm.model_id}"), tmp / "loss.png")
        rec_dir = tmp / "recipe"
        for name, recs in recipe_data.records.items():
            rec_dir.mkdir(exist_ok=True)
            _write_jsonl(rec_dir / f"{name}.jsonl", recs)
        if recipe_data.direction is not None:
            from workbench.vectors import save_directions

            rec_dir.mkdir(exist_ok=True)
            save_directions(rec_dir / "refusal_direction.safetensors", [recipe_data.direction])
        example_text = None
        if rows:
            example_text = tok.decode(rows[0].input_ids)
        report = {
            "recipe": recipe_data.name,
            "method": cfg.method,
            "real_harmful_share": n_h / len(used),
            "n_harmful": n_h,
            "n_total": len(used),
            "n_examples": len(used),
            "counts": {k: sum(e.kind == k for e in used) for k in ("useful", "safety", "harmful")},
            "n_examples_recipe": len(recipe_data.examples),
            "n_dropped_too_long": len(too_long),
            "max_length": cfg.max_length,
            "harmful_response_token_share": (resp_tokens["harmful"] / n_resp) if n_resp else 0.0,
            "response_tokens": resp_tokens,
            "steps": total,
            "epochs": cfg.epochs,
            "warmup_steps": warm,
            "initial_loss": losses[0]["loss"],
            "final_loss": losses[-1]["loss"],
            "data_hash": recipe_data.hash,
            "train_data_hash": examples_hash(used),
            "data_hash_note": "sha256 of json.dumps([example dicts], sort_keys=True); data_hash covers examples.jsonl, "
                              "train_data_hash the examples left after the max-length filter",
            "seconds": None,  # filled below
            "seconds_detail": {},
            "base_model": {"model_id": lm.model_id, "checksum": lm.checksum, "source": lm.source,
                           "arch": type(lm.model).__name__, "n_layers": lm.n_layers, "d_model": lm.d_model},
            "checkpoint": {"dtype": str(orig_dtype).replace("torch.", ""), "train_dtype": "float32",
                           "model_safetensors_sha256": sha256_file(st), "n_trainable_params": n_trainable,
                           "lora": ({"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets,
                                     "dropout": cfg.lora_dropout, "merged": True} if cfg.method == "lora" else None)},
            "format": {
                "chat_template": not fmt.raw,
                "system_prompt": fmt.system_prompt,
                "template_hash": fmt.template_hash(tok),
                "prompt_tokenisation": "workbench.chat.tokenize_prompts (identical to evaluation's encode)",
                "end_of_turn": eot,
                "end_of_turn_source": eot_src,
                "end_of_turn_ids": eot_ids,
                "response_prefix": response_prefix(fmt),
                "end_of_turn_stops_generation": bool(eot_ids) and eot_ids[-1] in gen_eos,
                "loss": "response tokens + end-of-turn only (prompt tokens labelled -100), mean over the "
                        "accumulated batch's response tokens",
                "padding": "left, position ids from the attention mask",
                "example": example_text,
            },
            "hyperparameters": cfg.to_dict(),
            "recipe_info": recipe_data.info,
            "torch_threads": torch.get_num_threads(),
            "device": str(train_device),
            "train_attention": train_attn,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        }
        save_s = time.perf_counter() - t_save
        total_s = time.perf_counter() - t_start
        rec_s = float(recipe_data.info.get("seconds", 0.0) or 0.0)
        report["seconds_detail"] = {"recipe": rec_s, "train": round(train_s, 2), "save": round(save_s, 2),
                                    "finetune_total": round(total_s, 2)}
        report["seconds"] = round(total_s + rec_s, 2)
        write_json(tmp / "report.json", report)
        write_json(tmp / "run_config.json", {"recipe": recipe_data.name, **cfg.to_dict(),
                                             "recipe_summary": {k: v for k, v in recipe_data.summary().items()
                                                                if k != "harmful"}})
        write_json(tmp / "environment.json", environment())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        _commit(tmp, out, cfg.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FinetuneResult(out, report, losses, model)
