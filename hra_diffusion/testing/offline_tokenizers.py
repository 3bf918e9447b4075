"""The text tokenizers of the tiny pipelines, rebuilt offline from a file open_clip ships.

CLIP's is the real one: OpenAI's BPE, ids equal to open_clip's. T5's SentencePiece model ships with no installed
package, so `t5_tokenizer` makes a stand-in with T5's layout: a Unigram model over the CLIP vocabulary's pieces
(word-final BPE pieces become SentencePiece's word-initial "▁" pieces), every printable ASCII character as a
fallback, `<pad>`=0, `</s>`=1, `<unk>`=2, 32,100 ids with the sentinels `<extra_id_99>`..`<extra_id_0>` last, and
transformers' own T5 pipeline (Metaspace, "$A </s>"). T5's normalizer is a binary SentencePiece charsmap that no
package ships; transformers keeps no other normalizer for T5, so this one has none (non-ASCII text maps to <unk>).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer, T5TokenizerFast

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # 48,894: what OpenAI CLIP (and SD1.5) use of the 262k-line BPE file
T5_PIECES = 32000  # T5's SentencePiece size; the 100 sentinels come on top (len 32,100, as google/t5-v1_1-*)
T5_EXTRA_IDS = 100


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable unicode map (same as CLIP / GPT-2)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[tuple[str, ...], dict[str, int]]:
    """(merges, vocab) of OpenAI CLIP, from open_clip's bundled `bpe_simple_vocab_16e6.txt.gz`."""
    spec = importlib.util.find_spec("open_clip")  # locate the package without importing it (and torchvision)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            'the CLIP vocabulary (bpe_simple_vocab_16e6) ships with open_clip: pip install "hra-studio[eval]"',
            name="open_clip",
        )
    bpe_path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = tuple(lines[1 : N_MERGES + 1])  # line 0 is a version header
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    return merges, vocab


def clip_tokenizer(out_dir: Path | None = None) -> CLIPTokenizer:
    """The SD1.5 CLIP tokenizer (ids equal to open_clip's). Writes vocab.json/merges.txt to `out_dir` if given."""
    merges, vocab = _clip_bpe()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(
            folder, model_max_length=77, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
        )
        if out_dir is not None:
            tokenizer.save_pretrained(folder)  # loadable by path with the same settings
        return tokenizer


@lru_cache(maxsize=1)
def _t5_pieces() -> tuple[tuple[str, float], ...]:
    """T5's (piece, log-probability) list: specials, single characters, then CLIP's longer pieces, Zipf-scored.

    CLIP numbers its merges by how common they are, so a rank-based score keeps whole common words ("▁photo")
    ahead of their parts; the single characters score below every longer piece: a fallback that keeps any ASCII
    text encodable.
    """
    chars, words = {"▁": None}, {}
    for token in _clip_bpe()[1]:
        text = token.removesuffix("</w>")
        if text.isascii() and text.isprintable() and token not in (BOS, EOS):
            (chars if len(text) == 1 else words)["▁" + text if token.endswith("</w>") else text] = None
    floor = -math.log(T5_PIECES + 2)
    scored = [(c, floor) for c in chars] + [(w, -math.log(rank + 2)) for rank, w in enumerate(words)]
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    return (("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *scored[: T5_PIECES - 3], *sentinels)


def t5_tokenizer(out_dir: Path | None = None) -> T5TokenizerFast:
    """A T5-layout tokenizer (see the module's docstring); saved to `out_dir` if given, where
    `T5TokenizerFast.from_pretrained` reads it back."""
    tokenizer = T5TokenizerFast(vocab=list(_t5_pieces()), extra_ids=T5_EXTRA_IDS, model_max_length=512)
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer
