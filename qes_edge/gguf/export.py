"""A trained model as a file other tools load: a GGUF with its own name and a record of the run,
and an ollama Modelfile beside it.

The GGUF keeps every key and tensor of the base (read and written with the `gguf` package), with
the trained tensors' bytes from replay, a new `general.name`, and `qes.*` keys that say where it
came from: run id, ledger head hash, base sha256, steps, task, noise spec.  It is written to a
temporary file beside the output, fsynced and renamed (atomic.py's rule).

The Modelfile's TEMPLATE and stop tokens are derived from the base's own chat template
(`tokenizer.chat_template`) by family (ChatML, Llama 3, Gemma): ollama templates are Go
templates, not Jinja, so an unknown family gets no TEMPLATE line (ollama then reads the chat
template from the GGUF where it knows it) and says so in a comment."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qes_edge.atomic import atomic_path

# (marker in the Jinja template, ollama TEMPLATE, stop tokens)
FAMILIES = {
    "chatml": ("<|im_start|>",
               "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
               "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
               ["<|im_start|>", "<|im_end|>"]),
    "llama3": ("<|start_header_id|>",
               "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
               "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "gemma": ("<start_of_turn>",
              "{{ if .System }}<start_of_turn>user\n{{ .System }}\n{{ end }}"
              "{{ if .Prompt }}{{ if not .System }}<start_of_turn>user\n{{ end }}{{ .Prompt }}<end_of_turn>\n{{ end }}"
              "<start_of_turn>model\n{{ .Response }}<end_of_turn>\n",
              ["<start_of_turn>", "<end_of_turn>"]),
}


def chat_family(template: str | None) -> str | None:
    if not template:
        return None
    for name, (marker, _, _) in FAMILIES.items():
        if marker in template:
            return name
    return None


def modelfile_text(gguf_name: str, template: str | None, params: dict | None = None) -> str:
    """An ollama Modelfile for the GGUF file `gguf_name` (in the same folder)."""
    lines = [f"# written by qes-edge export; `ollama create NAME -f {Path(gguf_name).name}.Modelfile`",
             f"FROM ./{Path(gguf_name).name}"]
    family = chat_family(template)
    if family:
        _, go, stops = FAMILIES[family]
        lines.append(f'TEMPLATE """{go}"""')
        lines += [f'PARAMETER stop "{s}"' for s in stops]
    elif not template:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
        lines.append("# the base model has no chat template (a base model, trained with --raw-prompt): prompts go to "
                     "it as written, as they did in training")
    else:
        lines.append("# the base's chat template is not one qes-edge can translate to an ollama TEMPLATE; "
                     "ollama uses the GGUF's own tokenizer.chat_template where it recognises it")
    for k, v in (params or {}).items():
        lines.append(f"PARAMETER {k} {v}")
    return "\n".join(lines) + "\n"


def write_gguf(base_path: Path, trained: dict[str, np.ndarray], out: Path, name: str, qes: dict) -> None:
    """Copy base_path to out with the trained tensors' bytes, general.name = name and qes.* keys."""
    import gguf

    reader = gguf.GGUFReader(base_path)
    arch = reader.fields["general.architecture"].contents()
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
        for field in reader.fields.values():
            if field.name in ("general.architecture", "general.name") or field.name.startswith("GGUF."):
                continue
            vtype = field.types[0]
            if field.name == "general.alignment":
                writer.data_alignment = int(field.contents())
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        writer.add_key_value("general.name", name, gguf.GGUFValueType.STRING)
        for key, value in qes.items():
            vtype = gguf.GGUFValueType.UINT32 if isinstance(value, int) else gguf.GGUFValueType.STRING
            writer.add_key_value(f"qes.{key}", value if isinstance(value, int) else str(value), vtype)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            data = t.data
            if t.name in trained:
                data = np.asarray(trained[t.name], dtype=np.uint8).reshape(t.data.shape).view(t.data.dtype)
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()
