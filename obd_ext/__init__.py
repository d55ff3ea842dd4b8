from . import _C  # noqa: F401  registers torch.ops.obd_ext
