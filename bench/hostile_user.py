"""The hostile-user findings of the robustness issue, reproduced against whichever ``annlib`` is
first on the path: ``python bench/hostile_user.py`` for this tree, or with ``PYTHONPATH`` pointing
at an older checkout's package to see the old behaviour. Prints one line per finding, FIXED or
BROKEN with what happened. Crashing cases run in subprocesses, so a segfault is reported, not
suffered. See docs/robustness.md."""
import os, sys, json, threading, tempfile, subprocess, struct, zlib, traceback
import numpy as np
import annlib

out = {}
def rec(item, ok, detail=""):
    out[item] = ("FIXED" if ok else "BROKEN") + (f": {detail}" if detail else "")

rng = np.random.default_rng(0)
X = rng.normal(size=(3000, 16)).astype(np.float32)
Q = rng.normal(size=(20, 16)).astype(np.float32)

def build(fam, X, **kw):
    extra = {"default_recall": None} if fam in ("hnsw", "partitioned") and "default_recall" in getattr(annlib.get_family(fam), "build_defaults", {}) else {}
    return annlib.Index.build(X, method=fam, **extra, **kw)

# 2. concurrent add with ids
try:
    bad = []
    for fam in ("bruteforce", "hnsw", "partitioned"):
        idx = build(fam, X[:1000], ids=np.arange(1000))
        errs = []
        def add(lo):
            try: idx.add(X[lo:lo+200], ids=np.arange(lo, lo+200))
            except Exception as e: errs.append(repr(e))
        ts = [threading.Thread(target=add, args=(lo,)) for lo in (1000, 1200)]
        [t.start() for t in ts]; [t.join() for t in ts]
        try:
            r = idx.search(X[1000:1400], 1)
            if len(idx) != 1400 or (r.ids[:, 0] != np.arange(1000, 1400)).mean() > 0.05: bad.append(f"{fam}: len {len(idx)}")
        except Exception as e:
            bad.append(f"{fam}: {type(e).__name__}")
    rec("2 concurrent add(ids)", not bad, "; ".join(bad))
except Exception as e:
    rec("2 concurrent add(ids)", False, repr(e))

# 4. aliasing / writing caller's array
bad = []
for fam in ("bruteforce", "hnsw", "partitioned"):
    Xc = X.copy()
    ro = Xc.copy(); ro.setflags(write=False)
    try:
        build(fam, ro)
    except Exception as e:
        bad.append(f"{fam} read-only: {type(e).__name__}")
    idx = build(fam, Xc)
    before = idx.search(Q, 5).ids.copy()
    Xc[:] = 0
    after = idx.search(Q, 5).ids
    if not np.array_equal(before, after): bad.append(f"{fam} aliased")
rec("4 caller's array aliased/written", not bad, "; ".join(bad))

# 5. magnitudes
bad = []
for fam in ("bruteforce", "partitioned"):
    try:
        r = build(fam, X * 1e20).search(Q * 1e20, 5)
        if (r.ids < 0).any() or not np.isfinite(r.distances).all(): bad.append(f"{fam} l2 1e20: -1/inf rows")
    except ValueError as e:
        if "at most" not in str(e): bad.append(f"{fam} l2 1e20: {e}")
    except Exception as e:
        bad.append(f"{fam} l2 1e20: {type(e).__name__}")
for scale in (1e30, 1e-25):
    r = build("bruteforce", X * scale, metric="cosine").search(Q * scale, 5)
    if not ((r.distances >= -1e-5) & (r.distances <= 2 + 1e-5)).all() or np.allclose(r.distances, 1.0):
        bad.append(f"cosine {scale:g}: distances {float(r.distances.min()):.3g}..{float(r.distances.max()):.3g}")
rec("5 magnitudes", not bad, "; ".join(bad))

# 6. Partitioned padding with large k
p = build("partitioned", X[:300])
r = p.search(Q, 300)
p40 = build("partitioned", X[:40])
r40 = p40.search(Q, 10)
rec("6 Partitioned -1 padding", not ((r.ids < 0).any() or (r40.ids < 0).any()),
    f"k=n=300: {(r.ids < 0).mean():.0%} padded; n=40,k=10: {(r40.ids < 0).mean():.0%}")

# 7. empty inputs and files
bad = []
b = build("bruteforce", X[:100])
try:
    rr = b.search(Q, 3, filter=[])
    if not (rr.ids == -1).all(): bad.append("filter=[] rows not empty")
