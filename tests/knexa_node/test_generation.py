"""Answer cleaning (fences, end of function) and batched generation with left padding."""

from __future__ import annotations

from pathlib import Path

import pytest

from knexa_node.generation import (
    STOP_SEQUENCES,
    GenerationSettings,
    clean_completion,
    function_end,
    generate,
)
from knexa_node.models import LoraSettings, load_model, resolve_model


@pytest.mark.parametrize(("raw", "entry", "clean"), [
    ("    return x + 1\n\ndef other():\n    pass\n", None, "    return x + 1\n"),
    ("    return x\n#comment\n", None, "    return x\n"),
    ("    return x\nprint(f(2))", None, "    return x\n"),
    ("    return x\nif __name__ == '__main__':\n    main()", None, "    return x\n"),
    ("    return x\nclass A:\n    pass", None, "    return x\n"),
    ("    if x:\n        return 1\n\n    return 2\n\n\n", None, "    if x:\n        return 1\n\n    return 2\n"),
    ("    return x\n```\nThe function adds one.", None, "    return x\n"),
    ("```python\ndef f(x):\n    return x\n```\nThis function...", "f", "def f(x):\n    return x\n"),
    ("from typing import List\n\n\ndef helper(a):\n    return a\n\n\ndef f(x):\n    return helper(x)\n\nprint(f(1))",
     "f", "from typing import List\n\n\ndef helper(a):\n    return a\n\n\ndef f(x):\n    return helper(x)\n"),
    ("def f(x):\n    return x\ndef g():\n    pass", None, "def f(x):\n    return x\n"),
    ("", None, ""),
    ("   \n\n", None, ""),
    ("    return (x +\n", None, "    return (x +\n"),  # unfinished: kept as is (max_new_tokens hit)
])
def test_clean_completion(raw: str, entry: str | None, clean: str) -> None:
    assert clean_completion(raw, entry) == clean


def test_stop_set_is_covered_by_the_column_zero_rule() -> None:
    for stop in STOP_SEQUENCES:
        text = "    return 1" + stop + "rest"
        assert function_end(text) == len("    return 1")
    assert function_end("    return 1\n    more") is None


def test_cleaned_answer_runs_after_the_prompt(problems: list[dict[str, str]]) -> None:
    p = next(q for q in problems if q["entry_point"] == "add")
    for raw in (p["canonical_solution"] + "\n\nprint(add(1, 2))\n",
                "```python\n" + p["prompt"] + p["canonical_solution"] + "```\nExplanation."):
        program = p["prompt"] + clean_completion(raw, "add") + "\n" + p["test"] + "\ncheck(add)\n"
        exec(compile(program, "<answer>", "exec"), {})


@pytest.fixture(scope="module")
def tiny_gpt2(model_cache: Path):  # noqa: ANN201 - LoadedModel
    return load_model(resolve_model("tiny-gpt2", cache_dir=model_cache), lora=LoraSettings(), threads=1)


def test_batched_greedy_equals_one_by_one(tiny_gpt2, problems: list[dict[str, str]]) -> None:  # noqa: ANN001
    prompts = [p["prompt"] for p in problems[:5]]
    settings = GenerationSettings(max_new_tokens=8, batch_size=8)
    batched = generate(tiny_gpt2.model, tiny_gpt2.tokenizer, prompts, settings=settings)
    single = [generate(tiny_gpt2.model, tiny_gpt2.tokenizer, [p], settings=settings).raw[0] for p in prompts]
    assert batched.raw == single  # left padding does not change what a prompt yields
    assert tiny_gpt2.tokenizer.padding_side == "right"  # restored
    assert 0 < batched.new_tokens <= 5 * 8


def test_sampling_shapes_and_seed(tiny_gpt2, problems: list[dict[str, str]]) -> None:  # noqa: ANN001
    prompts = [p["prompt"] for p in problems[:3]]
    settings = GenerationSettings(max_new_tokens=6, temperature=0.8, top_p=0.95, batch_size=4)
    a = generate(tiny_gpt2.model, tiny_gpt2.tokenizer, prompts, settings=settings, num_return_sequences=4, seed=1)
    b = generate(tiny_gpt2.model, tiny_gpt2.tokenizer, prompts, settings=settings, num_return_sequences=4, seed=1)
    assert [len(t) for t in a.texts] == [4, 4, 4]
    assert a.raw == b.raw
    assert len({t for row in a.raw for t in row}) > 1  # sampling actually samples


def test_chat_format_and_answer_shapes(tiny_gpt2) -> None:  # noqa: ANN001
    from knexa_node.generation import (
        body_of,
        format_prompt,
        is_full_function,
        training_target,
        uses_chat,
    )

    tok = tiny_gpt2.tokenizer
    prompt = 'def f(x):\n    """Double x."""\n'
    assert not uses_chat(tok) and format_prompt(tok, prompt) == prompt  # base model: raw
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    try:
        chat = format_prompt(tok, prompt)
        assert chat.startswith("<user>") and prompt in chat and chat.endswith("<assistant>```python\n")
        assert format_prompt(tok, prompt, "raw") == prompt
    finally:
        tok.chat_template = None
    body, full = "    return 2 * x\n", 'def f(x):\n    """Twice."""\n    return 2 * x\n'
    assert is_full_function(full) and not is_full_function(body)
    assert training_target(prompt, body, chat=True) == prompt + body
    assert training_target(prompt, full, chat=True) == full and training_target(prompt, body, chat=False) == body
    assert body_of(full, "f") == body and body_of(body, "f") == body and body_of("def f(:\n", "f") == "def f(:\n"


def test_generation_keeps_the_kv_cache_on_a_gradient_checkpointing_model(
        model_cache: Path, problems: list[dict[str, str]]) -> None:
    """Training settings never leak into generation: with gradient checkpointing on and use_cache
    off in the model's configs, every decoding step after the first feeds one new token (KV cache)."""
    loaded = load_model(resolve_model("tiny-gpt2", cache_dir=model_cache), lora=LoraSettings(), threads=1,
                        gradient_checkpointing=True)
    base = loaded.model.get_base_model()
    base.config.use_cache = False
    if base.generation_config is not None:
        base.generation_config.use_cache = False
    widths: list[int] = []
    hook = base.register_forward_pre_hook(
        lambda _m, _args, kwargs: widths.append(int(kwargs["input_ids"].shape[1])), with_kwargs=True)
    try:
        settings = GenerationSettings(max_new_tokens=6, batch_size=2)
        out = generate(loaded.model, loaded.tokenizer, [p["prompt"] for p in problems[:2]], settings=settings)
    finally:
        hook.remove()
    assert out.new_tokens > 0 and len(widths) >= 2
    assert widths[0] > 1 and set(widths[1:]) == {1}
