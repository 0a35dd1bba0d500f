"""Byte budgets: `PackConfig(budget=f)` chooses each layer's encoding of the prompt within f x DynamicCache bytes.

`knapsack.allocate` picks one option per group (layer x keys/values) minimizing the total error within a byte
limit; `planner.BudgetPlanner` proposes the candidates during a prefill and installs the choice.
"""

from .candidates import candidate_config
from .knapsack import Allocation, BudgetError, Option, allocate
from .planner import BudgetPlanner

__all__ = ["Allocation", "BudgetError", "BudgetPlanner", "Option", "allocate", "candidate_config"]