except Exception as e: bad.append(f"filter=[]: {type(e).__name__}")
h = build("hnsw", X[:500])
try: h.delete([])
except Exception as e: bad.append(f"delete([]): {type(e).__name__}")
h.delete([3])
try:
    h.delete([3]); bad.append("delete twice: silent")
except ValueError: pass
d = tempfile.mkdtemp()
try: annlib.load(d); bad.append("load(dir) accepted")
except annlib.IndexFormatError: pass
except Exception as e: bad.append(f"load(dir): {type(e).__name__}")
try: b.save(""); bad.append("save('') accepted")
except ValueError: pass
except Exception as e: bad.append(f"save(''): {type(e).__name__}")
rec("7 empty inputs / files", not bad, "; ".join(bad))

# 8. messages
bad = []
f = os.path.join(d, "x.annlib")
with open(f, "wb") as fh: fh.write(b"ANNLIB\x00\x01" + os.urandom(200))
try: annlib.load(f)
except Exception as e:
    if "version 3" in str(e) or "version" in str(e) and "format version field" not in str(e) and "corrupt" not in str(e): bad.append(f"garbage: {e}")
try:
    build("bruteforce", X[:10], ids=np.array([2**64 - 1] + list(range(9)), dtype=np.uint64)); bad.append("uint64 accepted")
except (TypeError, ValueError) as e:
    if "2**63" not in str(e) and "range" not in str(e): bad.append(f"uint64: {e}")
try: annlib.Index().build(X)
except NotImplementedError as e: bad.append(f"Index().build: NotImplementedError({e})")
except TypeError: pass
rec("8 messages", not bad, "; ".join(bad))

# 3. valid-checksum structural corruption (neighbour id out of range) in a subprocess
h = build("hnsw", X[:500])
f = os.path.join(d, "h.annlib"); h.save(f)
raw = bytearray(open(f, "rb").read())
hlen = struct.unpack("<I", raw[12:16])[0]
header = json.loads(raw[24:24 + hlen])
payload = (24 + hlen + 63) // 64 * 64
name = next(e for e in header["arrays"] if "links" in e["name"] and "0" in e["name"])
off = payload + name["offset"]
arr = np.frombuffer(raw, dtype=np.dtype(name["dtype"]), count=int(np.prod(name["shape"])), offset=off).copy().reshape(name["shape"])
arr[:, 1:] = 10**6
raw[off:off + arr.nbytes] = arr.tobytes()
name["crc32"] = zlib.crc32(arr.tobytes()) & 0xFFFFFFFF
hb = json.dumps(header, sort_keys=True).encode()
if len(hb) == hlen:
    raw[24:24 + hlen] = hb
    raw[16:20] = struct.pack("<I", zlib.crc32(hb) & 0xFFFFFFFF)
    open(f, "wb").write(bytes(raw))
    code = ("import annlib, numpy as np\ntry:\n    i = annlib.load(%r)\nexcept annlib.IndexFormatError as e:\n    print('refused', e); raise SystemExit(0)\n"
            "r = i.search(np.ones((3,16), np.float32), 5); print('loaded', r.ids[0])" % f)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    rec("3 valid-checksum corrupt file", p.returncode == 0 and "refused" in p.stdout,
        f"exit {p.returncode}: {(p.stdout + p.stderr).strip().splitlines()[-1][:120] if (p.stdout + p.stderr).strip() else ''}")
else:
    rec("3 valid-checksum corrupt file", False, "header length changed; not tested")

# 1. HNSW search during add, in a subprocess (a crash must not kill this script)
code = r'''
import threading, numpy as np, annlib
X = np.random.default_rng(1).normal(size=(20000, 16)).astype(np.float32)
kw = {"default_recall": None} if "default_recall" in annlib.HNSW.build_defaults else {}
h = annlib.HNSW.build(X[:2000], M=8, ef_construction=32, **kw)
stop = False; errors = []
def searcher():
    while not stop:
        try:
            r = h.search(X[:50], 5)
            if (r.ids >= len(h) + 500).any(): errors.append("bad id")
        except Exception as e:
            errors.append(type(e).__name__)
ts = [threading.Thread(target=searcher) for _ in range(3)]
[t.start() for t in ts]
for lo in range(2000, 20000, 300):
    h.add(X[lo:lo+300])
stop = True; [t.join() for t in ts]
print("errors", sorted(set(errors))[:5], len(errors))
'''
p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
rec("1 HNSW search during add", p.returncode == 0 and "errors [] 0" in p.stdout, f"exit {p.returncode}: {tail[0][:120]}")

for k in sorted(out): print(f"{k}: {out[k]}")
