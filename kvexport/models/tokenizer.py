"""SmolLM's byte-level BPE tokenizer from ``tokenizer.json`` plus its chat template.

Uses the ``tokenizers`` library directly (fast to load, no transformers import). Prompts are
encoded as given, without adding special tokens; ``--chat`` renders the model's chat template.
A missing or unreadable file is a :class:`KvxError` naming it (checked when the tokenizer loads).
"""

from __future__ import annotations

from pathlib import Path

import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from kvexport.errors import KvxError
from kvexport.fsutil import read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class Tokenizer:
    """Encode/decode plus chat template and end-of-sequence ids of one model."""

    def __init__(self, directory: Path, eos_ids: list[int] | None = None, bos_id: int | None = None):
        self.directory = Path(directory)
        path = self.directory / "tokenizer.json"
        if not path.is_file():
            raise KvxError(f"tokenizer file {path} is missing; copy it from the model or rebuild")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises its own Exception for every parse error
            raise KvxError(f"tokenizer file {path} is unreadable ({str(err).splitlines()[0][:120]}); "
                           "copy it again from the model or rebuild") from None
        cfg_path = self.directory / "tokenizer_config.json"
        cfg = read_json(cfg_path, "", "tokenizer file {path} is not valid JSON ({reason}); copy it again from the "
                        "model or rebuild", KvxError) if cfg_path.is_file() else {}
        template_path = self.directory / "chat_template.jinja"
        try:
            template = template_path.read_text() if template_path.is_file() else None
        except UnicodeDecodeError:
            raise KvxError(f"tokenizer file {template_path} is not text; copy it again or rebuild") from None
        self.chat_template = template or (cfg.get("chat_template") if isinstance(cfg, dict) else None)
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
