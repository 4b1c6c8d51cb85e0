"""Batched code generation: teacher answers for X_u (SPEC round step 3) and Pass@k samples.

Prompts are HumanEval-style (imports, signature, docstring); an answer is the text that follows
the prompt, cleaned to code. Generation is batched with left padding (the new tokens of every row
then start at the same column) and prompts sorted by length, so a batch wastes little on padding.

"End of function" is decided on decoded text, so it works for every tokenizer:

* body mode (the usual case): the answer continues the prompt's function, so the function ends
  at the first non-blank line at column 0 after the first line. This subsumes the standard
  HumanEval stop set (:data:`STOP_SEQUENCES`: ``\\ndef``, ``\\nclass``, ``\\nif __name__``,
  ``\\nprint(``, ``\\n#`` at column 0) and also stops at closing markdown fences.
* full-function mode: an (instruct) model rewrites the whole function from ``def`` (perhaps
  after imports or inside a markdown fence). The answer keeps everything up to the end of the
  ``entry_point`` function (or the first function when the entry point is unknown). Appended to
  the prompt it redefines the docstring-only stub, which is valid Python.

Instruct models with a chat template get the prompt in a user turn and write whole functions
(:func:`format_prompt`); :func:`training_target` gives every training pair, canonical or a
teacher's answer of either shape, the shape the model itself produces.

A stopping criterion applies the same rule while generating, so a batch stops as soon as every
row has finished its function instead of running to ``max_new_tokens``.
"""

from __future__ import annotations

import ast
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

__all__ = [
    "CHAT_REQUEST",
    "STOP_SEQUENCES",
    "GenerationResult",
    "GenerationSettings",
    "body_of",
    "clean_completion",
    "format_prompt",
    "function_end",
    "generate",
    "is_full_function",
    "training_target",
    "uses_chat",
]

logger = logging.getLogger(__name__)

#: The standard HumanEval stop set (all at column 0); see the module docstring.
STOP_SEQUENCES: tuple[str, ...] = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
_FENCE = re.compile(r"^\s*```[\w+-]*[ \t]*\n?")
_FULL = re.compile(r"^(def |async def |import |from |class |@)")


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    max_new_tokens: int = 128
    #: 0 = greedy; otherwise nucleus sampling at this temperature
    temperature: float = 0.0
    top_p: float = 0.95
    #: prompts per forward batch (divided by num_return_sequences when sampling several)
    batch_size: int = 8
    #: prompts longer than this many tokens keep their last max_prompt_len tokens
    max_prompt_len: int = 512
    progress: bool = False


@dataclass(frozen=True, slots=True)
class GenerationResult:
    texts: list[list[str]]  #: per prompt, its cleaned completions
    raw: list[list[str]]  #: per prompt, the decoded new text before cleaning
    new_tokens: int  #: generated tokens (excluding padding after a row finished)
    seconds: float


#: The user turn for chat models; the assistant's reply is pre-filled with an open code fence.
CHAT_REQUEST = "Complete the following Python function.\n\n```python\n{prompt}```"


def uses_chat(tokenizer: Any, mode: str = "auto") -> bool:
    """Whether prompts go through the chat template: ``chat``, or ``auto`` with a template."""
    if mode not in ("auto", "raw", "chat"):
        raise ValueError(f"prompt format must be auto, raw or chat, got {mode!r}")
    return mode == "chat" or (mode == "auto" and bool(getattr(tokenizer, "chat_template", None)))


def format_prompt(tokenizer: Any, prompt: str, mode: str = "auto") -> str:
    """The model input for a HumanEval-style ``prompt``.

    Raw (base models): the prompt itself; the model continues the function body. Chat
    (instruct models such as SmolLM2-Instruct): the prompt in a user turn and the assistant's
    reply opened with a code fence, so the model writes the whole function (pre-filling the
    prompt too makes small instruct models close the fence at once). Either answer, appended
    to the prompt, is a valid program (see the module docstring).
    """
    if not uses_chat(tokenizer, mode):
        return prompt
    head = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_REQUEST.format(prompt=prompt)}],
                                         tokenize=False, add_generation_prompt=True)
    return f"{head}```python\n"


def is_full_function(answer: str) -> bool:
    """True when an answer rewrites the function (starts at ``def``/imports), not a body."""
    return bool(_FULL.match(answer.lstrip("\n")))


def training_target(prompt: str, answer: str, chat: bool) -> str:
    """What a model is trained to produce for ``prompt`` given an answer of either shape.

    A chat-format model writes whole functions, so a body (a canonical solution, or a base-model
    teacher's answer in AKD) becomes ``prompt + body``; a raw-format model continues the prompt,
    for which both a body and a full redefinition are valid continuations.
    """
    if chat and not is_full_function(answer):
        return prompt + answer
    return answer


def body_of(answer: str, entry_point: str | None) -> str:
    """The statements of ``entry_point``'s body in a full-function answer (docstring dropped).

    Used to compare answers of both shapes with canonical solutions (CodeBLEU); a body, or
    code that does not parse, comes back unchanged.
    """
    if not is_full_function(answer):
        return answer
    try:
        tree = ast.parse(answer)
    except SyntaxError:
        return answer
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    func = next((f for f in funcs if f.name == entry_point), funcs[0] if funcs else None)
    if func is None:
        return answer
    stmts = func.body
    if len(stmts) > 1 and isinstance(stmts[0], ast.Expr) and isinstance(getattr(stmts[0], "value", None), ast.Constant):
        stmts = stmts[1:]  # the docstring
    lines = answer.splitlines(keepends=True)
    return "".join(lines[stmts[0].lineno - 1:func.end_lineno])


