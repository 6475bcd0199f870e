"""The CLIP BPE tokenizer, built offline from the committed vocabulary file.

This module owns turning ``xti/assets/bpe_simple_vocab_16e6.txt.gz`` (OpenAI's CLIP BPE merges, MIT)
into a `transformers.CLIPTokenizer` with the exact vocabulary Stable Diffusion 1.x/2.x use
(49,408 tokens; ``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407, padding with the end token),
and writing it as a tokenizer folder that ``from_pretrained`` loads without network access.

The vocabulary is laid out as CLIP defines it: the 256 byte symbols, the same 256 symbols with the
end-of-word marker ``</w>``, one token per merge rule (lines 1..48894 of the file) and the two
special tokens.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

BPE_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
"""The committed CLIP BPE merges file."""

N_MERGES = 48894
"""Merge rules CLIP uses: 49,408 - 256 - 256 - 2 (lines 1..48894 of the file, after the header)."""

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
END_OF_WORD = "</w>"


def byte_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, the table byte-level BPE is written in.

    Bytes that are printable latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
    themselves; the remaining 68 bytes (controls, space, soft hyphen...) are assigned code points
    256, 257, ... in increasing byte order. The dict's insertion order is the order CLIP numbers the
    byte symbols in: the printable bytes first, then the remapped ones.

    Returns:
        A dict of 256 entries from byte value to a one-character string.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Parse the BPE file once per process: (token, id) pairs and merge pairs, both immutable."""
    with gzip.open(BPE_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : N_MERGES + 1])
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise RuntimeError(f"{BPE_PATH} is not the CLIP BPE file (bad merge lines)")
    symbols = list(byte_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise RuntimeError(f"{BPE_PATH} does not give the {VOCAB_SIZE}-token CLIP vocabulary")
    return tuple((t, i) for i, t in enumerate(tokens)), merges  # type: ignore[return-value]


def clip_vocab() -> dict[str, int]:
    """Return a fresh copy of the CLIP vocabulary (token string → id)."""
    return dict(_vocab_and_merges()[0])


def clip_merges() -> list[tuple[str, str]]:
    """Return a fresh copy of the CLIP merge rules, highest priority first."""
    return list(_vocab_and_merges()[1])


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Build a new CLIP tokenizer (the one SD 1.x/2.x use) from the committed BPE file.

    The file is parsed once per process; every call returns a new tokenizer object, so callers may add
    tokens to it without affecting others.

    Args:
        model_max_length: Maximum sequence length (77 for Stable Diffusion).

    Returns:
        A `CLIPTokenizer` with 49,408 tokens, bos 49406, eos 49407 and padding with eos.
    """
    return CLIPTokenizer(
        vocab=clip_vocab(),
        merges=clip_merges(),
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )


def save_clip_tokenizer(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write a tokenizer folder loadable offline by ``CLIPTokenizer``/``AutoTokenizer.from_pretrained``.

    Besides what ``save_pretrained`` writes (``tokenizer.json``, ``tokenizer_config.json`` naming the
    class), the classic ``vocab.json`` and ``merges.txt`` are written too, so that older readers of the
    format (slow CLIP tokenizers, other tools) load the folder as well.

    Args:
        folder: Destination folder (created if missing).
        model_max_length: Maximum sequence length recorded in the config.

    Returns:
        The folder as a `Path`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer(model_max_length)
    tokenizer.save_pretrained(str(folder))
    vocab_file = folder / "vocab.json"
    if not vocab_file.exists():
        vocab_file.write_text(json.dumps(clip_vocab(), ensure_ascii=False), encoding="utf-8")
    merges_file = folder / "merges.txt"
    if not merges_file.exists():
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in clip_merges()]
        merges_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    config.setdefault("tokenizer_class", "CLIPTokenizer")
    config.setdefault("model_max_length", model_max_length)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return folder
