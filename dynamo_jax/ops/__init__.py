"""Pure jnp array math shared by `decoding` and `kernels`.

A leaf package: it imports neither. `grid` holds one DynaMo order's grid
steps and the one-order reference of the Pallas kernel.
"""
