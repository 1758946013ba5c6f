"""Engine builders: turn an AMIR model into ahead-of-time engine files (installed as `medir_fast.export`)."""
