"""The training program as a library: a typed configuration (:mod:`.config`), the setup (:mod:`.setup`),
the state and checkpoint keys (:mod:`.state`), the run folder's reports (:mod:`.report`), the loop
(:mod:`.loop`), the teacher (:mod:`.teacher`) and one run (:mod:`.run`); each imports only those before it.
``python -m fastsnn.train`` and ``python -m fastsnn.evaluate`` are thin entry points over these."""
from .config import DEFAULTS, METHODS, TrainConfig, UsageError, build_parser, parse, resolve, validate
from .loop import TooManyBadSteps, compute_loss, evaluate
from .run import main, prepare, run
from .state import TrainState

__all__ = ["DEFAULTS", "METHODS", "TrainConfig", "TrainState", "TooManyBadSteps", "UsageError", "build_parser",
           "compute_loss", "evaluate", "main", "parse", "prepare", "resolve", "run", "validate"]
