"""Running a frozen structure fast: compact kernels (:class:`CompactGBLR`), their layouts and cost model,
:func:`optimize_inference`, and FLOP counting under ``FlopCounterMode``.  Plain PyTorch; imports only
:mod:`gsm_lightning.core`."""
