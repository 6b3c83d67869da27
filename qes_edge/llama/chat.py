"""A model's own chat template, read from its GGUF and rendered with jinja2.

Instruct models answer well only inside the format they were tuned on (DESIGN.md, "Instruct
models need their chat template": capital-city questions score about 0.05 raw and about 0.5
through the template).  That format is in the file, as the Jinja source `tokenizer.chat_template`;
qes-edge renders it the way llama-cpp-python's Jinja2ChatFormatter and Hugging Face's
`apply_chat_template` do: a sandboxed environment with trim_blocks and lstrip_blocks, the
`loopcontrols` extension, a `tojson` filter that does not escape HTML, and the variables
`messages`, `bos_token`, `eos_token` (the texts of the vocabulary's BOS/EOS tokens),
`add_generation_prompt` and `raise_exception`.  No model's format is written by hand anywhere.

`strftime_now` is deliberately not provided: templates that use it (Llama 3.x puts today's
date in the system turn) fall back to their fixed default date, so a prompt, and therefore a
reward, does not change from one day of a run to the next.

Any failure (no template, a template that does not parse, one that raises while rendering)
is a QESError of one line that names the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from qes_edge.native.types import QESError

TEMPLATE_KEY = "tokenizer.chat_template"


class ChatTemplateError(QESError):
    """The model has no chat template, or it does not parse or render."""


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise ValueError(message)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class ChatTemplate:
    """A compiled chat template and the special-token texts it may refer to."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", model: str = "the model"):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"{model}: its chat template ({TEMPLATE_KEY}) is empty")
        self.source, self.bos_token, self.eos_token, self.model = source, bos_token, eos_token, model
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except Exception as e:  # TemplateSyntaxError and whatever else the parser raises
            raise ChatTemplateError(f"{model}: its chat template ({TEMPLATE_KEY}) does not parse "
                                    f"({_one_line(e)})") from None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The text of messages in the model's format, ending (by default) with the opening of the
        assistant's turn."""
        try:
            out = self._template.render(messages=[dict(m) for m in messages], bos_token=self.bos_token,
                                        eos_token=self.eos_token, add_generation_prompt=add_generation_prompt,
                                        raise_exception=_raise_exception)
        except Exception as e:  # the template is code from the file: any error is its failure to render
            raise ChatTemplateError(f"{self.model}: its chat template failed to render these messages "
                                    f"({_one_line(e)}); give plain text with --raw-prompt instead") from None
        if not isinstance(out, str) or not out:
            raise ChatTemplateError(f"{self.model}: its chat template rendered nothing for these messages")
        return out


def template_source(metadata: dict) -> str | None:
    """The chat template of a GGUF's decoded metadata (gguf_check.Header.metadata), or None."""
    v = metadata.get(TEMPLATE_KEY)
    return v if isinstance(v, str) and v.strip() else None


def _gguf_token_texts(path: str | Path, ids: Sequence[int]) -> list[str]:
    """Texts of some vocabulary entries, read with the gguf package (no llama.cpp needed).  Its
    reader builds an object per vocabulary entry (~170 MB peak for a 49k vocabulary): a process
    that has llama.cpp loaded passes token_text instead (as ModelDriver does)."""
    from gguf import GGUFReader
    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.tokens")
    out = []
    for i in ids:
        if field is None or not 0 <= i < len(field.data):
            out.append("")
        else:
            out.append(bytes(field.parts[field.data[i]]).decode("utf-8", "replace"))
    return out


def load_template(path: str | Path, metadata: dict | None = None,
                  token_text: Callable[[int], str] | None = None) -> ChatTemplate | None:
    """The chat template of the GGUF at path, or None when the file has none.

    metadata: the file's decoded metadata when the caller has it (our validator's Header.metadata);
    token_text: id -> text of a vocabulary entry (the loaded model's vocabulary), for the
    `bos_token` / `eos_token` strings; without it they are read from the file."""
    path = Path(path)
    if metadata is None:
        from qes_edge.gguf.check import check_gguf
        metadata = check_gguf(path).metadata
    source = template_source(metadata)
    if source is None:
        return None
    ids = [metadata.get("tokenizer.ggml.bos_token_id"), metadata.get("tokenizer.ggml.eos_token_id")]
    tokens = metadata.get("tokenizer.ggml.tokens")
    n_vocab = getattr(tokens, "count", None)
    # an id outside the vocabulary names no token (looking it up in llama.cpp aborts the process;
    # the validator refuses such files, this keeps the template safe on any metadata it is given)
    ids = [i if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < (n_vocab or 0) else -1 for i in ids]
    if token_text is not None:
        texts = [token_text(i) if i >= 0 else "" for i in ids]
    else:
        texts = _gguf_token_texts(path, ids)
    name = metadata.get("general.name")
    model = f"{path.name} ({name})" if isinstance(name, str) and name else path.name
    return ChatTemplate(source, bos_token=texts[0], eos_token=texts[1], model=model)
