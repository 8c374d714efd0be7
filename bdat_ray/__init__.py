"""bdat_ray: sweeps of adversarial training against backdoor-poisoned data.

The engine (`bdat_ray.engine.fit`) runs one poisoned-data training run and imports neither
Ray nor MLflow; `bdat_ray.sweep` runs many of them under Ray Tune with Optuna and MLflow.
"""

__version__ = "0.1.0"
