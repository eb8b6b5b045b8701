"""``[data]`` section: corpus and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """Where text comes from and how it becomes tokens."""

    path: str = field(
        default="",
        metadata={
            "help": "Text file, directory of text files, or JSONL with a 'text' field; "
            "empty: the embedded corpus (the running interpreter's standard library .py sources)."
        },
    )
    tokenizer: str = field(
        default="byte",
        metadata={"help": "'byte' (byte-level, 256 bytes + EOS), a path to a Hugging Face tokenizer.json, or a Hugging "
                          "Face model folder holding one (BOS/EOS from its config files); 'none': no tokenizer "
                          "(serving with token-id prompts only)."},
    )
    val_fraction: float = field(
        default=0.02, metadata={"help": "Fraction of documents (files) held out for validation."}
    )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key when a value is out of range."""
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
