"""python -m fastsnn.train: distil an ANN teacher into a spiking student with the TSER loss.

With no arguments it runs the whole job on scikit-learn's bundled 8×8 digits on the CPU: a small ANN
teacher (trained once and cached), then a spiking student distilled with TSER. `--ann` trains a teacher
with the same program; its checkpoint is a valid --teacher-weights. `--config run.yaml` reads settings
from a file (a run folder's config.yaml works). Many GPUs: torchrun. The program itself lives in
:mod:`fastsnn.training`.
"""
import sys

from .training import DEFAULTS, TrainConfig, main  # noqa: F401  (the public names of the entry point)

if __name__ == "__main__":
    sys.exit(main())
