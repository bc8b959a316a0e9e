"""Chat templates: how a conversation becomes the text a model reads.

A conversation is a list of messages `{"role": ..., "content": ...}` with
roles system / user / assistant. A tokenizer that carries its own
`chat_template` (tokenizer_config.json) is rendered with it; one that does not
gets `DEFAULT_CHAT_TEMPLATE`, and `chat_template` says so (callers print a
note: never a silent choice). Rendering goes through transformers'
`apply_chat_template`, so a fine-tuned checkpoint whose tokenizer directory
carries the template (`save_template`) formats prompts the same way in every
tool that loads it.

The "bytes" tokenizer (`dynamo_jax.tokenizer.ByteTokenizer`) is refused: its
EOS is id 256, which no text can spell, so a template cannot end an assistant
turn with it and a chat model trained on it would never learn to stop.
"""

from __future__ import annotations

import json
import os

from dynamo_jax.errors import ConfigError
from dynamo_jax.fileio import atomic_write_text

# Plain text, no special tokens besides EOS: the default model's BPE was
# trained on Early Modern English, so markers like "<|user|>" would cost many
# tokens while "### Question:" costs few. An assistant turn is
# "### Answer:\n" + content + eos_token; the generation prompt is exactly the
# "### Answer:\n" that precedes it, so the prompt rendering is a prefix of the
# full rendering (what response-only training relies on).
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '### Question:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Answer:\\n' + message['content'] + eos_token }}"
    "{%- else -%}"
    "{{ raise_exception('unknown role ' + message['role'] "
    "+ ' (expected system, user or assistant)') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Answer:\\n' }}{%- endif -%}")

DEFAULT_SOURCE = "dynamo_jax default"
ROLES = ("system", "user", "assistant")


def _refuse_bytes(tokenizer) -> None:
  if not hasattr(tokenizer, "apply_chat_template"):
    raise ConfigError(
        f"the chat template does not render: tokenizer "
        f"{type(tokenizer).__name__} has no apply_chat_template (the 'bytes' "
        "tokenizer's EOS, id 256, is not text a template can write); use a "
        "tokenizer directory, e.g. the embedded default model's")


def chat_template(tokenizer) -> tuple[str, str]:
  """(template, source): the tokenizer's own, else the project default.

  source is "tokenizer" or "dynamo_jax default"; on the latter callers print
  a one-line note to stderr (`default_note`).
  """
  _refuse_bytes(tokenizer)
  own = getattr(tokenizer, "chat_template", None)
  if isinstance(own, dict):  # named templates: transformers uses "default"
    own = own.get("default")
  if isinstance(own, str) and own.strip():
    return own, "tokenizer"
  return DEFAULT_CHAT_TEMPLATE, DEFAULT_SOURCE


def default_note(source: str) -> str | None:
  """The one-line stderr note for `source`, or None when nothing to say."""
  if source != DEFAULT_SOURCE:
    return None
  return ("note: the tokenizer has no chat template; using dynamo_jax's "
          "default (### Question: / ### Answer:)")


def _check_messages(messages) -> None:
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ConfigError("the chat template does not render: messages must be a "
                      "non-empty list of {role, content} objects")
  for k, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m:
      raise ConfigError(f"the chat template does not render: message {k} has "
                        "no 'role'")
    if m["role"] not in ROLES:
      raise ConfigError(f"the chat template does not render: message {k} has "
                        f"role {m['role']!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(m.get("content"), str):
      raise ConfigError(f"the chat template does not render: message {k} "
                        f"({m['role']!r}) has no string 'content'")


def render(tokenizer, messages, *, add_generation_prompt: bool,
           template: str | None = None) -> str:
  """The conversation as text, through `tokenizer.apply_chat_template`.

  template: a Jinja chat template; None = `chat_template(tokenizer)`. Any
  failure to render (syntax, undefined variable, unknown role) is a
  one-line ConfigError.
  """
  _refuse_bytes(tokenizer)
  _check_messages(messages)
  if template is None:
    template, _ = chat_template(tokenizer)
  import jinja2  # pylint: disable=import-outside-toplevel
  try:
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, chat_template=template,
        add_generation_prompt=add_generation_prompt)
  except jinja2.TemplateError as e:
    where = (f" (line {e.lineno})"
             if isinstance(e, jinja2.TemplateSyntaxError) else "")
    reason = " ".join(str(e).split()) or type(e).__name__
    raise ConfigError(f"the chat template does not render{where}: "
                      f"{type(e).__name__}: {reason}") from None
  except (TypeError, ValueError, KeyError) as e:
    raise ConfigError(f"the chat template does not render: "
                      f"{type(e).__name__}: {' '.join(str(e).split())}"
                      ) from None
  if not isinstance(text, str):
    raise ConfigError("the chat template does not render: it produced "
                      f"{type(text).__name__}, not text")
  return text


def save_template(tokenizer_dir: str | os.PathLike, template: str) -> None:
  """Writes `template` as tokenizer_config.json's "chat_template" (atomic).

  transformers' AutoTokenizer then loads it as `tokenizer.chat_template`.
  """
  path = os.path.join(os.fspath(tokenizer_dir), "tokenizer_config.json")
  try:
    with open(path, encoding="utf-8") as fh:
      config = json.load(fh)
  except FileNotFoundError:
    config = {}
  except (OSError, ValueError) as e:
    raise ConfigError(f"cannot read {path} to store the chat template: "
                      f"{e}") from None
  if not isinstance(config, dict):
    raise ConfigError(f"{path} is not a JSON object; cannot store the chat "
                      "template in it")
  config["chat_template"] = template
  atomic_write_text(path, json.dumps(config, indent=2, ensure_ascii=False)
                    + "\n")