def _unfence(text: str) -> tuple[str, bool]:
    """Text inside a leading markdown fence (up to the closing fence), and whether one was found."""
    m = _FENCE.match(text)
    if not m:
        return text, False
    body = text[m.end():]
    close = body.find("```")
    return (body if close < 0 else body[:close]), close >= 0


def function_end(text: str, entry_point: str | None = None) -> int | None:
    """Index in ``text`` where the answer's function has ended, or None if it has not yet."""
    full = bool(_FULL.match(text.lstrip("\n")))
    header = re.compile(rf"(async )?def {re.escape(entry_point)}\s*\(" if entry_point else r"(async )?def ")
    inside = not full  # body mode: the prompt already opened the function
    pos = 0
    for i, line in enumerate(text.split("\n")):
        at_col0 = bool(line) and not line[0].isspace()
        if full and at_col0 and not inside:
            inside = bool(header.match(line))  # imports, helpers, decorators before it are kept
        elif at_col0 and i > 0 and inside:
            return pos - 1  # cut before the newline that opens this line
        pos += len(line) + 1
    return None


def clean_completion(text: str, entry_point: str | None = None) -> str:
    """Strip markdown fences and cut at the end of the function (see module docstring)."""
    text, _ = _unfence(text)
    cut = function_end(text, entry_point)
    text = text if cut is None else text[:cut]
    return text.rstrip() + "\n" if text.strip() else ""


class _FunctionEnded(StoppingCriteria):
    """Per-row stop once the decoded new text contains a finished function."""

    def __init__(self, tokenizer: Any, prompt_len: int, entry_points: Sequence[str | None]) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.entry_points = list(entry_points)
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for row in torch.nonzero(~self.done).flatten().tolist():
            text = self.tokenizer.decode(input_ids[row, self.prompt_len:], skip_special_tokens=True)
            body, closed = _unfence(text)
            if closed or function_end(body, self.entry_points[row]) is not None:
                self.done[row] = True
        return self.done.clone().to(input_ids.device)  # type: ignore[return-value]


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, settings: GenerationSettings,
             num_return_sequences: int = 1, entry_points: Sequence[str | None] | None = None,
             seed: int = 0, device: Any = "cpu") -> GenerationResult:
    """Generate ``num_return_sequences`` cleaned completions for every prompt.

    Args:
        model: a causal LM (PeftModel or plain); put in eval mode for the call.
        tokenizer: its tokenizer (padding side is switched to left for the call, then restored).
        prompts: HumanEval-style prompts; results come back in the same order.
        settings: sampling and batching; temperature 0 is greedy.
        num_return_sequences: samples per prompt (pass@k needs k or more).
        entry_points: per prompt, the function name to keep in full-function mode.
        seed: seeds sampling, so the same call gives the same answers.
    """
    t0 = time.perf_counter()
    entry_points = list(entry_points) if entry_points is not None else [None] * len(prompts)
    greedy = settings.temperature <= 0
    nrs = max(1, num_return_sequences)
    gen_cfg = GenerationConfig(
        # the KV cache explicitly: gradient checkpointing (LearningConfig) may have switched the
        # model's configs' use_cache off for training; generation must not inherit that
        use_cache=True,
        max_new_tokens=settings.max_new_tokens, do_sample=not greedy, num_return_sequences=nrs,
        temperature=None if greedy else settings.temperature, top_p=None if greedy else settings.top_p,
        top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    per_batch = max(1, settings.batch_size // nrs)
    texts: list[list[str]] = [[] for _ in prompts]
    raw: list[list[str]] = [[] for _ in prompts]
    new_tokens = 0
    was_training = model.training
    side, trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    model.eval()
    try:
        torch.manual_seed(seed)
        batches = [order[i:i + per_batch] for i in range(0, len(order), per_batch)]
        for batch in tqdm(batches, desc="generate", disable=not settings.progress, leave=False):
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, truncation=True,
                            max_length=settings.max_prompt_len).to(device)
            width = enc["input_ids"].shape[1]
            stop = _FunctionEnded(tokenizer, width, [entry_points[i] for i in batch for _ in range(nrs)])
            with torch.no_grad():
                out = model.generate(**enc, generation_config=gen_cfg,
                                     stopping_criteria=StoppingCriteriaList([stop]))
            gen = out[:, width:]
            if tokenizer.pad_token_id is not None:
                new_tokens += int((gen != tokenizer.pad_token_id).sum())
            else:
                new_tokens += gen.numel()
            decoded = tokenizer.batch_decode(gen, skip_special_tokens=True)
            for row, text in enumerate(decoded):
                i = batch[row // nrs]
                raw[i].append(text)
                texts[i].append(clean_completion(text, entry_points[i]))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, trunc
        model.train(was_training)
    seconds = time.perf_counter() - t0
    logger.debug("generated %d x %d completions, %d new tokens in %.1fs", len(prompts), nrs, new_tokens, seconds)
    return GenerationResult(texts=texts, raw=raw, new_tokens=new_tokens, seconds=seconds)
