"""medir-fast: fast inference for AMIR, the all-in-one medical image restoration network.

    model = medir_fast.load_model()                      # shipped default weights
    restorer = medir_fast.Restorer(model, "ct_denoise")
    restored_hu = restorer.restore_volume(volume_hu, axis=2)
    medir_fast.restore_file("scan.nii.gz", "restored.nii.gz", "ct_denoise")

The names below are imported on first use, so that `medir-fast` can set up its signal handling
before PyTorch loads (seconds in which a SIGTERM would otherwise end it without cleanup).
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {"AMIR": "model", "Restorer": "restorer", "TASKS": "tasks", "Task": "tasks", "get_task": "tasks",
            "load_model": "api", "restore_file": "api"}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
