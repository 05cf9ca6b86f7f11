"""`hydra/launcher=ray`: a Hydra Launcher on Ray (rkbench/farm.py does the scheduling).

Built on Ray directly rather than hydra-ray-launcher 1.2.2: that plugin gives every job the same
ray.remote options (a board job needs `board:<its platform>`), gathers results with one ray.get per job
in submission order (no drain-and-retry of a board that drops), and pins cloudpickle<3 (rkbench's
environment has 3.x) and ray[default] with boto3 for its AWS launcher."""

from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class RayLauncher(Launcher):
    def __init__(self, **opts: Any) -> None:
        from rkbench.farm import RayOptions   # imported here: Hydra loads this module on every start

        self.opts = RayOptions(**opts)
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from rkbench import farm

        return farm.launch(self, job_overrides, initial_job_idx)
