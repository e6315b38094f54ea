"""raylab: adversarial training with diffusion-generated data on Ray, tracked in MLflow."""
import os

__version__ = "0.1.0"

# Ray's driver merges worker lines that differ only in words holding digits ("[repeated 2x across cluster]"), so
# with a sweep's trials side by side `[steps=2] epoch 3/12 ...` vanished into `[steps=8] epoch 3/12 ...`. A line
# carrying a trial's label is always printed. Ray reads this once, when it is first imported: hence here, before any
# raylab module can import it.
os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"^\[[^\]\s]+=[^\]\s]*\] ")
