"""rkbench's Ray launcher for Hydra (`hydra/launcher=ray`, conf/hydra/launcher/ray.yaml); the work is in
rkbench/farm.py. Hydra imports every module under hydra_plugins at start-up, so nothing here imports Ray."""
