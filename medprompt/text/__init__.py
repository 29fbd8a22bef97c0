"""Frozen text encoders (prompt and class vectors) and free-text prompt resolution by similarity."""

from medprompt.text.encoders import SPEC_HELP, TextEncoder, class_embedding, class_texts, get_text_encoder

__all__ = ["SPEC_HELP", "TextEncoder", "class_embedding", "class_texts", "get_text_encoder"]
