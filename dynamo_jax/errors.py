"""Errors raised on bad input. Each message names what is wrong and how to fix it."""

import json


class DynamoError(ValueError):
  """Base class of the errors this package raises on bad input."""


class ConfigError(DynamoError):
  """A model configuration this package cannot represent exactly."""


class CheckpointError(DynamoError):
  """A checkpoint that is missing, corrupt, or does not match its config."""


class InputError(DynamoError):
  """Token ids or decoding arguments that the model cannot take."""


def show_value(value) -> str:
  """A bad value as a message shows it: as JSON (as a config spells it;
  else repr), cut to one short line."""
  try:
    text = json.dumps(value)
  except (TypeError, ValueError):
    text = " ".join(repr(value).split())
  return text if len(text) <= 80 else text[:77] + "..."
