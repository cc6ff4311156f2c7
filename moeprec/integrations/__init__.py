"""Bridges to other ecosystems: Hugging Face transformers modules and gpt-oss checkpoints."""
