"""dualoptax: DualOptim+ and DualOptim for JAX, as composable optax transformations.

Unlearning trains on two objectives, FORGET and RETAIN, whose gradients often conflict.
DualOptim keeps a separate Adam state per objective; DualOptim+ keeps one shared base
state plus a per-objective delta, so objectives share momentum when they agree and are
kept apart when they conflict. See ``dualoptim_plus`` for the optimizer, ``MomentStorage``
for 8-bit states, the ``scale_by_*`` transforms to compose your own,
``dualoptim_plus_diagnostics`` for the conflict cosines of the paper's Figure 2,
``dualoptim_plus_conditioning`` for how often a delta cancels the base second moment (and
``denominator_floor`` to guard against it), ``state_shardings`` to place a state beside its
sharded parameters, ``multi_steps`` for gradient accumulation within one objective, and
``scale_by_lagrange_multiplier`` for primal-dual constrained unlearning (a retain-loss bound
whose multiplier acts as the retain learning-rate ratio).
``update`` takes the objective as ``objective=`` (an int, or an int32 array under ``jit``
and ``vmap``).
"""

from dualoptax._moments import MomentStorage
from dualoptax._record import hyperparameters
from dualoptax.alias import (
  adam,
  adamw,
  dualoptim,
  dualoptim_plus,
  multi_objective_dualoptim,
  multi_objective_dualoptim_plus,
)
from dualoptax.constrained import (
  LagrangeMultiplierState,
  constraint_metrics,
  lagrange_multiplier,
  scale_by_lagrange_multiplier,
)
from dualoptax.diagnostics import (
  ConditioningDiagnostics,
  ConflictDiagnostics,
  bytes_per_parameter,
  dualoptim_diagnostics,
  dualoptim_plus_conditioning,
  dualoptim_plus_diagnostics,
  find_state,
  state_nbytes,
)
from dualoptax.objectives import (
  FORGET,
  RETAIN,
  MultiStepsObjectiveState,
  multi_steps,
  scheduled_objective,
)
from dualoptax.quantization import QuantizedArray
from dualoptax.sharding import state_shardings
from dualoptax.transform import (
  ScaleByDualOptimPlusState,
  ScaleByDualOptimState,
  ScaleByObjectiveLearningRateState,
  scale_by_dualoptim,
  scale_by_dualoptim_plus,
  scale_by_objective_learning_rate,
)

__version__ = "0.1.0"

__all__ = [
  "FORGET",
  "RETAIN",
  "ConditioningDiagnostics",
  "ConflictDiagnostics",
  "LagrangeMultiplierState",
  "MomentStorage",
  "MultiStepsObjectiveState",
  "QuantizedArray",
  "ScaleByDualOptimPlusState",
  "ScaleByDualOptimState",
  "ScaleByObjectiveLearningRateState",
  "adam",
  "adamw",
  "bytes_per_parameter",
  "constraint_metrics",
  "dualoptim",
  "dualoptim_diagnostics",
  "dualoptim_plus",
  "dualoptim_plus_conditioning",
  "dualoptim_plus_diagnostics",
  "find_state",
  "hyperparameters",
  "lagrange_multiplier",
  "multi_objective_dualoptim",
  "multi_objective_dualoptim_plus",
  "multi_steps",
  "scale_by_lagrange_multiplier",
  "scale_by_dualoptim",
  "scale_by_dualoptim_plus",
  "scale_by_objective_learning_rate",
  "scheduled_objective",
  "state_nbytes",
  "state_shardings",
]
