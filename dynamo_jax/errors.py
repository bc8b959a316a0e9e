"""Errors raised on bad input. Each message names what is wrong and how to fix it."""


class DynamoError(ValueError):
  """Base class of the errors this package raises on bad input."""


class ConfigError(DynamoError):
  """A model configuration this package cannot represent exactly."""


class CheckpointError(DynamoError):
  """A checkpoint that is missing, corrupt, or does not match its config."""


class InputError(DynamoError):
  """Token ids or decoding arguments that the model cannot take."""
