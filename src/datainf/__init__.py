"""datainf: which training examples made my fine-tuned model do this?

Sign convention (the paper's eq. 2), identical for every method:
``score[k, j] = - sum_l g_{j,l}^T (H_l + lambda_l I)^{-1} g_{k,l}`` is the first-order change of query j's
loss when training example k is up-weighted. Positive = harmful (raises the query's loss),
negative = helpful.
"""

from datainf.attributor import Attributor
from datainf.errors import DataInfError
from datainf.estimators import ALL_METHODS, METHODS, default_damping, influence, self_influence
from datainf.gradients import per_example_gradients, tracked_parameters
from datainf.store import GradientStore

__version__ = "0.1.0"

__all__ = [
    "ALL_METHODS",
    "METHODS",
    "Attributor",
    "DataInfError",
    "GradientStore",
    "__version__",
    "default_damping",
    "influence",
    "per_example_gradients",
    "self_influence",
    "tracked_parameters",
]
