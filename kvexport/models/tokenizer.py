"""SmolLM's byte-level BPE tokenizer from ``tokenizer.json`` plus its chat template.

Uses the ``tokenizers`` library directly (fast to load, no transformers import). Prompts are
encoded as given, without adding special tokens; ``--chat`` renders the model's chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class Tokenizer:
    """Encode/decode plus chat template and end-of-sequence ids of one model."""

    def __init__(self, directory: Path, eos_ids: list[int] | None = None, bos_id: int | None = None):
        self.directory = Path(directory)
        self._tok = HFTokenizer.from_file(str(self.directory / "tokenizer.json"))
        cfg_path = self.directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template_path = self.directory / "chat_template.jinja"
        self.chat_template = template_path.read_text() if template_path.is_file() else cfg.get("chat_template")
        ids = [self._tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self.eos_ids = sorted(set(eos_ids or []) | {i for i in ids if i is not None})
        self.bos_id = bos_id if bos_id is not None else self._tok.token_to_id("<|im_start|>")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def apply_chat_template(self, user_message: str) -> str:
        """Render a one-turn chat with the generation prompt appended."""
        if not self.chat_template:
            raise ValueError(f"no chat template in {self.directory}; drop --chat")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        template = env.from_string(self.chat_template)
        return template.render(messages=[{"role": "user", "content": user_message}], add_generation_prompt=True)
