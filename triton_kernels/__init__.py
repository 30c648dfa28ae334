"""Triton kernels of decodekit (import name ``decodekit.kernels``).

One op per module, kernel and launcher together: ``process`` (launch 1 of a step: bias,
masks, penalties, temperature, per-chunk statistics; also the window rows of speculative
decoding), ``select`` (launch 2: thresholds, draw, commit; or the processed
distribution), ``accept`` (commit tokens chosen elsewhere) and ``verify`` (exact batched
speculative verification). ``layout`` holds the constants the kernels share with
``decodekit.sampling.slot_state``; ``launch`` sizes every launch.

This package imports nothing eagerly: ``layout`` and ``launch`` work without Triton, the
kernel modules import it when they are imported. Kernels import nothing from the rest of
decodekit; the torch reference of every op is ``decodekit.sampling.reference``.
"""
