"""The CLIP tokenizer built from the committed BPE file: ids, padding, copies, save/load round-trip."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, CLIPTokenizer

from xti.tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    VOCAB_SIZE,
    build_clip_tokenizer,
    byte_to_unicode,
    save_clip_tokenizer,
)

BOS, EOS = 49406, 49407


def byte_word_id(ch: str) -> int:
    """Id of a printable ASCII character as a whole word: 256 byte symbols, then the ``</w>`` ones."""
    return 256 + ord(ch) - ord("!")


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return build_clip_tokenizer()


def test_known_prompt_ids(tok: CLIPTokenizer) -> None:
    assert tok("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]


def test_special_tokens_and_size(tok: CLIPTokenizer) -> None:
    assert len(tok) == VOCAB_SIZE == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, EOS)
    assert (BOS_TOKEN_ID, EOS_TOKEN_ID) == (BOS, EOS)
    assert tok.convert_ids_to_tokens([BOS, EOS]) == ["<|startoftext|>", "<|endoftext|>"]
    assert tok("").input_ids == [BOS, EOS]
    assert tok.model_max_length == 77


def test_vocabulary_layout(tok: CLIPTokenizer) -> None:
    # 256 byte symbols in byte_to_unicode order, the same with </w>, then one token per merge.
    symbols = list(byte_to_unicode().values())
    assert len(set(symbols)) == 256
    assert tok.convert_tokens_to_ids(symbols[:3]) == [0, 1, 2]
    assert tok.convert_tokens_to_ids(["!", "!</w>", "a</w>"]) == [0, 256, 320]
    # The first merges of the file are "i n" and "t h".
    assert tok.convert_tokens_to_ids(["in", "th"]) == [512, 513]
    # Space (byte 32) is not printable: it is remapped past the latin-1 range.
    assert byte_to_unicode()[32] == "Ġ"


def test_byte_level_ids_by_reasoning(tok: CLIPTokenizer) -> None:
    # "a" as a whole word is byte symbol 64 + 256 = 320, the id CLIP gives "a".
    assert byte_word_id("a") == 320
    # Punctuation splits off as its own word; digits are split one by one.
    assert tok("a photo, of a cat!").input_ids == [
        BOS,
        320,
        1125,
        byte_word_id(","),
        539,
        320,
        2368,
        byte_word_id("!"),
        EOS,
    ]
    assert tok("123").input_ids == [
        BOS,
        byte_word_id("1"),
        byte_word_id("2"),
        byte_word_id("3"),
        EOS,
    ]


def test_lowercase_and_whitespace(tok: CLIPTokenizer) -> None:
    ref = tok("a photo of a cat").input_ids
    assert tok("A PHOTO of a Cat").input_ids == ref
    assert tok("  a   photo\tof a\n cat ").input_ids == ref


def test_padding_and_truncation(tok: CLIPTokenizer) -> None:
    enc = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True)
    assert len(enc.input_ids) == 77
    assert enc.input_ids[:7] == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert enc.input_ids[7:] == [EOS] * 70
    assert sum(enc.attention_mask) == 7
    long = tok(" ".join(["cat"] * 100), padding="max_length", max_length=77, truncation=True)
    assert len(long.input_ids) == 77
    assert long.input_ids[0] == BOS and long.input_ids[-1] == EOS
    assert long.input_ids[1:-1] == [2368] * 75


def test_each_call_returns_new_tokenizer() -> None:
    a = build_clip_tokenizer()
    b = build_clip_tokenizer()
    assert a is not b
    assert a.add_tokens(["<cat-toy>"]) == 1
    assert a("a <cat-toy>").input_ids == [BOS, 320, VOCAB_SIZE, EOS]
    assert len(b) == VOCAB_SIZE
    assert len(build_clip_tokenizer()) == VOCAB_SIZE
    assert build_clip_tokenizer(model_max_length=32).model_max_length == 32


def test_save_and_reload(tmp_path, tok: CLIPTokenizer) -> None:
    folder = save_clip_tokenizer(tmp_path / "tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (folder / name).is_file(), name
    prompts = ["a photo of a cat", "A Photo, of a DOG!", "café 123 🙂", "it's a dog's life"]
    expected = [tok(p).input_ids for p in prompts]
    for cls in (CLIPTokenizer, AutoTokenizer):
        loaded = cls.from_pretrained(str(folder), local_files_only=True)
        assert isinstance(loaded, CLIPTokenizer)
        assert len(loaded) == VOCAB_SIZE
        assert loaded.model_max_length == 77
        assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (BOS, EOS, EOS)
        assert [loaded(p).input_ids for p in prompts] == expected


def test_vocab_and_merges_alone_load(tmp_path, tok: CLIPTokenizer) -> None:
    # Readers that ignore tokenizer.json rebuild the same tokenizer from vocab.json + merges.txt.
    folder = save_clip_tokenizer(tmp_path / "tokenizer")
    (folder / "tokenizer.json").unlink()
    loaded = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert loaded("a photo, of a cat!").input_ids == tok("a photo, of a cat!").input_ids
    assert len(loaded) == VOCAB_SIZE
