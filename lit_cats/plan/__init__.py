"""Planning a run before it loads: predicted GPU memory, steps and time, and ``compile: auto``.

:mod:`~lit_cats.plan.memory` is the memory model (pure, from the architecture);
:mod:`~lit_cats.plan.calibration` reads measured step times per GPU (``calibration.yaml``);
:mod:`~lit_cats.plan.planner` turns a parsed config into a :class:`Plan`;
:mod:`~lit_cats.plan.command` is ``lit-cats plan`` and the check ``fit`` runs at start.
"""

from lit_cats.plan.planner import Plan, PlanSettings

__all__ = ["Plan", "PlanSettings"]
