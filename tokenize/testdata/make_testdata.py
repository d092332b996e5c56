#!/usr/bin/env python3
"""Makes the token producer's test data: a small Llama-3-style BPE tokenizer trained on the
project's own docs, its tokenizer_config.json (with the chat template of chat_template.jinja),
and expected.json, the ids Hugging Face's Python stack gives for a set of requests.

Run it with `make tokenizer-testdata` (installs the pinned `tokenizers` and `jinja2` into .venv).
The outputs are checked in; the Rust tests only read them, so they need no Python.

How the expected ids are made is how vLLM makes them:
- completions: `tokenizer.encode(prompt, add_special_tokens=True)` (the post-processor adds
  <|begin_of_text|>);
- chat: the messages rebuilt as vLLM rebuilds them for the template (`vllm_conversation`
  below, written for the project from vLLM's `vllm/entrypoints/chat_utils.py`: one content
  shape per template, only the keys it keeps, tool-call arguments decoded), then the template
  rendered as transformers' `apply_chat_template` renders it (jinja2's
  ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, the loopcontrols extension, its
  `tojson`, `raise_exception`), with `messages`, `tools`, `add_generation_prompt` (vLLM's
  default: true), `bos_token`, `eos_token`; then encoded with `add_special_tokens=False`.
  Each chat is rendered with both test templates: chat_template.jinja (which loops over
  message content: vLLM's "openai" content format) and chat_template_string.jinja ("string").

The tokenizer is trained once (`--retrain` trains it again, from the docs as they are then, and
changes every id); otherwise the checked-in tokenizer.json is reused.
"""

import json
import pathlib
import re
import sys

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# Llama 3's pre-tokenizer split (the regex of its tokenizer.json): contractions, letter runs
# with one leading non-letter, numbers in groups of 3, punctuation runs, newlines, spaces.
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
VOCAB_SIZE = 640  # 256 bytes + 384 merges: a few KB, not a real model's vocabulary


