"""Chat: templates, instruction data for fine-tuning, interactive use."""
