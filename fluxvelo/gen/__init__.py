"""Generative modelling with Flux Matching: models, data, losses, samplers, training loop, metrics and CLI.

>>> import fluxvelo as fv
>>> train, held_out, _ = fv.gen.load_dataset("triangle")
>>> model = fv.gen.MLPField(2)
>>> trainer = fv.gen.Trainer(model, train, fv.gen.TrainConfig(objective="flux", sigma=0.45, n_steps=500)).fit()
>>> samples = fv.gen.langevin(trainer.ema.model, 1000, shape=(2,), sigma=0.45, n_steps=400, init_std=3.0)
"""

from ._data import (
    Springs,
    Standardiser,
    load_dataset,
    load_digits,
    load_images,
    moons,
    ring,
    simulate_springs,
    spirals,
    toy_data,
    triangle_mixture,
)
from ._losses import (
    BlockField,
    FluxTerms,
    LossTerms,
    annealed_dsm_loss,
    annealed_flux_loss,
    dsm_loss,
    flux_loss,
    flux_or_dsm,
)
from ._metrics import (
    DigitClassifier,
    classifier_frechet_distance,
    mmd,
    recognisability,
    sliced_wasserstein,
    stationarity_test,
    train_digit_classifier,
    wasserstein,
)
from ._mixing import energy_distance, mixing_regulariser
from ._models import (
    MLPField,
    RotationalField,
    SigmaEmbedding,
    TrajectoryTransformer,
    UNetField,
    build_model,
    seeded_init,
)
from ._plots import plot_field, plot_images, plot_points, plot_trajectories
from ._proposal import LossNormaliser, TimeProposal
from ._sampling import annealed_langevin, langevin, langevin_step, predictor_corrector, sigma_schedule
from ._train import EMA, TrainConfig, Trainer, load_checkpoint

__all__ = [
    "BlockField",
    "DigitClassifier",
    "EMA",
    "FluxTerms",
    "LossNormaliser",
    "LossTerms",
    "MLPField",
    "RotationalField",
    "SigmaEmbedding",
    "Springs",
    "Standardiser",
    "TimeProposal",
    "TrainConfig",
    "Trainer",
    "TrajectoryTransformer",
    "UNetField",
    "annealed_dsm_loss",
    "annealed_flux_loss",
    "annealed_langevin",
    "build_model",
    "classifier_frechet_distance",
    "dsm_loss",
    "energy_distance",
    "flux_loss",
    "flux_or_dsm",
    "langevin",
    "langevin_step",
    "load_checkpoint",
    "load_dataset",
    "load_digits",
    "load_images",
    "mixing_regulariser",
    "mmd",
    "moons",
    "plot_field",
    "plot_images",
    "plot_points",
    "plot_trajectories",
    "predictor_corrector",
    "recognisability",
    "ring",
    "seeded_init",
    "sigma_schedule",
    "simulate_springs",
    "sliced_wasserstein",
    "spirals",
    "stationarity_test",
    "toy_data",
    "train_digit_classifier",
    "triangle_mixture",
    "wasserstein",
]