def train() -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [(ROOT / name).read_text(encoding="utf-8") for name in ("README.md", "ARCHITECTURE.md")]
    tok.train_from_iterator(corpus, trainer=trainer)
    # The special tokens after the vocabulary, as Llama 3's (128000 onwards).
    tok.add_special_tokens(SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    return tok


def hf_environment() -> jinja2.Environment:
    """The environment transformers compiles chat templates in."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather — in °C — for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

COMPLETIONS = [
    "Hello, world!",
    "The EPP routes each request to the replica whose KV cache holds its prefix.",
    "Numbers: 1 12 123 1234 12345 3.14159; dates 2026-11-30.",
    "Contractions: it's, we're, they've, I'm, you'll, he'd. SHOUTING IT'S LOUD.",
    "  leading spaces,\ttabs\tand\n\nnewlines\r\n  and trailing spaces   ",
    "Unicode: émigré naïve café, Ελληνικά, 日本語のテキスト, emoji 🚀🦀, ‘quotes’ — dashes.",
    "A special token written in a prompt, <|eot_id|>, is that special token.",
    "",
]

CHATS = [
    {"messages": [{"role": "user", "content": "Hi there"}]},
    {
        "messages": [
            {"role": "system", "content": "  Be brief.  "},
            {"role": "user", "content": "What is a KV cache?"},
            {"role": "assistant", "content": "Stored attention keys and values."},
            {"role": "user", "content": "And prefix caching?"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Describe "},
                {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}},
                {"type": "text", "text": "this, please."},
            ]},
        ],
        "add_generation_prompt": False,
    },
    {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "You route requests."}]},
            {"role": "user", "content": "Weather in Zürich for 3 days?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\", \"days\": 3}"}},
            ]},
            {"role": "tool", "content": "{\"temp\": 4}"},
        ],
        "tools": [WEATHER_TOOL],
    },
    {
        "messages": [
            {"role": "system", "extra": "dropped by vLLM", "content": [
                {"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=5e1f\nRoute well."},
                {"type": "text", "text": "x-anthropic-billing-header: cch=only"},
            ]},
            {"role": "user", "name": "ana", "content": [
                {"type": "text", "text": "First part."},
                "a bare string part",
                {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                {"type": "text", "text": "Last part."},
            ]},
            {"role": "assistant", "content": "", "reasoning": "Think first.", "tool_calls": [
                {"id": "c2", "type": "function", "extra": 1, "function": {"name": "a", "arguments": "not json", "x": 2}},
                {"id": "c3", "type": "function", "function": {"name": "b", "arguments": "[1, 2]"}},
                {"id": "c4", "type": "function", "function": {"name": "c", "arguments": ""}},
                {"id": "c5", "type": "function", "function": {"name": "d", "arguments": {"x": 1}}},
            ]},
            {"role": "tool", "tool_call_id": "c2", "content": [
                {"type": "text", "text": "ok"}, {"type": "text", "text": "twice"}]},
            {"role": "tool", "tool_call_id": "c3", "content": [
                {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "u"}},
                {"type": "text", "text": "this"}]},
            {"role": "assistant", "content": "Done.", "tool_calls": []},
        ]
    },
]


TEXT_PARTS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
MEDIA_PARTS = {
    "image_url": "image",
    "input_image": "image",
    "image_embeds": "image",
    "image_pil": "image",
    "audio_url": "audio",
    "input_audio": "audio",
    "audio_embeds": "audio",
    "video_url": "video",
}
BILLING_HEADER = "x-anthropic-billing-header"
CONTENT_LOOP = re.compile(
    r"\{%[-+]?\s*for\s+[\w\s,]+?\s+in\s+[^%]*?(\['content'\]|\[\"content\"\]|\.content)\s*(\|[^%]*?)?[-+]?%\}"
)


def content_format(template: str) -> str:
    """vLLM's `auto`: "openai" for a template that loops over a message's content."""
    template = re.sub(r"\{#.*?#\}", "", template, flags=re.S)
    return "openai" if CONTENT_LOOP.search(template) else "string"


def vllm_conversation(messages: list, fmt: str) -> list:
    """The messages as vLLM gives them to a chat template of content format `fmt`."""
    out = []
    for m in messages:
        content = m.get("content")
        if content is None:
            parts = []
        elif isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            parts = content
        texts, wrapped = [], []
        for p in parts:
            if isinstance(p, str):
                text = p
            elif p.get("type") in TEXT_PARTS:
                text = p.get(TEXT_PARTS[p["type"]])
                if text is None:
                    continue
            else:
                if p.get("type") in MEDIA_PARTS:
                    wrapped.append({"type": MEDIA_PARTS[p["type"]]})
                continue
            plain = isinstance(p, str) or p.get("type") == "text"
            if m["role"] == "system" and plain and text.startswith(BILLING_HEADER):
                text = text.partition("\n")[2]
                if not text:
                    continue
            texts.append(text)
            wrapped.append({"type": "text", "text": text})
        media = any(part["type"] != "text" for part in wrapped)
        if fmt == "string" or (m["role"] == "tool" and not media):
            content = "\n".join(texts)
        else:
            content = wrapped
        msg = {"role": m["role"], "content": content}
        if m["role"] == "assistant":
            if m.get("tool_calls") is not None:
                msg["tool_calls"] = list(m["tool_calls"])
            if m.get("reasoning") is not None:
                msg["reasoning"] = m["reasoning"]
                msg["reasoning_content"] = m["reasoning"]
        elif m["role"] == "tool" and "tool_call_id" in m:
            msg["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if isinstance(m.get("task"), str):
            msg["task"] = m["task"]
        if m["role"] == "developer":
            msg["tools"] = m.get("tools")
        out.append(msg)
    for msg in out:
        calls = msg.get("tool_calls")
        if msg["role"] != "assistant" or not isinstance(calls, list):
            continue
        if not calls:
            del msg["tool_calls"]
            continue
        decoded = []
        for call in calls:
            function = call["function"]
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments:
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    arguments = None
            arguments = arguments if isinstance(arguments, dict) and arguments else {}
            # The server validates a call as OpenAI's typed dicts (pydantic): their keys in the
            # types' order, others dropped.
            function = {"arguments": arguments, **({"name": function["name"]} if "name" in function else {})}
            decoded.append(
                {k: (function if k == "function" else call[k]) for k in ("id", "function", "type") if k in call}
            )
        msg["tool_calls"] = decoded
    return out


def main() -> None:
    path = HERE / "tokenizer.json"
    if "--retrain" in sys.argv[1:] or not path.exists():
        tok = train()
        tok.save(str(path), pretty=False)
    else:
        tok = Tokenizer.from_file(str(path))
    template = (HERE / "chat_template.jinja").read_text(encoding="utf-8")
    string_template = (HERE / "chat_template_string.jinja").read_text(encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "model_max_length": 131072,
        "chat_template": template,
    }
    (HERE / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )

    templates = {
        "chat": hf_environment().from_string(template),
        "chat_string": hf_environment().from_string(string_template),
    }
    formats = {"chat": content_format(template), "chat_string": content_format(string_template)}
    assert formats == {"chat": "openai", "chat_string": "string"}, formats
    expected = {"completions": [], "chat": [], "chat_string": []}
    for prompt in COMPLETIONS:
        ids = tok.encode(prompt, add_special_tokens=True).ids
        expected["completions"].append({"prompt": prompt, "ids": ids})
    for key, compiled in templates.items():
        for case in CHATS:
            rendered = compiled.render(
                messages=vllm_conversation(case["messages"], formats[key]),
                tools=case.get("tools"),
                add_generation_prompt=case.get("add_generation_prompt", True),
                bos_token=config["bos_token"],
                eos_token=config["eos_token"],
            )
            ids = tok.encode(rendered, add_special_tokens=False).ids
            expected[key].append({"request": case, "rendered": rendered, "ids": ids})
    # One case per line: small diffs when the data is regenerated.
    lines = ["{"]
    for i, (key, cases) in enumerate(expected.items()):
        lines.append(f' "{key}": [')
        lines.extend(
            "  " + json.dumps(c, ensure_ascii=False) + ("," if j + 1 < len(cases) else "")
            for j, c in enumerate(cases)
        )
        lines.append(" ]" + ("," if i + 1 < len(expected) else ""))
    lines.append("}")
    (HERE / "expected.json").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
