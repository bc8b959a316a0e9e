"""Peak host memory of converting a pythia-410m-shaped HF checkpoint.

Target: the streamed HF -> native conversion (`python -m dynamo_jax convert`)
peaks at <= 1.3x the checkpoint's size on disk.

How it is measured:
  1. A random pythia-410m-shaped HF checkpoint (config.json + one float32
     model.safetensors, ~1.6 GB) is written to a temp dir under /tmp, tensor
     by tensor with `dynamo_jax.fileio.write_safetensors`, without torch and
     without holding the whole model in memory.
  2. Each measurement runs in its own fresh subprocess; its peak RSS
     (ru_maxrss, KiB on Linux) is read from the kernel's rusage for that child
     after it exits:
       python_floor   `python -c pass`, the interpreter alone
       baseline       `import jax, dynamo_jax`
       cli_convert    `python -m dynamo_jax convert SRC OUT` (streamed)
       from_hf        `dynamo_jax.from_hf(SRC)` (holds all params, so ~1x
                      is expected from the params alone)
  3. Each peak is reported in MiB and as a ratio to the checkpoint's size on
     disk, alone and minus the baseline.

This parent process imports only the standard library and does the heavy
work (writing the checkpoint) in a subprocess too: on Linux, exec records
the pre-exec address space's RSS high-water mark into the child's ru_maxrss,
so a large parent would inflate every child's figure. We read each child's
own rusage with os.wait4 rather than getrusage(RUSAGE_CHILDREN), because the
latter is the maximum over all children reaped so far, so a later small run
would report an earlier large one.

Prints one JSON object to stdout. Run from the repo root:

  .venv/bin/python experiments/bench_convert_memory.py
  .venv/bin/python experiments/bench_convert_memory.py --model pythia-160m
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_RATIO = 1.3
MIB = 1024 ** 2


# ---- child-side work (runs in subprocesses) -------------------------------

def write_random_checkpoint(model: str, out_dir: str, seed: int) -> None:
  """Writes config.json and model.safetensors, one random tensor at a time."""
  # pylint: disable=import-outside-toplevel
  import numpy as np
  from dynamo_jax.convert.hf import layout
  from dynamo_jax.fileio import write_safetensors
  from dynamo_jax.model.config import PRESETS

  config = PRESETS[model]
  os.makedirs(out_dir)
  with open(os.path.join(out_dir, "config.json"), "w") as fh:
    json.dump(config.to_hf_config(), fh, indent=2)
  tensors = layout(config)
  specs = {t.hf_name: (t.hf_shape, np.dtype(np.float32)) for t in tensors}
  rng = np.random.default_rng(seed)

  def arrays():
    for t in tensors:
      a = rng.standard_normal(t.hf_shape, dtype=np.float32)
      a *= 0.02  # in place: no second copy of the largest tensor
      yield t.hf_name, a

  write_safetensors(os.path.join(out_dir, "model.safetensors"), specs,
                    arrays(), {"format": "pt"})


def load_from_hf(src: str) -> None:
  import dynamo_jax  # pylint: disable=import-outside-toplevel
  _, params = dynamo_jax.from_hf(src)
  # Make sure every transfer has landed before the process exits.
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(params)


# ---- parent-side measurement ---------------------------------------------

def run_measured(cmd: list[str], log_path: str) -> dict:
  """Runs cmd in a fresh process; returns its peak RSS, wall time and status."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  with open(log_path, "wb") as log:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)  # Popen did not reap it
  result = {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "wall_s": round(seconds, 2), "returncode": proc.returncode}
  if proc.returncode != 0:
    with open(log_path, "rb") as fh:
      result["log_tail"] = fh.read()[-2000:].decode(errors="replace")
  return result


def _self(*args: str) -> list[str]:
  return [sys.executable, os.path.abspath(__file__), *args]


def _dir_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(directory, f))
             for f in os.listdir(directory))


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def measure(model: str, seed: int, keep: bool) -> dict:
  tmp = tempfile.mkdtemp(prefix="bench_convert_", dir="/tmp")
  try:
    src = os.path.join(tmp, "hf")
    log = lambda name: os.path.join(tmp, name + ".log")  # noqa: E731
    made = run_measured(_self("--_write-checkpoint", src, "--model", model,
                              "--seed", str(seed)), log("write"))
    if made["returncode"] != 0:
      raise RuntimeError(f"writing the checkpoint failed: {made}")
    ckpt_bytes = _dir_bytes(src)
    ckpt_mib = ckpt_bytes / MIB

    runs = {
        "python_floor": [sys.executable, "-c", "pass"],
        "baseline": [sys.executable, "-c", "import jax, dynamo_jax"],
        "baseline_with_backend": [
            sys.executable, "-c",
            "import jax, dynamo_jax; jax.device_put(0).block_until_ready()"],
        "cli_convert": [sys.executable, "-m", "dynamo_jax", "convert", src,
                        os.path.join(tmp, "native")],
        "from_hf": _self("--_from-hf", src),
    }
    results = {name: run_measured(cmd, log(name)) for name, cmd in runs.items()}
    base = results["baseline"]["peak_rss_mib"]
    for name, r in results.items():
      r["ratio_to_checkpoint"] = round(r["peak_rss_mib"] / ckpt_mib, 3)
      r["ratio_above_baseline"] = round((r["peak_rss_mib"] - base) / ckpt_mib, 3)
    results["cli_convert"]["command"] = "python -m dynamo_jax convert SRC OUT"
    results["from_hf"]["command"] = "dynamo_jax.from_hf(SRC)"
    native_dir = os.path.join(tmp, "native")
    if os.path.isdir(native_dir):
      results["cli_convert"]["output_bytes"] = _dir_bytes(native_dir)
    cli = results["cli_convert"]
    return {
        "benchmark": "convert_peak_host_memory",
        "model": model,
        "checkpoint": {"bytes": ckpt_bytes, "mib": round(ckpt_mib, 1),
                       "dtype": "float32", "files": sorted(os.listdir(src)),
                       "write_s": made["wall_s"],
                       "writer_peak_rss_mib": made["peak_rss_mib"]},
        "target_ratio": TARGET_RATIO,
        "cli_convert_meets_target": (cli["returncode"] == 0 and
                                     cli["ratio_to_checkpoint"] <= TARGET_RATIO),
        "runs": results,
        "rss_source": "os.wait4 rusage of each child (ru_maxrss, KiB)",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "jax": _version("jax"), "numpy": _version("numpy"),
        },
        "kept_dir": tmp if keep else None,
    }
  finally:
    if not keep:
      shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="pythia-410m")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--keep", action="store_true",
                      help="keep the temp dir (checkpoints and logs)")
  # Internal: the subprocess entry points.
  parser.add_argument("--_write-checkpoint", dest="write_dir",
                      help=argparse.SUPPRESS)
  parser.add_argument("--_from-hf", dest="from_hf_dir", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.write_dir:
    write_random_checkpoint(args.model, args.write_dir, args.seed)
  elif args.from_hf_dir:
    load_from_hf(args.from_hf_dir)
  else:
    print(json.dumps(measure(args.model, args.seed, args.keep), indent=2))


if __name__ == "__main__":
  main()
