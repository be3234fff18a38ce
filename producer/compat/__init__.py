"""The PySyft-style conveniences (hook, send, modules and datasets on devices)."""
