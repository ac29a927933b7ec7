"""The Lightning layer: :class:`GSMModule`, its metrics and callbacks.  The only package part (with ``data`` and
``cli``) that imports Lightning."""
