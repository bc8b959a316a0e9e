"""Offline check of the GPU path on a machine without a GPU.

`jax.export(..., platforms=["cuda"])` only lowers the kernel to Triton IR;
Triton's own compiler (layouts, registers, shared memory) runs later, inside
XLA on a GPU. This tool goes one step further without a GPU: it captures the
Triton IR of every `grid_threshold_draw` variant and compiles it to a cubin
with a pip `triton` for sm_90, reporting ptxas's registers, spills and the
kernel's shared memory. Used to choose layout.TRITON_* and to catch IR
that Triton rejects.

Two steps, since the project's venv has no `triton` (and the compile step
needs no JAX):

  .venv/bin/python -m dynamo_jax.kernels.triton_offline dump --out /tmp/ttir
  python3 -m venv /tmp/tritonenv && /tmp/tritonenv/bin/pip install triton
  /tmp/tritonenv/bin/python dynamo_jax/kernels/triton_offline.py compile \\
      /tmp/ttir

`dump` hooks a private JAX function (the Pallas Triton lowering), so it may
need updating with JAX; the compile step reads Triton IR as text, which is
more stable across Triton versions than the bytecode JAX embeds.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

# (K, M, batch, greedy): the decode step's shapes (k = 50, n = 3) and the
# test shapes (k = 8).
VARIANTS = ((50, 2, 4, False), (50, 3, 4, False), (50, 3, 4, True),
            (8, 3, 4, False))


def dump(out_dir: str) -> list[str]:
  """Writes one .ttir (and .json with its launch options) per variant."""
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax._src.pallas.triton import (  # pylint: disable=import-outside-toplevel
      pallas_call_registration as registration)
  # pylint: disable-next=import-outside-toplevel
  from dynamo_jax.kernels import dynamo_grid, layout

  captured = []
  lower = registration.lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = lower(*args, **kwargs)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  os.makedirs(out_dir, exist_ok=True)
  paths = []
  registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    for k, m, b, greedy in VARIANTS:
      s = jax.ShapeDtypeStruct
      args = (s((b, m, k), jnp.float32), s((b,) + (k,) * m, jnp.float32),
              s((b, m, k), jnp.float32), s((b,), jnp.float32),
              s((), jnp.float32))
      fn = jax.jit(functools.partial(dynamo_grid.grid_threshold_draw,
                                     backend="triton", greedy=greedy))
      captured.clear()
      jax.export.export(fn, platforms=["cuda"], disabled_checks=[
          jax.export.DisabledSafetyCheck.custom_call(
              dynamo_grid.TRITON_CUSTOM_CALL)])(*args)
      name = f"k{k}_m{m}_{'greedy' if greedy else 'sample'}"
      path = os.path.join(out_dir, name + ".ttir")
      with open(path, "w") as f:
        f.write(captured[-1])
      with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump({"num_warps": layout.TRITON_NUM_WARPS,
                   "num_stages": layout.TRITON_NUM_STAGES,
                   "block_rows": layout.TRITON_BLOCK_ROWS,
                   "hist_entries": layout.TRITON_HIST_ENTRIES}, f)
      paths.append(path)
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = lower
  return paths


def compile_dir(in_dir: str, arch: int = 90) -> list[dict]:
  """Compiles every .ttir in `in_dir` for sm_`arch`; ptxas -v figures."""
  import triton  # pylint: disable=import-outside-toplevel
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel

  bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends",
                         "nvidia", "bin")
  # The Blackwell ptxas reads the newest PTX versions Triton emits.
  ptxas = next(p for p in (os.path.join(bin_dir, "ptxas-blackwell"),
                           os.path.join(bin_dir, "ptxas"))
               if os.path.exists(p))
  rows = []
  for path in sorted(glob.glob(os.path.join(in_dir, "*.ttir"))):
    with open(path[:-len(".ttir")] + ".json") as f:
      options = json.load(f)
    row = {"kernel": os.path.basename(path), **options}
    try:
      compiled = triton.compile(
          path, target=GPUTarget("cuda", arch, 32),
          options={"num_warps": options["num_warps"],
                   "num_stages": options["num_stages"]})
      ptx = path + ".ptx"
      with open(ptx, "w") as f:
        f.write(compiled.asm["ptx"])
      report = subprocess.run(
          [ptxas, "-v", f"--gpu-name=sm_{arch}a", ptx, "-o", os.devnull],
          capture_output=True, text=True, check=True).stderr
      row.update(ok=True, shared_bytes=compiled.metadata.shared,
                 ptxas=[line.split(":", 1)[-1].strip()
                        for line in report.splitlines()
                        if "registers" in line or "spill" in line])
    except Exception as e:  # pylint: disable=broad-except
      row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
    rows.append(row)
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("dump", help="write the Triton IR (project venv)")
  p.add_argument("--out", required=True)
  p = sub.add_parser("compile", help="compile it (a venv with triton)")
  p.add_argument("dir")
  p.add_argument("--arch", type=int, default=90)
  args = parser.parse_args(argv)
  if args.cmd == "dump":
    print(json.dumps(dump(args.out), indent=2))
  else:
    rows = compile_dir(args.dir, args.arch)
    print(json.dumps(rows, indent=2))
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
  main()
