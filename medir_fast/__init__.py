"""medir-fast: fast inference for AMIR, the all-in-one medical image restoration network.

    model = medir_fast.load_model()                      # shipped default weights
    restorer = medir_fast.Restorer(model, "ct_denoise")
    restored_hu = restorer.restore_volume(volume_hu, axis=2)
    medir_fast.restore_file("scan.nii.gz", "restored.nii.gz", "ct_denoise")
"""

from .api import load_model, restore_file
from .model import AMIR
from .restorer import Restorer
from .tasks import TASKS, Task, get_task

__version__ = "0.1.0"

__all__ = ["AMIR", "Restorer", "TASKS", "Task", "get_task", "load_model", "restore_file", "__version__"]
