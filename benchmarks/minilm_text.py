"""English text for MiniLM calibration and evaluation, shared by the benchmarks.

Real prose available offline (Python's documentation topics and the system
licence texts), split into sentences and tokenised with the exporter's
WordPiece tokenizer (``tools/export_minilm.py``) into
``.cache/minilm/text_{seq_len}.npz`` on first use.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MINILM = ROOT / ".cache" / "minilm"


def english_sentences() -> list[str]:
    """Real English prose available offline: Python's own documentation topics and the system licence texts."""
    import pydoc_data.topics as topics

    texts = list(topics.topics.values())
    licences = Path("/usr/share/common-licenses")
    if licences.is_dir():
        texts += [f.read_text(errors="ignore") for f in sorted(licences.iterdir()) if f.is_file()]
    found: set[str] = set()
    for text in texts:
        for para in re.split(r"\n\s*\n", text):
            for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(para.split())):
                if not 6 <= len(sent.split()) <= 40 or not sent[0].isupper() or sent[-1] not in ".!?":
                    continue
                if re.search(r"[=<>{}\[\]_*#|\\]|::|\(\)|\w\.\w", sent):  # code, markup, dotted names
                    continue
                if sum(c.isalpha() or c in " ,.'-;:!?\"()" for c in sent) >= 0.97 * len(sent):
                    found.add(sent)
    return sorted(found)


def text_calibration(seq_len: int = 64) -> Path:
    """``.cache/minilm/text.npz``: the sentences above tokenised for MiniLM (built once, shuffled with seed 0)."""
    path = MINILM / f"text_{seq_len}.npz"
    if not path.is_file():
        sys.path.insert(0, str(ROOT / "tools"))
        from export_minilm import WordPieceTokenizer

        sentences = english_sentences()
        np.random.default_rng(0).shuffle(sentences)
        ids, mask = WordPieceTokenizer(MINILM / "vocab.txt").batch(sentences, seq_len)
        np.savez(path, input_ids=ids, attention_mask=mask)
    return path
