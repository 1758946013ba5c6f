"""The AMIR network (official semantics and key names) and checkpoint loading."""

from .amir import AMIR
from .checkpoint import DEFAULT_CONFIG, CheckpointError, build_model, deepen, infer_config, read_state_dict, unwrap_state_dict

__all__ = ["AMIR", "DEFAULT_CONFIG", "CheckpointError", "build_model", "deepen", "infer_config", "read_state_dict", "unwrap_state_dict"]
