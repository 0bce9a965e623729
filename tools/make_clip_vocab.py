"""Derive the CLIP tokenizer files shipped in ``library/text/clip_tokenizer/``.

The openai CLIP BPE table ``bpe_simple_vocab_16e6.txt.gz`` is public and ships inside PyPI
packages such as ``clip-anytorch`` (in ``clip/``). We turn it into the ``vocab.json`` +
``merges.txt`` pair that ``transformers.CLIPTokenizer`` reads, so no tokenizer is ever fetched
from the Hugging Face hub. How it was made::

    pip download --no-deps clip-anytorch==2.6.0 -d /tmp/clip && unzip -o /tmp/clip/*.whl -d /tmp/clip
    python tools/make_clip_vocab.py /tmp/clip/clip/bpe_simple_vocab_16e6.txt.gz

The vocabulary order follows CLIP's own tokenizer: the 256 byte symbols, the same with the
end-of-word marker ``</w>``, one entry per merge, then the two special tokens; 49,408 in all.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "library" / "clip_tokenizer"
NUM_MERGES = 49152 - 256 - 2


def byte_symbols() -> list[str]:
    """The printable stand-in character for each of the 256 byte values, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()

    lines = gzip.open(args.bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408, len(tokens)

    args.out.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (args.out / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
